//! Where things are in a checksum table file (the format is in [`super`]), from the
//! image's size, and what growing the image does to it; pure.

use xxhash_rust::xxh3::xxh3_64;

use super::{BLOCK_SIZE, MAX_REGIONS};

pub(super) const PAGE: u64 = 4096;
const MAGIC: [u8; 8] = *b"DSTSUM\0\0";
const VERSION: u32 = 1;
/// The header fields that never change; their checksum follows.
const HEADER_FIELDS: usize = 56;
/// Bytes of the header, checksum included.
pub const HEADER_LEN: usize = HEADER_FIELDS + 8;
pub(super) const CLEAN_AT: usize = 64;
pub(super) const BITMAP_AT: usize = 1024;
pub(super) const ENTRIES_AT: u64 = PAGE;
/// Regions are at least 16 MiB, so a sequential writer marks one every 16 MiB at most.
const MIN_REGION_BLOCKS: u64 = 4096;

/// Where things are in a table, from the image size; pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub image_size: u64,
    pub blocks: u64,
    pub region_shift: u32,
    /// Identifies the image file (see [`Backend::identity`](crate::server::backend::Backend::identity)), so a table is never applied to a
    /// replaced image; 0 when unknown (block devices, whose nodes are made at boot).
    pub image_id: u64,
}

impl Layout {
    pub fn for_image(image_size: u64) -> Layout {
        let blocks = image_size.div_ceil(BLOCK_SIZE);
        let per_region = blocks
            .div_ceil(MAX_REGIONS)
            .max(MIN_REGION_BLOCKS)
            .next_power_of_two();
        Layout {
            image_size,
            blocks,
            region_shift: per_region.trailing_zeros(),
            image_id: 0,
        }
    }

    pub fn regions(&self) -> u64 {
        self.blocks.div_ceil(1 << self.region_shift).max(1)
    }

    pub fn region_bytes(&self) -> u64 {
        BLOCK_SIZE << self.region_shift
    }

    pub(super) fn region_of(&self, block: u64) -> u64 {
        block >> self.region_shift
    }

    /// What growing the image to `size` bytes takes, or `None` if it is not larger. The
    /// regions may become coarser (so they stay at most [`MAX_REGIONS`]), never finer; the
    /// dirty bits are not carried over, so a table grows only with all of them clear.
    pub fn grow_to(&self, size: u64) -> Option<Growth> {
        if size <= self.image_size {
            return None;
        }
        let fresh = Layout::for_image(size);
        let layout = Layout {
            region_shift: fresh.region_shift.max(self.region_shift),
            image_id: self.image_id,
            ..fresh
        };
        Some(Growth {
            layout,
            short_tail: (!self.image_size.is_multiple_of(BLOCK_SIZE)).then(|| self.blocks - 1),
            new_blocks: self.blocks..layout.blocks,
        })
    }

    #[cfg(test)]
    pub(super) fn with_id(self, image_id: u64) -> Layout {
        Layout { image_id, ..self }
    }

