//! The handshake objects in memory: every path, each refusal and each forgery, fed byte by
//! byte or whole, with no socket between the two sides.

use super::*;
use crate::channel::noise::NonzeroDhResolver;
use crate::keys::generate;

/// How a handshake ended for each side, and what the server answered.
struct Run {
    client: Result<Established, ChannelError>,
    server: Result<Established, Failed>,
    answer: Vec<u8>,
}

/// Feeds `bytes` to a side that takes `feed`'s share of them, in pieces of `step`.
fn pieces(bytes: &[u8], step: usize, mut feed: impl FnMut(&[u8]) -> Option<usize>) {
    let mut at = 0;
    while at < bytes.len() {
        let end = at.saturating_add(step).min(bytes.len());
        match feed(&bytes[at..end]) {
            Some(0) | None => return,
            Some(n) => at += n,
        }
    }
}

/// Feeds a whole first flight to `responder`.
fn flight_to(responder: &mut Responder, flight: &[u8]) -> Result<(), Failed> {
    let mut at = 0;
    while at < flight.len() && responder.wants() > 0 {
        at += responder.feed(&flight[at..])?;
    }
    Ok(())
}

/// Feeds a whole answer to `initiator`.
fn answer_to(initiator: &mut Initiator, answer: &[u8]) {
    pieces(answer, usize::MAX, |b| Some(initiator.feed(b)));
}

/// A handshake between a client that pins `pin` and chooses `cipher`, and a server with
/// key `server` that accepts `ciphers`, the first flight passed through `tamper`.
fn run(
    server: &PrivateKey,
    pin: &PublicKey,
    cipher: Cipher,
    ciphers: &[Cipher],
    tamper: impl FnOnce(&mut Vec<u8>),
    step: usize,
) -> Run {
    let client_key = generate();
    let (mut initiator, mut flight) = Initiator::start(&client_key, pin, cipher).unwrap();
    tamper(&mut flight);
    let mut responder = Responder::new(ciphers);
    let mut refused = None;
    pieces(&flight, step, |b| match responder.feed(b) {
        Ok(n) => Some(n),
        Err(f) => {
            refused = Some(f);
            None
        }
    });
    let server = match refused {
        Some(f) => Err(f),
        None => responder.answer(server),
    };
    let (answer, server) = match server {
        Ok((answer, keys)) => (answer, Ok(keys)),
        Err(f) => (f.reply.clone(), Err(f)),
    };
    pieces(&answer, step, |b| Some(initiator.feed(b)));
    let client = initiator.finish();
    if let Ok(keys) = &server {
        assert_eq!(keys.peer, client_key.public());
    }
    Run {
        client,
        server,
        answer,
    }
}

/// Both sides' first records, the server's verdict from `authorize`: what the client's
/// first receive gets.
fn verdicts(
    client: &Established,
    server: &Established,
    authorize: Result<(), String>,
) -> Result<(), ChannelError> {
    let ((mut c_tx, mut c_rx), (mut s_tx, mut s_rx)) = (client.codecs(), server.codecs());
    c_tx.seal_parts(&[&verdict_record(&Ok(()))]);
    s_rx.feed(c_tx.pending());
    assert_eq!(s_rx.verdict().unwrap(), Some(()));
    let verdict = authorize.map_err(|why| (Refusal::ClientKey, why));
    s_tx.seal_parts(&[&verdict_record(&verdict), b"\0\0\0\x01\x09"]);
    c_rx.feed(s_tx.pending());
    c_rx.verdict().map(|v| assert_eq!(v, Some(())))
}

fn refusal(run: &Run) -> (Refusal, String) {
    let Err(Failed {
        error: ChannelError::Refused(code, why),
        ..
    }) = &run.server
    else {
        panic!("the server did not refuse: {:?}", run.server.as_ref().err());
    };
    match &run.client {
        Err(ChannelError::Refused(c, w)) => assert_eq!((c, w), (code, why), "told as refused"),
        other => panic!("the client was not told: {:?}", other.as_ref().err()),
    }
    (*code, why.clone())
}

#[test]
fn a_handshake_fed_in_any_pieces_establishes_the_same_keys() {
    for cipher in Cipher::ALL {
        for step in [1, 2, 7, 100, usize::MAX] {
            let server = generate();
            let run = run(
                &server,
                &server.public(),
                cipher,
                &Cipher::ALL,
                |_| {},
                step,
            );
            let (client, server_side) = (run.client.unwrap(), run.server.unwrap());
            assert_eq!(client.peer, server.public());
            verdicts(&client, &server_side, Ok(())).unwrap();
        }
    }
}

