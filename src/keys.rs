//! Noise static key pairs (Curve25519) and their files.
//!
//! A private key file holds one line of base64 (32 bytes) and must be mode 0600; the public key
//! sits beside it in `FILE.pub`, also one line of base64. Public keys travel as that base64 text:
//! on the command line, in `FILE.pub` files and in `authorized_keys`.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The Noise pattern the keys are made for; only its DH part (25519) matters here.
const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";

const KEY_LEN: usize = 32;

/// The low-order points of Curve25519 and its twist, and the non-canonical encodings of 0 and
/// 1, with the top bit clear: the list of libsodium's `has_small_order`
/// (crypto_scalarmult/curve25519). X25519 with any of these gives the all-zero result whatever
/// the private key, so a Diffie-Hellman term with one authenticates nothing.
const LOW_ORDER: [[u8; KEY_LEN]; 7] = [
    // 0 (order 4)
    [0; KEY_LEN],
    // 1 (order 1)
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    // 325606250916557431795983626356110631294008115727848805560023387167927233504 (order 8)
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    // 39382357235489614581723060781553021112529911719440698176882885853963445705823 (order 8)
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    // p - 1 (order 2)
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // p, that is 0 (order 4)
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // p + 1, that is 1 (order 1)
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

/// Why a key could not be generated, written, read or parsed; the message is meant for the user.
#[derive(Debug)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// A Curve25519 private key, zeroed when dropped. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn public(&self) -> PublicKey {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("snow's default resolver provides Curve25519");
        dh.set(&self.0);
        let mut public = [0; KEY_LEN];
        public.copy_from_slice(dh.pubkey());
        // Snow's DH keeps a copy of the private key and does not clear it when dropped.
        dh.set(&[0; KEY_LEN]);
        PublicKey(public)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        // Best effort: moves may have left copies elsewhere, but the long-lived one goes.
        // zeroize's volatile writes are not optimised away, though the memory is about to die.
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for PrivateKey {}

/// A Curve25519 public key; displayed and parsed as standard base64 (44 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PublicKey {
    /// Whether this is a low-order (weak) point: a key for which the Diffie-Hellman result
    /// is a known constant (all zeros), so that a handshake with it proves nothing and anyone
    /// could pass for its owner without any private key. [`generate`] never makes one.
    /// X25519 ignores the top bit of the last byte, so the comparison does too; public keys
    /// are not secret, so it need not take constant time.
    pub fn is_weak(&self) -> bool {
        let mut key = self.0;
        key[KEY_LEN - 1] &= 0x7f;
        LOW_ORDER.contains(&key)
    }

    /// Parses base64 into a key without refusing weak ones: for callers that refuse them
    /// with a message of their own. Everyone else parses with [`str::parse`].
    pub fn parse_allowing_weak(s: &str) -> Result<PublicKey, KeyError> {
        decode_key(s).map(PublicKey).ok_or_else(|| {
            KeyError(
                "not a dst public key: expected 44 characters of base64 (as printed by dst-keygen)"
                    .into(),
            )
        })
    }
}

/// Why the weak key `shown` is refused.
fn weak_key(shown: &str) -> KeyError {
    KeyError(format!(
        "{shown} is a low-order (weak) key: it authenticates nothing, and anyone could pass \
         for its owner without a private key (keys made by dst-keygen never are)"
    ))
}

/// Parses a public key, refusing weak ones ([`PublicKey::is_weak`]).
impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let key = PublicKey::parse_allowing_weak(s)?;
        if key.is_weak() {
            return Err(weak_key(s.trim()));
        }
        Ok(key)
    }
}

/// Decodes one key's base64; the decoded bytes on the heap are zeroed (a private key's too).
fn decode_key(s: &str) -> Option<[u8; KEY_LEN]> {
    let bytes = Zeroizing::new(BASE64.decode(s.trim()).ok()?);
    bytes.as_slice().try_into().ok()
}

/// Generates a fresh private key from the operating system's random source.
pub fn generate() -> PrivateKey {
    let params = NOISE_PARAMS
        .parse()
        .expect("the built-in Noise pattern parses");
    let pair = snow::Builder::new(params)
        .generate_keypair()
        .expect("snow's default resolver provides an RNG and Curve25519");
    let private = Zeroizing::new(pair.private);
    PrivateKey(
        private
            .as_slice()
            .try_into()
            .expect("Curve25519 private keys are 32 bytes"),
    )
}

/// Where the public key of the private key file `private` lives: the full name plus ".pub".
pub fn public_key_path(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    name.into()
}

