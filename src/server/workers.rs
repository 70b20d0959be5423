//! A fixed pool of threads for the blocking I/O on exports; a job also sends its reply,
//! encryption included. A few threads keep the disk busy; many would only queue on the
//! file's inode lock, spinning on the CPU the network and the ciphers need.

use std::thread;

type Job = Box<dyn FnOnce() + Send>;

pub struct Workers {
    jobs: smol::channel::Sender<Job>,
}

impl Workers {
    /// Starts `threads` workers; they end when the pool is dropped.
    pub fn new(threads: usize) -> std::io::Result<Workers> {
        let (jobs, queue) = smol::channel::unbounded::<Job>();
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            thread::Builder::new()
                .name(format!("dst-io-{i}"))
                .spawn(move || {
                    while let Ok(job) = queue.recv_blocking() {
                        job();
                    }
                })?;
        }
        Ok(Workers { jobs })
    }

    /// Runs `f` on a worker; it reports its own outcome.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        // The queue is unbounded (the callers' windows bound it), so this never waits.
        self.jobs
            .try_send(Box::new(f))
            .expect("the workers live as long as the pool");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_named_workers() {
        let w = Workers::new(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..10u32 {
            let tx = tx.clone();
            w.spawn(move || {
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
