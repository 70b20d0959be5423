//! The request path of one connection: each request is admitted into the budget before
//! its payload is read, checked against the session's access and the export's size,
//! looked up in the reply cache, and run on the reader itself when it is alone or queued
//! for the I/O threads in its key's turn; whoever executes it sends its reply.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use smol::future::FutureExt;

use super::baton::Baton;
use super::replies::Reply;
use super::reply_cache::Admit;
use super::session::Session;
use super::{fair, Shared};
use crate::blocking::ThreadReader;
use crate::channel::{self, OwnedFrame};
use crate::protocol::{Access, Head, Limits, Op, ReplyHeader, RequestHeader};

/// Budget a request holds at least: what its reply costs to queue.
const REPLY_COST: usize = 128;

impl Shared {
    /// Reads and dispatches requests, in turns with the connection's other reader, until
    /// the connection ends or `closing` closes; returns why it ended.
    pub(super) async fn read_requests(
        self: &Arc<Self>,
        session: &Arc<Session>,
        conn: u64,
        baton: &Baton<channel::Receiver<ThreadReader>>,
        closing: &smol::channel::Receiver<()>,
    ) -> String {
        let limits = Limits {
            max_transfer: self.max_transfer,
        };
        let Some(mut rx) = baton.take() else {
            return "closing".into();
        };
        loop {
            // A connection that is closing reads nothing more, even what its buffers hold.
            if closing.is_closed() {
                return "closing".into();
            }
            // Every request holds room in the budget until its reply is sent, taken before
            // its payload is read: a peer that floods requests and never reads replies is
            // throttled (its socket is not read), not buffered.
            let admit = |head: &Head| {
                let cost = match head {
                    Head::Request(h) if matches!(h.op, Op::Read | Op::Write) => h.length as usize,
                    _ => 0,
                };
                let acquire =
                    self.budget
                        .acquire(&session.client, &session.id, conn, cost.max(REPLY_COST));
                async {
                    let closed = async {
                        let _ = closing.recv().await;
                        None
                    };
                    async { Some(acquire.await) }.or(closed).await
                }
            };
            let (h, data, permit) = match rx.recv_admitted(&limits, &self.pool, admit).await {
                Ok(Some((
                    OwnedFrame {
                        head: Head::Request(h),
                        payload,
                    },
                    Some(permit),
                ))) => (h, payload, permit),
                Ok(Some((_, None))) => return "closing".into(),
                Ok(Some(_)) => return "unexpected frame after negotiation".into(),
                Ok(None) => return "closed by the client".into(),
                Err(e) => return e.to_string(),
            };
            let arrived = Instant::now();
            let answer = |status, permit| Reply {
                header: ReplyHeader {
                    txid: h.txid,
                    status,
                },
                data: Vec::new(),
                _permit: permit,
            };
            let admit = match self.refuse(session, &h) {
                Some(status) => Admit::Answer(status),
                // A read-only session has no writes of its own to make durable.
                None if h.op == Op::Ping
                    || (h.op == Op::Flush && session.access == Access::ReadOnly) =>
                {
                    Admit::Answer(0)
                }
                None => session
                    .state()
                    .cache
                    .admit(h.txid, h.floor, h.op == Op::Read),
            };
            match admit {
                Admit::Execute => {}
                Admit::Join | Admit::Stale => {
                    self.pool.put(data);
                    continue;
                }
                Admit::Answer(status) => {
                    session.count(&h, status, arrived);
                    self.pool.put(data);
                    session.reply(conn, answer(status, permit));
                    continue;
                }
            }
            let alone = self.executing.fetch_add(1, Ordering::SeqCst) == 0;
            let (flow, cost) = (session.client, fair::cost(&h));
            let (shared, session, export) = (self.clone(), session.clone(), session.export.clone());
            // Whoever executes also answers: no task to wake between the disk and the reply.
            // A request of a session that ended while it waited is cancelled (see `session`).
            session.queue();
            let job = move || {
                let pool = shared.pool.clone();
                let Some(running) = session.start() else {
                    pool.put(data);
                    shared.executed();
                    return;
                };
                let done = move |(status, read)| {
                    session.count(&h, status, arrived);
                    let header = ReplyHeader {
                        txid: h.txid,
                        status,
                    };
                    session.complete(
                        h.txid,
                        Reply {
                            header,
                            data: read,
                            _permit: permit,
                        },
                    );
                    drop(running);
                    shared.executed();
                };
                export.execute(&h, &data, &pool, done);
                pool.put(data);
            };
            // A lone request is latency-bound (the write, then the flush, of an fsync): run
            // it here rather than wake a worker for it. It lends the reader to the other
            // thread first, even for a write into the page cache: a disk that hangs would
            // otherwise leave the socket unread, and the client's leaving unseen, until it
            // came back. What has company, executing or already received, goes to the
            // workers.
            if !(alone && rx.is_drained()) {
                self.workers.spawn(flow, cost, job);
            } else {
                baton.lend(rx);
                job();
                rx = match baton.take() {
                    Some(rx) => rx,
                    None => return "closing".into(),
                };
            }
        }
    }

    /// A request left the I/O path, executed or cancelled.
    fn executed(&self) {
        if self.executing.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify(usize::MAX);
        }
    }

    /// The status for a request that must not execute, if it must not.
    fn refuse(&self, session: &Session, h: &RequestHeader) -> Option<u32> {
        if h.op.modifies() && session.access != Access::ReadWrite {
            return Some(libc::EROFS as u32);
        }
        if h.op.has_range() && !session.export.contains(h.offset, h.length) {
            log::debug!(
                "{:?} at {}+{} is outside export '{}'",
                h.op,
                h.offset,
                h.length,
                session.export.name
            );
            return Some(libc::EINVAL as u32);
        }
        None
    }
}