#[test]
fn message_2_is_the_same_whether_or_not_the_client_is_allowed() {
    let server = generate();
    let allowed = run(
        &server,
        &server.public(),
        Cipher::AesGcm,
        &Cipher::ALL,
        |_| {},
        9,
    );
    let refused = run(
        &server,
        &server.public(),
        Cipher::AesGcm,
        &Cipher::ALL,
        |_| {},
        9,
    );
    // The verdict is not in message 2: it has the same length and the same shape for both.
    assert_eq!(allowed.answer.len(), refused.answer.len());
    assert_eq!(allowed.answer[..3], refused.answer[..3]);
    let (client, server_side) = (refused.client.unwrap(), refused.server.unwrap());
    let why = "client key is not in this server's authorized keys".to_string();
    match verdicts(&client, &server_side, Err(why.clone())) {
        Err(ChannelError::Refused(Refusal::ClientKey, w)) => assert_eq!(w, why),
        other => panic!("expected the client-key refusal, got {other:?}"),
    }
}

#[test]
fn a_replayed_first_message_cannot_confirm() {
    // The server answers a replay as it answers the client, but only the client's keys
    // seal a first record that the server opens.
    let server = generate();
    let run = run(
        &server,
        &server.public(),
        Cipher::ChaChaPoly,
        &Cipher::ALL,
        |_| {},
        64,
    );
    let (_, mut s_rx) = run.server.unwrap().codecs();
    let mut forged = Encoder::new(RecordKey::new(Cipher::ChaChaPoly, &[1; 32]));
    forged.seal_parts(&[&verdict_record(&Ok(()))]);
    s_rx.feed(forged.pending());
    assert!(matches!(s_rx.verdict(), Err(ChannelError::Decrypt)));
}

#[test]
fn a_bad_preamble_is_refused_in_clear() {
    let server = generate();
    let old_version = |f: &mut Vec<u8>| f[3] = 1;
    let http = |f: &mut Vec<u8>| f[..8].copy_from_slice(b"GET / HT");
    for tamper in [&old_version as &dyn Fn(&mut Vec<u8>), &http] {
        let run = run(
            &server,
            &server.public(),
            Cipher::AesGcm,
            &Cipher::ALL,
            tamper,
            3,
        );
        let (code, why) = refusal(&run);
        assert_eq!(code, Refusal::Preamble);
        assert!(why.contains("a channel version other than 2"), "{why}");
    }
}

#[test]
fn a_cipher_the_server_does_not_accept_is_refused_with_the_ones_it_does() {
    let server = generate();
    let first = run(
        &server,
        &server.public(),
        Cipher::AesGcm,
        &[Cipher::ChaChaPoly],
        |_| {},
        5,
    );
    let (code, why) = refusal(&first);
    assert_eq!(code, Refusal::Cipher);
    assert!(
        why.contains("aesgcm is not accepted") && why.contains("chachapoly"),
        "{why}"
    );
    let unknown = |f: &mut Vec<u8>| f[4] = 9;
    let run = run(
        &server,
        &server.public(),
        Cipher::AesGcm,
        &Cipher::ALL,
        unknown,
        5,
    );
    assert!(refusal(&run).1.contains("cipher #9"));
}

#[test]
fn a_wrong_pinned_server_key_is_refused_in_clear_naming_no_key() {
    let server = generate();
    let other = generate().public();
    let run = run(
        &server,
        &other,
        Cipher::ChaChaPoly,
        &Cipher::ALL,
        |_| {},
        11,
    );
    let (code, why) = refusal(&run);
    assert_eq!(code, Refusal::ServerKey);
    assert!(why.contains("fix the client's --server-key"), "{why}");
    assert!(!why.contains(&other.to_string()) && !why.contains(&server.public().to_string()));
}

#[test]
fn a_tampered_prologue_or_cipher_fails_the_handshake() {
    // A reserved byte, or the cipher id switched to another the server accepts: both
    // sides mix the preamble into the handshake, so the server cannot read message 1.
    let server = generate();
    let reserved = |f: &mut Vec<u8>| f[6] = 1;
    let switched = |f: &mut Vec<u8>| f[4] = Cipher::AesGcm.id();
    for tamper in [&reserved as &dyn Fn(&mut Vec<u8>), &switched] {
        let run = run(
            &server,
            &server.public(),
            Cipher::ChaChaPoly,
            &Cipher::ALL,
            tamper,
            50,
        );
        assert_eq!(refusal(&run).0, Refusal::ServerKey);
    }
}

