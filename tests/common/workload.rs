//! A verified workload through a client engine and the model of the writes it acked: what
//! the image must hold afterwards, whatever the workload lived through (a server killed,
//! a link cut, a stall).

use std::collections::HashMap;
use std::path::Path;

use dst::client::engine::{Engine, EngineConfig};
use dst::client::ClientConfig;

use super::{file_bytes, pattern};

/// Resends and pings for tests that ride out outages: a resend every 500 ms for 20 s.
pub fn patient(client: ClientConfig) -> EngineConfig {
    EngineConfig {
        resend_timeout: std::time::Duration::from_millis(500),
        resend_count: 40,
        ping_interval: std::time::Duration::from_millis(500),
        ..EngineConfig::new(client)
    }
}

/// An engine started with [`patient`] settings; panics if it cannot connect.
pub fn patient_engine(client: ClientConfig) -> Engine {
    smol::block_on(Engine::start(patient(client))).unwrap_or_else(|e| panic!("engine: {e}"))
}

/// Runs `workload` in the background; [`finish`] waits for it.
pub fn spawn(engine: &Engine, workload: Workload) -> smol::Task<Acked> {
    let engine = engine.clone();
    smol::spawn(async move { workload.run(&engine).await })
}

/// Waits for a workload to end, then flushes and closes the engine; returns the model of
/// what it acked.
pub fn finish(engine: &Engine, run: smol::Task<Acked>) -> Acked {
    smol::block_on(async {
        let acked = run.await;
        engine.flush().await.unwrap();
        engine.close().await;
        acked
    })
}

/// The last acked write at each offset: its length and the seed of its [`pattern`].
#[derive(Debug, Default)]
pub struct Acked(HashMap<u64, (usize, u64)>);

impl Acked {
    pub fn record(&mut self, offset: u64, len: usize, seed: u64) {
        self.0.insert(offset, (len, seed));
    }

    /// Panics unless `image` holds every acked write.
    pub fn check(&self, image: &Path) {
        for (&offset, &(len, seed)) in &self.0 {
            assert!(
                file_bytes(image, offset, len) == pattern(len, seed),
                "{} at {offset} (+{len}) differs from the last acked write",
                image.display()
            );
        }
    }
}

/// The shape of a [`run`]: concurrent writers, each writing its own places `rounds` times
/// with fresh data and reading every write back, with a flush every third round.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub writers: u64,
    pub places_each: u64,
    pub rounds: u64,
    pub len: usize,
    /// Mixed into every seed, so that two runs on one image write different data.
    pub salt: u64,
    /// Where place `n` (of `writers * places_each`) is; defaults to back to back.
    pub place: fn(n: u64, len: usize) -> u64,
}

impl Workload {
    pub fn new(writers: u64, places_each: u64, rounds: u64, len: usize) -> Workload {
        Workload {
            writers,
            places_each,
            rounds,
            len,
            salt: 0,
            place: |n, len| n * len as u64,
        }
    }

    /// Runs the workload; any error fails the test. Returns the model of acked writes.
    pub async fn run(self, engine: &Engine) -> Acked {
        let tasks: Vec<_> = (0..self.writers)
            .map(|w| {
                let engine = engine.clone();
                smol::spawn(async move { self.writer(&engine, w).await })
            })
            .collect();
        let mut acked = Acked::default();
        for t in tasks {
            acked.0.extend(t.await.0);
        }
        acked
    }

    async fn writer(self, engine: &Engine, w: u64) -> Acked {
        let mut acked = Acked::default();
        for r in 0..self.rounds {
            for p in 0..self.places_each {
                let n = w * self.places_each + p;
                let offset = (self.place)(n, self.len);
                let seed = self.salt ^ (n << 20) ^ r;
                let data = pattern(self.len, seed);
                engine
                    .write(offset, &data, false)
                    .await
                    .unwrap_or_else(|e| panic!("write at {offset}: errno {e}"));
                acked.record(offset, self.len, seed);
                let back = engine
                    .read(offset, self.len as u32)
                    .await
                    .unwrap_or_else(|e| panic!("read at {offset}: errno {e}"));
                assert!(back == data, "the write at {offset} read back wrong");
            }
            if r % 3 == 2 {
                engine
                    .flush()
                    .await
                    .unwrap_or_else(|e| panic!("flush: errno {e}"));
            }
        }
        acked
    }
}
