//! A fault-injecting TCP proxy for tests: it sits between a dst client and a real
//! `dst-server` on 127.0.0.1, understands the channel's framing (see `dst::channel`), and
//! can stall, delay, drop, duplicate, corrupt or cut whole records on demand.
//!
//! ```ignore
//! let server = s.server(&["--export", "disk=disk.img", "--create-size", "1M"]);
//! let proxy = Proxy::start(server.addr);
//! let mut cfg = s.client(&server, "disk", Access::ReadWrite);
//! cfg.server = proxy.addr().to_string(); // the client now talks through the proxy
//! let mut c = connect(&cfg);
//! proxy.set_fault(Fault::FlipByte(Direction::ToServer));
//! assert!(smol::block_on(c.ping()).is_err()); // the server rejected the forged record
//! ```
//!
//! # What the proxy sees
//!
//! Each proxied connection is parsed into *units*: the handshake messages (client to
//! server: the 8-byte preamble, then `len:u16 msg1`; server to client: `code:u8 len:u16
//! msg2`), then *records* `len:u16 ciphertext` in both directions. Negotiation (HELLO and
//! WELCOME) travels in the first record of each direction. Handshake units are always
//! forwarded untouched; only [`Fault::Stall`], [`Fault::Delay`] and [`Fault::RefuseNew`]
//! affect them. [`Proxy::records`] counts records only.
//!
//! # Faults
//!
//! One fault is active at a time, for every connection, and applies to traffic from the
//! moment it is set ([`Proxy::set_fault`]). The one-shot faults ([`Fault::DropToClient`],
//! [`Fault::DuplicateToServer`], [`Fault::FlipByte`], [`Fault::CutMidRecord`]) hit the next
//! matching records, whichever connection carries them, and then the proxy reverts to
//! [`Fault::None`] by itself: poll [`Proxy::fault`] or use [`Proxy::wait_for_fault_spent`]
//! to know that one has fired.
//!
//! Records carry implicit nonces (a counter per direction), so after a dropped or
//! duplicated record the *next* record on that connection fails authentication at the
//! receiver, and an altered record fails itself: every record fault ends that connection
//! sooner or later. They differ in
//! when and how, which is what a client's resend and reconnect logic must survive:
//!
//! - `DropToClient`: replies vanish silently; the client hears nothing until its next reply
//!   fails to decrypt (or it times out and pings);
//! - `DuplicateToServer`: the server executes the request(s) in the record, then rejects
//!   the copy and closes; the reply may or may not have left before it did (an "executed, ack lost" case);
//! - `FlipByte`: the receiver rejects that very record and closes;
//! - `CutMidRecord`: the connection ends in the middle of a record.
//!
//! # Threads
//!
//! A listener thread accepts; each connection has, per direction, a reader thread (which
//! frames units and time-stamps them) and a forwarder thread (which waits out stalls and
//! delays, applies faults and writes). A delay is thus latency, not a bandwidth cap: a
//! burst of records read together is forwarded together, `d` later. Dropping the [`Proxy`]
//! closes every connection and ends all of its threads promptly.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use dst::client::ClientConfig;

use super::wait_until;

/// How long the proxy's waits wait before they fail the test.
const PATIENCE: Duration = Duration::from_secs(10);

/// Which way traffic flows through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client to the server: requests.
    ToServer,
    /// From the server to the client: replies.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToServer => 0,
            Direction::ToClient => 1,
        }
    }
}

