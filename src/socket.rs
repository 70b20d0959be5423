//! The TCP congestion control of dst's connections, chosen by name as with
//! `TCP_CONGESTION`.
//!
//! A client's writes leave in bursts of up to the window; a pacing control such as BBR
//! (some distributions' default) spreads each burst over time, and on a fast link the CPUs
//! then idle between the pieces of work that burst was. CUBIC sends what the window
//! allows: sequential writes over 127.0.0.1 ran about a fifth faster with it, the other
//! jobs of the benchmark about the same (README, Performance). So dst asks for CUBIC unless
//! told otherwise, quietly keeping the system's default where this process may not choose.

use std::io;
use std::os::fd::AsRawFd;
use std::str::FromStr;

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
}
