//! Content digests, chunk arithmetic and `VerifiedChunk`.
//!
//! Everything in wanfs is named by a digest: blobs by the whole-file sha256, chunks by their
//! own digest under the file's `ChunkHash` (sha256, BLAKE3, or BLAKE3 subtrees where the
//! manifest says so). A chunk is checked under a [`ChunkCheck`]: the hash and, for
//! `blake3-tree`, where the chunk sits in its file.
//! `VerifiedChunk` can only be built by hashing the bytes and comparing with the expected
//! digest, so the type system keeps unverified bytes away from readers and from the cache.
//! A `Filler` does the hashing while a source's bytes land (so no second pass over the chunk
//! is needed), and `VerifiedChunk::verify_landed` takes what it hashed only for the very
//! memory it filled.
//!
//! - `mod.rs`: `Digest`, `ChunkHash`, `ChunkCheck`, `Layout` (chunk arithmetic: a head chunk
//!   then a grid, or the aligned power-of-two layout of `blake3-tree`), `VerifiedChunk`.
//! - `filler.rs`: `Filler` (a request's bytes hashed as they land), `Hashed`, and the BLAKE3
//!   subtree arithmetic that joins parallel parts into a chunk's digest.
//! - `tree.rs`: `blake3_tree_root`, a `blake3-tree` file's chunk digests merged into its
//!   BLAKE3 hash, with no byte of it read.
//! - `outboard.rs`: outboards, a `blake3-tree` file's sub-block values (every 64 KiB): a
//!   chunk's, once they merge into its digest, prove any of its sub-blocks on its own, so a
//!   small read of a cold chunk is verified without the whole chunk.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

mod filler;
mod outboard;
mod tree;

use blake3::hazmat::HasherExt;
use filler::landed_digest;
pub use filler::{Filler, Hashed, blocks_fit};
pub use outboard::{
    ChunkOutboard, OUTBOARD_GRAIN, Outboard, OutboardError, OutboardHasher, SubBlock,
    outboard_path, read_values as read_outboard,
};
pub use tree::blake3_tree_root;

/// A 32-byte digest (sha256, or a BLAKE3 chunk digest): a compiled manifest's digest table is
/// 32-byte records of these (`crate::compiled`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..12])
    }
}

/// The hash a file's chunk digests are taken with (`chunk_hash` in the manifest). The
/// whole-file digest that names a blob is always sha256 (it is the Hub's LFS oid); chunk
/// digests are only ever compared with bytes of their own file, so each file may pick.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum ChunkHash {
    /// The manifest's original form, and what a file without `chunk_hash` uses.
    #[default]
    Sha256,
    /// BLAKE3 (32-byte output) of each chunk on its own: several times sha256's speed per
    /// core where AVX-512 or AVX2 is available and no SHA-NI, about equal on SHA-NI CPUs
    /// without AVX-512.
    Blake3,
    /// BLAKE3 of the whole file, cut at its tree: a chunk's digest is the chaining value of
    /// the chunk as the subtree it is at its offset in the file (its BLAKE3 hash when it is
    /// the whole file). The chunks are whole aligned subtrees ([`LayoutKind::Aligned`]), so
    /// [`blake3_tree_root`] merges a file's chunk list into the file's BLAKE3 hash with no
    /// byte read: what binds a chunk list to a publisher's BLAKE3 signature.
    Blake3Tree,
}

impl ChunkHash {
    pub const ALL: [ChunkHash; 3] = [ChunkHash::Sha256, ChunkHash::Blake3, ChunkHash::Blake3Tree];

    /// Hashes `data` as a whole file's one chunk ([`ChunkCheck`] from a `ChunkHash`): for a
    /// chunk of a `blake3-tree` file that is not the whole file, use the file's
    /// [`ChunkCheck`] for that chunk.
    pub fn digest(self, data: &[u8]) -> Digest {
        ChunkCheck::from(self).digest(data)
    }

    /// An incremental hasher, for data that arrives in pieces (a whole file's one chunk, as
    /// [`digest`](ChunkHash::digest)).
    pub fn hasher(self) -> ChunkHasher {
        ChunkCheck::from(self).hasher()
    }

