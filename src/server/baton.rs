//! A connection's request reader, passed between its two reader threads. The one holding
//! it reads; to run a request itself, it passes the reader on first, so requests that
//! arrive meanwhile, and the client's leaving, are still read however long the disk takes.
//! The request runs without a worker to wake, and the other thread's wakeup is off its path.

use std::sync::{Condvar, Mutex};

enum Hand<T> {
    Free(T),
    Held,
    Ended,
}

pub struct Baton<T> {
    hand: Mutex<Hand<T>>,
    turn: Condvar,
}

impl<T> Baton<T> {
    pub fn new(value: T) -> Baton<T> {
        Baton {
            hand: Mutex::new(Hand::Free(value)),
            turn: Condvar::new(),
        }
    }

    /// Waits until the value is free and takes it; `None` once [`end`](Self::end) was called.
    pub fn take(&self) -> Option<T> {
        let mut hand = self.hand.lock().unwrap();
        loop {
            match std::mem::replace(&mut *hand, Hand::Held) {
                Hand::Free(value) => return Some(value),
                Hand::Held => hand = self.turn.wait(hand).unwrap(),
                Hand::Ended => {
                    *hand = Hand::Ended;
                    return None;
                }
            }
        }
    }

    /// Gives the value back for a waiting [`take`](Self::take); dropped if ended meanwhile.
    pub fn put(&self, value: T) {
        let mut hand = self.hand.lock().unwrap();
        if !matches!(*hand, Hand::Ended) {
            *hand = Hand::Free(value);
            self.turn.notify_one();
        }
    }

    /// Ends the turns: every [`take`](Self::take), waiting or to come, returns `None`.
    pub fn end(&self) {
        *self.hand.lock().unwrap() = Hand::Ended;
        self.turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_put_wakes_the_waiting_taker() {
        let baton = Arc::new(Baton::new(1));
        let first = baton.take().unwrap();
        let other = baton.clone();
        let waiter = std::thread::spawn(move || other.take());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "took a value that was held");
        baton.put(first + 1);
        assert_eq!(waiter.join().unwrap(), Some(2));
    }

    #[test]
    fn an_end_wakes_every_waiter_and_refuses_later_takes() {
        let baton = Arc::new(Baton::new(7));
        let held = baton.take().unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let b = baton.clone();
                std::thread::spawn(move || b.take())
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        baton.end();
        for w in waiters {
            assert_eq!(w.join().unwrap(), None);
        }
        baton.put(held);
        assert_eq!(baton.take(), None);
    }
}
