//! The handshake over a byte stream: [`connect`] and [`accept`] feed the
//! [`handshake`](super::handshake) objects what they read and write what those give, and
//! exchange the first records, the verdicts, that finish the handshake.

use std::io;

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::handshake::{verdict_record, Failed, Initiator, Refusal, Responder};
use super::stream::{halves, Receiver, Sender};
use super::ChannelError;
use crate::cipher::Cipher;
use crate::keys::{PrivateKey, PublicKey};

/// What a refused client may still send before it reads why and closes: its confirmation
/// and its HELLO, read and dropped so that closing does not reset the connection first.
const DISCARD_AFTER_REFUSAL: usize = 64 << 10;

/// Runs the client side of the handshake. `server` is the pinned server key. The server's
/// verdict on this client's key comes with its first record: a refusal is the error of the
/// first receive.
pub async fn connect<R, W>(
    mut reader: R,
    mut writer: W,
    local: &PrivateKey,
    server: &PublicKey,
    cipher: Cipher,
) -> Result<(Sender<W>, Receiver<R>), ChannelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut hs, flight) = Initiator::start(local, server, cipher)?;
    writer.write_all(&flight).await?;
    writer.flush().await?;
    let mut buf = Vec::new();
    while hs.wants() > 0 {
        buf.resize(hs.wants(), 0);
        reader.read_exact(&mut buf).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ChannelError::Protocol(
                    "the server closed the connection during the handshake; is it a dst-server?"
                        .into(),
                )
            } else {
                e.into()
            }
        })?;
        hs.feed(&buf);
    }
    let keys = hs.finish()?;
    let (mut tx, rx) = halves(reader, writer, &keys);
    // The confirmation goes at once: the server says nothing before it.
    tx.send(&verdict_record(&Ok(()))).await?;
    Ok((tx, rx))
}

/// Runs the server side of the handshake. `authorize` sees the client's static key and
/// returns why it is refused, if it is. Returns the halves and the client's key.
pub async fn accept<R, W>(
    mut reader: R,
    mut writer: W,
    local: &PrivateKey,
    ciphers: &[Cipher],
    authorize: impl FnOnce(&PublicKey) -> Result<(), String>,
) -> Result<(Sender<W>, Receiver<R>, PublicKey), ChannelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    accept_first_flight(&mut reader, &mut writer, ciphers)
        .await?
        .accept(reader, writer, local, authorize)
        .await
}

/// The client's first flight: its preamble and first Noise message, read but not yet
/// processed, so that a server can bound the wait for it apart from the crypto after it.
pub struct FirstFlight(Responder);

/// Reads the client's first flight; a bad preamble or a cipher not in `ciphers` is
/// refused in clear at once.
pub async fn accept_first_flight<R, W>(
    reader: &mut R,
    writer: &mut W,
    ciphers: &[Cipher],
) -> Result<FirstFlight, ChannelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hs = Responder::new(ciphers);
    let mut buf = Vec::new();
    while hs.wants() > 0 {
        buf.resize(hs.wants(), 0);
        reader.read_exact(&mut buf).await?;
        if let Err(failed) = hs.feed(&buf) {
            return Err(tell(writer, failed).await);
        }
    }
    Ok(FirstFlight(hs))
}

impl FirstFlight {
    /// The rest of [`accept`]: the crypto, message 2, the client's first record, and the
    /// server's verdict on the client's key, from `authorize`.
    pub async fn accept<R, W>(
        self,
        reader: R,
        mut writer: W,
        local: &PrivateKey,
        authorize: impl FnOnce(&PublicKey) -> Result<(), String>,
    ) -> Result<(Sender<W>, Receiver<R>, PublicKey), ChannelError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (answer, keys) = match self.0.answer(local) {
            Ok(v) => v,
            Err(failed) => return Err(tell(&mut writer, failed).await),
        };
        writer.write_all(&answer).await?;
        writer.flush().await?;
        let client = keys.peer;
        let (mut tx, mut rx) = halves(reader, writer, &keys);
        // A first message can be replayed: until the client's own first record decrypts,
        // nothing tells it from a replay, so nothing it is sent depends on its key.
        rx.verdict().await.map_err(|e| match e {
            ChannelError::Refused(..) => {
                ChannelError::Protocol("the client's first record is not a confirmation".into())
            }
            e => e,
        })?;
        match authorize(&client) {
            Ok(()) => {
                // It goes out with the server's first frame.
                tx.seal_parts(&[&verdict_record(&Ok(()))]);
                Ok((tx, rx, client))
            }
            Err(why) => {
                tx.seal_parts(&[&verdict_record(&Err((Refusal::ClientKey, why.clone())))]);
                // Best effort: the client may already be gone.
                if tx.flush().await.is_ok() && tx.close().await.is_ok() {
                    rx.discard(DISCARD_AFTER_REFUSAL).await;
                }
                Err(ChannelError::Refused(Refusal::ClientKey, why))
            }
        }
    }
}

/// Tells the peer what `failed` says to, in clear, before the connection closes.
async fn tell<W: AsyncWrite + Unpin>(writer: &mut W, failed: Failed) -> ChannelError {
    if !failed.reply.is_empty() {
        // Best effort: the peer may already be gone.
        let _ = writer.write_all(&failed.reply).await;
        let _ = writer.flush().await;
    }
    failed.error
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::generate;
    use crate::protocol::Limits;
    use smol::net::unix::UnixStream;

    /// A client the server refuses learns why at its first receive, after message 2
    /// looked like an acceptance; the server waited for the client's first record.
    #[test]
    fn a_refused_client_hears_why_at_its_first_receive() {
        let (server_key, client_key) = (generate(), generate());
        let server_pub = server_key.public();
        let (a, b) = UnixStream::pair().unwrap();
        smol::block_on(async {
            let client = async {
                let (mut tx, mut rx) =
                    connect(a.clone(), a, &client_key, &server_pub, Cipher::AesGcm).await?;
                tx.send(b"hello").await?;
                rx.recv(&Limits { max_transfer: 4096 }).await.map(drop)
            };
            let server = accept(b.clone(), b, &server_key, &Cipher::ALL, |key| {
                Err(format!("client key {key} is not allowed here"))
            });
            let (client, server) = smol::future::zip(client, server).await;
            for result in [client, server.map(drop)] {
                match result {
                    Err(ChannelError::Refused(Refusal::ClientKey, why)) => {
                        assert!(why.contains(&client_key.public().to_string()), "{why}")
                    }
                    other => panic!("expected the client-key refusal, got {other:?}"),
                }
            }
        });
    }
}
