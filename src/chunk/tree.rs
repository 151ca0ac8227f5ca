//! A `blake3-tree` file's chunk digests merged into the file's BLAKE3 hash: what a BLAKE3
//! signature of the whole file is compared with, with no byte of the file read.
//!
//! Each chunk of an aligned layout is a node of BLAKE3's tree of the file (its digest the
//! node's chaining value; the file's hash itself for a one-chunk file), so the file's hash is
//! those nodes merged as BLAKE3 splits its input: a node of `n` bytes has a left child of
//! `left_subtree_len(n)` bytes, the largest power of two of whole 1 KiB chunks below `n`.

use blake3::hazmat::{
    ChainingValue, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use super::{Digest, Layout};

/// The BLAKE3 hash of a file cut as `layout`, from its `blake3-tree` chunk digests `chunks`
/// (in order), or `None` if they do not fit the layout (another count, or a layout whose
/// chunks are not whole subtrees). An empty file has no chunks, and its hash is BLAKE3's of
/// no bytes. Cheap: no allocation, one BLAKE3 compression per merge (a file's chunk count
/// less one), a recursion as deep as the tree (at most 64).
pub fn blake3_tree_root(layout: &Layout, chunks: &[Digest]) -> Option<Digest> {
    merge(layout, chunks, true)
}

/// The node over all of `layout` from its chunks' values: as [`blake3_tree_root`] when `root`,
/// else the chaining value of the whole as a subtree (what a chunk's outboard merges into,
/// the chunk's sub-blocks being its `layout`).
pub(super) fn merge(layout: &Layout, chunks: &[Digest], root: bool) -> Option<Digest> {
    if !layout.is_tree() || chunks.len() as u64 != layout.count() {
        return None;
    }
    match chunks {
        [] => root.then(|| Digest(*blake3::hash(b"").as_bytes())),
        [whole] => Some(*whole),
        _ if !root => node(layout, chunks, 0, layout.size).map(Digest),
        _ => {
            let n = layout.size;
            let left = left_subtree_len(n);
            let root = merge_subtrees_root(
                &node(layout, chunks, 0, left)?,
                &node(layout, chunks, left, n)?,
                Mode::Hash,
            );
            Some(Digest(*root.as_bytes()))
        }
    }
}

/// The chaining value of the tree node `start..end`: one chunk's digest when a chunk is
/// exactly that range, else its two children merged. `None` when a chunk straddles a node's
/// edge (the chunks are not the tree's nodes).
fn node(layout: &Layout, chunks: &[Digest], start: u64, end: u64) -> Option<ChainingValue> {
    let covering = layout.covering(start, end - start);
    if covering.end - covering.start == 1 {
        let only = covering.start;
        return (layout.range(only) == (start..end)).then_some(chunks[only as usize].0);
    }
    // Two or more chunks of at least 1 KiB each: the node is over one BLAKE3 chunk long.
    let mid = start + left_subtree_len(end - start);
    Some(merge_subtrees_non_root(
        &node(layout, chunks, start, mid)?,
        &node(layout, chunks, mid, end)?,
        Mode::Hash,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::chunk::{ChunkCheck, ChunkHash};
    use proptest::prelude::*;

    const K: u64 = 1024;

    /// The file's bytes: random-looking, made fast (BLAKE3's output stream of `seed`).
    pub(crate) fn bytes(size: u64, seed: u8) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// Each chunk's `blake3-tree` digest, hashed from the bytes as a fetch would.
    fn chunk_digests(layout: &Layout, data: &[u8]) -> Vec<Digest> {
        (0..layout.count())
            .map(|i| {
                let r = layout.range(i);
                ChunkCheck::of(ChunkHash::Blake3Tree, layout, i)
                    .digest(&data[r.start as usize..r.end as usize])
            })
            .collect()
    }

    /// The examples the layout is written for: head 1 MiB, chunk 8 MiB gives 1, 1, 2, 4, 8,
    /// 8, … MiB at 0, 1, 2, 4, 8, 16, … MiB (scaled down here by 1024), and a one-chunk file's
    /// digest is its plain BLAKE3 hash.
    #[test]
    fn the_aligned_ramp_and_its_root() {
        let l = Layout::aligned(30 * K + 5, 8 * K, K);
        let ranges: Vec<_> = (0..l.count()).map(|i| l.range(i)).collect();
        assert_eq!(
            ranges,
            [
                0..K,
                K..2 * K,
                2 * K..4 * K,
                4 * K..8 * K,
                8 * K..16 * K,
                16 * K..24 * K,
                24 * K..30 * K + 5,
            ]
        );
        assert_eq!((l.covering(0, 1), l.covering(3 * K, 6 * K)), (0..1, 2..5));
        let data = bytes(l.size, 1);
        let digests = chunk_digests(&l, &data);
        let want = Digest(*blake3::hash(&data).as_bytes());
        assert_eq!(blake3_tree_root(&l, &digests), Some(want));
        // A chunk list of another layout's count, or a tampered digest, is not the file's.
        assert_eq!(blake3_tree_root(&l, &digests[1..]), None);
        let mut forged = digests.clone();
        forged[3].0[0] ^= 1;
        assert_ne!(blake3_tree_root(&l, &forged), Some(want));
        // The head grid's chunks are not the tree's nodes.
        let grid = Layout::with_head(l.size, 8 * K, K);
        assert_eq!(blake3_tree_root(&grid, &digests), None);

        let one = Layout::aligned(3 * K, 8 * K, 4 * K);
        assert_eq!(one.count(), 1);
        let data = bytes(one.size, 2);
        assert_eq!(
            chunk_digests(&one, &data),
            [Digest(*blake3::hash(&data).as_bytes())]
        );
        let empty = Layout::aligned(0, 8 * K, K);
        assert_eq!(
            blake3_tree_root(&empty, &[]),
            Some(Digest(*blake3::hash(b"").as_bytes()))
        );
    }

    proptest! {
        /// For any size and small power-of-two head and chunk, every chunk of the aligned
        /// layout is a whole, aligned subtree (a power-of-two size at a multiple of it, or the
        /// short last one), the chunks tile the file, `covering` finds them, and merging their
        /// digests gives BLAKE3 of the whole file.
        #[test]
        fn chunk_digests_merge_into_the_files_blake3(
            size in 0u64..(3 << 20),
            head_log in 10u32..17,
            ramp in 0u32..4,
            seed: u8,
            off in 0u64..(3 << 20),
            len in 0u64..(1 << 18),
        ) {
            let (head, cs) = (1u64 << head_log, 1u64 << (head_log + ramp));
            let l = Layout::aligned(size, cs, head);
            let mut at = 0;
            for i in 0..l.count() {
                let r = l.range(i);
                let nominal = if i == 0 { head } else { r.start.min(cs).max(head) };
                prop_assert!(r.start == at && r.end > r.start);
                prop_assert!(nominal.is_power_of_two() && r.start.is_multiple_of(nominal));
                prop_assert!(r.end - r.start == nominal || r.end == size);
                prop_assert_eq!(l.covering(r.start, 1), i..i + 1);
                prop_assert_eq!(l.covering(r.end - 1, 1), i..i + 1);
                at = r.end;
            }
            prop_assert_eq!(at, size);
            let c = l.covering(off, len);
            let end = (off + len).min(size);
            if off >= end {
                prop_assert!(c.is_empty());
            } else {
                prop_assert!(l.range(c.start).contains(&off));
                prop_assert!(l.range(c.end - 1).contains(&(end - 1)));
            }
            let data = bytes(size, seed);
            let root = blake3_tree_root(&l, &chunk_digests(&l, &data));
            prop_assert_eq!(root, Some(Digest(*blake3::hash(&data).as_bytes())));
        }
    }

    /// What a mount pays per signed file: 100k files of a few chunks merge in milliseconds.
    #[test]
    fn merging_is_cheap() {
        let l = Layout::aligned(40 * K * K, 8 * K * K, K * K);
        let digests: Vec<Digest> = (0..l.count()).map(|i| Digest([i as u8; 32])).collect();
        let t = std::time::Instant::now();
        for _ in 0..100_000 {
            std::hint::black_box(blake3_tree_root(&l, std::hint::black_box(&digests)));
        }
        let took = t.elapsed();
        // A debug build on a shared CPU: generous, yet far below a mount's second.
        assert!(took.as_secs_f64() < 5.0, "{took:?}");
    }
}
