//! dst's TCP connections: dialling a server by name, every address it resolves to in
//! turn as ssh and curl do, and their congestion control, chosen by name as with
//! `TCP_CONGESTION`.
//!
//! A client's writes leave in bursts of up to the window; a pacing control such as BBR
//! (some distributions' default) spreads each burst over time, and on a fast link the CPUs
//! then idle between the pieces of work that burst was. CUBIC sends what the window
//! allows: sequential writes over 127.0.0.1 ran about a fifth faster with it, the other
//! jobs of the benchmark about the same (docs/performance.md). So dst asks for CUBIC unless
//! told otherwise, quietly keeping the system's default where this process may not choose.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::str::FromStr;

use smol::net::TcpStream;

/// The congestion control asked for when none is given.
const PREFERRED: &str = "cubic";
/// `TCP_CA_NAME_MAX` less the terminating NUL.
const NAME_MAX: usize = 15;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC where this process may choose it, else the system's default.
    #[default]
    Preferred,
    /// The system's default (`net.ipv4.tcp_congestion_control`).
    System,
    /// This one; a socket that cannot have it is an error.
    Named(String),
}

impl Congestion {
    /// Sets this congestion control on `socket`; a listening socket passes it on to the
    /// connections it accepts.
    pub fn apply(&self, socket: &impl AsRawFd) -> io::Result<()> {
        match self {
            Congestion::System => Ok(()),
            Congestion::Preferred => {
                if let Err(e) = set(socket, PREFERRED) {
                    log::debug!("keeping the system's TCP congestion control: {PREFERRED}: {e}");
                }
                Ok(())
            }
            Congestion::Named(name) => set(socket, name).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot use TCP congestion control '{name}': {e}; choose one listed in \
                         /proc/sys/net/ipv4/tcp_available_congestion_control (without root: \
                         tcp_allowed_congestion_control), or 'system' for the system's default"
                    ),
                )
            }),
        }
    }
}

fn set(socket: &impl AsRawFd, name: &str) -> io::Result<()> {
    // SAFETY: the option value is `name`'s bytes, with their length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "system" {
            return Ok(Congestion::System);
        }
        let ok = !s.is_empty()
            && s.len() <= NAME_MAX
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Congestion::Named(s.to_owned()))
        } else {
            Err(format!(
                "'{s}' is not a congestion control name (such as cubic, bbr or reno: up to \
                 {NAME_MAX} letters, digits, '-' or '_'), nor 'system'"
            ))
        }
    }
}

/// Connects to `server` (`HOST:PORT`): each address the name resolves to is tried in
/// turn, IPv6 and IPv4 alike, and the error names every one tried.
pub async fn dial(server: &str) -> io::Result<TcpStream> {
    let addrs = smol::net::resolve(server)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve {server}: {e}")))?;
    dial_any(server, &addrs).await
}

/// Connects to the first of `addrs` (what `server` resolved to) that accepts.
pub async fn dial_any(server: &str, addrs: &[SocketAddr]) -> io::Result<TcpStream> {
    let mut tried = Vec::new();
    let mut kind = io::ErrorKind::NotFound;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                kind = e.kind();
                tried.push(format!("{addr}: {e}"));
            }
        }
    }
    Err(io::Error::new(
        kind,
        match tried.len() {
            0 => format!("cannot connect to {server}: it resolves to no address"),
            1 => format!("cannot connect to {server} ({})", tried[0]),
            _ => format!("cannot connect to {server}: tried {}", tried.join("; ")),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// The congestion control a socket has, as the kernel reports it.
    fn current(socket: &impl AsRawFd) -> String {
        let mut buf = [0u8; 16];
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `buf`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let name = &buf[..len as usize];
        String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap()).into_owned()
    }

    #[test]
    fn names_parse_and_bad_ones_say_what_is_wanted() {
        assert_eq!("system".parse(), Ok(Congestion::System));
        assert_eq!("cubic".parse(), Ok(Congestion::Named("cubic".into())));
        for bad in ["", "cu bic", "a/b", "averyverylongname"] {
            let e = bad.parse::<Congestion>().unwrap_err();
            assert!(e.contains("congestion control name"), "{e}");
        }
    }

    #[test]
    fn a_listener_passes_its_choice_to_accepted_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // reno is built into every kernel with TCP and allowed to every process.
        Congestion::Named("reno".into()).apply(&listener).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(current(&accepted), "reno");
        Congestion::Named("reno".into()).apply(&client).unwrap();
        assert_eq!(current(&client), "reno");
    }

    #[test]
    fn an_unknown_name_is_an_error_that_says_where_to_look() {
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = Congestion::Named("nosuchcc".into())
            .apply(&socket)
            .unwrap_err();
        assert!(
            e.to_string().contains("tcp_available_congestion_control"),
            "{e}"
        );
        Congestion::Preferred.apply(&socket).unwrap();
        Congestion::System.apply(&socket).unwrap();
    }

    #[test]
    fn dialling_tries_every_address_and_names_each_that_failed() {
        smol::block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let open = listener.local_addr().unwrap();
            // A port nobody listens on: bound, then let go.
            let closed = std::net::TcpListener::bind("127.0.0.2:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let stream = dial_any("node", &[closed, open]).await.unwrap();
            assert_eq!(stream.peer_addr().unwrap(), open);

            let other = std::net::TcpListener::bind("127.0.0.3:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let e = dial_any("node:7700", &[closed, other]).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
            let text = e.to_string();
            assert!(
                text.starts_with("cannot connect to node:7700: tried ")
                    && text.contains(&closed.to_string())
                    && text.contains(&other.to_string()),
                "{text}"
            );
            let e = dial_any("node:7700", &[]).await.unwrap_err();
            assert!(e.to_string().contains("resolves to no address"), "{e}");
        });
    }

    #[test]
    fn a_name_that_does_not_resolve_says_so() {
        let e = smol::block_on(dial("no-such-host.invalid:7700")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot resolve no-such-host.invalid:7700"),
            "{e}"
        );
    }
}