/// What the proxy does to traffic; see the [module documentation](self) for how faults
/// interact with the channel.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward everything as it comes.
    #[default]
    None,
    /// Stop reading from both sockets of every connection, and forward nothing (not even
    /// what was already read), until the fault changes. Nothing is closed; the peers'
    /// bytes wait in the proxy and in the kernel's buffers.
    Stall,
    /// Forward each unit (handshake messages included) this long after the proxy read it,
    /// in both directions: a round trip gains twice this.
    Delay(Duration),
    /// Drop the next N records going to the client (replies), then forward normally.
    DropToClient(u32),
    /// Send the next N records going to the server twice each, then forward normally.
    DuplicateToServer(u32),
    /// Flip one byte in the middle of the ciphertext of the next record in this direction
    /// (not its length, so the framing stays intact and the receiver's AEAD check fails).
    FlipByte(Direction),
    /// Forward the first half of the next record in this direction, then close both sides
    /// of that connection.
    CutMidRecord(Direction),
    /// Accept new connections and close them at once while set; existing connections keep
    /// flowing. The client sees its handshake fail.
    RefuseNew,
}

/// A running proxy on 127.0.0.1; dropping it closes every connection and stops its threads.
pub struct Proxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    listener: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        assert!(
            upstream.ip().is_loopback(),
            "the test proxy only talks to the loopback interface, not {upstream}"
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            port: addr.port(),
            state: Mutex::new(State {
                fault: Fault::None,
                upstream,
                conns: Vec::new(),
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            records: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        let sh = shared.clone();
        let listener = thread::Builder::new()
            .name(thread_name(addr.port(), ""))
            .spawn(move || sh.listen(listener))
            .expect("proxy thread starts");
        Proxy {
            shared,
            addr,
            listener: Some(listener),
        }
    }

    /// `client`, talking through the proxy.
    pub fn route(&self, mut client: ClientConfig) -> ClientConfig {
        client.server = self.addr().to_string();
        client
    }

    /// Where clients connect: `cfg.server = proxy.addr().to_string()`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends connections accepted from now on to `upstream`, for instance a restarted
    /// server on a new port. Existing connections keep their server.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        assert!(
            upstream.ip().is_loopback(),
            "not a loopback address: {upstream}"
        );
        self.shared.lock().upstream = upstream;
    }

    /// Replaces the active fault; it applies from now on, to existing and new connections.
    /// A count of 0 (`DropToClient(0)`, `DuplicateToServer(0)`) is [`Fault::None`].
    pub fn set_fault(&self, f: Fault) {
        let f = match f {
            Fault::DropToClient(0) | Fault::DuplicateToServer(0) => Fault::None,
            f => f,
        };
        self.shared.lock().fault = f;
        self.shared.changed.notify_all();
    }

    /// The active fault: a one-shot fault reads [`Fault::None`] once it has fired.
    pub fn fault(&self) -> Fault {
        self.shared.lock().fault.clone()
    }

    /// Waits until a one-shot fault has fired (the active fault is back to
    /// [`Fault::None`]); panics after 10 seconds.
    pub fn wait_for_fault_spent(&self) {
        wait_until("the fault to fire", PATIENCE, || {
            self.fault() == Fault::None
        });
    }

    /// Closes every current connection at once, both sides (the peers see an end of stream,
    /// or a reset if they had unread bytes in flight). New connections are still accepted.
    pub fn cut_all(&self) {
        let conns = std::mem::take(&mut self.shared.lock().conns);
        for c in &conns {
            c.close();
        }
        self.shared.changed.notify_all();
    }

    /// Connections accepted so far, including those refused under [`Fault::RefuseNew`] or
    /// closed because the server could not be reached: a client's connection attempts.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently open through the proxy.
    pub fn open_connections(&self) -> usize {
        self.shared.lock().conns.len()
    }

    /// Records forwarded so far in `dir`, over all connections; handshake messages are not
    /// counted, a duplicated record counts twice, dropped and cut records not at all. A
    /// record is counted just before it is written, so one that a peer received is counted.
    pub fn records(&self, dir: Direction) -> u64 {
        self.shared.records[dir.index()].load(Ordering::SeqCst)
    }

    /// Waits until at least `n` connections were accepted in all; panics after 10 seconds.
    pub fn wait_for_connections(&self, n: usize) {
        wait_until(&format!("{n} connections"), PATIENCE, || {
            self.connections() >= n
        });
    }

    /// Waits until exactly `n` connections are open, for instance 0 after a client closed
    /// and its server followed; panics after 10 seconds.
    pub fn wait_for_open_connections(&self, n: usize) {
        wait_until(&format!("{n} open connections"), PATIENCE, || {
            self.open_connections() == n
        });
    }

    /// Waits until at least `n` records were forwarded in `dir` in all; panics after 10
    /// seconds.
    pub fn wait_for_records(&self, dir: Direction, n: u64) {
        wait_until(&format!("{n} records {dir:?}"), PATIENCE, || {
            self.records(dir) >= n
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The listener first, so that no connection is registered after the cut below.
        if let Some(listener) = self.listener.take() {
            let _ = listener.join();
        }
        self.cut_all();
    }
}

/// Threads of the proxy on `port` are named `px<port>` (the listener) and
/// `px<port>-<connection><s|c><r|f>` (reader or forwarder towards the server or the
/// client), short enough for Linux's 15-byte thread names.
fn thread_name(port: u16, rest: &str) -> String {
    format!("px{port}{rest}")
}

/// How many threads of the proxy that listened on `port` are still alive in this process;
/// after the [`Proxy`] is dropped this falls to 0 promptly.
pub fn live_threads(port: u16) -> usize {
    let (alone, prefix) = (thread_name(port, ""), thread_name(port, "-"));
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| {
                    let comm = comm.trim_end();
                    comm == alone || comm.starts_with(&prefix)
                })
                .count()
        })
        .unwrap_or(0)
}