    /// Length of the table file.
    pub fn file_len(&self) -> u64 {
        (ENTRIES_AT + self.blocks * 8).next_multiple_of(PAGE)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.image_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.blocks.to_le_bytes());
        h[32..36].copy_from_slice(&self.region_shift.to_le_bytes());
        h[40..48].copy_from_slice(&ENTRIES_AT.to_le_bytes());
        h[48..56].copy_from_slice(&self.image_id.to_le_bytes());
        let sum = xxh3_64(&h[..HEADER_FIELDS]);
        h[HEADER_FIELDS..].copy_from_slice(&sum.to_le_bytes());
        h
    }

    /// Reads a header; the error says what is wrong with it.
    pub fn decode(h: &[u8]) -> Result<Layout, String> {
        if h.len() < HEADER_FIELDS + 8 || h[0..8] != MAGIC {
            return Err("it is not a dst checksum table (bad magic)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
        if u64_at(HEADER_FIELDS) != xxh3_64(&h[..HEADER_FIELDS]) {
            return Err("its header is damaged (checksum mismatch)".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!(
                "it has format version {}; this dst-server reads version {VERSION}",
                u32_at(8)
            ));
        }
        let layout = Layout {
            image_size: u64_at(16),
            blocks: u64_at(24),
            region_shift: u32_at(32),
            image_id: u64_at(48),
        };
        if u32_at(12) as u64 != BLOCK_SIZE
            || u64_at(40) != ENTRIES_AT
            || layout.blocks != layout.image_size.div_ceil(BLOCK_SIZE)
            || layout.region_shift > 40
            || layout.regions() > MAX_REGIONS
        {
            return Err("its header has impossible values".into());
        }
        Ok(layout)
    }
}

/// What growing a table takes (see [`Layout::grow_to`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Growth {
    pub layout: Layout,
    /// The old last block, when it was short: its entry describes fewer bytes than the
    /// block holds now.
    pub short_tail: Option<u64>,
    /// Blocks that did not exist before; their entries start as zeros, [`UNVERIFIED`](super::UNVERIFIED).
    pub new_blocks: std::ops::Range<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes_regions_and_round_trips() {
        let small = Layout::for_image(64 << 20);
        assert_eq!(small.blocks, 16384);
        assert_eq!(small.region_bytes(), 16 << 20);
        assert_eq!(small.regions(), 4);
        assert_eq!(small.file_len(), 4096 + 16384 * 8);
        let big = Layout::for_image(16 << 40);
        assert!(big.regions() <= MAX_REGIONS);
        assert_eq!(big.region_bytes(), 2 << 30);
        let odd = Layout::for_image(10_000);
        assert_eq!((odd.blocks, odd.regions()), (3, 1));
        assert_eq!(Layout::for_image(0).regions(), 1);
        let with_id = Layout {
            image_id: 12345,
            ..small
        };
        for l in [small, big, odd, with_id] {
            assert_eq!(Layout::decode(&l.encode()), Ok(l));
        }
    }

    #[test]
    fn growth_keeps_the_regions_bounded_and_only_coarsens_them() {
        let small = Layout {
            image_id: 7,
            ..Layout::for_image(10_000)
        };
        assert_eq!(small.grow_to(10_000), None);
        assert_eq!(small.grow_to(4096), None, "a shrink is no growth");
        let g = small.grow_to(64 << 20).unwrap();
        assert_eq!(g.layout.image_id, 7, "the same image");
        assert_eq!(g.short_tail, Some(2), "10 000 bytes end inside block 2");
        assert_eq!(g.new_blocks, 3..16384);
        assert_eq!(g.layout.region_shift, small.region_shift);
        // Whole blocks: no tail to redo.
        let whole = Layout::for_image(64 << 20);
        assert_eq!(whole.grow_to(65 << 20).unwrap().short_tail, None);
        // A large growth needs coarser regions, never more than the bitmap holds.
        let g = whole.grow_to(16 << 40).unwrap();
        assert!(g.layout.regions() <= MAX_REGIONS);
        assert!(g.layout.region_shift > whole.region_shift);
        assert_eq!(g.layout, Layout::for_image(16 << 40));
        // Regions never get finer than the table had, whatever the new size suggests.
        let coarse = Layout {
            region_shift: 20,
            ..whole
        };
        assert_eq!(coarse.grow_to(128 << 20).unwrap().layout.region_shift, 20);
        for size in [10_001, 12_289, 1 << 30, (1 << 40) + 1, 1 << 50] {
            let g = small.grow_to(size).unwrap();
            assert!(g.layout.regions() <= MAX_REGIONS, "{size}");
            assert_eq!(Layout::decode(&g.layout.encode()), Ok(g.layout));
        }
    }

    #[test]
    fn damaged_headers_are_refused_with_a_reason() {
        let good = Layout::for_image(1 << 30).encode();
        let mut h = good;
        h[0] = b'X';
        assert!(Layout::decode(&h).unwrap_err().contains("magic"));
        let mut h = good;
        h[20] ^= 1;
        assert!(Layout::decode(&h).unwrap_err().contains("damaged"));
        assert!(Layout::decode(&good[..20]).is_err());
    }
}
