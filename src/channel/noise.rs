//! Snow, set up for the channel's handshake: its builder with a Diffie-Hellman that refuses
//! low-order keys, and the transport keys taken out of a finished handshake. Apart from the
//! handshake's states so that those read as the protocol, not as snow's plumbing.

use zeroize::Zeroizing;

use super::ChannelError;
use crate::cipher::Cipher;
use crate::keys::PublicKey;

pub(super) fn snow_err(e: snow::Error) -> ChannelError {
    ChannelError::Protocol(format!("noise: {e}"))
}

/// A snow builder whose Diffie-Hellman refuses an all-zero result.
///
/// Snow 0.10 does not: its 25519 DH (the default resolver's, curve25519-dalek's
/// `MontgomeryPoint::mul_clamped`; the ring resolver has none) returns `Ok` with the all-zero
/// result for a low-order peer key, and the handshake goes on mixing a constant that anyone
/// knows. So a weak remote static or ephemeral key is refused here twice: by name, where the
/// keys are read ([`PublicKey::is_weak`]), and by this DH, which makes any all-zero term
/// (`ee`, `es`, `se`, `ss`) a handshake error. Otherwise it is exactly `snow::Builder::new`.
pub(super) fn noise_builder(cipher: Cipher) -> snow::Builder<'static> {
    use snow::resolvers::{DefaultResolver, FallbackResolver, RingResolver};
    let snow_default = FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver));
    snow::Builder::with_resolver(
        cipher.noise_params(),
        Box::new(FallbackResolver::new(
            Box::new(NonzeroDhResolver),
            Box::new(snow_default),
        )),
    )
}

/// Resolves only the DH, to [`NonzeroDh`] around snow's own.
pub(super) struct NonzeroDhResolver;

impl snow::resolvers::CryptoResolver for NonzeroDhResolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        None
    }

    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        let inner = snow::resolvers::DefaultResolver.resolve_dh(choice)?;
        Some(Box::new(NonzeroDh(inner)))
    }

    fn resolve_hash(
        &self,
        _choice: &snow::params::HashChoice,
    ) -> Option<Box<dyn snow::types::Hash>> {
        None
    }

    fn resolve_cipher(
        &self,
        _choice: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        None
    }
}

/// A DH that fails where the result is all zeros, that is, where the peer's key is a
/// low-order point. Dropped, it clears the private key it holds (snow's does not).
struct NonzeroDh(Box<dyn snow::types::Dh>);

impl Drop for NonzeroDh {
    fn drop(&mut self) {
        // Once per key of a handshake, never per record.
        let zero = [0u8; 32];
        self.0.set(&zero[..self.0.priv_len().min(32)]);
    }
}

impl snow::types::Dh for NonzeroDh {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn pub_len(&self) -> usize {
        self.0.pub_len()
    }
    fn priv_len(&self) -> usize {
        self.0.priv_len()
    }
    fn dh_len(&self) -> usize {
        self.0.dh_len()
    }
    fn set(&mut self, privkey: &[u8]) {
        self.0.set(privkey)
    }
    fn generate(&mut self, rng: &mut dyn snow::types::Random) -> Result<(), snow::Error> {
        self.0.generate(rng)
    }
    fn pubkey(&self) -> &[u8] {
        self.0.pubkey()
    }
    fn privkey(&self) -> &[u8] {
        self.0.privkey()
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        self.0.dh(pubkey, out)?;
        // The result is secret: look at every byte, whatever they are.
        let len = self.0.dh_len().min(out.len());
        if out[..len].iter().fold(0, |acc, b| acc | b) == 0 {
            return Err(snow::Error::Dh);
        }
        Ok(())
    }
}

/// The ephemeral key that starts a handshake message (in clear, in every Noise message of
/// pattern IK), if it is a low-order one.
pub(super) fn weak_ephemeral(msg: &[u8]) -> bool {
    msg.get(..32)
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .is_some_and(|k| PublicKey(k).is_weak())
}

/// The transport keys of a finished handshake (client to server, server to client), zeroed
/// when dropped; [`RecordKey::new`] copies them into aws-lc, which clears its copy when the
/// key is dropped. Nothing of this is per record.
pub(super) fn split(hs: &mut snow::HandshakeState) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let (mut to_server, mut to_client) = (Zeroizing::new([0; 32]), Zeroizing::new([0; 32]));
    let mut raw = hs.dangerously_get_raw_split();
    to_server.copy_from_slice(&raw.0);
    to_client.copy_from_slice(&raw.1);
    zeroize::Zeroize::zeroize(&mut raw.0);
    zeroize::Zeroize::zeroize(&mut raw.1);
    (to_server, to_client)
}
