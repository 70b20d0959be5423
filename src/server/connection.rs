//! One connection's life on the export node: admission of a stranger, the handshake on
//! the handshake threads within its deadlines, negotiation (the client's session found
//! or made), then its two request readers and its replies until it ends.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smol::future::FutureExt;
use smol::net::{Shutdown, TcpStream};

use super::admission::{Admitted, HandshakeSlot, Kind, Prefix, Rates};
use super::baton::Baton;
use super::budget::Admission;
use super::limits::Slot;
use super::negotiation::Refused;
use super::replies::Replies;
use super::reply_cache::ReplyCache;
use super::session::Session;
use super::sessions::{Ask, EndReason, Ended, SessionTable};
use super::{negotiation, Shared};
use crate::channel::{self, FirstFlight, Sender};
use crate::keys::PublicKey;
use crate::protocol::{
    self, features, Access, ExportInfo, Frame, Hello, Limits, SessionId, Welcome, MAX_NEGOTIATION,
    PROTOCOL_VERSION,
};

/// Negotiation happens before any transfer size is agreed.
const NEGOTIATION_LIMITS: Limits = Limits {
    max_transfer: MAX_NEGOTIATION as u32,
};
/// How long a new writer waits for the requests of the export's ended sessions.
const FENCE_WAIT: Duration = Duration::from_secs(5);
/// Reply cache entries a session keeps, per request it may have in progress: the cache
/// must remember every transaction the client may still resend.
const CACHE_PER_REQUEST: usize = 4;

/// A connection after negotiation: its channel halves, its session, its place among its
/// key's connections, among all, and in the budget, and the export's size its client was
/// given if it takes RESIZE notices.
type Opened = (
    Sender<TcpStream>,
    channel::Receiver<TcpStream>,
    Arc<Session>,
    Places,
    Option<u64>,
);

/// A connection's places among its key's connections, among all, and in the budget;
/// given back when it closes.
struct Places {
    _key: Slot<PublicKey>,
    _all: Slot<()>,
    _budget: Admission,
    attachment: Attachment,
}

/// What negotiation made or found: the session, its hold on the connection, and the ended
/// sessions of its export that its first request must wait for.
struct Negotiated {
    session: Arc<Session>,
    attachment: Attachment,
    fence: Vec<Arc<Session>>,
}

/// A session's hold on its connection in the session table. The session is attached from
/// the moment it is made or resumed, under the table's lock, so no other connection sees it
/// disconnected (to evict, or to take over) while its WELCOME is on the way; it is detached,
/// and lingers, when this is dropped, however the connection ends.
struct Attachment {
    sessions: Arc<Mutex<SessionTable<Arc<Session>>>>,
    id: SessionId,
    conn: u64,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.sessions
            .lock()
            .unwrap()
            .detach(&self.id, self.conn, Instant::now());
    }
}

/// Why a connection was not opened.
enum Unopened {
    /// Its handshake place went to a newer connection; logged when that one came.
    Evicted,
    /// Failed before the client proved its key, or timed out: logged rate-limited.
    Stranger(Kind, String),
    /// Refused or failed in the negotiation, the client's key proved.
    Negotiation(String),
}

impl Shared {
    /// Decides whether a connection from `peer` may start a handshake: within its
    /// prefix's rate and share, making room by dropping the oldest handshake if need be.
    pub(super) fn admit(&self, peer: SocketAddr, now: Instant) -> Option<HandshakeSlot> {
        let prefix = Prefix::of(peer.ip());
        if !self.rates.lock().unwrap().allow(prefix, now) {
            let why = format!(
                "{peer}: over the handshake rate of prefix {prefix} ({}/s, burst {})",
                Rates::RATE,
                Rates::BURST
            );
            self.refused(Kind::Rate, why, now);
            return None;
        }
        match self.handshakes.admit(peer.ip()) {
            Admitted::PrefixFull => {
                let why = format!(
                    "{peer}: handshake limit for prefix {prefix}: {} in progress \
                     (--max-handshakes-per-prefix)",
                    self.handshakes.per_prefix()
                );
                self.refused(Kind::PrefixFull, why, now);
                None
            }
            Admitted::In(slot, evicted) => {
                if let Some(old) = evicted {
                    let why = format!(
                        "the oldest, from {old}, for one from {peer}: {} handshakes in progress \
                         (--max-handshakes)",
                        self.handshakes.max()
                    );
                    self.refused(Kind::Evicted, why, now);
                }
                Some(slot)
            }
        }
    }

