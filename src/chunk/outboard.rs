//! Outboards: the BLAKE3 chaining values of a `blake3-tree` file's aligned sub-blocks (every
//! `grain` bytes, 64 KiB by default), so that a few KiB of a chunk can be verified, and served,
//! without fetching the whole chunk.
//!
//! A sub-block at a multiple of `grain` is a node of BLAKE3's tree of the file, as each chunk of
//! the aligned layout is; a chunk longer than `grain` is the sub-blocks it holds merged as
//! BLAKE3 splits its input. So the values of one chunk's sub-blocks, merged, must give the
//! chunk's digest from the manifest; once they do, each value proves its own sub-block. The
//! values themselves are untrusted data (a side file, a peer, an origin): [`ChunkOutboard::verify`]
//! is the only way to use them, and a set that does not merge into the chunk's digest is refused
//! whole. The values do not depend on the chunk layout (only on the file and the grain), so one
//! outboard serves any aligned layout whose chunks are whole sub-blocks.
//!
//! On disk (`<sha256>.wanobao`, found by the file's sha256): `wanobao1`, the grain and the file's
//! size (u64 little-endian each), then one 32-byte value per sub-block, in order. Written by
//! `wan manifest build --outboards DIR`, which hashes every byte anyway ([`OutboardHasher`]).

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{ChunkCheck, ChunkHash, Digest, Layout, tree};

/// The grain builds write: a random 4 KiB read then fetches 64 KiB, about the cost of one small
/// request on any link (a 64 KiB GET took 0.5 ms against 0.4 ms for 4 KiB on a local origin), and
/// the outboard is 1/2048 of the file (30 MiB for a 60 GB model).
pub const OUTBOARD_GRAIN: u64 = 64 << 10;

const MAGIC: &[u8; 8] = b"wanobao1";
const HEADER: u64 = 24;

/// Where the outboard of the file whose sha256 is `sha` is kept under `dir`.
pub fn outboard_path(dir: &Path, sha: &Digest) -> PathBuf {
    dir.join(format!("{}.wanobao", sha.to_hex()))
}

/// Computes a file's outboard from its bytes, fed in order in pieces of any size.
pub struct OutboardHasher {
    grain: u64,
    size: u64,
    at: u64,
    block: blake3::Hasher,
    values: Vec<Digest>,
}

impl OutboardHasher {
    /// For a file of `size` bytes; `grain` a power of two of at least 1 KiB.
    pub fn new(size: u64, grain: u64) -> OutboardHasher {
        assert!(grain.is_power_of_two() && grain >= blake3::CHUNK_LEN as u64);
        OutboardHasher {
            grain,
            size,
            at: 0,
            block: blake3::Hasher::new(),
            values: Vec::with_capacity(size.div_ceil(grain) as usize),
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let left = self.grain - self.at % self.grain;
            let n = (data.len() as u64).min(left) as usize;
            self.block.update(&data[..n]);
            self.at += n as u64;
            data = &data[n..];
            if self.at.is_multiple_of(self.grain) || self.at == self.size {
                self.end_block();
            }
        }
    }

    fn end_block(&mut self) {
        use blake3::hazmat::HasherExt;
        let cv = self.block.finalize_non_root();
        self.values.push(Digest(cv));
        self.block = blake3::Hasher::new();
        if self.at < self.size {
            self.block.set_input_offset(self.at);
        }
    }

    /// The outboard file's bytes; `None` if the bytes fed were not `size`, or the file is one
    /// sub-block (its only value would be the file's hash: nothing to prove a part with).
    pub fn finish(self) -> Option<Vec<u8>> {
        if self.at != self.size || self.size <= self.grain {
            return None;
        }
        Some(encode(self.grain, self.size, &self.values))
    }
}

/// An outboard file's bytes.
pub fn encode(grain: u64, size: u64, values: &[Digest]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER as usize + values.len() * 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&grain.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.0);
    }
    out
}

