//! The channel's ciphers: the [`Cipher`] a client chooses (its preamble id, its name on
//! command lines, the Noise protocol it names), and [`RecordKey`], one direction's key
//! after the Noise handshake, sealing and opening records exactly as Noise transport
//! messages (empty associated data, the cipher's nonce layout), so a peer using any Noise
//! library reads them. Its own module so that option parsing names a cipher without
//! depending on the channel, and the channel's parts share one key type.
//!
//! Snow does the handshake; the records go through aws-lc, whose AES-GCM is about twice
//! ring's on CPUs with vector AES (`cargo bench --bench channel`), and whose out-of-place
//! calls encrypt from one buffer into another in one pass, where snow copies and then
//! encrypts in place.

use std::fmt;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};

/// The AEAD cipher of the channel, chosen by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    ChaChaPoly,
    AesGcm,
}

impl Cipher {
    pub const ALL: [Cipher; 2] = [Cipher::ChaChaPoly, Cipher::AesGcm];

    /// The faster cipher on this machine: AES-GCM where the CPU has AES instructions
    /// (about 2.5 times ChaChaPoly's throughput there, by `cargo bench --bench channel`),
    /// ChaChaPoly elsewhere.
    pub fn preferred() -> Cipher {
        #[cfg(target_arch = "x86_64")]
        let aes = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq");
        #[cfg(target_arch = "aarch64")]
        let aes = std::arch::is_aarch64_feature_detected!("aes");
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let aes = false;
        if aes {
            Cipher::AesGcm
        } else {
            Cipher::ChaChaPoly
        }
    }

    /// Its number in the preamble.
    pub(crate) fn id(self) -> u8 {
        match self {
            Cipher::ChaChaPoly => 1,
            Cipher::AesGcm => 2,
        }
    }

    pub(crate) fn from_id(id: u8) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.id() == id)
    }

    /// The Noise protocol of the handshake with this cipher.
    pub(crate) fn noise_params(self) -> snow::params::NoiseParams {
        let name = match self {
            Cipher::ChaChaPoly => "Noise_IK_25519_ChaChaPoly_BLAKE2s",
            Cipher::AesGcm => "Noise_IK_25519_AESGCM_BLAKE2s",
        };
        name.parse().expect("valid Noise pattern")
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cipher::ChaChaPoly => "chachapoly",
            Cipher::AesGcm => "aesgcm",
        })
    }
}

impl std::str::FromStr for Cipher {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "chachapoly" | "chacha20poly1305" => Ok(Cipher::ChaChaPoly),
            "aesgcm" | "aes-gcm" | "aes256gcm" => Ok(Cipher::AesGcm),
            _ => Err(format!(
                "unknown cipher '{s}'; known ciphers: chachapoly, aesgcm"
            )),
        }
    }
}

/// Bytes of the authentication tag that ends every record.
pub const TAG_LEN: usize = 16;

/// The record was not sealed by the peer's key with this nonce: tampered, or out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unauthentic;

/// One direction's key; the caller counts nonces, one per record, from 0.
pub struct RecordKey {
    key: LessSafeKey,
    cipher: Cipher,
}

impl RecordKey {
    pub fn new(cipher: Cipher, key: &[u8; 32]) -> RecordKey {
        let algorithm = match cipher {
            Cipher::AesGcm => &AES_256_GCM,
            Cipher::ChaChaPoly => &CHACHA20_POLY1305,
        };
        let key = UnboundKey::new(algorithm, key).expect("a 32-byte key fits both ciphers");
        RecordKey {
            key: LessSafeKey::new(key),
            cipher,
        }
    }

