//! Adoption: blob files whose chunks the index does not list (a lost or rebuilt index, a
//! commit cut short by a crash) are read back, verified against the manifest, and marked
//! present, so no verified data on disk is fetched again. Also `hash_blob`, the one-pass
//! whole-file and per-chunk hash that whole-file verification shares, and orphans: blob files
//! the index does not name, found and removed by deep-clean GC.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::chunk::{Digest, VerifiedChunk};
use crate::manifest::{FileEntry, Verification};

use super::blob::has_data;
use super::{Store, StoreError, io_err};

/// What `Store::adopt` found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AdoptReport {
    pub blobs_adopted: u64,
    pub chunks_verified: u64,
    pub chunks_bad: u64,
    pub bytes: u64,
}

impl std::fmt::Display for AdoptReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "index rebuilt: {} blobs adopted, {} chunks verified ({} bytes), {} corrupt chunks left out",
            self.blobs_adopted, self.chunks_verified, self.bytes, self.chunks_bad
        )
    }
}

impl Store {
    /// Marks `chunks`, verified by reading them from `file`, present — if `file` is still the
    /// blob file at its path. Checked under `writer`, so an eviction (which unlinks under
    /// it) cannot slip between the check and the marks: otherwise chunks verified in an
    /// evicted file would be marked present in a new, empty one, and zeros served.
    /// `epoch` is [`Store::unverified_epoch`] from before the chunks were read: if an
    /// unverified write (a whole-file fetch) ended since (one in progress then ends, and
    /// counts, under `writer`, so before this check), what was verified may no longer be what
    /// is on disk, and nothing is marked.
    /// Returns whether they were marked.
    pub(super) fn adopt_verified(
        &self,
        f: &FileEntry,
        file: &File,
        chunks: &[(u64, Digest)],
        epoch: u64,
    ) -> Result<bool, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.blob_path(f.sha256);
        let _w = self.writer.lock();
        if self.unverified_epoch(f.sha256) != epoch {
            return Ok(false);
        }
        let same = match (file.metadata(), std::fs::metadata(&path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino() && a.nlink() > 0,
            _ => false,
        };
        if !same {
            return Ok(false);
        }
        let (fd, generation) = self.prepare_locked(f)?;
        // Bytes read back may still be only in the page cache (a crash before a commit).
        fd.sync_data().map_err(io_err(&path))?;
        self.mark_locked(f, generation, chunks)?;
        Ok(true)
    }

    /// Chunk `idx` read back from the blob file where the index does not list it but the file
    /// holds data there: a lost index not yet rebuilt, or a commit cut short by a crash. The
    /// bytes are verified against `expected` and, if they match, the chunk is made durable
    /// and marked present, so a read racing an index rebuild fetches nothing it already has.
    /// `None` when there is nothing usable on disk. Blocking.
    pub fn adopt_chunk(&self, f: &FileEntry, idx: u64, expected: Digest) -> Option<VerifiedChunk> {
        // A file this process created holds only its own commits: nothing to adopt, and no
        // need to ask the filesystem (`SEEK_DATA` waits for the inode lock that a slow
        // `O_DIRECT` write of another chunk holds, which put every fetch behind the disk).
        if self.blobs.lock().get(&f.sha256).is_some_and(|s| s.fresh) {
            return None;
        }
        let path = self.blob_path(f.sha256);
        let epoch = self.unverified_epoch(f.sha256);
        let file = File::open(&path).ok()?;
        if file.metadata().ok()?.len() != f.size {
            return None;
        }
        let r = f.layout().range(idx);
        if !has_data(&file, r.start, r.end) {
            return None;
        }
        let mut buf = crate::bufpool::AlignedBuf::zeroed((r.end - r.start) as usize);
        file.read_exact_at(buf.as_mut_slice(), r.start).ok()?;
        let chunk = VerifiedChunk::verify(f.check(idx), expected, buf.freeze()).ok()?;
        match self.adopt_verified(f, &file, &[(idx, expected)], epoch) {
            Ok(false) => None,
            Ok(true) => {
                tracing::debug!(blob = %f.sha256, chunk = idx, "adopted a chunk found on disk");
                Some(chunk)
            }
            Err(e) => {
                tracing::debug!(blob = %f.sha256, chunk = idx, error = %e, "could not adopt a chunk found on disk");
                None
            }
        }
    }