/// The values an outboard file gives for the sub-blocks of `range` of a file of `size` bytes,
/// with its grain: `Ok(None)` if the file is not an outboard of a file of that size, or its
/// grain does not cut `range` into whole sub-blocks. Reads only the header and those values.
pub fn read_values(
    file: &std::fs::File,
    size: u64,
    range: Range<u64>,
) -> std::io::Result<Option<(u64, Vec<Digest>)>> {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; HEADER as usize];
    file.read_exact_at(&mut head, 0)?;
    let grain = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let said = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
    let fits = &head[..8] == MAGIC
        && said == size
        && grain.is_power_of_two()
        && grain >= blake3::CHUNK_LEN as u64
        && range.start.is_multiple_of(grain)
        && range.end <= size
        && range.start < range.end;
    if !fits {
        return Ok(None);
    }
    let (first, end) = (range.start / grain, range.end.div_ceil(grain));
    let mut raw = vec![0u8; ((end - first) * 32) as usize];
    file.read_exact_at(&mut raw, HEADER + first * 32)?;
    let values = raw
        .chunks_exact(32)
        .map(|c| Digest(c.try_into().expect("32 bytes")))
        .collect();
    Ok(Some((grain, values)))
}

/// A file's whole outboard, read once and kept by the reader (`fetch/sub_block.rs`): still
/// untrusted, each chunk's values checked by [`ChunkOutboard::verify`] at use.
#[derive(Debug)]
pub struct Outboard {
    grain: u64,
    size: u64,
    values: Vec<Digest>,
}

impl Outboard {
    /// The outboard in `file` for a file of `size` bytes: `Ok(None)` if it is not one (another
    /// size, a bad header, too few values).
    pub fn read(file: &std::fs::File, size: u64) -> std::io::Result<Option<Outboard>> {
        use std::io::Read;
        let mut raw = Vec::new();
        (&*file).read_to_end(&mut raw)?;
        let head = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        if raw.len() < HEADER as usize || &raw[..8] != MAGIC || head(16) != size {
            return Ok(None);
        }
        let grain = head(8);
        if !grain.is_power_of_two() || grain < blake3::CHUNK_LEN as u64 {
            return Ok(None);
        }
        let values: Vec<Digest> = raw[HEADER as usize..]
            .chunks_exact(32)
            .map(|c| Digest(c.try_into().expect("32 bytes")))
            .collect();
        if values.len() as u64 != size.div_ceil(grain) {
            return Ok(None);
        }
        Ok(Some(Outboard {
            grain,
            size,
            values,
        }))
    }

    /// Bytes it takes in memory.
    pub fn len_bytes(&self) -> usize {
        self.values.len() * 32
    }

    /// The values of the sub-blocks of `range` (whole sub-blocks of the file), with the grain.
    pub fn values(&self, range: std::ops::Range<u64>) -> Option<(u64, Vec<Digest>)> {
        let fits = range.start.is_multiple_of(self.grain)
            && range.start < range.end
            && range.end <= self.size;
        fits.then(|| {
            let (a, b) = (range.start / self.grain, range.end.div_ceil(self.grain));
            (self.grain, self.values[a as usize..b as usize].to_vec())
        })
    }
}

/// Why an outboard was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OutboardError {
    /// The values do not merge into the chunk's digest: wrong, or another file's.
    #[error("outboard values do not merge into the chunk's digest {expected}")]
    Mismatch { expected: Digest },
    /// Not a `blake3-tree` chunk, or one the grain does not cut into two or more sub-blocks,
    /// or as many values as it has sub-blocks.
    #[error("outboard does not fit the chunk")]
    Misfit,
}

/// One chunk's sub-block values, checked against the chunk's digest: each proves its own
/// sub-block ([`ChunkOutboard::block`]).
#[derive(Debug, Clone)]
pub struct ChunkOutboard {
    /// The chunk's bytes in the file.
    range: Range<u64>,
    grain: u64,
    values: Vec<Digest>,
}

/// One sub-block of a chunk: where it is in the file, how its bytes are hashed, and the
/// value they must hash to. Only a [`ChunkOutboard`] makes one, so `digest` is proven;
/// [`VerifiedChunk::verify`](super::VerifiedChunk::verify) of its bytes under `check` is what
/// lets them reach a reader.
#[derive(Debug, Clone)]
pub struct SubBlock {
    pub range: Range<u64>,
    pub check: ChunkCheck,
    pub digest: Digest,
}