#[test]
fn a_tampered_message_1_or_2_fails_the_handshake() {
    let server = generate();
    let flip = |f: &mut Vec<u8>| *f.last_mut().unwrap() ^= 1;
    let run1 = run(
        &server,
        &server.public(),
        Cipher::AesGcm,
        &Cipher::ALL,
        flip,
        50,
    );
    assert_eq!(refusal(&run1).0, Refusal::ServerKey);

    let (mut initiator, flight) =
        Initiator::start(&generate(), &server.public(), Cipher::AesGcm).unwrap();
    let mut responder = Responder::new(&Cipher::ALL);
    flight_to(&mut responder, &flight).unwrap();
    let (mut answer, _) = responder.answer(&server).unwrap();
    answer[10] ^= 0x40;
    answer_to(&mut initiator, &answer);
    let err = initiator.finish().err().unwrap();
    assert!(err.to_string().contains("did not authenticate"), "{err}");
}

#[test]
fn an_incomplete_flight_or_answer_is_an_error_not_a_panic() {
    let server = generate();
    let (mut initiator, flight) =
        Initiator::start(&generate(), &server.public(), Cipher::AesGcm).unwrap();
    let mut responder = Responder::new(&Cipher::ALL);
    flight_to(&mut responder, &flight[..20]).unwrap();
    assert!(responder.wants() > 0);
    assert!(responder.answer(&server).is_err());
    answer_to(&mut initiator, &[0, 0]);
    assert!(initiator.finish().is_err());
}

#[test]
fn a_weak_pinned_server_key_is_refused_before_anything_is_sent() {
    let err = Initiator::start(&generate(), &PublicKey([0; 32]), Cipher::AesGcm)
        .err()
        .unwrap();
    assert!(err.to_string().contains("low-order (weak) key"), "{err}");
}

/// Snow's 25519 DH, but posing where told: a static key set with `set` (if
/// `weak_static`) or an ephemeral one from `generate` (if `weak_ephemeral`) has the
/// all-zero point as its public half, and its DH results are the zeros that an honest
/// peer computes with that point. What an attacker without any private key does.
struct PoseDh {
    inner: Box<dyn snow::types::Dh>,
    weak_static: bool,
    weak_ephemeral: bool,
    weak: bool,
}

impl snow::types::Dh for PoseDh {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn pub_len(&self) -> usize {
        32
    }
    fn priv_len(&self) -> usize {
        32
    }
    fn set(&mut self, privkey: &[u8]) {
        self.inner.set(privkey);
        self.weak = self.weak_static;
    }
    fn generate(&mut self, rng: &mut dyn snow::types::Random) -> Result<(), snow::Error> {
        self.weak = self.weak_ephemeral;
        self.inner.generate(rng)
    }
    fn pubkey(&self) -> &[u8] {
        if self.weak {
            &[0; 32]
        } else {
            self.inner.pubkey()
        }
    }
    fn privkey(&self) -> &[u8] {
        self.inner.privkey()
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        if self.weak {
            out[..32].fill(0);
            return Ok(());
        }
        self.inner.dh(pubkey, out)
    }
}

struct PoseResolver {
    weak_static: bool,
    weak_ephemeral: bool,
}

impl snow::resolvers::CryptoResolver for PoseResolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        None
    }
    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        Some(Box::new(PoseDh {
            inner: snow::resolvers::DefaultResolver.resolve_dh(choice)?,
            weak_static: self.weak_static,
            weak_ephemeral: self.weak_ephemeral,
            weak: false,
        }))
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

/// A snow builder for a peer that poses with weak keys, as [`PoseDh`] says.
fn pose_builder(weak_static: bool, weak_ephemeral: bool) -> snow::Builder<'static> {
    use snow::resolvers::{DefaultResolver, FallbackResolver, RingResolver};
    let rest = FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver));
    let pose = PoseResolver {
        weak_static,
        weak_ephemeral,
    };
    snow::Builder::with_resolver(
        Cipher::ChaChaPoly.noise_params(),
        Box::new(FallbackResolver::new(Box::new(pose), Box::new(rest))),
    )
}

/// A client's first Noise message to `server`, forged with weak keys.
fn forged_first_message(server: &PublicKey, weak_static: bool, weak_ephemeral: bool) -> Vec<u8> {
    let pre = preamble(Cipher::ChaChaPoly);
    let mut hs = pose_builder(weak_static, weak_ephemeral)
        .local_private_key(crate::keys::generate().bytes())
        .and_then(|b| b.remote_public_key(&server.0))
        .and_then(|b| b.prologue(&pre))
        .and_then(|b| b.build_initiator())
        .unwrap();
    let mut msg = vec![0u8; NOISE_MAX];
    let n = hs.write_message(&[], &mut msg).unwrap();
    msg.truncate(n);
    msg
}