    /// Noise's nonce: 32 zero bits, then the counter, big-endian for AES-GCM and
    /// little-endian for ChaChaPoly.
    fn nonce(&self, n: u64) -> Nonce {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&match self.cipher {
            Cipher::AesGcm => n.to_be_bytes(),
            Cipher::ChaChaPoly => n.to_le_bytes(),
        });
        Nonce::assume_unique_for_key(bytes)
    }

    /// Seals `plain` with nonce `n` into `out`, which is exactly `plain.len() + TAG_LEN`.
    pub fn seal(&self, n: u64, plain: &[u8], out: &mut [u8]) {
        let (ciphertext, tag) = out.split_at_mut(plain.len());
        self.key
            .seal_out_of_place_scatter(self.nonce(n), Aad::empty(), plain, ciphertext, &[], tag)
            .expect("buffer lengths match");
    }

    /// Opens `record` (ciphertext and tag) sealed with nonce `n` into `out`, which is
    /// exactly `record.len() - TAG_LEN`. On failure `out` holds garbage.
    pub fn open(&self, n: u64, record: &[u8], out: &mut [u8]) -> Result<(), Unauthentic> {
        let Some(split) = record.len().checked_sub(TAG_LEN) else {
            return Err(Unauthentic);
        };
        let (ciphertext, tag) = record.split_at(split);
        self.key
            .open_separate_gather(self.nonce(n), Aad::empty(), ciphertext, tag, out)
            .map_err(|_| Unauthentic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished Noise handshake in memory: the initiator's and responder's snow
    /// transports, and the initiator-to-responder and responder-to-initiator keys.
    fn handshake(
        cipher: Cipher,
    ) -> (
        snow::StatelessTransportState,
        snow::StatelessTransportState,
        [u8; 32],
        [u8; 32],
    ) {
        let params: snow::params::NoiseParams = match cipher {
            Cipher::AesGcm => "Noise_NN_25519_AESGCM_BLAKE2s",
            Cipher::ChaChaPoly => "Noise_NN_25519_ChaChaPoly_BLAKE2s",
        }
        .parse()
        .unwrap();
        let mut i = snow::Builder::new(params.clone())
            .build_initiator()
            .unwrap();
        let mut r = snow::Builder::new(params).build_responder().unwrap();
        let (mut msg, mut out) = ([0u8; 256], [0u8; 256]);
        let n = i.write_message(&[], &mut msg).unwrap();
        r.read_message(&msg[..n], &mut out).unwrap();
        let n = r.write_message(&[], &mut msg).unwrap();
        i.read_message(&msg[..n], &mut out).unwrap();
        let (i2r, r2i) = i.dangerously_get_raw_split();
        assert_eq!(r.dangerously_get_raw_split(), (i2r, r2i));
        (
            i.into_stateless_transport_mode().unwrap(),
            r.into_stateless_transport_mode().unwrap(),
            i2r,
            r2i,
        )
    }

    #[test]
    fn records_are_noise_transport_messages_both_ways() {
        for cipher in Cipher::ALL {
            let (initiator, responder, i2r, r2i) = handshake(cipher);
            let (send, recv) = (RecordKey::new(cipher, &i2r), RecordKey::new(cipher, &r2i));
            // Nonces past 2^32 tell the byte orders apart.
            for n in [0u64, 1, 258, (1 << 40) + 3] {
                let plain: Vec<u8> = (0..1000u32).map(|b| (b * 7 + n as u32) as u8).collect();

                let mut ours = vec![0u8; plain.len() + TAG_LEN];
                send.seal(n, &plain, &mut ours);
                let mut theirs = vec![0u8; ours.len()];
                let len = initiator.write_message(n, &plain, &mut theirs).unwrap();
                assert_eq!(ours, theirs[..len], "{cipher} nonce {n}");
                let mut opened = vec![0u8; plain.len()];
                responder.read_message(n, &ours, &mut opened).unwrap();
                assert_eq!(opened, plain);

                let len = responder.write_message(n, &plain, &mut theirs).unwrap();
                recv.open(n, &theirs[..len], &mut opened).unwrap();
                assert_eq!(opened, plain, "{cipher} nonce {n}");
            }
        }
    }

    #[test]
    fn a_wrong_nonce_or_a_flipped_bit_fails_to_open() {
        for cipher in Cipher::ALL {
            let key = RecordKey::new(cipher, &[9; 32]);
            let mut record = vec![0u8; 100 + TAG_LEN];
            key.seal(5, &[1; 100], &mut record);
            let mut out = vec![0u8; 100];
            assert_eq!(key.open(6, &record, &mut out), Err(Unauthentic));
            for at in [0, 99, 100, 115] {
                record[at] ^= 1;
                assert_eq!(key.open(5, &record, &mut out), Err(Unauthentic));
                record[at] ^= 1;
            }
            assert_eq!(
                key.open(5, &record[..TAG_LEN - 1], &mut []),
                Err(Unauthentic)
            );
            key.open(5, &record, &mut out).unwrap();
            assert_eq!(out, [1; 100]);
        }
    }
}