    /// Rebuilds index entries for blob files on disk that the index does not know (a lost or
    /// rebuilt index): every chunk with data is read and verified against `files` (the
    /// manifest), and only matching chunks are marked present. Holes are skipped without
    /// reading. Nothing is fetched. Blocking.
    pub fn adopt<'a>(
        &self,
        files: impl IntoIterator<Item = &'a FileEntry>,
    ) -> Result<AdoptReport, StoreError> {
        let mut report = AdoptReport::default();
        let mut seen = std::collections::HashSet::new();
        for f in files {
            if !seen.insert(f.sha256) || self.blobs.lock().contains_key(&f.sha256) {
                continue;
            }
            let path = self.blob_path(f.sha256);
            let epoch = self.unverified_epoch(f.sha256);
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if file.metadata().map(|m| m.len()).ok() != Some(f.size) {
                continue;
            }
            let layout = f.layout();
            let mut good = Vec::new();
            match &f.verification {
                Verification::Chunked(digests) => {
                    for idx in 0..layout.count() {
                        let r = layout.range(idx);
                        if !has_data(&file, r.start, r.end) {
                            continue;
                        }
                        let mut buf = vec![0u8; (r.end - r.start) as usize];
                        file.read_exact_at(&mut buf, r.start)
                            .map_err(io_err(&path))?;
                        if f.check(idx).digest(&buf) == digests[idx as usize] {
                            good.push((idx, digests[idx as usize]));
                        } else if buf.iter().any(|b| *b != 0) {
                            // All zeros is a never-written region sharing a block with data.
                            report.chunks_bad += 1;
                        }
                    }
                }
                Verification::Whole => {
                    let (whole, chunks) = hash_blob(&file, f).map_err(io_err(&path))?;
                    if whole == f.sha256 {
                        good = chunks
                            .into_iter()
                            .enumerate()
                            .map(|(i, d)| (i as u64, d))
                            .collect();
                    } else {
                        report.chunks_bad += layout.count();
                    }
                }
            }
            if good.is_empty() || !self.adopt_verified(f, &file, &good, epoch)? {
                continue;
            }
            report.chunks_verified += good.len() as u64;
            report.bytes += good
                .iter()
                .map(|(i, _)| {
                    let r = layout.range(*i);
                    r.end - r.start
                })
                .sum::<u64>();
            report.blobs_adopted += 1;
            tracing::info!(blob = %f.sha256, path = %f.path, chunks = good.len(), "adopted a blob into the index");
        }
        Ok(report)
    }
}

/// (whole-file sha256, chunk digests under the file's chunk hash) of a blob file, in one pass.
pub(super) fn hash_blob(fd: &File, f: &FileEntry) -> std::io::Result<(Digest, Vec<Digest>)> {
    let layout = f.layout();
    let mut whole = Sha256::new();
    let mut chunks = Vec::with_capacity(layout.count() as usize);
    let mut buf = vec![0u8; (1 << 20).min(f.chunk_size) as usize];
    for idx in 0..layout.count() {
        let r = layout.range(idx);
        let mut chunk = f.check(idx).hasher();
        let mut off = r.start;
        while off < r.end {
            let n = (r.end - off).min(buf.len() as u64) as usize;
            fd.read_exact_at(&mut buf[..n], off)?;
            whole.update(&buf[..n]);
            chunk.update(&buf[..n]);
            off += n as u64;
        }
        chunks.push(chunk.finalize());
    }
    Ok((Digest(whole.finalize().into()), chunks))
}

/// Orphans: blob files on disk that the index does not name.
impl Store {
    /// Blob files on disk that the index does not name (left by a lost index), and their size.
    pub fn orphans(&self) -> Vec<(PathBuf, u64)> {
        let known: std::collections::HashSet<String> =
            self.blobs.lock().keys().map(|d| d.to_hex()).collect();
        let mut out = Vec::new();
        let Ok(fans) = std::fs::read_dir(self.root.join("blobs")) else {
            return out;
        };
        for fan in fans.flatten() {
            let Ok(files) = std::fs::read_dir(fan.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    let size = f
                        .metadata()
                        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                        .unwrap_or(0);
                    out.push((f.path(), size));
                }
            }
        }
        out
    }

    /// Removes a blob file the index does not name, unless its blob is known by now
    /// (checked under the lock, so a blob being created is never deleted).
    pub fn remove_orphan(&self, path: &Path) -> std::io::Result<bool> {
        let blobs = self.blobs.lock();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.parse::<Digest>().is_ok_and(|d| blobs.contains_key(&d)) {
            return Ok(false);
        }
        std::fs::remove_file(path)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{commit, entry};
    use super::super::*;

    #[test]
    fn lost_index_is_rebuilt_from_blobs_without_fetching() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        let f = entry(&data, 30);
        {
            let s = Store::open(dir.path()).unwrap();
            for idx in [0u64, 2] {
                commit(&s, &f, &data, idx);
            }
        }
        std::fs::write(dir.path().join("v1/index.sqlite"), b"this is not sqlite").unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.state(&f), CacheState::NotPresent);
        let r = s.adopt([&f]).unwrap();
        assert_eq!(
            (r.blobs_adopted, r.chunks_verified, r.chunks_bad),
            (1, 2, 0)
        );
        assert!(s.has_chunk(&f, 0) && !s.has_chunk(&f, 1) && s.has_chunk(&f, 2));
    }
}