    /// The name the manifest uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkHash::Sha256 => "sha256",
            ChunkHash::Blake3 => "blake3",
            ChunkHash::Blake3Tree => "blake3-tree",
        }
    }

    /// The chunk layout a file whose chunks are taken with this hash has: `blake3-tree` needs
    /// aligned subtrees; the others keep the head-then-grid layout.
    pub fn layout_kind(self) -> LayoutKind {
        match self {
            ChunkHash::Blake3Tree => LayoutKind::Aligned,
            ChunkHash::Sha256 | ChunkHash::Blake3 => LayoutKind::Head,
        }
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChunkHash {
    type Err = String;
    fn from_str(s: &str) -> Result<ChunkHash, String> {
        ChunkHash::ALL
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| {
                format!("unknown chunk_hash {s:?} (want \"blake3-tree\", \"blake3\" or \"sha256\")")
            })
    }
}

/// How one chunk's bytes are hashed: the file's [`ChunkHash`] and, for `blake3-tree`, where
/// the chunk sits (its byte offset in the file, and whether it is the whole file, whose
/// digest is the root hash rather than a chaining value). sha256 and BLAKE3 chunks are hashed
/// alone, so theirs is always offset 0, root: two checks of the same hash compare equal.
/// Made for chunk `idx` of a file by [`ChunkCheck::of`] (`FileEntry::check`); from a bare
/// `ChunkHash`, it is a whole file's one chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ChunkCheck {
    pub hash: ChunkHash,
    offset: u64,
    root: bool,
}

impl From<ChunkHash> for ChunkCheck {
    fn from(hash: ChunkHash) -> ChunkCheck {
        ChunkCheck {
            hash,
            offset: 0,
            root: true,
        }
    }
}

impl ChunkCheck {
    /// The check of chunk `idx` of a file cut as `layout`, hashed with `hash`. A
    /// `blake3-tree` chunk must be a whole subtree, which only [`LayoutKind::Aligned`]
    /// guarantees ([`Layout::is_tree`]; the manifest's rules tie the two); panics otherwise,
    /// rather than hash against a tree the file does not have.
    pub fn of(hash: ChunkHash, layout: &Layout, idx: u64) -> ChunkCheck {
        if hash != ChunkHash::Blake3Tree {
            return hash.into();
        }
        assert!(
            layout.is_tree(),
            "blake3-tree chunks need the aligned layout"
        );
        ChunkCheck {
            hash,
            offset: layout.range(idx).start,
            root: layout.count() == 1,
        }
    }

    /// Where the chunk starts in its file (0 for a hash that does not care).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the digest is a root hash (a whole file, or a hash without a tree) rather than
    /// a subtree's chaining value.
    pub fn root(&self) -> bool {
        self.root
    }

    /// Hashes `data`, the whole chunk.
    pub fn digest(self, data: &[u8]) -> Digest {
        match (self.hash, self.root) {
            (ChunkHash::Sha256, _) => Digest::of(data),
            (ChunkHash::Blake3, _) | (ChunkHash::Blake3Tree, true) => {
                Digest(*blake3::hash(data).as_bytes())
            }
            (ChunkHash::Blake3Tree, false) => {
                let mut h = self.hasher();
                h.update(data);
                h.finalize()
            }
        }
    }

    /// An incremental hasher, for a chunk that arrives in pieces.
    pub fn hasher(self) -> ChunkHasher {
        match (self.hash, self.root) {
            (ChunkHash::Sha256, _) => ChunkHasher::Sha256(Sha256::new()),
            (ChunkHash::Blake3, _) | (ChunkHash::Blake3Tree, true) => {
                ChunkHasher::Blake3(Box::new(blake3::Hasher::new()))
            }
            (ChunkHash::Blake3Tree, false) => {
                let mut h = blake3::Hasher::new();
                h.set_input_offset(self.offset);
                ChunkHasher::Subtree(Box::new(h))
            }
        }
    }
}

/// [`ChunkCheck::hasher`]: one of the three, fed piece by piece.
pub enum ChunkHasher {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
    /// A BLAKE3 subtree at its offset: its chaining value comes out.
    Subtree(Box<blake3::Hasher>),
}

impl ChunkHasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            ChunkHasher::Sha256(h) => h.update(data),
            ChunkHasher::Blake3(h) | ChunkHasher::Subtree(h) => {
                h.update(data);
            }
        }
    }

    pub fn finalize(self) -> Digest {
        match self {
            ChunkHasher::Sha256(h) => Digest(h.finalize().into()),
            ChunkHasher::Blake3(h) => Digest(*h.finalize().as_bytes()),
            ChunkHasher::Subtree(h) => Digest(h.finalize_non_root()),
        }
    }
}

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a digest (want 64 lowercase hex characters): {0:?}")]
pub struct BadHex(pub String);

