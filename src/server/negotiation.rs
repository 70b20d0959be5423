//! What a client may open, decided from its HELLO, its grant in `authorized_keys` and the
//! export, and the refusals it gets: an errno and a message that says what to do.
//!
//! A message tells a peer nothing it has no right to know: a key without rights to an
//! export is refused the same way whether or not the export exists, no list of exports
//! or server path is sent, and the holder of a busy export is not named. The export name
//! came from the peer, so it is escaped before it is quoted. Pure.

use std::time::Duration;

use super::auth::Grant;
use super::sessions::Refusal;
use crate::protocol::{printable, Access, Hello, PROTOCOL_VERSION};

/// A refusal: an errno for the client to act on, and why.
pub type Refused = (i32, String);

/// The export asked for, as far as the decision needs it.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub read_only: bool,
}

/// Whether the client with `grant` may open `export` (`None`: there is none of that
/// name) as its HELLO asks.
pub fn check(hello: &Hello, export: Option<Target>, grant: Grant) -> Result<(), Refused> {
    if hello.version != PROTOCOL_VERSION {
        return Err((
            libc::EPROTONOSUPPORT,
            format!(
                "protocol version {} is not supported; this server speaks version {PROTOCOL_VERSION}",
                hello.version
            ),
        ));
    }
    let name = printable(&hello.export);
    let may_write = match grant {
        Grant::Unknown => {
            return Err((
                libc::EACCES,
                "this client's key is no longer authorized on the server".into(),
            ))
        }
        Grant::NotThisExport => return Err(not_allowed(&name)),
        Grant::ReadOnly => false,
        Grant::ReadWrite => true,
    };
    // The key may open any export of this name: telling it there is none reveals nothing.
    let Some(export) = export else {
        return Err((
            libc::ENOENT,
            format!("the server has no export named '{name}'; check --export"),
        ));
    };
    if hello.access == Access::ReadWrite && (!may_write || export.read_only) {
        let why = if !may_write {
            "this client's key is read-only (ro) in authorized_keys on the server"
        } else {
            "the export is read-only on the server"
        };
        return Err((
            libc::EROFS,
            format!(
                "export '{name}' cannot be opened read-write: {why}; mount it read-only (--ro)"
            ),
        ));
    }
    Ok(())
}

/// The refusal for a key that may not open `name`, whether or not it exists.
fn not_allowed(name: &str) -> Refused {
    (
        libc::EACCES,
        format!(
            "this client's key may not open export '{name}'; the server's operator can add it \
             to the key's exports= in authorized_keys"
        ),
    )
}

/// The refusal for a session the table could not make.
pub fn refused_session(refusal: &Refusal, export: &str, linger: Duration) -> Refused {
    let name = printable(export);
    match refusal {
        Refusal::Busy { disconnected } => {
            let state = match disconnected {
                Some(d) => format!(
                    "disconnected {}s ago; released {}s after its disconnect",
                    d.as_secs(),
                    linger.as_secs()
                ),
                None => "connected".into(),
            };
            (
                libc::EBUSY,
                format!(
                    "export '{name}' is already open read-write by another session ({state}); \
                     unmount it there, or mount read-only (--ro)"
                ),
            )
        }
        Refusal::KeyFull => (
            libc::EUSERS,
            "this client's key has the most sessions the server allows, all connected; close \
             one, or ask the server's operator to raise --max-sessions-per-key"
                .into(),
        ),
        Refusal::Full => (
            libc::EAGAIN,
            "the server has the most sessions it allows, all connected; try again later, or \
             ask its operator to raise --max-sessions"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(export: &str, access: Access) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            export: export.into(),
            access,
            session: None,
            max_transfer: 1 << 20,
            features: 0,
        }
    }

    const RW: Option<Target> = Some(Target { read_only: false });

    #[test]
    fn a_key_without_rights_learns_nothing_of_what_exists() {
        let h = hello("secret", Access::ReadOnly);
        let exists = check(&h, RW, Grant::NotThisExport).unwrap_err();
        let missing = check(&h, None, Grant::NotThisExport).unwrap_err();
        assert_eq!(exists, missing);
        assert_eq!(exists.0, libc::EACCES);
        assert!(!exists.1.contains('/'), "no server path: {}", exists.1);
    }

    #[test]
    fn access_follows_the_grant_and_the_export() {
        assert!(check(&hello("d", Access::ReadWrite), RW, Grant::ReadWrite).is_ok());
        assert!(check(&hello("d", Access::ReadOnly), RW, Grant::ReadOnly).is_ok());
        let ro_key = check(&hello("d", Access::ReadWrite), RW, Grant::ReadOnly).unwrap_err();
        assert_eq!(ro_key.0, libc::EROFS);
        assert!(ro_key.1.contains("key is read-only"), "{}", ro_key.1);
        let ro_export = Some(Target { read_only: true });
        let e = check(&hello("d", Access::ReadWrite), ro_export, Grant::ReadWrite).unwrap_err();
        assert!(e.1.contains("export is read-only"), "{}", e.1);
        assert_eq!(
            check(&hello("d", Access::ReadOnly), None, Grant::ReadWrite)
                .unwrap_err()
                .0,
            libc::ENOENT
        );
        assert_eq!(
            check(&hello("d", Access::ReadOnly), RW, Grant::Unknown)
                .unwrap_err()
                .0,
            libc::EACCES
        );
        let old = Hello {
            version: PROTOCOL_VERSION + 1,
            ..hello("d", Access::ReadOnly)
        };
        assert_eq!(
            check(&old, RW, Grant::ReadWrite).unwrap_err().0,
            libc::EPROTONOSUPPORT
        );
    }

    #[test]
    fn a_peer_s_export_name_is_escaped_in_messages() {
        let e = check(
            &hello("x\n\u{1b}[31mred", Access::ReadOnly),
            RW,
            Grant::NotThisExport,
        )
        .unwrap_err();
        assert!(!e.1.chars().any(char::is_control), "{:?}", e.1);
        let busy = refused_session(
            &Refusal::Busy { disconnected: None },
            "x\r",
            Duration::from_secs(120),
        );
        assert!(!busy.1.chars().any(char::is_control), "{:?}", busy.1);
    }
}
