//! The channel's halves over a byte stream: a [`Sender`] writes what its record
//! [`Encoder`] sealed, a [`Receiver`] reads into its [`Decoder`] until that has a frame.
//! They own the stream: after the handshake nobody else reads or writes it, and a
//! connection is ended through the channel too ([`Hangup`], [`Receiver::into_blocking`]).

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::net::TcpStream;

use super::handshake::Established;
use super::record::{Decoder, Encoder, OwnedFrame, Sealed, HEAD_MAX};
use super::ChannelError;
use crate::blocking::ThreadReader;
use crate::pool::Pool;
use crate::protocol::{Frame, Head, Limits};

/// The halves of an established channel over `reader` and `writer`.
pub(super) fn halves<R, W>(reader: R, writer: W, keys: &Established) -> (Sender<W>, Receiver<R>) {
    let (encoder, decoder) = keys.codecs();
    (
        Sender {
            writer,
            codec: encoder,
        },
        Receiver {
            reader,
            codec: decoder,
        },
    )
}

/// The sending half of a channel.
pub struct Sender<W> {
    writer: W,
    codec: Encoder,
}

impl<W: AsyncWrite + Unpin> Sender<W> {
    /// Encrypts `plain` (one or more encoded frames) and writes it in one go.
    pub async fn send(&mut self, plain: &[u8]) -> Result<(), ChannelError> {
        self.send_parts(&[plain]).await
    }

    /// Encrypts the parts, in order, as one stream of records and writes them in one go.
    /// Parts are encrypted where they lie, so a large payload goes from its buffer into the
    /// ciphertext without a copy; each part starts a record.
    pub async fn send_parts(&mut self, parts: &[&[u8]]) -> Result<(), ChannelError> {
        self.seal_parts(parts);
        self.flush().await
    }

    /// Encrypts the parts as [`send_parts`](Self::send_parts) does, after whatever was
    /// sealed before, without writing them: [`flush`](Self::flush) or
    /// [`try_flush`](Self::try_flush) does.
    pub fn seal_parts(&mut self, parts: &[&[u8]]) {
        self.codec.seal_parts(parts);
    }

    /// Sends `head` (encoded frames) and then `payload`, as `send_parts(&[head, payload])`
    /// would, but seals the payload into `buf` ([`Encoder::seal_apart`]) and writes it
    /// from there, in one vectored write with the head when the socket takes it all. The
    /// records come back, sealed, whether or not the write succeeded.
    pub async fn send_apart(
        &mut self,
        head: &[u8],
        payload: &[u8],
        buf: Vec<u8>,
    ) -> (Sealed, Result<(), ChannelError>) {
        self.codec.seal_parts(&[head]);
        let sealed = self.codec.seal_apart(payload, buf);
        let sent = self.flush_then(sealed.records()).await;
        (sealed, sent)
    }

    /// Writes everything sealed, then `more`.
    async fn flush_then(&mut self, more: &[u8]) -> Result<(), ChannelError> {
        let mut rest = more;
        while !self.codec.pending().is_empty() {
            let parts = [IoSlice::new(self.codec.pending()), IoSlice::new(rest)];
            let n = self.writer.write_vectored(&parts).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            let head = n.min(self.codec.pending().len());
            self.codec.consume(head);
            rest = &rest[n - head..];
        }
        self.writer.write_all(rest).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Writes everything sealed, waiting for the stream to take it.
    pub async fn flush(&mut self) -> Result<(), ChannelError> {
        self.flush_then(&[]).await
    }

    /// Writes as much of what was sealed as the stream takes without waiting; true when
    /// all of it is written. A thread that must not block sends with this and leaves the
    /// rest to a task that awaits [`flush`](Self::flush).
    pub fn try_flush(&mut self) -> Result<bool, ChannelError> {
        // Nothing is woken: whoever finishes the send polls again with its own waker.
        let mut cx = Context::from_waker(Waker::noop());
        let mut writer = Pin::new(&mut self.writer);
        while !self.codec.pending().is_empty() {
            match writer.as_mut().poll_write(&mut cx, self.codec.pending()) {
                Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Poll::Ready(Ok(n)) => self.codec.consume(n),
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => return Ok(false),
            }
        }
        match writer.poll_flush(&mut cx) {
            Poll::Ready(r) => r.map(|()| true).map_err(Into::into),
            Poll::Pending => Ok(false),
        }
    }

    /// Closes the write side of the byte stream.
    pub async fn close(&mut self) -> io::Result<()> {
        self.writer.close().await
    }
}

/// Shuts a channel's connection down from anywhere, without its halves: a send or receive
/// blocked on it ends. All it can do with the socket.
#[derive(Clone)]
pub struct Hangup(TcpStream);

impl Hangup {
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.0.shutdown(how)
    }
}

impl Sender<TcpStream> {
    /// A [`Hangup`] for this channel's connection.
    pub fn hangup(&self) -> Hangup {
        Hangup(self.writer.clone())
    }
}