impl FromStr for Digest {
    type Err = BadHex;
    fn from_str(s: &str) -> Result<Digest, BadHex> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(BadHex(s.to_string()));
        }
        // A table and one check at the end: a fleet manifest holds over half a million
        // digests, and this was a tenth of parsing it.
        const VAL: [u8; 256] = {
            let mut t = [0xffu8; 256];
            let mut c = 0;
            while c < 10 {
                t[b'0' as usize + c] = c as u8;
                c += 1;
            }
            let mut c = 0;
            while c < 6 {
                t[b'a' as usize + c] = 10 + c as u8;
                c += 1;
            }
            t
        };
        let mut out = [0u8; 32];
        let mut bad = 0u8;
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let (h, l) = (VAL[pair[0] as usize], VAL[pair[1] as usize]);
            bad |= h | l;
            *o = (h << 4) | (l & 0x0f);
        }
        if bad > 0x0f {
            return Err(BadHex(s.to_string()));
        }
        Ok(Digest(out))
    }
}

/// How a file of `size` bytes is cut into chunks ([`LayoutKind`]): a first ("head") chunk of
/// `head` bytes, then chunks of `chunk_size` (the last may be short), or, for `blake3-tree`
/// files, the aligned ramp `head, head, 2·head, 4·head, …` up to `chunk_size`. A small head
/// makes the first read of a file (a loader reading a safetensors header) wait for one small
/// chunk instead of a whole large one; `head == chunk_size` is the uniform grid (the same
/// under both kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub chunk_size: u64,
    pub head: u64,
    pub kind: LayoutKind,
}

/// The two ways a [`Layout`] cuts a file. A store keeps each blob's kind with its grid: a
/// chunk's presence bit means nothing under another kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum LayoutKind {
    /// A head chunk at 0, then `chunk_size` chunks from `head` on: every file before
    /// `blake3-tree`.
    #[default]
    Head,
    /// Every chunk a whole, aligned BLAKE3 subtree: power-of-two sizes at offsets that are
    /// multiples of their size. `head` at 0, `head` at `head`, then `2·head` at `2·head`,
    /// `4·head` at `4·head`, … until the size reaches `chunk_size` (at offset `chunk_size`),
    /// then `chunk_size` chunks. Head 1 MiB, chunk 8 MiB: 1, 1, 2, 4, 8, 8, … MiB at 0, 1, 2,
    /// 4, 8, 16, … MiB. Such a chunk is a node of BLAKE3's tree of any file it is cut from,
    /// the last (short) one included.
    Aligned,
}

impl LayoutKind {
    /// The number the store's index and the compiled manifest keep for the kind.
    pub fn code(self) -> u8 {
        match self {
            LayoutKind::Head => 0,
            LayoutKind::Aligned => 1,
        }
    }

    /// The kind `code` stands for, if any.
    pub fn from_code(code: u8) -> Option<LayoutKind> {
        match code {
            0 => Some(LayoutKind::Head),
            1 => Some(LayoutKind::Aligned),
            _ => None,
        }
    }

    /// Whether a layout of this kind may have chunks of `chunk_size` after a `head`: the
    /// constructors' conditions, for a caller that checks input before it builds one.
    pub fn fits(self, chunk_size: u64, head: u64) -> bool {
        let head_grid = chunk_size > 0 && head > 0 && head <= chunk_size;
        match self {
            LayoutKind::Head => head_grid,
            LayoutKind::Aligned => {
                head_grid
                    && chunk_size.is_power_of_two()
                    && head.is_power_of_two()
                    && head >= blake3::CHUNK_LEN as u64
            }
        }
    }
}

impl Layout {
    /// The uniform grid.
    pub fn new(size: u64, chunk_size: u64) -> Layout {
        Layout::with_head(size, chunk_size, chunk_size)
    }

    /// A first chunk of `head` bytes (`0 < head <= chunk_size`), then `chunk_size` chunks.
    pub fn with_head(size: u64, chunk_size: u64, head: u64) -> Layout {
        Layout::of(LayoutKind::Head, size, chunk_size, head)
    }

    /// The aligned layout ([`LayoutKind::Aligned`]): `head` and `chunk_size` powers of two,
    /// `1 KiB <= head <= chunk_size`.
    pub fn aligned(size: u64, chunk_size: u64, head: u64) -> Layout {
        Layout::of(LayoutKind::Aligned, size, chunk_size, head)
    }