struct Shared {
    /// The proxy's own port, to name its threads.
    port: u16,
    state: Mutex<State>,
    /// Signalled when the fault changes or connections close, for stalled and delayed
    /// forwarders.
    changed: Condvar,
    stop: AtomicBool,
    accepted: AtomicUsize,
    next_id: AtomicU64,
    records: [AtomicU64; 2],
}

struct State {
    fault: Fault,
    upstream: SocketAddr,
    conns: Vec<Arc<Conn>>,
}

/// One proxied connection.
struct Conn {
    id: u64,
    client: TcpStream,
    server: TcpStream,
    closed: AtomicBool,
    /// Directions whose source reached its end and whose forwarder finished.
    ended: AtomicU8,
}

impl Conn {
    fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            let _ = self.client.shutdown(Shutdown::Both);
            let _ = self.server.shutdown(Shutdown::Both);
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// (source, destination) of `dir`.
    fn ends(&self, dir: Direction) -> (&TcpStream, &TcpStream) {
        match dir {
            Direction::ToServer => (&self.client, &self.server),
            Direction::ToClient => (&self.server, &self.client),
        }
    }
}

/// What a reader hands its forwarder.
enum Unit {
    /// A whole handshake message, read at this instant.
    Handshake(Vec<u8>, Instant),
    /// A whole record, length included, read at this instant.
    Record(Vec<u8>, Instant),
    /// The bytes of an incomplete unit at the end of the stream.
    Tail(Vec<u8>),
}

/// What to do with one record.
enum Action {
    Forward,
    Drop,
    Duplicate,
    Flip,
    Cut,
}

