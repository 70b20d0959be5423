//! The `authorized_keys` allowlist: which client keys may open which exports, read-write or
//! read-only.
//!
//! The format follows ssh's, one client a line:
//!
//! ```text
//! # blank lines and lines starting with '#' are ignored
//! <public key> [exports=disk,backup] [ro] [# comment]
//! ```
//!
//! Options are whitespace-separated tokens after the key. `exports=` names the exports the key
//! may open (without it: all of them); `ro` restricts the key to read-only access. A token that
//! starts with `#` begins a comment running to the end of the line.

use std::collections::HashMap;
use std::path::Path;

use crate::keys::PublicKey;

const KNOWN_OPTIONS: &str = "exports=NAME[,NAME...], ro, # comment";

/// One line of `authorized_keys`.
#[derive(Debug, Clone)]
pub struct AuthorizedKey {
    pub key: PublicKey,
    /// The exports this key may open; `None` means all of them.
    pub exports: Option<Vec<String>>,
    pub read_only: bool,
    /// The text after `#`, trimmed; empty without one.
    pub comment: String,
}

/// What a client key may do with one export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// The key is not in `authorized_keys` at all.
    Unknown,
    /// The key is listed, but its `exports=` does not name this export.
    NotThisExport,
    ReadOnly,
    ReadWrite,
}

/// A parsed `authorized_keys` file.
#[derive(Debug, Clone, Default)]
pub struct AuthorizedKeys {
    entries: Vec<AuthorizedKey>,
}

impl AuthorizedKeys {
    /// Parses the file's text; errors start with `line N: `.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        let mut first_seen: HashMap<PublicKey, usize> = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let Some(entry) = parse_line(line).map_err(|e| format!("line {number}: {e}"))? else {
                continue;
            };
            // Two lines for one key would leave the operator guessing which one applies.
            if let Some(first) = first_seen.insert(entry.key, number) {
                return Err(format!(
                    "line {number}: key {} is already listed on line {first}; \
                     merge the two lines into one",
                    entry.key
                ));
            }
            entries.push(entry);
        }
        Ok(AuthorizedKeys { entries })
    }

    /// Reads and parses the file at `path`; errors start with the path.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn lookup(&self, key: &PublicKey) -> Option<&AuthorizedKey> {
        self.entries.iter().find(|entry| entry.key == *key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What `key` may do with `export`.
    pub fn grant(&self, key: &PublicKey, export: &str) -> Grant {
        let Some(entry) = self.lookup(key) else {
            return Grant::Unknown;
        };
        match &entry.exports {
            Some(names) if !names.iter().any(|name| name == export) => Grant::NotThisExport,
            _ if entry.read_only => Grant::ReadOnly,
            _ => Grant::ReadWrite,
        }
    }
}

/// Parses one line; `Ok(None)` for blank and comment lines.
fn parse_line(line: &str) -> Result<Option<AuthorizedKey>, String> {
    let (body, comment) = split_comment(line);
    let mut tokens = body.split_whitespace();
    let Some(key_text) = tokens.next() else {
        return Ok(None);
    };
    let key =
        PublicKey::parse_allowing_weak(key_text).map_err(|e| format!("{e}, found {key_text:?}"))?;
    // With a low-order key the handshake's Diffie-Hellman results are known constants:
    // whoever connects with it is admitted without any private key.
    if key.is_weak() {
        return Err(format!(
            "{key_text} is a low-order (weak) key that would let anyone in; remove it"
        ));
    }

    let mut entry = AuthorizedKey {
        key,
        exports: None,
        read_only: false,
        comment: comment.to_owned(),
    };
    for token in tokens {
        if token == "ro" {
            entry.read_only = true;
        } else if let Some(list) = token.strip_prefix("exports=") {
            if entry.exports.is_some() {
                return Err("exports= given twice; list all exports in one exports=".into());
            }
            let names: Vec<String> = list.split(',').map(str::to_owned).collect();
            if names.iter().any(String::is_empty) {
                return Err(format!(
                    "empty export name in {token:?}; expected exports=NAME[,NAME...]"
                ));
            }
            entry.exports = Some(names);
        } else {
            return Err(format!(
                "unknown option {token:?}; known options: {KNOWN_OPTIONS}"
            ));
        }
    }
    Ok(Some(entry))
}

