//! The replies of one connection, sent by whoever produces them. The I/O worker that
//! executed a request, or the connection's reader answering a ping, a refusal or from the
//! reply cache, queues its reply; if nobody is sending, it takes the turn and encrypts and
//! writes everything queued, in batches, until the queue is empty. So a reply costs no
//! hop to another thread, and replies that complete together share one send.
//!
//! Whoever has the turn never waits on the socket: what the socket does not take at once
//! is finished by a task on the executor, which keeps the turn until the queue is empty.
//! A client that does not read holds up its own connection, never an I/O thread.
//!
//! A RESIZE notice goes out the same way, ahead of the replies queued with it; only the
//! latest size is kept.

use std::sync::{Arc, Mutex};

use smol::io::AsyncWrite;

use super::budget::Permit;
use crate::channel::{ChannelError, Outgoing, Sender};
use crate::pool::Pool;
use crate::protocol::{self, ReplyHeader};

/// Replies batched into one channel send, at most.
const BATCH: usize = 256 << 10;

/// A reply on its way out: its data (a read's) goes back to the pool once sent, and its
/// request's window space is held until then.
pub(super) struct Reply {
    pub header: ReplyHeader,
    pub data: Vec<u8>,
    pub _permit: Permit,
}

/// The sending side of one connection.
pub(super) struct Replies<W> {
    queue: Mutex<Queue<W>>,
    pool: Arc<Pool>,
    /// Notified when the turn is given back or sending ends.
    idle: event_listener::Event,
    /// Notified when sending ends.
    ending: event_listener::Event,
}

struct Queue<W> {
    replies: Vec<Reply>,
    /// A new size of the export to tell the client.
    resize: Option<u64>,
    /// The channel's sending half, here while nobody has the turn.
    wire: Option<Wire<W>>,
    /// Why nothing more is sent: the connection failed or was closed. Replies queued
    /// from then on are dropped.
    ended: Option<String>,
}

struct Wire<W> {
    tx: Sender<W>,
    out: Outgoing,
    /// Replies sealed into `tx` and not yet all written.
    unsent: Vec<Reply>,
    /// A RESIZE notice to seal before them.
    resize: Option<u64>,
}

