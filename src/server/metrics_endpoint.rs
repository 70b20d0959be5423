//! The `--metrics` endpoint: a minimal HTTP/1.1 responder that serves `GET /metrics` as
//! Prometheus text and nothing else.
//!
//! Meant for localhost or a management network, it is still bounded like everything a
//! peer can reach: a few scrapes at once (a connection beyond them is closed at once), a
//! request head of at most 8 KiB read within 5 s, one request per connection, and nothing
//! of the request logged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};

use super::metrics::{self, ExportView, Gauges};
use super::Shared;

/// Scrapes served at once.
const MAX_SCRAPES: usize = 8;
const MAX_HEAD: usize = 8 << 10;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What to answer a request head with.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Metrics,
    Status(u16, &'static str),
}

/// Decides the answer to a complete request head. Pure.
pub fn answer(head: &[u8]) -> Answer {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let mut parts = line.split(|&b| b == b' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    match (method, target, version, parts.next()) {
        (Some(m), Some(t), Some(v), None) if v.starts_with(b"HTTP/1.") => match (m, t) {
            (b"GET", b"/metrics") => Answer::Metrics,
            (b"GET", _) => Answer::Status(404, "Not Found"),
            _ => Answer::Status(405, "Method Not Allowed"),
        },
        _ => Answer::Status(400, "Bad Request"),
    }
}

/// Serves scrapes until the server stops (the task is dropped).
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("metrics endpoint: accept failed: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_SCRAPES {
            busy.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (shared, busy) = (shared.clone(), busy.clone());
        smol::spawn(async move {
            let timeout = async {
                smol::Timer::after(HEAD_TIMEOUT).await;
            };
            scrape(stream, &shared).or(timeout).await;
            busy.fetch_sub(1, Ordering::SeqCst);
        })
        .detach();
    }
}

async fn scrape(mut stream: TcpStream, shared: &Shared) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD {
            let _ = respond(&mut stream, 431, "Request Header Fields Too Large", "").await;
            return;
        }
    }
    let _ = match answer(&head) {
        Answer::Metrics => respond(&mut stream, 200, "OK", &text(shared)).await,
        Answer::Status(code, reason) => respond(&mut stream, code, reason, "").await,
    };
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    body: &str,
) -> std::io::Result<()> {
    let body = if body.is_empty() && code != 200 {
        format!("{code} {reason}\n")
    } else {
        body.to_owned()
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await
}

/// The exposition of the server's counters and gauges at this moment.
pub(super) fn text(shared: &Shared) -> String {
    let mut exports: Vec<_> = shared.exports.values().collect();
    exports.sort_by(|a, b| a.name.cmp(&b.name));
    let views: Vec<ExportView> = exports
        .iter()
        .map(|e| ExportView {
            name: &e.name,
            counters: &e.counters,
            corrupt_blocks: e.corrupt_blocks(),
        })
        .collect();
    let (sessions, sessions_connected) = {
        let table = shared.sessions.lock().unwrap();
        (table.len(), table.connected())
    };
    let gauges = Gauges {
        sessions,
        sessions_connected,
        connections: shared.connections.held(),
        handshakes: shared.handshakes.len(),
        budget_in_use: shared.budget.in_use(),
        budget_total: shared.memory_budget,
    };
    metrics::render(&views, &shared.metrics, &gauges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_gets_metrics() {
        assert_eq!(
            answer(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Answer::Metrics
        );
        assert_eq!(answer(b"GET /metrics HTTP/1.0\r\n\r\n"), Answer::Metrics);
        assert_eq!(
            answer(b"GET / HTTP/1.1\r\n\r\n"),
            Answer::Status(404, "Not Found")
        );
        assert_eq!(
            answer(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Answer::Status(405, "Method Not Allowed")
        );
        for garbage in [
            &b""[..],
            b"\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"\xff\x00 a b c\r\n\r\n",
            b"GET /metrics SSH-2.0\r\n\r\n",
        ] {
            assert_eq!(
                answer(garbage),
                Answer::Status(400, "Bad Request"),
                "{garbage:?}"
            );
        }
    }
}
