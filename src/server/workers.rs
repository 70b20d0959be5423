//! A fixed pool of threads for the blocking I/O on exports; a job also sends its reply,
//! encryption included. A few threads keep the disk busy; many would only queue on the
//! file's inode lock, spinning on the CPU the network and the ciphers need. Jobs wait in
//! a [`FairQueue`], one flow per client key, so a tenant's backlog does not hold up
//! another's requests.

use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use super::fair::FairQueue;

type Job = Box<dyn FnOnce() + Send>;

pub struct Workers<K> {
    shared: Arc<Queue<K>>,
}

struct Queue<K> {
    jobs: Mutex<FairQueue<K, Job>>,
    ready: Condvar,
}

impl<K: Hash + Eq + Clone + Send + 'static> Workers<K> {
    /// Starts `threads` workers sharing turns by `quantum` of cost (see [`FairQueue`]).
    /// The workers live as long as the process: the server never stops its pool.
    pub fn new(threads: usize, quantum: u64) -> std::io::Result<Workers<K>> {
        let shared = Arc::new(Queue {
            jobs: Mutex::new(FairQueue::new(quantum)),
            ready: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let queue = shared.clone();
            thread::Builder::new()
                .name(format!("dst-io-{i}"))
                .spawn(move || loop {
                    let job = {
                        let mut jobs = queue.jobs.lock().unwrap();
                        loop {
                            match jobs.pop() {
                                Some(job) => break job,
                                None => jobs = queue.ready.wait(jobs).unwrap(),
                            }
                        }
                    };
                    job();
                })?;
        }
        Ok(Workers { shared })
    }

    /// Runs `f` on a worker in `flow`'s turn; it reports its own outcome. Never waits:
    /// the queue is bounded by the callers' windows.
    pub fn spawn(&self, flow: K, cost: u64, f: impl FnOnce() + Send + 'static) {
        self.shared
            .jobs
            .lock()
            .unwrap()
            .push(flow, cost, Box::new(f));
        self.shared.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_named_workers() {
        let w = Workers::new(2, 100).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..10u32 {
            let tx = tx.clone();
            w.spawn(i % 3, 10, move || {
                tx.send((i, thread::current().name().map(str::to_owned)))
                    .unwrap()
            });
        }
        let mut seen: Vec<_> = (0..10).map(|_| rx.recv().unwrap()).collect();
        seen.sort();
        assert!(seen
            .iter()
            .all(|(_, n)| n.as_deref().is_some_and(|n| n.starts_with("dst-io-"))));
        assert_eq!(
            seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
    }
}