    /// A layout of `kind`; panics unless [`LayoutKind::fits`] the sizes. With `head ==
    /// chunk_size` both kinds are the uniform grid, and it is always named
    /// [`LayoutKind::Head`]: one grid, one name, so a blob listed under `blake3-tree` and under
    /// another hash with the same uniform chunks is one blob with one grid in the store.
    pub fn of(kind: LayoutKind, size: u64, chunk_size: u64, head: u64) -> Layout {
        assert!(chunk_size > 0, "chunk_size must be positive");
        assert!(
            head > 0 && head <= chunk_size,
            "head must be in (0, chunk_size]"
        );
        assert!(
            kind.fits(chunk_size, head),
            "an aligned layout wants powers of two, head >= 1 KiB"
        );
        Layout {
            size,
            chunk_size,
            head,
            kind: if head == chunk_size {
                LayoutKind::Head
            } else {
                kind
            },
        }
    }

    /// Whether every chunk is a whole, aligned BLAKE3 subtree, as `blake3-tree` needs: the
    /// aligned layout, or a uniform grid of power-of-two chunks of at least 1 KiB.
    pub fn is_tree(&self) -> bool {
        LayoutKind::Aligned.fits(self.chunk_size, self.head)
            && (self.kind == LayoutKind::Aligned || self.head == self.chunk_size)
    }

    /// Chunks of the aligned ramp before the first `chunk_size` one: the head and its
    /// doublings, `1 + log2(chunk_size / head)`; 0 for the head grid.
    fn ramp(&self) -> u64 {
        match self.kind {
            LayoutKind::Head => 0,
            LayoutKind::Aligned => 1 + (self.chunk_size / self.head).trailing_zeros() as u64,
        }
    }

    /// Number of chunks; an empty file has none.
    pub fn count(&self) -> u64 {
        match (self.kind, self.size) {
            (_, 0) => 0,
            (_, s) if s <= self.head => 1,
            (LayoutKind::Head, s) => 1 + (s - self.head).div_ceil(self.chunk_size),
            // The ramp ends at `chunk_size` bytes; chunk `i` of it ends at `head << i`.
            (LayoutKind::Aligned, s) if s <= self.chunk_size => {
                1 + s.div_ceil(self.head).next_power_of_two().trailing_zeros() as u64
            }
            (LayoutKind::Aligned, s) => self.ramp() - 1 + s.div_ceil(self.chunk_size),
        }
    }

    /// Byte range of chunk `idx` within the file.
    pub fn range(&self, idx: u64) -> Range<u64> {
        let (start, len) = match (self.kind, idx) {
            (_, 0) => (0, self.head),
            (LayoutKind::Head, i) => (self.head + (i - 1) * self.chunk_size, self.chunk_size),
            (LayoutKind::Aligned, i) if i < self.ramp() => {
                let at = self.head << (i - 1);
                (at, at)
            }
            (LayoutKind::Aligned, i) => ((i + 1 - self.ramp()) * self.chunk_size, self.chunk_size),
        };
        start.min(self.size)..start.saturating_add(len).min(self.size)
    }

    /// The chunk holding byte `offset` (< size).
    fn index_of(&self, offset: u64) -> u64 {
        match self.kind {
            _ if offset < self.head => 0,
            LayoutKind::Head => 1 + (offset - self.head) / self.chunk_size,
            LayoutKind::Aligned if offset < self.chunk_size => {
                1 + (offset / self.head).ilog2() as u64
            }
            LayoutKind::Aligned => self.ramp() - 1 + offset / self.chunk_size,
        }
    }

    /// Chunks covering `offset..offset+len`, clipped to the file.
    pub fn covering(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return 0..0;
        }
        self.index_of(offset)..self.index_of(end - 1) + 1
    }
}

/// Bytes whose chunk digest (sha256, BLAKE3 or a BLAKE3 subtree's) was checked against the one the manifest gives.
#[derive(Clone, Debug)]
pub struct VerifiedChunk {
    digest: Digest,
    data: Bytes,
}

/// Bytes that did not hash to what the manifest says.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{hash} mismatch: expected {expected}, got {actual}")]
pub struct Mismatch {
    pub hash: ChunkHash,
    pub expected: Digest,
    pub actual: Digest,
}

