//! The engine's awaited operations: a read, write, flush, trim or zeroing becomes as many
//! transactions as the export node's limits require (its maximum transfer, a gigabyte for
//! ranges), all entered before any is waited for, and the caller gets one result.

use super::{Engine, Outcome};
use crate::protocol::{Op, FLAG_FUA};

/// Largest trim or write-zeroes range in one transaction.
const RANGE_CHUNK: u64 = 1 << 30;

impl Engine {
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, i32> {
        let max = self.inner.info.max_transfer;
        let mut pending = Vec::new();
        for (off, n) in chunks(offset, len as u64, max as u64) {
            pending.push(self.inner.submit(Op::Read, 0, off, n as u32).await?);
        }
        let mut out = Vec::with_capacity(len as usize);
        for rx in pending {
            let data = wait(rx).await?;
            if out.is_empty() {
                out = data;
            } else {
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), i32> {
        let max = self.inner.info.max_transfer as usize;
        let flags = if fua { FLAG_FUA } else { 0 };
        let mut pending = Vec::new();
        for (i, part) in data.chunks(max).enumerate() {
            let off = offset + (i * max) as u64;
            pending.push(self.inner.submit_write(flags, off, part).await?);
        }
        wait_all(pending).await
    }

    /// Returns once every write acked before it is on stable storage on the export node.
    pub async fn flush(&self) -> Result<(), i32> {
        let rx = self.inner.submit(Op::Flush, 0, 0, 0).await?;
        wait(rx).await.map(drop)
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), i32> {
        self.range_op(Op::Trim, 0, offset, len).await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), i32> {
        self.range_op(Op::WriteZeroes, if fua { FLAG_FUA } else { 0 }, offset, len)
            .await
    }

    async fn range_op(&self, op: Op, flags: u8, offset: u64, len: u64) -> Result<(), i32> {
        let mut pending = Vec::new();
        for (off, n) in chunks(offset, len, RANGE_CHUNK) {
            pending.push(self.inner.submit(op, flags, off, n as u32).await?);
        }
        wait_all(pending).await
    }
}

/// Splits `len` bytes at `offset` into pieces of at most `max`.
fn chunks(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let count = len.div_ceil(max).max(1);
    (0..count).map(move |i| (offset + i * max, (len - i * max).min(max)))
}

async fn wait(rx: smol::channel::Receiver<Outcome>) -> Outcome {
    rx.recv().await.unwrap_or(Err(libc::EIO))
}

async fn wait_all(pending: Vec<smol::channel::Receiver<Outcome>>) -> Result<(), i32> {
    let mut result = Ok(());
    for rx in pending {
        if let Err(e) = wait(rx).await {
            result = result.and(Err(e));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn chunks_cover_the_range() {
        assert_eq!(chunks(10, 0, 4).collect::<Vec<_>>(), vec![(10, 0)]);
        assert_eq!(chunks(10, 4, 4).collect::<Vec<_>>(), vec![(10, 4)]);
        assert_eq!(
            chunks(10, 9, 4).collect::<Vec<_>>(),
            vec![(10, 4), (14, 4), (18, 1)]
        );
    }
}
