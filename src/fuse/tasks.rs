//! The tasks answering FUSE requests, counted so that shutdown can stop taking new ones
//! (their requests fail with EIO) and wait for the last reply, and so that a worker
//! draining for an upgrade can leave new ones unanswered for the next worker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use event_listener::Event;

/// Counts the tasks answering requests, so that shutdown can stop taking new ones and wait
/// for the last reply.
#[derive(Default)]
pub struct Tasks {
    running: AtomicUsize,
    stopping: AtomicBool,
    draining: AtomicBool,
    idle: Event,
}

/// One running task; dropping it ends it.
pub struct TaskGuard(Arc<Tasks>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify(usize::MAX);
        }
    }
}

impl Tasks {
    /// Registers a task, unless shutdown has begun.
    pub(super) fn enter(self: &Arc<Self>) -> Option<TaskGuard> {
        // Counted before `stopping` is checked, and `stop` sets `stopping` before it reads the
        // count; with SeqCst on all four, either `stop` sees this task or it sees `stopping`.
        self.running.fetch_add(1, Ordering::SeqCst);
        let guard = TaskGuard(self.clone());
        if self.draining.load(Ordering::SeqCst) {
            drop(guard);
            // The request is neither executed nor answered: each FUSE thread stops here at
            // its first, so nothing more is read, and the kernel resends them to the next
            // worker.
            // Its reply object lives on this stack until the process exits, so it never
            // sends fuser's default EIO.
            loop {
                std::thread::park();
            }
        }
        if self.stopping.load(Ordering::SeqCst) {
            return None;
        }
        Some(guard)
    }

    /// Leaves new requests unanswered (the thread that would start one stops for good)
    /// and waits for the running ones: an upgrade's drain.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.idle().await
    }

    /// Refuses new tasks (their requests fail with EIO) and waits for the running ones.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.idle().await
    }

    async fn idle(&self) {
        loop {
            let listener = self.idle.listen();
            if self.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            listener.await;
        }
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_waits_for_running_tasks_and_refuses_new_ones() {
        let tasks = Arc::new(Tasks::default());
        let a = tasks.enter().unwrap();
        let b = tasks.enter().unwrap();
        assert_eq!(tasks.running(), 2);
        let stopper = {
            let tasks = tasks.clone();
            std::thread::spawn(move || smol::block_on(tasks.stop()))
        };
        drop(a);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!stopper.is_finished(), "stop returned with a task running");
        assert!(tasks.enter().is_none(), "a task started during shutdown");
        drop(b);
        stopper.join().unwrap();
        assert_eq!(tasks.running(), 0);
    }

    #[test]
    fn drain_waits_for_running_tasks_and_holds_new_ones_unanswered() {
        let tasks = Arc::new(Tasks::default());
        let a = tasks.enter().unwrap();
        let drainer = {
            let tasks = tasks.clone();
            std::thread::spawn(move || smol::block_on(tasks.drain()))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        let late = {
            let tasks = tasks.clone();
            std::thread::spawn(move || tasks.enter().is_some())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!late.is_finished(), "a request started while draining");
        assert!(!drainer.is_finished(), "drain returned with a task running");
        drop(a);
        drainer.join().unwrap();
        assert!(!late.is_finished(), "the held request went on");
        assert_eq!(tasks.running(), 0);
    }
}
