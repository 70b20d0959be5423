//! The executor that handshakes run on: a thread or two of their own, so that the X25519
//! work strangers can ask for competes with itself, not with the accept loop or the
//! tasks that serve authenticated connections.

use std::future::Future;
use std::io;
use std::sync::Arc;

pub struct Handshakers {
    executor: Arc<smol::Executor<'static>>,
    /// Closed on drop, which ends the threads.
    _stop: smol::channel::Sender<()>,
}

impl Handshakers {
    /// Starts `threads` threads, named `dst-handshake-N`.
    pub fn new(threads: usize) -> io::Result<Self> {
        let executor = Arc::new(smol::Executor::new());
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        for n in 0..threads.max(1) {
            let (executor, stopped) = (executor.clone(), stopped.clone());
            std::thread::Builder::new()
                .name(format!("dst-handshake-{n}"))
                .spawn(move || smol::block_on(executor.run(stopped.recv())))?;
        }
        Ok(Handshakers {
            executor,
            _stop: stop,
        })
    }

    pub fn spawn<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> smol::Task<T> {
        self.executor.spawn(future)
    }
}

/// One thread on up to three cores, two from four: handshakes never take more than half
/// of a small machine.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 2))
}
