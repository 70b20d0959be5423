//! The engine's connection, one at a time: made, served (a writer task sending what is
//! queued, a reader thread resolving transactions from replies), lost, and made again
//! when the core's backoff says, resuming the session; and the timer that lets the core
//! resend, fail, ping and declare a connection dead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::future::FutureExt;
use smol::net::Shutdown;

use super::{Inner, Wire, TIMER_MIN};
use crate::blocking::ThreadReader;
use crate::channel::{Outgoing, OwnedFrame, Receiver};
use crate::client::{Connection, Parts};
use crate::protocol::{Head, Limits};

impl Inner {
    /// Lets the core resend, fail, ping and watch the connection whenever it has
    /// something to decide, until closed and empty.
    pub(super) async fn timer(self: Arc<Self>) {
        loop {
            let rewake = self.rewake.listen();
            let at = {
                let st = self.state.lock().unwrap();
                if st.finished() {
                    return;
                }
                st.next_wake()
            };
            async {
                smol::Timer::at(at.max(Instant::now() + TIMER_MIN)).await;
            }
            .or(rewake)
            .await;
            let tick = self.state.lock().unwrap().on_tick(Instant::now());
            if let Some(why) = tick.dead {
                self.cut(why);
            }
            // The writer sends: a send blocked on a stalled connection must not hold up
            // the next tick, which may be the one that declares it dead.
            if tick.send {
                self.queued.notify(1);
            }
            self.fail(tick.failed);
        }
    }

    fn finished(&self) -> bool {
        self.state.lock().unwrap().finished()
    }

    /// Keeps a connection up and serves it, until closed with nothing left in flight.
    pub(super) async fn drive(self: Arc<Self>, first: Connection) {
        let mut conn = Some(first);
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => match self.reconnect().await {
                    Some(c) => c,
                    None => break,
                },
            };
            let why = self.serve(c).await;
            self.state.lock().unwrap().on_lost(Instant::now());
            if self.finished() {
                break;
            }
            log::warn!(
                "connection to {} lost: {why}; reconnecting",
                self.cfg.client.server
            );
        }
        log::debug!("engine for {} stopped", self.cfg.client.server);
    }

    /// Connects again when the core's backoff says, resuming the session; `None` once
    /// there is nothing left to do or the export changed.
    async fn reconnect(&self) -> Option<Connection> {
        loop {
            let finished = self.finished.listen();
            let (retry_at, session) = {
                let st = self.state.lock().unwrap();
                if st.finished() {
                    return None;
                }
                (st.retry_at(), st.session())
            };
            if let Some(at) = retry_at.filter(|&at| at > Instant::now()) {
                // Closing with nothing in flight ends the wait early.
                async {
                    smol::Timer::at(at).await;
                }
                .or(finished)
                .await;
                continue;
            }
            let attempt =
                async { Some(Connection::connect(&self.cfg.client, Some(session)).await) };
            let limit = async {
                smol::Timer::after(self.cfg.resend_timeout.max(Duration::from_secs(1))).await;
                None
            };
            let failure = match attempt.or(limit).await {
                Some(Ok(c)) => {
                    let connected = self
                        .state
                        .lock()
                        .unwrap()
                        .on_connected(Instant::now(), c.info());
                    self.resized.notify(usize::MAX);
                    return match connected {
                        Ok(attempts) => {
                            let how = if c.info().resumed {
                                "session resumed"
                            } else {
                                "the server lost the session; new session"
                            };
                            log::info!(
                                "reconnected to {} after {attempts} attempts ({how})",
                                self.cfg.client.server
                            );
                            // The new connection is to be pinged when idle.
                            self.rewake.notify(1);
                            Some(c)
                        }
                        Err(failed) => {
                            self.fail(failed);
                            None
                        }
                    };
                }
                Some(Err(e)) => e.to_string(),
                None => "timed out".to_string(),
            };
            log::debug!(
                "reconnect attempt to {} failed: {failure}",
                self.cfg.client.server
            );
            self.state.lock().unwrap().on_connect_failed(Instant::now());
        }
    }

    /// Serves one connection until it fails or the engine is done; returns why it ended.
    async fn serve(self: &Arc<Self>, conn: Connection) -> String {
        let Parts {
            sender,
            receiver,
            hangup: stream,
            limits,
            ..
        } = conn.into_parts();
        let mut receiver = match receiver.into_blocking() {
            Ok(receiver) => receiver,
            Err(e) => return format!("cannot read the connection: {e}"),
        };
        *self.send_error.lock().unwrap() = None;
        *self.hangup.lock().unwrap() = Some(stream.clone());
        *self.wire.lock().await = Some(Wire {
            sender,
            stream: stream.clone(),
            out: Outgoing::default(),
            batch: Vec::new(),
        });
        // Replies are read on a thread of their own, which completes each transaction as
        // its reply is decrypted: the kernel wakes it, and it answers the caller directly.
        let (ended_tx, ended) = smol::channel::bounded(1);
        let inner = self.clone();
        let spawned = std::thread::Builder::new()
            .name("dst-replies".into())
            .spawn(move || {
                let why = smol::block_on(inner.read_replies(&mut receiver, &limits));
                let _ = ended_tx.send_blocking(why);
            });
        if let Err(e) = spawned {
            let _ = stream.shutdown(Shutdown::Both);
            *self.hangup.lock().unwrap() = None;
            *self.wire.lock().await = None;
            return format!("cannot start the reply reader: {e}");
        }
        let replies_ended = async {
            ended
                .recv()
                .await
                .unwrap_or_else(|_| "the reply reader stopped".into())
        };
        let done = async {
            loop {
                let finished = self.finished.listen();
                if self.finished() {
                    return "closed".to_string();
                }
                finished.await;
            }
        };
        let why = self.write_requests().or(replies_ended).or(done).await;
        let why = self.send_error.lock().unwrap().take().unwrap_or(why);
        // Threads blocked sending or reading on this connection let go once the socket is
        // shut; the reader is waited for, so nothing of this connection completes after
        // the next one starts.
        let _ = stream.shutdown(Shutdown::Both);
        let _ = ended.recv().await;
        *self.hangup.lock().unwrap() = None;
        *self.wire.lock().await = None;
        why
    }

    /// Sends what is queued without a submitter to send it: everything after a reconnect,
    /// resends, pings.
    async fn write_requests(&self) -> String {
        loop {
            let queued = self.queued.listen();
            self.send_queued().await;
            queued.await;
        }
    }

    async fn read_replies(&self, receiver: &mut Receiver<ThreadReader>, limits: &Limits) -> String {
        loop {
            // Read data is decrypted straight into the buffer handed to the caller.
            match receiver.recv_owned(limits, &self.pool).await {
                Ok(Some(OwnedFrame {
                    head: Head::Reply(h),
                    payload,
                })) => self.complete(h.txid, h.status, payload),
                Ok(Some(OwnedFrame {
                    head: Head::Resize(size),
                    ..
                })) => {
                    if self.state.lock().unwrap().on_resize(size) {
                        self.resized.notify(usize::MAX);
                    }
                }
                Ok(Some(_)) => return "the server sent a frame other than a reply".into(),
                Ok(None) => return "closed by the server".into(),
                Err(e) => return e.to_string(),
            }
        }
    }
}
