//! Whole-only files in the cache: their bytes are written before they are verified
//! (`write_unverified`, invisible to readers), then the whole blob is hashed and, if it
//! matches, every chunk is marked present at once (`verify_whole`), and the blob is
//! whole-checked by construction (`checked.rs`). Unverified writes are
//! counted per blob so an adoption racing them never marks what it read (see `adopt.rs`).

use std::os::unix::fs::FileExt;

use super::{Store, StoreError, adopt, io_err};
use crate::chunk::Digest;
use crate::manifest::FileEntry;

impl Store {
    /// Writes not-yet-verified bytes of a file fetched whole. They stay invisible until
    /// `verify_whole` checks the whole file. Blocking; returns the generation to verify with.
    ///
    /// Never over chunks that are present (the caller, `fetch/whole.rs`, writes one chunk per
    /// call, so that is all of them or none): a whole-file fetch picks the chunks it writes
    /// before it writes them, and one may become present meanwhile (an index rebuild adopting
    /// the blob from disk), with readers served from it. The check and the write happen under
    /// `writer`, which every marking takes, so nothing is marked in between; such a chunk is
    /// left as it is (its verified bytes are the same as the file's).
    pub fn write_unverified(
        &self,
        f: &FileEntry,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, StoreError> {
        let _w = self.writer.lock();
        let (fd, generation) = self.prepare_locked(f)?;
        let covering = f.layout().covering(offset, data.len() as u64);
        if data.is_empty()
            || self.with_state(f, |s| s.is_some_and(|s| covering.clone().all(|i| s.has(i))))
        {
            return Ok(generation);
        }
        let written = fd.write_all_at(data, offset);
        // After the write (failed or not: bytes may have landed), still under `writer`: an
        // adoption that read the file before or during it finds the count moved.
        *self.unverified.lock().entry(f.sha256).or_insert(0) += 1;
        written.map_err(io_err(&self.blob_path(f.sha256)))?;
        Ok(generation)
    }

    /// The blob's unverified-write count (see `Store::unverified`).
    pub(super) fn unverified_epoch(&self, d: Digest) -> u64 {
        self.unverified.lock().get(&d).copied().unwrap_or(0)
    }

    /// Hashes a blob written by `write_unverified`; if it matches, makes it durable and marks
    /// every chunk present (with the chunk digests computed here). Returns the actual digest.
    /// `generation` is what `write_unverified` returned (None for an empty file).
    pub fn verify_whole(
        &self,
        f: &FileEntry,
        generation: Option<u64>,
    ) -> Result<Digest, StoreError> {
        let (fd, current) = self.prepare(f)?;
        let generation = generation.unwrap_or(current);
        if generation != current {
            return Err(StoreError::Evicted(f.sha256));
        }
        let path = self.blob_path(f.sha256);
        let (actual, chunks) = adopt::hash_blob(&fd, f).map_err(io_err(&path))?;
        if actual != f.sha256 {
            return Ok(actual);
        }
        fd.sync_data().map_err(io_err(&path))?;
        let chunks: Vec<(u64, Digest)> = chunks
            .into_iter()
            .enumerate()
            .map(|(i, d)| (i as u64, d))
            .collect();
        // Hashed whole just now: checked as it becomes complete.
        let _w = self.writer.lock();
        self.mark_locked(f, generation, &chunks)?;
        self.set_checked_locked(f.sha256)?;
        Ok(actual)
    }
}