/// The right to send a connection's replies, held by one at a time.
#[must_use = "a turn not sent strands the queued replies"]
pub(super) struct Turn<W> {
    replies: Arc<Replies<W>>,
    wire: Wire<W>,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Replies<W> {
    pub fn new(tx: Sender<W>, pool: Arc<Pool>) -> Arc<Self> {
        Arc::new(Replies {
            queue: Mutex::new(Queue {
                replies: Vec::new(),
                resize: None,
                wire: Some(Wire {
                    tx,
                    out: Outgoing::default(),
                    unsent: Vec::new(),
                    resize: None,
                }),
                ended: None,
            }),
            pool,
            idle: event_listener::Event::new(),
            ending: event_listener::Event::new(),
        })
    }

    /// Queues a reply. Returns the turn to send it if nobody else has it: send it once
    /// any lock held while queueing is let go.
    pub fn queue(self: &Arc<Self>, reply: Reply) -> Option<Turn<W>> {
        let mut q = self.queue.lock().unwrap();
        if q.ended.is_some() {
            drop(q);
            self.pool.put(reply.data);
            return None;
        }
        q.replies.push(reply);
        let wire = q.wire.take()?;
        Some(Turn {
            replies: self.clone(),
            wire,
        })
    }

    /// Queues a RESIZE notice of the export's new `size`; returns the turn as
    /// [`queue`](Self::queue) does.
    pub fn resize(self: &Arc<Self>, size: u64) -> Option<Turn<W>> {
        let mut q = self.queue.lock().unwrap();
        if q.ended.is_some() {
            return None;
        }
        q.resize = Some(size);
        let wire = q.wire.take()?;
        Some(Turn {
            replies: self.clone(),
            wire,
        })
    }

    /// Resolves when nothing more will be sent, with why: sending failed, or the
    /// connection was closed.
    pub async fn ended(&self) -> String {
        loop {
            let ending = self.ending.listen();
            if let Some(why) = &self.queue.lock().unwrap().ended {
                return why.clone();
            }
            ending.await;
        }
    }

    /// Waits until everything queued is sent (or sending failed), then closes the sending
    /// side of the stream. For the end of the connection: nothing is sent after it.
    pub async fn close(&self) {
        let mut wire = loop {
            let idle = self.idle.listen();
            {
                let mut q = self.queue.lock().unwrap();
                if q.ended.is_some() {
                    return;
                }
                if let Some(wire) = q.wire.take() {
                    q.ended = Some("the connection was closed".into());
                    break wire;
                }
            }
            idle.await;
        };
        self.ending.notify(usize::MAX);
        let _ = wire.tx.close().await;
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> Turn<W> {
    /// Sends everything queued, then gives the turn back. Does not wait on the socket:
    /// what it does not take at once, a task finishes.
    pub fn send(self) {
        let mut turn = self;
        while let Some(mut t) = turn.seal_next() {
            match t.wire.tx.try_flush() {
                Ok(true) => {
                    t.wire.written(&t.replies.pool);
                    turn = t;
                }
                Ok(false) => {
                    smol::spawn(t.finish()).detach();
                    return;
                }
                Err(e) => return t.fail(e),
            }
        }
    }

    /// Waits for the socket to take what was sealed, and sends on as [`send`](Self::send).
    async fn finish(mut self) {
        loop {
            if let Err(e) = self.wire.tx.flush().await {
                return self.fail(e);
            }
            self.wire.written(&self.replies.pool);
            match self.seal_next() {
                Some(t) => self = t,
                None => return,
            }
        }
    }

    /// Encrypts the next batch of queued replies into the wire. When none is queued, gives
    /// the turn back instead, in the same look at the queue, so that no reply is left
    /// queued without a sender.
    fn seal_next(self) -> Option<Self> {
        let Turn { replies, mut wire } = self;
        {
            let mut q = replies.queue.lock().unwrap();
            if q.replies.is_empty() && q.resize.is_none() {
                q.wire = Some(wire);
                drop(q);
                replies.idle.notify(usize::MAX);
                return None;
            }
            let mut bytes = 0;
            let n = q
                .replies
                .iter()
                .take_while(|r| {
                    let room = bytes < BATCH;
                    bytes += r.data.len() + protocol::REPLY_HEADER;
                    room
                })
                .count();
            wire.unsent.extend(q.replies.drain(..n));
            wire.resize = q.resize.take();
        }
        wire.seal();
        Some(Turn { replies, wire })
    }

    /// Ends the connection's sending: drops what is queued, freeing its window space, and
    /// lets the reader know.
    fn fail(self, e: ChannelError) {
        log::debug!("sending replies failed: {e}");
        let Turn { replies, mut wire } = self;
        {
            let mut q = replies.queue.lock().unwrap();
            wire.written(&replies.pool);
            for r in q.replies.drain(..) {
                replies.pool.put(r.data);
            }
            q.ended = Some(format!("sending replies failed: {e}"));
        }
        replies.ending.notify(usize::MAX);
        replies.idle.notify(usize::MAX);
    }
}

impl<W: AsyncWrite + Unpin> Wire<W> {
    /// Encodes and encrypts `unsent`: small frames staged together, read data encrypted
    /// from its own buffer.
    fn seal(&mut self) {
        self.out.clear();
        if let Some(size) = self.resize.take() {
            protocol::encode_resize(self.out.staged(), size);
        }
        for (i, r) in self.unsent.iter().enumerate() {
            if r.data.len() < Outgoing::INLINE {
                protocol::encode_reply(self.out.staged(), &r.header, &r.data);
            } else {
                protocol::encode_reply_head(self.out.staged(), &r.header, r.data.len());
                self.out.payload(i);
            }
        }
        let unsent = &self.unsent;
        self.tx
            .seal_parts(&self.out.parts(|i| unsent[i].data.as_slice()));
    }

    /// What was sealed is written: buffers go back to the pool, window space is freed.
    fn written(&mut self, pool: &Pool) {
        for r in self.unsent.drain(..) {
            pool.put(r.data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::budget::{Bounds, Budget};
    use super::*;
    use crate::channel::testing::pair;
    use crate::channel::Receiver;
    use crate::cipher::Cipher;
    use crate::protocol::{Frame, Limits};
    use smol::net::unix::UnixStream;
    use std::time::{Duration, Instant};

    const LIMITS: Limits = Limits {
        max_transfer: 1 << 20,
    };

    /// A budget of 64 MiB for one session of one connection.
    type Window = Arc<Budget>;

    fn window() -> Window {
        Budget::new(Bounds {
            total: 64 << 20,
            per_key: 64 << 20,
            session_bytes: 64 << 20,
            session_requests: usize::MAX,
            reserve: 0,
            overhead: 0,
        })
    }

    fn reply(txid: u64, len: usize, pool: &Pool, window: &Window) -> Reply {
        let mut data = pool.take(len);
        data.fill(txid as u8);
        let key = crate::keys::PublicKey([7; 32]);
        Reply {
            header: ReplyHeader { txid, status: 0 },
            data,
            _permit: smol::block_on(window.acquire(&key, &[0; 16], 0, len.max(1))),
        }
    }

    /// Queues replies `txids` of `len` bytes, sending when given the turn.
    fn produce(
        replies: &Arc<Replies<UnixStream>>,
        txids: impl Iterator<Item = u64>,
        len: usize,
        window: &Window,
    ) {
        for txid in txids {
            if let Some(turn) = replies.queue(reply(txid, len, &replies.pool, window)) {
                turn.send();
            }
        }
    }

    /// Receives `n` replies; returns their txids, checking each one's data.
    fn consume(rx: &mut Receiver<UnixStream>, n: usize, len: usize) -> Vec<u64> {
        smol::block_on(async {
            let mut seen = Vec::new();
            for _ in 0..n {
                match rx.recv(&LIMITS).await.unwrap() {
                    Some(Frame::Reply(h, data)) => {
                        assert!(data.len() == len && data.iter().all(|&b| b == h.txid as u8));
                        seen.push(h.txid);
                    }
                    other => panic!("{other:?}"),
                }
            }
            seen
        })
    }

    fn free(window: &Window) -> usize {
        (64 << 20) - window.in_use()
    }

    #[test]
    fn replies_from_many_threads_each_arrive_once_in_their_order() {
        let ((_, mut rx), (tx, _)) = pair(Cipher::ChaChaPoly);
        let replies = Replies::new(tx, Arc::new(Pool::new(8 << 20)));
        let window = window();
        let (threads, each, len) = (4u64, 200u64, 20_000);
        let producers: Vec<_> = (0..threads)
            .map(|t| {
                let (replies, window) = (replies.clone(), window.clone());
                std::thread::spawn(move || {
                    produce(&replies, (0..each).map(|i| i * threads + t), len, &window)
                })
            })
            .collect();
        let seen = consume(&mut rx, (threads * each) as usize, len);
        for p in producers {
            p.join().unwrap();
        }
        for t in 0..threads {
            let mine: Vec<_> = seen.iter().filter(|x| *x % threads == t).collect();
            assert_eq!(mine.len() as u64, each);
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "thread {t}'s order");
        }
        smol::block_on(replies.close());
        assert_eq!(free(&window), 64 << 20, "every permit given back");
        assert!(replies.pool.kept() > 0, "buffers back in the pool");
    }

    #[test]
    fn a_client_that_does_not_read_holds_up_no_producer() {
        let ((_, mut rx), (tx, _)) = pair(Cipher::AesGcm);
        let replies = Replies::new(tx, Arc::new(Pool::new(8 << 20)));
        let window = window();
        // Far more than the socket buffers: the rest waits in the queue, not in `send`.
        let start = Instant::now();
        produce(&replies, 0..40, 1 << 20, &window);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            free(&window) < (64 << 20) - (30 << 20),
            "unsent replies hold their window"
        );
        assert_eq!(consume(&mut rx, 40, 1 << 20), (0..40).collect::<Vec<_>>());
        smol::block_on(replies.close());
        assert_eq!(free(&window), 64 << 20);
    }

    #[test]
    fn a_resize_notice_goes_out_ahead_of_the_replies_queued_with_it() {
        let ((_, mut rx), (tx, _)) = pair(Cipher::ChaChaPoly);
        let replies = Replies::new(tx, Arc::new(Pool::new(8 << 20)));
        let window = window();
        // Held by a producer: both wait in the queue, then go out in one batch.
        let held = replies.queue(reply(1, 10, &replies.pool, &window)).unwrap();
        assert!(replies.resize(1 << 30).is_none(), "the turn is taken");
        assert!(replies.resize(2 << 30).is_none());
        held.send();
        smol::block_on(async {
            assert_eq!(
                rx.recv(&LIMITS).await.unwrap(),
                Some(Frame::Resize(2 << 30))
            );
        });
        assert_eq!(consume(&mut rx, 1, 10), vec![1]);
        // Alone, a notice takes the turn itself.
        replies.resize(3 << 30).unwrap().send();
        smol::block_on(async {
            assert_eq!(
                rx.recv(&LIMITS).await.unwrap(),
                Some(Frame::Resize(3 << 30))
            );
        });
        smol::block_on(replies.close());
    }

    #[test]
    fn a_failed_send_is_reported_and_frees_what_was_queued() {
        let ((_, rx), (tx, _)) = pair(Cipher::ChaChaPoly);
        let replies = Replies::new(tx, Arc::new(Pool::new(8 << 20)));
        let window = window();
        produce(&replies, 0..10, 1 << 20, &window);
        drop(rx);
        let why = smol::block_on(replies.ended());
        assert!(why.contains("sending replies failed"), "{why}");
        produce(&replies, 10..20, 1 << 20, &window);
        assert_eq!(free(&window), 64 << 20, "nothing held after the failure");
        smol::block_on(replies.close());
    }
}