impl VerifiedChunk {
    /// The only way to make one: hash `data` as `check` says (a chunk's [`ChunkCheck`], or a
    /// bare `ChunkHash` for bytes that are a whole file's one chunk) and compare.
    pub fn verify(
        check: impl Into<ChunkCheck>,
        expected: Digest,
        data: Bytes,
    ) -> Result<VerifiedChunk, Mismatch> {
        let check = check.into();
        let actual = check.digest(&data);
        VerifiedChunk::checked(check.hash, expected, actual, data)
    }

    /// The same check for bytes that [`Filler`]s hashed as they landed, in `parts` (in the
    /// chunk's order): no second pass, only a comparison (and, for parts hashed as BLAKE3
    /// subtrees, joining them into the chunk's root or subtree). `parts` must describe exactly
    /// the memory of `data`, end to end, hashed for this `check`; if they do not (none given, a
    /// gap, other memory, another hash or offset), `data` is hashed here as
    /// [`verify`](VerifiedChunk::verify) does, so a caller's mix-up costs time, never a wrong
    /// byte.
    pub(crate) fn verify_landed(
        check: impl Into<ChunkCheck>,
        expected: Digest,
        data: Bytes,
        parts: &[Hashed],
    ) -> Result<VerifiedChunk, Mismatch> {
        let check = check.into();
        let Some(actual) = landed_digest(check, &data, parts) else {
            return VerifiedChunk::verify(check, expected, data);
        };
        VerifiedChunk::checked(check.hash, expected, actual, data)
    }