impl ChunkOutboard {
    /// `values` (untrusted) as the sub-block values of the chunk `check` names, `range` of its
    /// file, whose digest is `expected`, if they merge into it.
    pub fn verify(
        check: ChunkCheck,
        range: Range<u64>,
        expected: Digest,
        grain: u64,
        values: Vec<Digest>,
    ) -> Result<ChunkOutboard, OutboardError> {
        let len = range.end - range.start;
        let fits = check.hash == ChunkHash::Blake3Tree
            && check.offset == range.start
            && grain.is_power_of_two()
            && grain >= blake3::CHUNK_LEN as u64
            && range.start.is_multiple_of(grain)
            && len > grain
            && values.len() as u64 == len.div_ceil(grain);
        if !fits {
            return Err(OutboardError::Misfit);
        }
        // The chunk's own tree: the grain's uniform grid over its bytes, every sub-block a node.
        let grid = Layout::new(len, grain);
        let merged = tree::merge(&grid, &values, check.root).ok_or(OutboardError::Misfit)?;
        if merged != expected {
            return Err(OutboardError::Mismatch { expected });
        }
        Ok(ChunkOutboard {
            range,
            grain,
            values,
        })
    }

    /// The sub-blocks holding file bytes `offset..end` (clipped to the chunk), as indexes.
    pub fn covering(&self, offset: u64, end: u64) -> Range<u64> {
        let (s, e) = (offset.max(self.range.start), end.min(self.range.end));
        if s >= e {
            return 0..0;
        }
        (s - self.range.start) / self.grain..(e - self.range.start).div_ceil(self.grain)
    }

