//! A fixed pool of threads for the blocking I/O on exports. A few threads keep the disk
//! busy; many would only queue on the file's inode lock, spinning on the CPU the network
//! and the ciphers need.

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

    /// Runs `f` on a worker and returns its result.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = smol::channel::bounded(1);
        let job: Job = Box::new(move || {
            let _ = done.send_blocking(f());
        });
        self.jobs
            .send(job)
            .await
            .expect("the workers live as long as the pool");
        result
            .recv()
            .await
            .expect("a worker runs every job it takes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_named_workers_and_return_their_results() {
        let w = Workers::new(2).unwrap();
        let name = smol::block_on(w.run(|| thread::current().name().map(str::to_owned)));
        assert!(name.unwrap().starts_with("dst-io-"));
        let sums = smol::block_on(async {
            let a = w.run(|| (1..=10).sum::<u32>());
            let b = w.run(|| 7 * 6);
            smol::future::zip(a, b).await
        });
        assert_eq!(sums, (55, 42));
    }
}