/// The server's answer to a forged first message.
fn forge_against_server(weak_static: bool, weak_ephemeral: bool) -> Result<Established, Failed> {
    let server = generate();
    let msg = forged_first_message(&server.public(), weak_static, weak_ephemeral);
    let mut responder = Responder::new(&Cipher::ALL);
    let flight = u16_message(&preamble(Cipher::ChaChaPoly), &msg);
    flight_to(&mut responder, &flight).unwrap();
    responder.answer(&server).map(|(_, keys)| keys)
}

#[test]
fn snow_alone_admits_a_weak_client_key() {
    // Why the checks exist: snow 0.10 reads the forged message without complaint.
    let server_key = generate();
    let msg = forged_first_message(&server_key.public(), true, false);
    let pre = preamble(Cipher::ChaChaPoly);
    let mut hs = snow::Builder::new(Cipher::ChaChaPoly.noise_params())
        .local_private_key(server_key.bytes())
        .and_then(|b| b.prologue(&pre))
        .and_then(|b| b.build_responder())
        .unwrap();
    let mut payload = vec![0u8; NOISE_MAX];
    hs.read_message(&msg, &mut payload).unwrap();
    assert_eq!(hs.get_remote_static(), Some(&[0u8; 32][..]));
}

#[test]
fn a_weak_client_key_is_refused_in_clear_before_any_keys_exist() {
    let Err(failed) = forge_against_server(true, false) else {
        panic!("admitted a weak key");
    };
    match &failed.error {
        ChannelError::Refused(Refusal::ClientKey, why) => {
            assert!(why.contains("is a low-order (weak) key"), "{why}")
        }
        e => panic!("expected a client-key refusal, got {e}"),
    }
    // The forger hears why, in clear.
    assert_eq!(failed.reply[0], Refusal::ClientKey as u8);
    assert!(String::from_utf8_lossy(&failed.reply[3..]).contains("low-order (weak) key"));
}

#[test]
fn a_weak_client_ephemeral_ends_the_handshake_silently() {
    for weak_static in [false, true] {
        let Err(failed) = forge_against_server(weak_static, true) else {
            panic!("admitted a weak ephemeral key");
        };
        assert!(failed.reply.is_empty());
        let why = failed.error.to_string();
        assert!(why.contains("low-order (weak) ephemeral"), "{why}");
    }
    // The forger is honest otherwise: with its own keys it is admitted.
    assert!(forge_against_server(false, false).is_ok());
}

#[test]
fn a_weak_server_ephemeral_ends_the_handshake() {
    let server = generate();
    let (initiator, flight) =
        Initiator::start(&generate(), &server.public(), Cipher::ChaChaPoly).unwrap();
    // A server that holds the real key but answers with a weak ephemeral one.
    let mut hs = pose_builder(false, true)
        .local_private_key(server.bytes())
        .and_then(|b| b.prologue(&flight[..PREAMBLE_LEN]))
        .and_then(|b| b.build_responder())
        .unwrap();
    let mut payload = vec![0u8; NOISE_MAX];
    hs.read_message(&flight[PREAMBLE_LEN + 2..], &mut payload)
        .unwrap();
    let mut answer = vec![0u8; NOISE_MAX];
    let n = hs.write_message(&[], &mut answer).unwrap();
    let mut initiator = initiator;
    answer_to(&mut initiator, &u16_message(&[0], &answer[..n]));
    let err = initiator.finish().err().unwrap();
    assert!(
        err.to_string().contains("low-order (weak) ephemeral"),
        "{err}"
    );
}

#[test]
fn an_all_zero_diffie_hellman_result_is_an_error() {
    use snow::resolvers::CryptoResolver;
    let mut dh = NonzeroDhResolver
        .resolve_dh(&snow::params::DHChoice::Curve25519)
        .unwrap();
    dh.set(generate().bytes());
    let mut out = [0u8; 32];
    let mut p_plus_1 = [0xffu8; 32];
    (p_plus_1[0], p_plus_1[31]) = (0xee, 0xff);
    for weak in [[0u8; 32], p_plus_1] {
        assert!(PublicKey(weak).is_weak());
        assert!(matches!(dh.dh(&weak, &mut out), Err(snow::Error::Dh)));
    }
    dh.dh(&generate().public().0, &mut out).unwrap();
    assert_ne!(out, [0u8; 32]);
}