    fn refused(&self, kind: Kind, what: String, now: Instant) {
        self.metrics.refused(kind);
        let line = self.refusals.lock().unwrap().note(kind, what, now);
        if let Some(line) = line {
            log::log!(kind.level(), "{line}");
        }
    }

    pub(super) async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: HandshakeSlot,
    ) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let handshake = self.clone().handshake(conn, stream, slot);
        let (tx, rx, session, places, told) = match self.handshakers.spawn(handshake).await {
            Ok(v) => v,
            Err(Unopened::Evicted) => return,
            Err(Unopened::Stranger(kind, why)) => {
                self.refused(kind, format!("{peer}: {why:?}"), Instant::now());
                return;
            }
            Err(Unopened::Negotiation(why)) => {
                log::info!("connection from {peer} closed: {why:?}");
                return;
            }
        };
        log::info!(
            "{peer}: client {} opened export '{}' {:?} (connection {conn})",
            session.client,
            session.export.name,
            session.access
        );
        let hangup = tx.hangup();
        let replies = Replies::new(tx, self.pool.clone());
        session.attach(conn, replies.clone(), told);
        let Places {
            attachment,
            _key,
            _all,
            _budget,
        } = places;
        let stopped = async {
            let stop = self.stop.listen();
            if !self.shutting_down.load(Ordering::SeqCst) {
                stop.await;
            }
            "the server is shutting down".to_string()
        };
        // Requests are read by threads of their own, which the kernel wakes when they come
        // and which hand each to a worker: no reactor between the socket and the disk. Two
        // take turns (see `baton`), so that one can run a lone request itself.
        let (ended_tx, ended) = smol::channel::bounded(2);
        let (closing_tx, closing) = smol::channel::bounded::<()>(1);
        let reader = rx.into_blocking().and_then(|rx| {
            let readiness = rx.readiness()?;
            let baton = Arc::new(Baton::new(rx, readiness)?);
            for _ in 0..2 {
                let (shared, session, baton) = (self.clone(), session.clone(), baton.clone());
                let (closing, ended_tx) = (closing.clone(), ended_tx.clone());
                std::thread::Builder::new()
                    .name(format!("dst-conn-{conn}"))
                    .spawn(move || {
                        let read = shared.read_requests(&session, conn, &baton, &closing);
                        let _ = ended_tx.send_blocking(smol::block_on(read));
                        baton.end();
                    })?;
            }
            Ok(())
        });
        drop(ended_tx);
        let why = match reader {
            Ok(_) => {
                let read = async {
                    ended
                        .recv()
                        .await
                        .unwrap_or_else(|_| "the request reader stopped".into())
                };
                read.or(replies.ended()).or(stopped).await
            }
            Err(e) => format!("cannot start a reader for the connection: {e}"),
        };
        // The readers stop at once, blocked on the socket or on the window; one running a
        // request itself is not waited for, or a hung disk would keep the session attached
        // to a client that is gone. What it runs is in the session's fence and reply cache,
        // like any request executing: a successor waits for it, and a resend joins it.
        // Replies already queued still go out.
        drop(closing_tx);
        let _ = hangup.shutdown(Shutdown::Read);
        session.detach(conn);
        drop(attachment);
        // Logged once the session is free to be resumed, taken over or evicted.
        log::info!("{peer}: connection {conn} closed: {why}");
        replies.close().await;
    }

    /// The handshake and the negotiation, each within its deadline, unless the connection's
    /// place is given to a newer one first. Its place is given back once it has opened.
    async fn handshake(
        self: Arc<Self>,
        conn: u64,
        stream: TcpStream,
        slot: HandshakeSlot,
    ) -> Result<Opened, Unopened> {
        let (mut reader, mut writer) = (stream.clone(), stream);
        let open = async {
            let flight = async {
                channel::accept_first_flight(&mut reader, &mut writer, &self.ciphers)
                    .await
                    .map_err(|e| Unopened::Stranger(Kind::Failed, e.to_string()))
            };
            let late = async {
                smol::Timer::after(self.first_flight_timeout).await;
                Err(Unopened::Stranger(
                    Kind::FirstFlight,
                    format!(
                        "sent no first handshake message within {:?}",
                        self.first_flight_timeout
                    ),
                ))
            };
            let flight = flight.or(late).await?;
            self.open(conn, flight, reader, writer).await
        };
        let timeout = async {
            smol::Timer::after(self.handshake_timeout).await;
            Err(Unopened::Stranger(
                Kind::Timeout,
                format!(
                    "did not finish the handshake within {:?}",
                    self.handshake_timeout
                ),
            ))
        };
        let evicted = async {
            slot.evicted().await;
            Err(Unopened::Evicted)
        };
        open.or(timeout).or(evicted).await
    }

    /// The rest of the handshake, and negotiation. Also returns the connection's places
    /// among its key's, among all and in the budget.
    async fn open(
        &self,
        conn: u64,
        flight: FirstFlight,
        reader: TcpStream,
        writer: TcpStream,
    ) -> Result<Opened, Unopened> {
        let (mut tx, mut rx, client) = flight
            .accept(reader, writer, &self.key, |key| {
                match self.authorized_keys.read().unwrap().lookup(key) {
                    Some(_) => Ok(()),
                    None => Err(format!(
                    "client key {key} is not in this server's authorized keys; its operator can \
                     add it there to admit this client"
                )),
                }
            })
            .await
            .map_err(|e| Unopened::Stranger(Kind::Failed, e.to_string()))?;
        // The client has proved its key: its first record decrypted in `accept`.
        let hello = match rx.recv(&NEGOTIATION_LIMITS).await {
            Ok(Some(Frame::Hello(h))) => h,
            Ok(Some(_)) => return Err(Unopened::Negotiation("first frame is not HELLO".into())),
            Ok(None) => {
                let why = "closed before negotiation".into();
                return Err(Unopened::Stranger(Kind::Failed, why));
            }
            Err(e) => return Err(Unopened::Stranger(Kind::Failed, e.to_string())),
        };
        let slot = self.per_key.try_take(&client);
        let open = self.connections.try_take(&());
        let admission = self.budget.admit(conn);
        let result = match (&slot, &open, &admission) {
            (Some(_), Some(_), Some(_)) => match self.negotiate(conn, &client, &hello) {
                Ok(Negotiated {
                    session,
                    attachment,
                    fence,
                }) => self.fence(session, fence).await.map(|s| (s, attachment)),
                Err(refused) => Err(refused),
            },
            (Some(_), Some(_), None) => Err((
                libc::EAGAIN,
                "the server's memory budget is in use by other connections; try again later, \
                 or raise the server's --memory-budget"
                    .to_string(),
            )),
            (None, _, _) => Err((
                libc::EUSERS,
                format!(
                    "{} connections with this client key are open, the most allowed; close one, \
                     or raise the server's --max-connections-per-key",
                    self.per_key.max()
                ),
            )),
            (_, None, _) => Err((
                libc::EUSERS,
                format!(
                    "{} connections are open on this server, the most allowed; try again later, \
                     or raise the server's --max-connections",
                    self.connections.max()
                ),
            )),
        };
        // Read once: the size told is the size the client knows.
        let size = result.as_ref().map_or(0, |(s, _)| s.export.size());
        let welcome = match &result {
            Ok((s, _)) => Welcome::Accepted(ExportInfo {
                version: PROTOCOL_VERSION,
                export: s.export.name.clone(),
                access: s.access,
                session: s.id,
                resumed: hello.session == Some(s.id),
                boot_id: self.boot_id.clone(),
                size,
                block_size: s.export.block_size,
                max_transfer: self.max_transfer.min(hello.max_transfer.max(64 << 10)),
                features: features::ALL,
            }),
            Err((status, message)) => Welcome::Refused {
                status: *status as u32,
                message: message.clone(),
            },
        };
        let mut buf = Vec::new();
        protocol::encode_welcome(&mut buf, &welcome);
        tx.send(&buf)
            .await
            .map_err(|e| Unopened::Negotiation(e.to_string()))?;
        match result {
            Ok((s, attachment)) => Ok((
                tx,
                rx,
                s,
                Places {
                    _key: slot.expect("negotiated only with a slot"),
                    _all: open.expect("negotiated only with a slot"),
                    _budget: admission.expect("negotiated only when admitted"),
                    attachment,
                },
                (hello.features & features::RESIZE != 0).then_some(size),
            )),
            Err((_, message)) => Err(Unopened::Negotiation(format!("refused: {message}"))),
        }
    }

    /// Decides whether a client may open what it asks for, and finds or makes its session.
    /// A new writer comes with the ended sessions of its export still executing, which it
    /// must wait for (see [`fence`](Self::fence)).
    fn negotiate(
        &self,
        conn: u64,
        client: &PublicKey,
        hello: &Hello,
    ) -> Result<Negotiated, Refused> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err((libc::ESHUTDOWN, "the server is shutting down".into()));
        }
        let export = self.exports.get(&hello.export);
        let grant = self
            .authorized_keys
            .read()
            .unwrap()
            .grant(client, &hello.export);
        let target = export.map(|e| negotiation::Target {
            read_only: e.read_only,
        });
        negotiation::check(hello, target, grant)?;
        let export = export.expect("checked: the export exists");
        let ask = Ask {
            client: *client,
            export: &export.name,
            access: hello.access,
        };
        let comment = (self.authorized_keys.read().unwrap())
            .lookup(client)
            .map(|k| k.comment.clone())
            .unwrap_or_default();
        let attachment = |id| Attachment {
            sessions: self.sessions.clone(),
            id,
            conn,
        };
        let mut sessions = self.sessions.lock().unwrap();
        if let Some(s) = hello.session.and_then(|id| sessions.resume(&id, &ask)) {
            sessions.attach(&s.id, conn);
            return Ok(Negotiated {
                attachment: attachment(s.id),
                session: s,
                fence: Vec::new(),
            });
        }
        let session = Arc::new(Session::new(
            random_id(),
            *client,
            export.clone(),
            hello.access,
            ReplyCache::new(self.session_requests * CACHE_PER_REQUEST),
            self.metrics.client(client, &comment),
        ));
        let now = Instant::now();
        let ended = sessions.expire(now);
        let made = sessions.create(session.id, &ask, session.clone(), now);
        if made.is_ok() {
            sessions.attach(&session.id, conn);
        }
        drop(sessions);
        self.end_sessions(ended);
        let gone =
            made.map_err(|r| negotiation::refused_session(&r, &export.name, self.session_linger))?;
        self.end_sessions(gone);
        let mut fence = Vec::new();
        if hello.access == Access::ReadWrite {
            let mut draining = self.draining.lock().unwrap();
            draining.retain(|s| !s.is_drained());
            fence.extend(
                draining
                    .iter()
                    .filter(|s| Arc::ptr_eq(&s.export, export))
                    .cloned(),
            );
        }
        Ok(Negotiated {
            attachment: attachment(session.id),
            session,
            fence,
        })
    }

    /// Admits the new writer `session` once nothing of the ended sessions `fence` (of its
    /// export) executes any more, within [`FENCE_WAIT`]; past it, refuses it, so that it is
    /// never admitted unfenced. Their queued requests are cancelled as their turn comes.
    async fn fence(
        &self,
        session: Arc<Session>,
        fence: Vec<Arc<Session>>,
    ) -> Result<Arc<Session>, Refused> {
        if fence.is_empty() {
            return Ok(session);
        }
        let started = Instant::now();
        let drained = async {
            for s in &fence {
                s.drained().await;
            }
            true
        };
        let late = async {
            smol::Timer::after(FENCE_WAIT).await;
            false
        };
        if drained.or(late).await {
            log::info!(
                "export '{}': the new session waited {:?} for the requests of the one before",
                session.export.name,
                started.elapsed()
            );
            return Ok(session);
        }
        self.sessions.lock().unwrap().discard(&session.id);
        session.end();
        log::warn!(
            "export '{}': a new session refused: the one before still has requests executing \
             after {FENCE_WAIT:?} (a slow or stalled disk?)",
            session.export.name
        );
        Err((
            libc::EAGAIN,
            format!(
                "the previous session of export '{}' still has requests executing on the \
                 server's disk; they must finish first, so that none runs after this session's \
                 writes; try again",
                session.export.name
            ),
        ))
    }

    /// Lets go of the sessions disconnected for longer than the linger time.
    pub(super) fn expire_sessions(&self) {
        let ended = self.sessions.lock().unwrap().expire(Instant::now());
        self.end_sessions(ended);
    }

    /// Closes the fences of sessions that left the table (see `session`) and logs why
    /// they ended; read-write ones with requests still executing are kept until those
    /// finish, for the export's next writer to wait for.
    fn end_sessions(&self, ended: Vec<Ended<Arc<Session>>>) {
        for Ended { value: s, why } in ended {
            let left = s.end();
            let why = match why {
                EndReason::Expired => "expired",
                EndReason::Evicted => "evicted for a newer session",
                EndReason::Replaced => "replaced by a new one of the same client",
            };
            log::info!(
                "export '{}': session of client {} {why}; {} queued requests cancelled, {} \
                 executing",
                s.export.name,
                s.client,
                left.queued,
                left.executing
            );
            if s.access == Access::ReadWrite && left.executing > 0 {
                self.draining.lock().unwrap().push(s);
            }
        }
    }
}

fn random_id() -> SessionId {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).expect("the OS random number generator works");
    id
}
