//! One client session on the export node: its reply cache, where its replies go, and its
//! fence. A session outlives its connection (see `sessions`): while it has none, replies
//! of its requests still executing are recorded in the cache and dropped; a client that
//! resumes the session on a new connection gets the answers of its resends from the cache.
//!
//! When a session ends (replaced by its restarted client, evicted, expired), its fence
//! closes: a request of it still queued is cancelled when its turn comes and never reaches
//! the disk, and the session's successor on the export waits until those executing have
//! finished. So nothing of a session runs after its successor's first request.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use smol::net::TcpStream;

use super::export::Export;
use super::metrics::ClientCounters;
use super::replies::{Replies, Reply};
use super::reply_cache::ReplyCache;
use crate::keys::PublicKey;
use crate::protocol::{Access, RequestHeader, SessionId};

pub(super) struct Session {
    pub id: SessionId,
    pub client: PublicKey,
    pub export: Arc<Export>,
    pub access: Access,
    /// Its client key's counters, for monitoring.
    pub counters: Arc<ClientCounters>,
    state: Mutex<SessionState>,
    fence: Mutex<Fence>,
    /// Notified when the last executing request of an ended session finishes.
    drained: event_listener::Event,
}

/// What of a session may still run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fence {
    /// Requests queued for the I/O threads, not yet started.
    pub queued: usize,
    /// Requests started and not yet finished.
    pub executing: usize,
    /// Requests cancelled because the session had ended.
    pub cancelled: usize,
    pub ended: bool,
}

impl Fence {
    fn queue(&mut self) {
        self.queued += 1;
    }

    /// A queued request's turn came: whether it may run.
    fn start(&mut self) -> bool {
        self.queued -= 1;
        if self.ended {
            self.cancelled += 1;
            return false;
        }
        self.executing += 1;
        true
    }

    /// A started request finished; true if it was the last of an ended session.
    fn finish(&mut self) -> bool {
        self.executing -= 1;
        self.ended && self.executing == 0
    }

    /// Closes the fence; returns what was left to cancel and to wait for.
    fn end(&mut self) -> Fence {
        self.ended = true;
        *self
    }
}

/// A request of a session between its start and its end; dropped when it finished.
pub(super) struct Running(Arc<Session>);

pub(super) struct SessionState {
    pub cache: ReplyCache,
    /// Where replies go: the session's current connection, if it has one.
    sink: Option<(u64, Arc<Replies<TcpStream>>)>,
    /// The size the client on that connection knows, if it takes RESIZE notices.
    told: Option<u64>,
}

impl Session {
    pub fn new(
        id: SessionId,
        client: PublicKey,
        export: Arc<Export>,
        access: Access,
        cache: ReplyCache,
        counters: Arc<ClientCounters>,
    ) -> Session {
        Session {
            id,
            client,
            export,
            access,
            counters,
            state: Mutex::new(SessionState {
                cache,
                sink: None,
                told: None,
            }),
            fence: Mutex::new(Fence::default()),
            drained: event_listener::Event::new(),
        }
    }

    /// A request is queued for the I/O threads; [`start`](Self::start) must follow.
    pub fn queue(&self) {
        self.fence.lock().unwrap().queue();
    }

    /// A queued request's turn came: the guard to hold while it executes, or `None` if
    /// the session has ended and the request is cancelled.
    pub fn start(self: &Arc<Self>) -> Option<Running> {
        self.fence
            .lock()
            .unwrap()
            .start()
            .then(|| Running(self.clone()))
    }

    /// Ends the session: nothing of it starts from now on. Returns what was queued (to be
    /// cancelled) and executing (to wait for) at this moment.
    pub fn end(&self) -> Fence {
        self.fence.lock().unwrap().end()
    }

    /// Whether the session has ended and nothing of it executes.
    pub fn is_drained(&self) -> bool {
        let f = *self.fence.lock().unwrap();
        f.ended && f.executing == 0
    }

    /// Resolves once the session has ended and nothing of it executes.
    pub async fn drained(&self) {
        loop {
            let drained = self.drained.listen();
            if self.is_drained() {
                return;
            }
            drained.await;
        }
    }

    /// The session's state, for the reply cache.
    pub fn state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.state.lock().unwrap()
    }

    /// Replies go to connection `conn` from now on. `told` is the size its client was
    /// given, if it takes RESIZE notices: one goes out at once if the export grew since.
    pub fn attach(&self, conn: u64, sink: Arc<Replies<TcpStream>>, told: Option<u64>) {
        {
            let mut st = self.state();
            st.sink = Some((conn, sink));
            st.told = told;
        }
        self.tell_size();
    }

    /// Tells the connected client the export's size, if it takes RESIZE notices and knows
    /// another size.
    pub fn tell_size(&self) {
        let size = self.export.size();
        let turn = {
            let mut st = self.state();
            match (&st.sink, st.told) {
                (Some((_, sink)), Some(told)) if told != size => {
                    let turn = sink.resize(size);
                    st.told = Some(size);
                    turn
                }
                _ => None,
            }
        };
        if let Some(turn) = turn {
            turn.send();
        }
    }

    /// Connection `conn` ended: if replies went there, they go nowhere now.
    pub fn detach(&self, conn: u64) {
        let mut st = self.state();
        if st.sink.as_ref().is_some_and(|(c, _)| *c == conn) {
            st.sink = None;
            st.told = None;
        }
    }

    /// Counts an answered request, which arrived at `arrived`, for monitoring.
    pub fn count(&self, h: &RequestHeader, status: u32, arrived: Instant) {
        let latency = arrived.elapsed();
        self.export.counters.record(h.op, status, h.length, latency);
        self.counters.record(h.op, status, h.length);
    }

    /// Sends a reply on the connection `conn`, if it is still the session's.
    pub fn reply(&self, conn: u64, reply: Reply) {
        let turn = match &self.state().sink {
            Some((c, sink)) if *c == conn => sink.queue(reply),
            _ => None,
        };
        if let Some(turn) = turn {
            turn.send();
        }
    }

    /// Records an executed transaction and queues its reply on the current connection.
    /// Both happen under one lock, so a resend sees either the result or the execution;
    /// the reply is sent after the lock is let go.
    pub fn complete(&self, txid: u64, reply: Reply) {
        let turn = {
            let mut st = self.state();
            st.cache.complete(txid, reply.header.status);
            st.sink.as_ref().and_then(|(_, sink)| sink.queue(reply))
        };
        if let Some(turn) = turn {
            turn.send();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.fence.lock().unwrap().finish() {
            self.0.drained.notify(usize::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_starts_once_the_fence_is_closed() {
        let mut f = Fence::default();
        for _ in 0..3 {
            f.queue();
        }
        assert!(f.start(), "one starts before the end");
        let left = f.end();
        assert_eq!((left.queued, left.executing), (2, 1));
        assert!(!f.start() && !f.start(), "the queued ones are cancelled");
        assert_eq!(f.cancelled, 2);
        assert!(f.finish(), "the last executing one drains the session");
        assert_eq!(f.executing, 0);
    }

    #[test]
    fn a_live_session_is_never_drained() {
        let mut f = Fence::default();
        f.queue();
        assert!(f.start());
        assert!(!f.finish());
    }
}