/// The receiving half of a channel.
pub struct Receiver<R> {
    reader: R,
    codec: Decoder,
}

impl<R> Receiver<R> {
    /// Whether everything read from the stream so far was returned as frames: the peer has
    /// sent nothing more yet, as far as this side knows.
    pub fn is_drained(&self) -> bool {
        self.codec.is_drained()
    }
}

impl Receiver<TcpStream> {
    /// The same channel, read from here on by blocking reads on the calling thread (a
    /// [`ThreadReader`] of its own socket); what was read and not yet decoded is kept.
    pub fn into_blocking(self) -> io::Result<Receiver<ThreadReader>> {
        Ok(Receiver {
            reader: ThreadReader::new(&self.reader)?,
            codec: self.codec,
        })
    }
}

impl Receiver<ThreadReader> {
    /// A descriptor of the stream to wait on until it has something to read (see
    /// [`ThreadReader::readiness`]).
    pub fn readiness(&self) -> io::Result<std::os::fd::OwnedFd> {
        self.reader.readiness()
    }
}

impl<R: AsyncRead + Unpin> Receiver<R> {
    /// Returns the next frame, reading and decrypting records as needed. A frame longer
    /// than `limits` allows is refused from its header, before it is buffered.
    /// `Ok(None)` means the peer closed the stream cleanly between frames.
    pub async fn recv(&mut self, limits: &Limits) -> Result<Option<Frame<'_>>, ChannelError> {
        if self.buffer(limits, usize::MAX).await?.is_none() {
            return Ok(None);
        }
        self.codec.frame(limits).map(Some)
    }

    /// Returns the next frame, a REQUEST or REPLY, with its payload in a buffer from
    /// `pool`: records that lie within the payload are decrypted straight into it, and
    /// only pieces of records shared with other frames are copied. Limits are enforced
    /// from the head, before anything is buffered. `Ok(None)` as for [`recv`](Self::recv).
    /// Dropping the future inside a payload leaves the receiver unusable.
    pub async fn recv_owned(
        &mut self,
        limits: &Limits,
        pool: &Pool,
    ) -> Result<Option<OwnedFrame>, ChannelError> {
        let frame = self.recv_admitted(limits, pool, |_| async {}).await?;
        Ok(frame.map(|(frame, ())| frame))
    }

    /// [`recv_owned`](Self::recv_owned), with `admit` awaited once the frame's head is
    /// decoded and before its payload is buffered: the server waits there for room in its
    /// budget, so a request it has no room for stays in the socket. Dropping the future
    /// while `admit` waits leaves the receiver as it was.
    pub async fn recv_admitted<T, F: std::future::Future<Output = T>>(
        &mut self,
        limits: &Limits,
        pool: &Pool,
        admit: impl FnOnce(&Head) -> F,
    ) -> Result<Option<(OwnedFrame, T)>, ChannelError> {
        let Some(total) = self.buffer(limits, HEAD_MAX).await? else {
            return Ok(None);
        };
        let (head, head_len) = self.codec.head(limits)?;
        let admitted = admit(&head).await;
        let mut filling = self.codec.start_payload(head, head_len, total, pool);
        while !self.codec.fill(&mut filling)? {
            if !self.read().await? {
                return Err(self.cut());
            }
        }
        Ok(Some((filling.into_frame(), admitted)))
    }

    /// Reads until the decoder has the next frame, or its first `at_least` bytes; returns
    /// the frame's length, or `None` at a clean end of stream between frames.
    async fn buffer(
        &mut self,
        limits: &Limits,
        at_least: usize,
    ) -> Result<Option<usize>, ChannelError> {
        loop {
            if let Some(n) = self.codec.buffer(limits, at_least)? {
                return Ok(Some(n));
            }
            if !self.read().await? {
                return self.codec.end_of_stream().map(|()| None);
            }
        }
    }

    /// Reads the peer's first record, its verdict on this side.
    pub(super) async fn verdict(&mut self) -> Result<(), ChannelError> {
        while self.codec.verdict()?.is_none() {
            if !self.read().await? {
                return Err(self.cut());
            }
        }
        Ok(())
    }

    /// Reads and drops what the peer sends until it closes, at most `limit` bytes: after a
    /// refusal, so that closing with its data unread does not reset the connection before
    /// the peer has read why.
    pub(super) async fn discard(&mut self, limit: usize) {
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < limit {
            match self.reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    }

    /// Why the stream's end, where the decoder is waiting for more, is an error.
    fn cut(&self) -> ChannelError {
        let cut = || ChannelError::Protocol("stream ended inside a record".into());
        self.codec.end_of_stream().err().unwrap_or_else(cut)
    }

    /// Reads what the stream has into the decoder; false at its end.
    async fn read(&mut self) -> Result<bool, ChannelError> {
        let n = self.reader.read(self.codec.space()).await?;
        self.codec.filled(n);
        Ok(n > 0)
    }
}
