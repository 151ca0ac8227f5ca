//! A chunk buffer filled by a source, each piece hashed as it lands: [`Filler`], what it
//! hashed ([`Hashed`]), and joining BLAKE3 subtrees hashed by parallel parts into the chunk's
//! root (or, for a `blake3-tree` chunk, into the chunk's own subtree). [`VerifiedChunk::verify_landed`](super::VerifiedChunk::verify_landed) is the only
//! way from what a filler hashed to a `VerifiedChunk`: it asks [`landed_digest`] for the
//! digest the parts give, and hashes the bytes itself when they do not describe them exactly.

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use super::{ChunkCheck, ChunkHash, ChunkHasher, Digest};

/// A chunk buffer filled front to back by a source, each piece hashed as it lands.
///
/// Why: hashing a chunk after the whole of it arrived reads 8 MiB back from memory that the
/// socket copy wrote moments before and that has left the CPU's cache since; hashing each
/// piece right after the `read` that wrote it finds it in cache. On this project's bench VM
/// that pass was about a tenth of the daemon's CPU on a cold read (docs/DESIGN-NOTES.md).
///
/// Two ways to hash, by how the chunk is fetched:
/// - [`whole`](Filler::whole): one request fills the whole chunk; its digest comes out.
/// - [`blocks`](Filler::blocks): the chunk comes as parts fetched side by side (parallel
///   requests), each a run of whole `block`-byte blocks at a multiple of `block` into the
///   chunk. Each block is hashed as a BLAKE3 subtree of its own (`blake3::hazmat`), and
///   [`VerifiedChunk::verify_landed`](super::VerifiedChunk::verify_landed) joins the parts'
///   subtrees into the chunk's root, so parts may land in any order and none is read twice.
///   A power-of-two block of at least 1 KiB is always a whole subtree of BLAKE3's tree,
///   wherever the chunk ends; a `blake3-tree` chunk's blocks are subtrees of the file's tree,
///   at the chunk's offset plus theirs. sha256 has no tree: parallel parts of a sha256 chunk
///   are hashed after they all landed.
///
/// Why the digest can be trusted to describe the buffer: a source writes only into
/// [`unfilled`](Filler::unfilled), the tail not yet hashed, and [`advance`](Filler::advance)
/// hashes those bytes and moves them behind the cursor, where nothing hands out a `&mut` to
/// them again. [`Hashed`] keeps the address and length of the memory it describes, and
/// [`VerifiedChunk::verify_landed`](super::VerifiedChunk::verify_landed) re-hashes `Bytes`
/// that are not exactly that memory.
pub struct Filler<'a> {
    buf: &'a mut [u8],
    filled: usize,
    hashing: Hashing,
    /// When the first byte landed: what a request's rate is taken from once its answer
    /// started (`fetch::attempt`).
    first_byte: Option<std::time::Instant>,
}

enum Hashing {
    Plain,
    Whole(ChunkCheck, ChunkHasher),
    Blocks(Box<Blocks>),
}

struct Blocks {
    size: usize,
    /// Where the chunk starts in BLAKE3's input: its offset in the file for `blake3-tree`, 0
    /// for a chunk hashed as a tree of its own.
    base: u64,
    /// Index in the chunk of this part's first block (the one being hashed is
    /// `first + cvs.len()`).
    first: u64,
    cur: blake3::Hasher,
    in_cur: usize,
    cvs: Vec<ChainingValue>,
}

/// What a full [`Filler`] hashed, and which memory that is of. It names the memory by
/// address and length only, and the buffer pool hands the same memory to the next chunk: use
/// it only with the `Bytes` frozen from the buffer it was filled into (as `fetch_range`
/// returns the two together, or keeps them together between rounds), never apart from it.
#[derive(Debug, Clone)]
pub struct Hashed {
    at: usize,
    len: usize,
    kind: HashedKind,
}

#[derive(Debug, Clone)]
enum HashedKind {
    Whole(ChunkCheck, Digest),
    /// BLAKE3 chaining values of `block`-byte subtrees, the first at `first * block` bytes
    /// into the chunk, which starts at `base` in BLAKE3's input.
    Blocks {
        block: usize,
        base: u64,
        first: u64,
        cvs: Vec<ChainingValue>,
    },
}

impl Hashed {
    /// The digest of a whole chunk hashed by one filler.
    pub fn digest(&self) -> Option<Digest> {
        match self.kind {
            HashedKind::Whole(_, d) => Some(d),
            HashedKind::Blocks { .. } => None,
        }
    }
}