    /// Sub-block `i` of the chunk.
    pub fn block(&self, i: u64) -> SubBlock {
        let start = self.range.start + i * self.grain;
        SubBlock {
            range: start..(start + self.grain).min(self.range.end),
            check: ChunkCheck {
                hash: ChunkHash::Blake3Tree,
                offset: start,
                root: false,
            },
            digest: self.values[i as usize],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::VerifiedChunk;
    use crate::chunk::tree::tests::bytes;
    use bytes::Bytes;
    use proptest::prelude::*;

    const K: u64 = 1024;

    /// The outboard of `data`, written to a temp file, fed in pieces of `piece` bytes.
    fn outboard_file(data: &[u8], grain: u64, piece: usize) -> tempfile::NamedTempFile {
        let mut h = OutboardHasher::new(data.len() as u64, grain);
        for p in data.chunks(piece.max(1)) {
            h.update(p);
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), h.finish().expect("more than one sub-block")).unwrap();
        f
    }

    /// Chunk `idx` of `layout`'s outboard, read back and verified against its real digest.
    fn chunk_outboard(
        layout: &Layout,
        data: &[u8],
        file: &std::fs::File,
        idx: u64,
    ) -> Result<ChunkOutboard, OutboardError> {
        let r = layout.range(idx);
        let check = ChunkCheck::of(ChunkHash::Blake3Tree, layout, idx);
        let expected = check.digest(&data[r.start as usize..r.end as usize]);
        let (grain, values) = read_values(file, layout.size, r.clone()).unwrap().unwrap();
        ChunkOutboard::verify(check, r, expected, grain, values)
    }

    /// A sound outboard proves each sub-block; a tampered value is refused whole, a tampered
    /// sub-block is refused by its value, and a sub-block served at another place is refused.
    #[test]
    fn a_tampered_outboard_and_a_tampered_sub_block_are_both_refused() {
        let layout = Layout::aligned(40 * K + 7, 16 * K, 4 * K);
        let data = bytes(layout.size, 3);
        let f = outboard_file(&data, K, 5000);
        let file = std::fs::File::open(f.path()).unwrap();
        let last = layout.count() - 1;
        let ob = chunk_outboard(&layout, &data, &file, last).unwrap();
        let r = layout.range(last);
        assert_eq!(ob.covering(r.start + 10, r.start + 2 * K), 0..2);
        let b = ob.block(1);
        let good = Bytes::copy_from_slice(&data[b.range.start as usize..b.range.end as usize]);
        assert!(VerifiedChunk::verify(b.check, b.digest, good.clone()).is_ok());
        let mut bad = good.to_vec();
        bad[100] ^= 1;
        assert!(VerifiedChunk::verify(b.check, b.digest, Bytes::from(bad)).is_err());
        let other = ob.block(2);
        assert!(VerifiedChunk::verify(other.check, other.digest, good).is_err());

        // One value flipped in the file: the chunk's outboard no longer merges into its digest.
        let mut raw = std::fs::read(f.path()).unwrap();
        let at = (HEADER + (r.start / K + 2) * 32) as usize;
        raw[at] ^= 1;
        std::fs::write(f.path(), &raw).unwrap();
        let file = std::fs::File::open(f.path()).unwrap();
        assert!(matches!(
            chunk_outboard(&layout, &data, &file, last),
            Err(OutboardError::Mismatch { .. })
        ));
        // Another chunk's values are another chunk's: untouched, still sound.
        assert!(chunk_outboard(&layout, &data, &file, last - 1).is_ok());
        // Values of the right count from elsewhere (another chunk's) are refused.
        let r1 = layout.range(last - 1);
        let (g, v) = read_values(&file, layout.size, r1).unwrap().unwrap();
        let check = ChunkCheck::of(ChunkHash::Blake3Tree, &layout, last);
        let expected = check.digest(&data[r.start as usize..]);
        let v: Vec<_> = v
            .into_iter()
            .take(((r.end - r.start).div_ceil(K)) as usize)
            .collect();
        assert!(ChunkOutboard::verify(check, r.clone(), expected, g, v).is_err());
        // Read whole, it gives the same values.
        let whole = Outboard::read(&file, layout.size).unwrap().unwrap();
        assert_eq!(
            whole.values(r.clone()),
            read_values(&file, layout.size, r.clone()).unwrap()
        );
        assert!(Outboard::read(&file, layout.size - 1).unwrap().is_none());
        // A header naming another size, or a range off the grain, reads as no outboard.
        assert!(
            read_values(&file, layout.size + 1, r.clone())
                .unwrap()
                .is_none()
        );
        assert!(
            read_values(&file, layout.size, r.start + 1..r.end)
                .unwrap()
                .is_none()
        );
    }

    /// A whole file's one chunk (a root) is proven by its sub-blocks too; a file of one
    /// sub-block gets no outboard.
    #[test]
    fn a_one_chunk_file_is_a_root() {
        let layout = Layout::aligned(5 * K + 1, 8 * K, 8 * K);
        assert_eq!(layout.count(), 1);
        let data = bytes(layout.size, 4);
        let f = outboard_file(&data, K, 777);
        let file = std::fs::File::open(f.path()).unwrap();
        assert!(chunk_outboard(&layout, &data, &file, 0).is_ok());
        let mut h = OutboardHasher::new(K, K);
        h.update(&data[..K as usize]);
        assert!(h.finish().is_none());
    }

    proptest! {
        /// For any file, grain and aligned layout: every chunk longer than the grain has an
        /// outboard that merges into its digest (BLAKE3's own), and every sub-block verifies
        /// against its value.
        #[test]
        fn outboards_prove_every_sub_block(
            size in (2 * K)..(600 * K),
            grain_log in 10u32..14,
            head_log in 10u32..15,
            ramp in 0u32..3,
            seed: u8,
            piece in 1usize..70_000,
        ) {
            let grain = 1u64 << grain_log;
            let (head, cs) = (1u64 << head_log, 1u64 << (head_log + ramp));
            let layout = Layout::aligned(size, cs, head);
            let data = bytes(size, seed);
            prop_assume!(size > grain);
            let f = outboard_file(&data, grain, piece);
            let file = std::fs::File::open(f.path()).unwrap();
            for idx in 0..layout.count() {
                let r = layout.range(idx);
                if r.end - r.start <= grain || !r.start.is_multiple_of(grain) {
                    continue;
                }
                let ob = chunk_outboard(&layout, &data, &file, idx);
                prop_assert!(ob.is_ok(), "chunk {} {:?}", idx, ob);
                let ob = ob.unwrap();
                for i in ob.covering(r.start, r.end) {
                    let b = ob.block(i);
                    let part = Bytes::copy_from_slice(&data[b.range.start as usize..b.range.end as usize]);
                    prop_assert!(VerifiedChunk::verify(b.check, b.digest, part).is_ok());
                }
            }
        }
    }
}