/// Generates a key pair and writes the private key to `path` (mode 0600) and the public key to
/// `path.pub`. Without `force` neither file is ever overwritten: whoever trusts the old public
/// key would be locked out, and a stale `path.pub` beside a new key would mislead. With
/// `force` both are replaced. A symbolic link at either path is refused, never followed.
pub fn write_keypair(path: &Path, force: bool) -> Result<PublicKey, KeyError> {
    let shown = path.display();
    let pub_path = public_key_path(path);
    let pub_shown = pub_path.display();

    // Opens `path` for writing, never through a symbolic link: O_EXCL (create_new) refuses any
    // existing name, links included, and with `force` an existing file is opened with
    // O_NOFOLLOW, so that a link planted at the path cannot redirect the key elsewhere. Says
    // whether the file is new; an existing one is truncated only once both files are open.
    let open = |path: &Path, mode: u32| {
        let mut options = OpenOptions::new();
        options
            .write(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW);
        match options.clone().create_new(true).open(path) {
            Ok(file) => Ok((file, true)),
            Err(e) if force && e.kind() == io::ErrorKind::AlreadyExists => {
                options.open(path).map(|file| (file, false))
            }
            Err(e) => Err(e),
        }
    };
    let is_link = |e: &io::Error| e.raw_os_error() == Some(libc::ELOOP);

    let (mut file, created) = open(path, 0o600).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => KeyError(format!(
            "{shown} already exists; pass --force to overwrite it (the old key stops working)"
        )),
        _ if is_link(&e) => KeyError(format!(
            "{shown} is a symbolic link; refusing to write a private key through it \
             (remove it, or pass the link's target)"
        )),
        _ => KeyError(format!("cannot create private key {shown}: {e}")),
    })?;
    // The public key file is opened before anything is written, so that a refusal leaves the
    // old key pair as it was, and no new private key without its public key. The public key
    // is for everyone to read, as far as the umask lets it.
    let (mut pub_file, _) = open(&pub_path, 0o644).map_err(|e| {
        if created {
            // We created it a moment ago, and it is still empty.
            let _ = fs::remove_file(path);
        }
        match e.kind() {
            io::ErrorKind::AlreadyExists => KeyError(format!(
                "{pub_shown} already exists, perhaps the public key of an earlier key; \
                 remove it, or choose another name for the key"
            )),
            _ if is_link(&e) => KeyError(format!(
                "{pub_shown} is a symbolic link; refusing to write the public key through it \
                 (remove it, or choose another name for the key)"
            )),
            _ => KeyError(format!("cannot create public key {pub_shown}: {e}")),
        }
    })?;
    file.set_len(0)
        .map_err(|e| KeyError(format!("cannot write private key {shown}: {e}")))?;
    pub_file
        .set_len(0)
        .map_err(|e| KeyError(format!("cannot write public key {pub_shown}: {e}")))?;

    let key = generate();
    // `mode` only applies to new files; an overwritten one keeps its old mode, so fix it before
    // the new key is written.
    let text = Zeroizing::new(BASE64.encode(key.bytes()));
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .and_then(|()| writeln!(file, "{}", text.as_str()))
        // A crash must not leave a truncated key behind a .pub that looks fine.
        .and_then(|()| file.sync_all())
        .map_err(|e| KeyError(format!("cannot write private key {shown}: {e}")))?;

    let public = key.public();
    writeln!(pub_file, "{public}").map_err(|e| {
        KeyError(format!(
            "cannot write public key {pub_shown}: {e} (the private key in {shown} is fine; \
                 the public key is also printed by dst-keygen)"
        ))
    })?;
    Ok(public)
}

/// Reads a private key file written by [`write_keypair`], refusing one that others can read.
pub fn load_private(path: &Path) -> Result<PrivateKey, KeyError> {
    let shown = path.display();
    let read_err = |e: io::Error| KeyError(format!("cannot read private key {shown}: {e}"));
    let file = fs::File::open(path).map_err(read_err)?;
    // Check the mode of the file we opened, not of whatever the path names a moment later.
    let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        let hint = if path.extension().is_some_and(|ext| ext == "pub") {
            " (is this the public key? pass the private key file, without .pub)"
        } else {
            ""
        };
        return Err(KeyError(format!(
            "private key {shown} is readable by others (mode {mode:04o}); \
             fix it with: chmod 600 {shown}{hint}"
        )));
    }
    let text = Zeroizing::new(io::read_to_string(file).map_err(read_err)?);
    decode_key(&text).map(PrivateKey).ok_or_else(|| {
        KeyError(format!(
            "{shown} is not a dst private key: expected one line of base64 \
             (create one with: dst-keygen {shown})"
        ))
    })
}

/// Takes a public key given either literally (base64) or as a key file such as `server.key.pub`.
/// A weak key is refused ([`PublicKey::is_weak`]).
pub fn load_public(arg: &str) -> Result<PublicKey, KeyError> {
    if PublicKey::parse_allowing_weak(arg).is_ok() {
        return arg.parse();
    }
    let text = fs::read_to_string(arg).map_err(|e| {
        KeyError(format!(
            "{arg} is neither a base64 public key nor a readable key file: {e} \
             (a public key is 44 characters of base64, as printed by dst-keygen)"
        ))
    })?;
    let token = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .and_then(|line| line.split_whitespace().next());
    let key = token
        .and_then(|t| PublicKey::parse_allowing_weak(t).ok())
        .ok_or_else(|| {
            KeyError(format!(
                "{arg} is not a dst public key file: expected a line with 44 characters of base64 \
                 (as written by dst-keygen to FILE.pub)"
            ))
        })?;
    if key.is_weak() {
        return Err(weak_key(&format!("the key in {arg}, {key},")));
    }
    // A private key file has the same format, so passing server.key for server.key.pub would
    // "work" until the handshake fails far away; catch it here, where the fix is obvious.
    let sibling = public_key_path(Path::new(arg));
    if let Ok(sibling_text) = fs::read_to_string(&sibling) {
        if decode_key(&sibling_text) == Some(PrivateKey(key.0).public().0) {
            return Err(KeyError(format!(
                "{arg} is a private key; pass its public key {} instead",
                sibling.display()
            )));
        }
    }
    Ok(key)
}

#[cfg(test)]
mod tests;
