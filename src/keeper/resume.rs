//! The bytes that let a new worker take over a FUSE connection the kernel already
//! initialised: a synthesized FUSE_INIT request carrying what the kernel offered at mount
//! time (fuser insists on answering an INIT before it serves), and the FUSE_NOTIFY_RESEND
//! notice that makes the kernel queue again every request a dead worker had read but not
//! answered. Pure: bytes out, laid out as the kernel's `fuse_kernel.h` ABI says.

/// What the kernel offered in its FUSE_INIT at mount time. A worker's fuser answers it as
/// the keeper's did, since both make the same choices ([`crate::fuse::configure_kernel`])
/// with the same fuser; a dst-mount built on a fuser with another ABI minor or other
/// default flags needs a new mount rather than an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelInit {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags | flags2 << 32`, as fuser's `InitFlags`.
    pub flags: u64,
}

/// FUSE_INIT's opcode.
const FUSE_INIT: u32 = 26;
/// The flag that says `flags2` is there.
const FUSE_INIT_EXT: u64 = 1 << 30;
/// The kernel can resend what was read but not answered (Linux 6.9).
pub const FUSE_HAS_RESEND: u64 = 1 << 39;
/// The notification code of FUSE_NOTIFY_RESEND.
const FUSE_NOTIFY_RESEND: i32 = 7;

/// `fuse_in_header` (40 bytes) then `fuse_init_in` (64 bytes).
pub const INIT_REQUEST_LEN: usize = 40 + 64;
/// `fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;

impl KernelInit {
    /// Whether the kernel takes FUSE_NOTIFY_RESEND, which crash survival needs.
    pub fn can_resend(&self) -> bool {
        self.flags & FUSE_HAS_RESEND != 0
    }
}

/// A FUSE_INIT request as the kernel would send it, with request id `unique`.
pub fn init_request(kernel: &KernelInit, unique: u64) -> [u8; INIT_REQUEST_LEN] {
    let flags = kernel.flags | FUSE_INIT_EXT;
    let mut b = [0u8; INIT_REQUEST_LEN];
    // fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
    b[0..4].copy_from_slice(&(INIT_REQUEST_LEN as u32).to_le_bytes());
    b[4..8].copy_from_slice(&FUSE_INIT.to_le_bytes());
    b[8..16].copy_from_slice(&unique.to_le_bytes());
    // fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11].
    b[40..44].copy_from_slice(&kernel.major.to_le_bytes());
    b[44..48].copy_from_slice(&kernel.minor.to_le_bytes());
    b[48..52].copy_from_slice(&kernel.max_readahead.to_le_bytes());
    b[52..56].copy_from_slice(&(flags as u32).to_le_bytes());
    b[56..60].copy_from_slice(&((flags >> 32) as u32).to_le_bytes());
    b
}

/// The FUSE_NOTIFY_RESEND notice: a bare `fuse_out_header` with unique 0 and the
/// notification code in place of the error.
pub fn resend_notice() -> [u8; OUT_HEADER_LEN] {
    let mut b = [0u8; OUT_HEADER_LEN];
    b[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    b[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    b
}

/// A reply's request id and error (0 for success), from its `fuse_out_header`.
pub fn reply_header(reply: &[u8]) -> Option<(u64, i32)> {
    if reply.len() < OUT_HEADER_LEN {
        return None;
    }
    let len = u32::from_le_bytes(reply[0..4].try_into().ok()?) as usize;
    if len != reply.len() {
        return None;
    }
    let error = i32::from_le_bytes(reply[4..8].try_into().ok()?);
    let unique = u64::from_le_bytes(reply[8..16].try_into().ok()?);
    Some((unique, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn init_request_follows_the_abi_layout() {
        let kernel = KernelInit {
            major: 7,
            minor: 45,
            max_readahead: 131072,
            flags: FUSE_HAS_RESEND | 0x1234,
        };
        let b = init_request(&kernel, 9);
        assert_eq!(u32_at(&b, 0) as usize, INIT_REQUEST_LEN);
        assert_eq!(u32_at(&b, 4), 26);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 9);
        assert!(b[16..40].iter().all(|&x| x == 0), "nodeid, ids, extlen: 0");
        assert_eq!((u32_at(&b, 40), u32_at(&b, 44)), (7, 45));
        assert_eq!(u32_at(&b, 48), 131072);
        assert_eq!(
            u32_at(&b, 52),
            0x1234 | 1 << 30,
            "INIT_EXT says flags2 is there"
        );
        assert_eq!(u32_at(&b, 56), 1 << 7, "HAS_RESEND is bit 39: flags2 bit 7");
        assert!(b[60..].iter().all(|&x| x == 0));
        assert!(kernel.can_resend());
        assert!(!KernelInit { flags: 0, ..kernel }.can_resend());
    }

    #[test]
    fn resend_notice_is_a_bare_out_header() {
        assert_eq!(
            resend_notice(),
            [16, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn reply_headers_are_read_strictly() {
        let mut r = vec![0u8; 24];
        r[0] = 24;
        r[4..8].copy_from_slice(&(-5i32).to_le_bytes());
        r[8] = 3;
        assert_eq!(reply_header(&r), Some((3, -5)));
        assert_eq!(reply_header(&r[..20]), None, "length must match");
        assert_eq!(reply_header(&r[..8]), None);
    }
}