/// Records a reader may have read ahead of its forwarder (each at most 64 KiB).
const QUEUE: usize = 64;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn listen(self: Arc<Self>, listener: TcpListener) {
        while !self.stopping() {
            match listener.accept() {
                Ok((client, _)) => self.admit(client),
                // Nothing to accept (or out of descriptors): look again shortly.
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn admit(self: &Arc<Self>, client: TcpStream) {
        self.accepted.fetch_add(1, Ordering::SeqCst);
        let upstream = {
            let st = self.lock();
            if st.fault == Fault::RefuseNew {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            st.upstream
        };
        let server = match TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
        };
        let conn = match self.pair(&client, &server) {
            Ok(c) => Arc::new(c),
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                return;
            }
        };
        self.lock().conns.push(conn.clone());
        for dir in [Direction::ToServer, Direction::ToClient] {
            let (tx, rx) = sync_channel(QUEUE);
            let d = match dir {
                Direction::ToServer => 's',
                Direction::ToClient => 'c',
            };
            let port = self.port;
            let name = |role| thread_name(port, &format!("-{}{d}{role}", conn.id));
            let (sh, c) = (self.clone(), conn.clone());
            let reader = thread::Builder::new()
                .name(name('r'))
                .spawn(move || sh.read(&c, dir, tx));
            let (sh, c) = (self.clone(), conn.clone());
            let forwarder = thread::Builder::new()
                .name(name('f'))
                .spawn(move || sh.forward(&c, dir, rx));
            if reader.is_err() || forwarder.is_err() {
                self.close(&conn);
                return;
            }
        }
    }

    fn pair(&self, client: &TcpStream, server: &TcpStream) -> io::Result<Conn> {
        client.set_nonblocking(false)?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        Ok(Conn {
            id: self.next_id.fetch_add(1, Ordering::SeqCst),
            client: client.try_clone()?,
            server: server.try_clone()?,
            closed: AtomicBool::new(false),
            ended: AtomicU8::new(0),
        })
    }

    /// Closes `conn` both sides and forgets it.
    fn close(&self, conn: &Conn) {
        conn.close();
        self.lock().conns.retain(|c| c.id != conn.id);
        self.changed.notify_all();
    }

    /// Blocks while the fault is [`Fault::Stall`]; false if the connection closed meanwhile.
    fn wait_unstalled(&self, conn: &Conn) -> bool {
        self.hold(conn, None)
    }

    /// Waits out a stall and, for a unit read at `read_at`, the active delay. False if the
    /// connection closed or the proxy is stopping meanwhile.
    fn hold(&self, conn: &Conn, read_at: Option<Instant>) -> bool {
        let mut st = self.lock();
        loop {
            if self.stopping() || conn.is_closed() {
                return false;
            }
            let wait = match (&st.fault, read_at) {
                // Woken by set_fault and close; the timeout is only a safety net.
                (Fault::Stall, _) => Duration::from_millis(100),
                (Fault::Delay(d), Some(at)) => {
                    match (at + *d).checked_duration_since(Instant::now()) {
                        Some(left) if !left.is_zero() => left,
                        _ => return true,
                    }
                }
                _ => return true,
            };
            st = self
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// What to do with the next record in `dir`; spends one-shot faults.
    fn action(&self, dir: Direction) -> Action {
        let mut st = self.lock();
        let (action, next) = match (&st.fault, dir) {
            (Fault::DropToClient(n), Direction::ToClient) if *n > 0 => {
                (Action::Drop, Fault::DropToClient(n - 1))
            }
            (Fault::DuplicateToServer(n), Direction::ToServer) if *n > 0 => {
                (Action::Duplicate, Fault::DuplicateToServer(n - 1))
            }
            (Fault::FlipByte(d), _) if *d == dir => (Action::Flip, Fault::None),
            (Fault::CutMidRecord(d), _) if *d == dir => (Action::Cut, Fault::None),
            _ => return Action::Forward,
        };
        st.fault = match next {
            Fault::DropToClient(0) | Fault::DuplicateToServer(0) => Fault::None,
            f => f,
        };
        action
    }

    /// Reads units from the source of `dir` and queues them for the forwarder.
    fn read(&self, conn: &Conn, dir: Direction, tx: SyncSender<Unit>) {
        let (src, _) = conn.ends(dir);
        let mut src = BufReader::with_capacity(1 << 17, src);
        // (bytes before the payload, whether the last two of them are its length)
        let handshake: &[(usize, bool)] = match dir {
            Direction::ToServer => &[(8, false), (2, true)],
            Direction::ToClient => &[(3, true)],
        };
        let mut units = handshake.iter().map(|&(head, len)| (head, len, true));
        loop {
            let (head, has_len, is_handshake) = units.next().unwrap_or((2, true, false));
            if !self.wait_unstalled(conn) {
                return;
            }
            let (bytes, complete) = match read_unit(&mut src, head, has_len) {
                Ok(r) => r,
                Err(_) => {
                    self.close(conn);
                    return;
                }
            };
            let now = Instant::now();
            let unit = match (complete, is_handshake) {
                (true, true) => Unit::Handshake(bytes, now),
                (true, false) => Unit::Record(bytes, now),
                (false, _) if bytes.is_empty() => return, // clean end: dropping tx says so
                (false, _) => Unit::Tail(bytes),
            };
            if tx.send(unit).is_err() || !complete {
                return;
            }
        }
    }

    /// Forwards queued units to the destination of `dir`, applying the active fault. When
    /// the source ended, passes the end on (half close) and closes the connection once
    /// both directions have ended.
    fn forward(&self, conn: &Conn, dir: Direction, rx: Receiver<Unit>) {
        let (_, mut dst) = conn.ends(dir);
        let records = &self.records[dir.index()];
        while let Ok(unit) = rx.recv() {
            let ok = match unit {
                Unit::Handshake(bytes, at) => {
                    self.hold(conn, Some(at)) && dst.write_all(&bytes).is_ok()
                }
                Unit::Tail(bytes) => self.hold(conn, None) && dst.write_all(&bytes).is_ok(),
                Unit::Record(mut bytes, at) => {
                    if !self.hold(conn, Some(at)) {
                        return;
                    }
                    match self.action(dir) {
                        Action::Forward => send(dst, &bytes, records),
                        Action::Drop => true,
                        Action::Duplicate => {
                            send(dst, &bytes, records) && send(dst, &bytes, records)
                        }
                        Action::Flip => {
                            let mid = 2 + (bytes.len() - 2) / 2;
                            if let Some(b) = bytes.get_mut(mid) {
                                *b ^= 0xff;
                            }
                            send(dst, &bytes, records)
                        }
                        Action::Cut => {
                            let _ = dst.write_all(&bytes[..bytes.len() / 2]);
                            false
                        }
                    }
                }
            };
            if !ok {
                self.close(conn);
                return;
            }
        }
        // The source ended cleanly (or the connection was closed, which is harmless here).
        let _ = dst.shutdown(Shutdown::Write);
        if conn.ended.fetch_add(1, Ordering::SeqCst) == 1 {
            self.close(conn);
        }
    }
}

/// Counts one record, then writes `bytes`; false on failure. Counting first means that
/// whatever a peer has received is already counted.
fn send(mut dst: &TcpStream, bytes: &[u8], records: &AtomicU64) -> bool {
    records.fetch_add(1, Ordering::SeqCst);
    dst.write_all(bytes).is_ok()
}

/// Reads one unit: `head` bytes, then, if `has_len`, as many more as their last two bytes
/// say (big endian). Returns the bytes and whether the unit is complete; an incomplete unit
/// (possibly empty) means the stream ended.
fn read_unit(src: &mut impl Read, head: usize, has_len: bool) -> io::Result<(Vec<u8>, bool)> {
    let mut buf = vec![0u8; head];
    let n = read_full(src, &mut buf)?;
    if n < head {
        buf.truncate(n);
        return Ok((buf, false));
    }
    if has_len {
        let len = u16::from_be_bytes([buf[head - 2], buf[head - 1]]) as usize;
        buf.resize(head + len, 0);
        let n = read_full(src, &mut buf[head..])?;
        if n < len {
            buf.truncate(head + n);
            return Ok((buf, false));
        }
    }
    Ok((buf, true))
}

/// Fills `buf` unless the stream ends first; returns how much it read.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match src.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}