/// Whether a chunk checked by `check`, fetched as parts of `part` bytes, can be hashed part by
/// part: BLAKE3, and parts that are whole subtrees (a power of two of at least 1 KiB, at an
/// offset in BLAKE3's input that is a multiple of it).
pub fn blocks_fit(check: ChunkCheck, part: usize) -> bool {
    matches!(check.hash, ChunkHash::Blake3 | ChunkHash::Blake3Tree)
        && part.is_power_of_two()
        && part >= blake3::CHUNK_LEN
        && check.offset().is_multiple_of(part as u64)
}

impl<'a> Filler<'a> {
    /// A filler for a whole chunk, hashed as `check` says.
    pub fn whole(check: impl Into<ChunkCheck>, buf: &'a mut [u8]) -> Filler<'a> {
        let check = check.into();
        Filler {
            buf,
            filled: 0,
            first_byte: None,
            hashing: Hashing::Whole(check, check.hasher()),
        }
    }

    /// A filler for the part of a BLAKE3 chunk (checked by `check`) that starts `offset`
    /// bytes into it, hashed as subtrees of `block` bytes. `offset` must be a multiple of
    /// `block`, and `block` must pass [`blocks_fit`].
    pub fn blocks(check: ChunkCheck, block: usize, offset: u64, buf: &'a mut [u8]) -> Filler<'a> {
        assert!(blocks_fit(check, block) && offset.is_multiple_of(block as u64));
        Filler {
            buf,
            filled: 0,
            first_byte: None,
            hashing: Hashing::Blocks(Box::new(Blocks::new(block, check.offset(), offset))),
        }
    }

    /// A filler that only fills (a caller that verifies otherwise, or not at all).
    pub fn plain(buf: &'a mut [u8]) -> Filler<'a> {
        Filler {
            buf,
            filled: 0,
            first_byte: None,
            hashing: Hashing::Plain,
        }
    }

    /// Where the next bytes go.
    pub fn unfilled(&mut self) -> &mut [u8] {
        &mut self.buf[self.filled..]
    }

    /// The next `n` bytes of [`unfilled`](Filler::unfilled) are written: hash them and move on.
    pub fn advance(&mut self, n: usize) {
        let piece = &self.buf[self.filled..self.filled + n];
        match &mut self.hashing {
            Hashing::Plain => {}
            Hashing::Whole(_, h) => h.update(piece),
            Hashing::Blocks(b) => b.update(piece),
        }
        if self.first_byte.is_none() && n > 0 {
            self.first_byte = Some(std::time::Instant::now());
        }
        self.filled += n;
    }

    /// When the first byte landed, if one has.
    pub fn first_byte(&self) -> Option<std::time::Instant> {
        self.first_byte
    }

    /// Copies `piece` in at the cursor and [`advance`](Filler::advance)s past it; false (and
    /// nothing written) if it does not fit in what is left.
    pub fn fill(&mut self, piece: &[u8]) -> bool {
        let Some(to) = self.unfilled().get_mut(..piece.len()) else {
            return false;
        };
        to.copy_from_slice(piece);
        self.advance(piece.len());
        true
    }

    /// Bytes written so far.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Starts over, for a new attempt at the same bytes.
    pub fn reset(&mut self) {
        self.filled = 0;
        self.first_byte = None;
        match &mut self.hashing {
            Hashing::Plain => {}
            Hashing::Whole(check, h) => *h = check.hasher(),
            Hashing::Blocks(b) => **b = Blocks::new(b.size, b.base, b.first * b.size as u64),
        }
    }

    /// What was hashed; `None` unless every byte was written and hashed.
    pub fn finish(self) -> Option<Hashed> {
        if self.filled != self.buf.len() {
            return None;
        }
        let kind = match self.hashing {
            Hashing::Plain => return None,
            Hashing::Whole(check, h) => HashedKind::Whole(check, h.finalize()),
            Hashing::Blocks(mut b) => {
                if b.in_cur > 0 {
                    b.cvs.push(b.cur.finalize_non_root());
                }
                if b.cvs.is_empty() {
                    return None;
                }
                HashedKind::Blocks {
                    block: b.size,
                    base: b.base,
                    first: b.first,
                    cvs: b.cvs,
                }
            }
        };
        Some(Hashed {
            at: self.buf.as_ptr() as usize,
            len: self.buf.len(),
            kind,
        })
    }
}

impl Blocks {
    fn new(size: usize, base: u64, offset: u64) -> Blocks {
        let mut cur = blake3::Hasher::new();
        cur.set_input_offset(base + offset);
        Blocks {
            size,
            base,
            first: offset / size as u64,
            cur,
            in_cur: 0,
            cvs: Vec::new(),
        }
    }

    fn update(&mut self, mut piece: &[u8]) {
        while !piece.is_empty() {
            let take = (self.size - self.in_cur).min(piece.len());
            self.cur.update(&piece[..take]);
            self.in_cur += take;
            piece = &piece[take..];
            if self.in_cur == self.size {
                self.cvs.push(self.cur.finalize_non_root());
                let next = self.base + (self.first + self.cvs.len() as u64) * self.size as u64;
                self.cur = blake3::Hasher::new();
                self.cur.set_input_offset(next);
                self.in_cur = 0;
            }
        }
    }
}

/// The chaining value of the subtree of `cvs` (`block`-byte subtrees, the last maybe short),
/// `len` bytes in all, joined as BLAKE3 splits its tree: the left side is the largest power of
/// two below `len`.
fn subtree(cvs: &[ChainingValue], block: u64, len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let k = (left / block) as usize;
    merge_subtrees_non_root(
        &subtree(&cvs[..k], block, left),
        &subtree(&cvs[k..], block, len - left),
        Mode::Hash,
    )
}

/// The root digest of a chunk of `len` bytes from its `block`-byte subtrees (at least two).
fn root(cvs: &[ChainingValue], block: u64, len: u64) -> Digest {
    let left = left_subtree_len(len);
    let k = (left / block) as usize;
    let h = merge_subtrees_root(
        &subtree(&cvs[..k], block, left),
        &subtree(&cvs[k..], block, len - left),
        Mode::Hash,
    );
    Digest(*h.as_bytes())
}

/// The digest `parts` give for `data`, if they cover exactly its memory, end to end, hashed
/// for `check`.
pub(super) fn landed_digest(check: ChunkCheck, data: &[u8], parts: &[Hashed]) -> Option<Digest> {
    let mut at = data.as_ptr() as usize;
    for p in parts {
        if p.at != at {
            return None;
        }
        at += p.len;
    }
    if at != data.as_ptr() as usize + data.len() {
        return None;
    }
    match parts {
        [
            Hashed {
                kind: HashedKind::Whole(h, d),
                ..
            },
        ] => (*h == check).then_some(*d),
        [first, ..] if matches!(check.hash, ChunkHash::Blake3 | ChunkHash::Blake3Tree) => {
            let HashedKind::Blocks { block, .. } = first.kind else {
                return None;
            };
            let mut cvs = Vec::new();
            for p in parts {
                let HashedKind::Blocks {
                    block: b,
                    base,
                    first: f,
                    cvs: c,
                } = &p.kind
                else {
                    return None;
                };
                // Each part starts at the block after the last one's, hashed where this
                // chunk starts, and only the chunk's last part may end inside a block.
                if *b != block || *base != check.offset() || cvs.len() as u64 != *f {
                    return None;
                }
                cvs.extend_from_slice(c);
            }
            let all_whole = parts[..parts.len() - 1].iter().all(|p| p.len % block == 0);
            let count_right = cvs.len() == data.len().div_ceil(block);
            if !(all_whole && count_right) {
                return None;
            }
            let len = data.len() as u64;
            match check.root() {
                // A root is made by its last merge: one block's chaining value has none.
                true => (cvs.len() >= 2).then(|| root(&cvs, block as u64, len)),
                false => (!cvs.is_empty()).then(|| Digest(subtree(&cvs, block as u64, len))),
            }
        }
        _ => None,
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::bufpool::AlignedBuf;
    use crate::chunk::VerifiedChunk;
    use bytes::Bytes;
    use proptest::prelude::*;

    /// A chunk filled in pieces and hashed as it lands verifies as one hashed after: with
    /// no second pass, with wrong bytes refused, with a restarted attempt hashed afresh, and
    /// never for a buffer left short.
    #[test]
    fn a_filler_hashes_what_lands_and_only_that() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for hash in ChunkHash::ALL {
            let mut buf = AlignedBuf::zeroed(data.len());
            let mut into = Filler::whole(hash, buf.as_mut_slice());
            // A failed attempt wrote garbage, then the retry starts over.
            into.unfilled()[..5000].fill(0xee);
            into.advance(5000);
            into.reset();
            let mut at = 0;
            for n in [1, 4095, 16384, 1, 60_000, 19_519] {
                into.unfilled()[..n].copy_from_slice(&data[at..at + n]);
                into.advance(n);
                at += n;
            }
            assert_eq!(at, data.len());
            let hashed = into.finish().expect("full");
            let want = hash.digest(&data);
            assert_eq!(hashed.digest(), Some(want));
            let bytes = buf.freeze();
            let parts = [hashed];
            let chunk = VerifiedChunk::verify_landed(hash, want, bytes.clone(), &parts).unwrap();
            assert_eq!(chunk.bytes(), &data[..]);
            let other = ChunkHash::ALL.into_iter().find(|h| *h != hash).unwrap();
            let e =
                VerifiedChunk::verify_landed(hash, other.digest(&data), bytes, &parts).unwrap_err();
            assert_eq!((e.hash, e.actual), (hash, want));

            let mut short = vec![0u8; 10];
            let mut into = Filler::whole(hash, &mut short);
            into.advance(9);
            assert!(into.finish().is_none(), "a short buffer has no digest");
            assert!(Filler::plain(&mut short).finish().is_none());
        }
    }

    /// Parts that describe other memory than the bytes given (a copy, a gap) are not trusted:
    /// the bytes are hashed again, so the answer is still right.
    #[test]
    fn landed_parts_of_other_memory_are_hashed_again() {
        let data = vec![5u8; 8192];
        let mut buf = data.clone();
        let mut into = Filler::whole(ChunkHash::Blake3, &mut buf);
        into.unfilled().copy_from_slice(&data);
        into.advance(data.len());
        let hashed = into.finish().unwrap();
        let copy = Bytes::copy_from_slice(&data);
        assert_eq!(
            landed_digest(
                ChunkHash::Blake3.into(),
                &copy,
                std::slice::from_ref(&hashed)
            ),
            None
        );
        assert_eq!(
            landed_digest(
                ChunkHash::Blake3.into(),
                &buf,
                std::slice::from_ref(&hashed)
            ),
            Some(ChunkHash::Blake3.digest(&data))
        );
        // The same memory, but the digest is of the other hash.
        assert_eq!(
            landed_digest(ChunkHash::Sha256.into(), &buf, &[hashed]),
            None
        );
    }

    proptest! {
        /// A BLAKE3 chunk fetched as parallel parts (runs of whole blocks, landing in pieces
        /// of any size) verifies exactly when its bytes are right: a chunk hashed alone, or a
        /// `blake3-tree` chunk, the subtree at its offset in its file (here the short last
        /// chunk of an aligned layout, so not the whole file).
        #[test]
        fn parts_hashed_as_subtrees_join_into_the_chunks_digest(
            len in 2049usize..200_000,
            block_log in 10u32..15,
            run in 1usize..4,
            pieces in proptest::collection::vec(1usize..9000, 1..8),
            flip in proptest::option::of(0usize..200_000),
            tree: bool,
        ) {
            let block = 1usize << block_log;
            prop_assume!(len > block);
            let check = if tree {
                let at = (len as u64).next_power_of_two();
                let layout = crate::chunk::Layout::aligned(at + len as u64, at, at);
                let c = ChunkCheck::of(ChunkHash::Blake3Tree, &layout, 1);
                assert!(c.offset() == at && !c.root() && layout.range(1).end - at == len as u64);
                c
            } else {
                ChunkHash::Blake3.into()
            };
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + i / 977) as u8).collect();
            let mut buf = AlignedBuf::zeroed(len);
            let part = block * run;
            let mut landed = Vec::new();
            for (i, slice) in buf.as_mut_slice().chunks_mut(part).enumerate() {
                let off = i * part;
                let mut into = Filler::blocks(check, block, off as u64, slice);
                let mut k = 0;
                while into.filled() < into.buf.len() {
                    let n = pieces[k % pieces.len()].min(into.buf.len() - into.filled());
                    let at = off + into.filled();
                    into.unfilled()[..n].copy_from_slice(&data[at..at + n]);
                    if let Some(f) = flip.filter(|f| (at..at + n).contains(f)) {
                        into.unfilled()[f - at] ^= 1;
                    }
                    into.advance(n);
                    k += 1;
                }
                landed.push(into.finish().expect("full"));
            }
            let want = check.digest(&data);
            prop_assert_eq!(want == ChunkHash::Blake3.digest(&data), !tree);
            let bytes = buf.freeze();
            // Joined from the parts, not hashed again.
            prop_assert!(landed_digest(check, &bytes, &landed).is_some());
            let got = VerifiedChunk::verify_landed(check, want, bytes, &landed);
            let flipped = flip.is_some_and(|f| f < len);
            prop_assert_eq!(got.is_ok(), !flipped);
            if let Err(e) = got {
                prop_assert_ne!(e.actual, want);
            }
        }
    }
}
