//! One client session on the export node: its reply cache, and where its replies go.
//! A session outlives its connection (see `sessions`): while it has none, replies of its
//! requests still executing are recorded in the cache and dropped; a client that resumes
//! the session on a new connection gets the answers of its resends from the cache.

use std::sync::{Arc, Mutex};

use smol::net::TcpStream;

use super::export::Export;
use super::replies::{Replies, Reply};
use super::reply_cache::ReplyCache;
use crate::keys::PublicKey;
use crate::protocol::{Access, SessionId};

pub(super) struct Session {
    pub id: SessionId,
    pub client: PublicKey,
    pub export: Arc<Export>,
    pub access: Access,
    state: Mutex<SessionState>,
}

pub(super) struct SessionState {
    pub cache: ReplyCache,
    /// Where replies go: the session's current connection, if it has one.
    sink: Option<(u64, Arc<Replies<TcpStream>>)>,
}

impl Session {
    pub fn new(
        id: SessionId,
        client: PublicKey,
        export: Arc<Export>,
        access: Access,
        cache: ReplyCache,
    ) -> Session {
        Session {
            id,
            client,
            export,
            access,
            state: Mutex::new(SessionState { cache, sink: None }),
        }
    }

    /// The session's state, for the reply cache.
    pub fn state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.state.lock().unwrap()
    }

    /// Replies go to connection `conn` from now on.
    pub fn attach(&self, conn: u64, sink: Arc<Replies<TcpStream>>) {
        self.state().sink = Some((conn, sink));
    }

    /// Connection `conn` ended: if replies went there, they go nowhere now.
    pub fn detach(&self, conn: u64) {
        let mut st = self.state();
        if st.sink.as_ref().is_some_and(|(c, _)| *c == conn) {
            st.sink = None;
        }
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