    /// `data` as a verified chunk if `actual`, its digest under `hash`, is `expected`.
    fn checked(
        hash: ChunkHash,
        expected: Digest,
        actual: Digest,
        data: Bytes,
    ) -> Result<VerifiedChunk, Mismatch> {
        if actual != expected {
            return Err(Mismatch {
                hash,
                expected,
                actual,
            });
        }
        Ok(VerifiedChunk {
            digest: expected,
            data,
        })
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn bytes(&self) -> &Bytes {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hex_round_trip_and_rejects() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!(
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
                .parse::<Digest>()
                .is_err()
        );
        assert!("abc".parse::<Digest>().is_err());
        assert!("g".repeat(64).parse::<Digest>().is_err());
    }

    #[test]
    fn verify_refuses_wrong_bytes() {
        let good = Bytes::from_static(b"hello");
        let d = Digest::of(&good);
        assert!(VerifiedChunk::verify(ChunkHash::Sha256, d, good.clone()).is_ok());
        assert!(VerifiedChunk::verify(ChunkHash::Sha256, d, Bytes::from_static(b"hellp")).is_err());
        let b3 = ChunkHash::Blake3.digest(&good);
        assert_ne!(b3, d);
        assert!(VerifiedChunk::verify(ChunkHash::Blake3, b3, good.clone()).is_ok());
        assert!(VerifiedChunk::verify(ChunkHash::Sha256, b3, good.clone()).is_err());
        let e = VerifiedChunk::verify(ChunkHash::Blake3, d, good).unwrap_err();
        assert!(e.to_string().starts_with("blake3 mismatch"), "{e}");
        // BLAKE3's published digest of "abc".
        assert_eq!(
            ChunkHash::Blake3.digest(b"abc").to_hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        let mut h = ChunkHash::Blake3.hasher();
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(h.finalize(), ChunkHash::Blake3.digest(b"abc"));
    }

    /// A `blake3-tree` chunk's digest is its subtree at its place: the same bytes checked at
    /// another offset, or as another file's whole, are refused; a one-chunk file's digest is
    /// its plain BLAKE3 hash; sha256 and BLAKE3 checks do not depend on where a chunk is.
    #[test]
    fn blake3_tree_chunks_verify_only_at_their_place() {
        const K: u64 = 1024;
        let l = Layout::aligned(6 * K, 8 * K, K);
        let data = Bytes::from(vec![9u8; K as usize]);
        let (c1, c2) = (
            ChunkCheck::of(ChunkHash::Blake3Tree, &l, 1),
            ChunkCheck::of(ChunkHash::Blake3Tree, &l, 2),
        );
        assert_eq!((c1.offset(), c1.root(), c2.offset()), (K, false, 2 * K));
        let d1 = c1.digest(&data);
        assert_ne!(d1, c2.digest(&data), "the offset is hashed in");
        assert_ne!(
            d1,
            ChunkHash::Blake3Tree.digest(&data),
            "a subtree is not a root"
        );
        assert!(VerifiedChunk::verify(c1, d1, data.clone()).is_ok());
        let e = VerifiedChunk::verify(c2, d1, data.clone()).unwrap_err();
        assert!(e.to_string().starts_with("blake3-tree mismatch"), "{e}");
        let mut h = c1.hasher();
        h.update(&data[..100]);
        h.update(&data[100..]);
        assert_eq!(h.finalize(), d1);
        let one = Layout::aligned(K, 8 * K, K);
        let whole = ChunkCheck::of(ChunkHash::Blake3Tree, &one, 0);
        assert!(whole.root());
        assert_eq!(whole.digest(&data), ChunkHash::Blake3.digest(&data));
        for hash in [ChunkHash::Sha256, ChunkHash::Blake3] {
            let grid = Layout::with_head(6 * K, 8 * K, K);
            assert_eq!(ChunkCheck::of(hash, &grid, 3), ChunkCheck::from(hash));
        }
        assert_eq!("blake3-tree".parse(), Ok(ChunkHash::Blake3Tree));
        assert_eq!(ChunkHash::Blake3Tree.layout_kind(), LayoutKind::Aligned);
        for k in [LayoutKind::Head, LayoutKind::Aligned] {
            assert_eq!(LayoutKind::from_code(k.code()), Some(k));
        }
        assert!(!LayoutKind::Aligned.fits(8 * K, 3 * K) && !LayoutKind::Aligned.fits(8 * K, 512));
    }

    #[test]
    fn layout_edges() {
        let l = Layout::new(10, 4);
        assert_eq!(l.count(), 3);
        assert_eq!(l.range(2), 8..10);
        assert_eq!(l.covering(0, 0), 0..0);
        assert_eq!(l.covering(3, 2), 0..2);
        assert_eq!(l.covering(9, 100), 2..3);
        assert_eq!(l.covering(10, 1), 0..0);
        assert_eq!(Layout::new(0, 4).count(), 0);
        let h = Layout::with_head(10, 4, 1);
        assert_eq!(h.count(), 4);
        assert_eq!((h.range(0), h.range(1), h.range(3)), (0..1, 1..5, 9..10));
        assert_eq!(h.covering(0, 2), 0..2);
        assert_eq!(Layout::with_head(1, 4, 2).count(), 1);
        // Aligned, head 1 KiB, chunk 4 KiB: 1, 1, 2, then 4 KiB chunks at 0, 1, 2, 4, 8 KiB.
        const K: u64 = 1024;
        let a = Layout::aligned(9 * K, 4 * K, K);
        assert_eq!(a.count(), 5);
        assert_eq!(
            (a.range(2), a.range(3), a.range(4)),
            (2 * K..4 * K, 4 * K..8 * K, 8 * K..9 * K)
        );
        assert_eq!(
            (a.covering(K, 1), a.covering(3 * K, 5 * K + 1)),
            (1..2, 2..5)
        );
        assert_eq!(Layout::aligned(3 * K, 4 * K, K).count(), 3);
        assert_eq!(Layout::aligned(4 * K + 1, 4 * K, K).count(), 4);
        // head == chunk_size: the uniform grid under either kind, one layout; a tree when its
        // chunks are powers of two of at least 1 KiB.
        let (u, g) = (
            Layout::aligned(9 * K, 4 * K, 4 * K),
            Layout::new(9 * K, 4 * K),
        );
        assert_eq!(u, g);
        assert!((0..3).all(|i| u.range(i) == g.range(i)) && u.count() == g.count());
        assert!(g.is_tree() && a.is_tree());
        assert!(
            !Layout::new(9 * K, 3 * K).is_tree() && !Layout::with_head(9 * K, 4 * K, K).is_tree()
        );
    }

    proptest! {
        #[test]
        fn covering_is_exact(size in 0u64..10_000, cs in 1u64..700, head_pct in 1u64..=100, off in 0u64..11_000, len in 0u64..3_000) {
            let head = (cs * head_pct / 100).max(1);
            let l = Layout::with_head(size, cs, head);
            // The chunks tile the file exactly.
            let mut at = 0;
            for i in 0..l.count() {
                let r = l.range(i);
                prop_assert!(r.start == at && r.end > r.start);
                at = r.end;
            }
            prop_assert_eq!(at, size);
            let r = l.covering(off, len);
            let end = (off + len).min(size);
            if off >= end {
                prop_assert!(r.is_empty());
            } else {
                prop_assert!(l.range(r.start).start <= off && off < l.range(r.start).end);
                prop_assert!(l.range(r.end - 1).end >= end && l.range(r.end - 1).start < end);
            }
        }
    }
}