/// Splits `line` at the first token that starts with `#`, returning the text before it and the
/// comment without its `#`, both trimmed. A `#` inside a token (say `ro#x`) is not a comment,
/// so a typo is reported rather than silently cut short.
fn split_comment(line: &str) -> (&str, &str) {
    let mut previous = ' ';
    for (at, c) in line.char_indices() {
        if c == '#' && previous.is_whitespace() {
            return (line[..at].trim(), line[at + 1..].trim());
        }
        previous = c;
    }
    (line.trim(), "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> PublicKey {
        PublicKey([byte; 32])
    }

    fn err(text: &str) -> String {
        AuthorizedKeys::parse(text).unwrap_err()
    }

    #[test]
    fn skips_blank_lines_and_comments() {
        let text = format!("# clients\n\n   \n  # indented comment\n{}\n", key(1));
        let keys = AuthorizedKeys::parse(&text).unwrap();
        assert_eq!(keys.len(), 1);
        let entry = keys.lookup(&key(1)).unwrap();
        assert_eq!(entry.exports, None);
        assert!(!entry.read_only);
        assert_eq!(entry.comment, "");

        assert!(AuthorizedKeys::parse("").unwrap().is_empty());
    }

    #[test]
    fn parses_exports_ro_and_trailing_comment() {
        let text = format!(
            "{} exports=disk,backup ro # alice's laptop\n{} exports=disk #bob\n",
            key(1),
            key(2)
        );
        let keys = AuthorizedKeys::parse(&text).unwrap();
        let alice = keys.lookup(&key(1)).unwrap();
        assert_eq!(alice.exports, Some(vec!["disk".into(), "backup".into()]));
        assert!(alice.read_only);
        assert_eq!(alice.comment, "alice's laptop");
        let bob = keys.lookup(&key(2)).unwrap();
        assert_eq!(bob.exports, Some(vec!["disk".into()]));
        assert!(!bob.read_only);
        assert_eq!(bob.comment, "bob");
        assert!(keys.lookup(&key(3)).is_none());
    }

    #[test]
    fn unknown_option_names_line_token_and_known_options() {
        let e = err(&format!("# header\n{} rw\n", key(1)));
        assert!(e.starts_with("line 2: unknown option \"rw\""), "{e}");
        assert!(e.contains("exports=NAME[,NAME...], ro"), "{e}");

        // A '#' inside a token does not start a comment.
        let e = err(&format!("{} ro#x\n", key(1)));
        assert!(e.starts_with("line 1: unknown option \"ro#x\""), "{e}");
    }

    #[test]
    fn bad_exports_lists_are_errors() {
        let e = err(&format!("{} exports=\n", key(1)));
        assert!(e.starts_with("line 1: empty export name"), "{e}");
        let e = err(&format!("{} exports=a,,b\n", key(1)));
        assert!(e.starts_with("line 1: empty export name"), "{e}");
        let e = err(&format!("{} exports=a exports=b\n", key(1)));
        assert!(e.starts_with("line 1: exports= given twice"), "{e}");
    }

    #[test]
    fn duplicate_key_names_both_lines() {
        let e = err(&format!("{}\n\n{} ro\n", key(1), key(1)));
        assert!(e.starts_with("line 3: "), "{e}");
        assert!(e.contains("already listed on line 1"), "{e}");
    }

    #[test]
    fn bad_key_names_line() {
        let e = err(&format!("{}\nnot-a-key exports=disk\n", key(1)));
        assert!(e.starts_with("line 2: not a dst public key"), "{e}");
        assert!(e.contains("\"not-a-key\""), "{e}");
    }

    #[test]
    fn weak_keys_are_errors_naming_the_line() {
        let zero = PublicKey([0; 32]);
        let e = err(&format!(
            "{}\n# the next one is weak\n{zero} ro # oops\n",
            key(1)
        ));
        assert!(
            e.starts_with(&format!("line 3: {zero} is a low-order (weak) key")),
            "{e}"
        );
        assert!(e.contains("would let anyone in; remove it"), "{e}");

        // Another low-order point, with the top bit that X25519 ignores set.
        let mut p_minus_1 = [0xff; 32];
        p_minus_1[0] = 0xec;
        let e = err(&format!("{}\n", PublicKey(p_minus_1)));
        assert!(
            e.starts_with("line 1: ") && e.contains("low-order (weak) key"),
            "{e}"
        );
    }

    #[test]
    fn load_prefixes_errors_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys");
        std::fs::write(&path, "bogus\n").unwrap();
        let e = AuthorizedKeys::load(&path).unwrap_err();
        assert!(
            e.starts_with(&format!("{}: line 1: ", path.display())),
            "{e}"
        );

        let e = AuthorizedKeys::load(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn grant_covers_every_case() {
        let text = format!(
            "{} exports=disk ro\n{} exports=disk,backup\n{}\n",
            key(1),
            key(2),
            key(3)
        );
        let keys = AuthorizedKeys::parse(&text).unwrap();
        assert_eq!(keys.grant(&key(9), "disk"), Grant::Unknown);
        assert_eq!(keys.grant(&key(1), "backup"), Grant::NotThisExport);
        assert_eq!(keys.grant(&key(1), "disk"), Grant::ReadOnly);
        assert_eq!(keys.grant(&key(2), "backup"), Grant::ReadWrite);
        assert_eq!(keys.grant(&key(3), "anything"), Grant::ReadWrite);
    }
}
