//! The whole-file check of complete blobs, and the blobs it refused.
//!
//! A chunked file's bytes are verified chunk by chunk against the manifest's chunk digests;
//! nothing ties those digests to the `sha256` line that names the blob. So when a blob is
//! complete its bytes are hashed whole ([`Store::check_whole`], or a verify's own pass through
//! [`Store::begin_check`] and [`Store::finish_check`]) and compared with that name. A match is
//! kept (`whole_checked`, in memory and in the index) until a chunk of the blob is dropped; only
//! a whole-checked blob backs a passthrough open or serves a whole-only file. A mismatch is an
//! integrity failure: [`Store::refuse`] records the refusal (index row first, so a restart
//! cannot serve or fetch the file again silently) and drops the blob as an eviction does.
//!
//! A refusal names the entry it refused by a fingerprint of its layout and chunk digests
//! ([`entry_fingerprint`]): the same entry fetched again would produce the same bytes and be
//! refused again, so it stays refused; a reload that changes the entry (other chunks, or
//! whole-only) is not refused. An operator clears it with `ensure --force-redownload`.
//! Who hashes and when (one check at a time, on a blocking thread) is the fetcher's choice
//! (`fetch/check.rs`); this file only reads the blob and keeps the results.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sha2::{Digest as _, Sha256};

use super::index::RefusedRow;
use super::{Store, StoreError, io_err, now_secs};
use crate::chunk::Digest;
use crate::manifest::{FileEntry, Verification};

/// What a whole-file check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WholeCheck {
    /// The bytes hash to the blob's name: recorded.
    Match,
    /// The bytes hash to this other digest.
    Mismatch(Digest),
    /// The blob is not complete (or changed while it was read): nothing to say yet.
    NotComplete,
    /// The whole did not match, and these chunks no longer match their digests either: the
    /// cache disk rotted them (not the entry's fault); the caller drops them.
    BadChunks(Vec<u64>),
}

/// The state of a complete blob when a check started reading it; the result is recorded only
/// if the blob is still that one (same generation, no chunk cleared since).
#[derive(Debug, Clone, Copy)]
pub struct CheckToken {
    generation: u64,
    clears: u64,
}

/// Why a blob is refused (kept in memory and in the index's `refused` table).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// [`entry_fingerprint`] of the entry refused.
    pub entry: Digest,
    /// What the blob's bytes hashed to.
    pub actual: Digest,
    /// The model and file whose read or verify found it.
    pub model: String,
    pub file: String,
    pub ts: u64,
}

/// A fingerprint of what an entry says of its bytes besides their sha256: size, chunk grid,
/// chunk hash and chunk digests (or that it has none). Two entries with the same sha256 and
/// the same fingerprint fetch the same bytes.
pub fn entry_fingerprint(f: &FileEntry) -> Digest {
    let mut h = Sha256::new();
    h.update(b"wanfs entry 1\0");
    let layout = f.layout();
    for n in [f.size, layout.chunk_size, layout.head] {
        h.update(n.to_le_bytes());
    }
    // The manifest's own name of the hash (its layout kind follows from it).
    h.update(f.chunk_hash.as_str().as_bytes());
    h.update(b"\0");
    match &f.verification {
        Verification::Chunked(digests) => {
            for d in digests.iter() {
                h.update(d.0);
            }
        }
        Verification::Whole => h.update(b"whole"),
    }
    Digest(h.finalize().into())
}

impl Store {
    /// Whether `f`'s blob is complete and its whole-file sha256 was checked (an empty file
    /// always is).
    pub fn is_whole_checked(&self, f: &FileEntry) -> bool {
        f.size == 0 || self.with_state(f, |s| s.is_some_and(|s| s.complete() && s.whole_checked))
    }

    /// A handle on `f`'s blob and the state to record a check against, if the blob is complete
    /// and not checked yet. For a caller that hashes the blob itself (verify).
    pub fn begin_check(&self, f: &FileEntry) -> Option<(Arc<File>, CheckToken)> {
        let blobs = self.blobs.lock();
        let st = blobs
            .get(&f.sha256)
            .filter(|s| s.layout == f.layout() && s.complete())?;
        let token = CheckToken {
            generation: st.generation,
            clears: st.clears,
        };
        let fd = self.fd(f.sha256, None).ok()?;
        Some((fd, token))
    }

    /// Records what a check that started at `token` found: the sha256 of the blob's bytes.
    /// A match is kept (index row, then the in-memory flag) only if the blob is still the one
    /// that was read; a mismatch is only reported (the caller refuses, see [`Store::refuse`]).
    pub fn finish_check(
        &self,
        f: &FileEntry,
        token: CheckToken,
        actual: Digest,
    ) -> Result<WholeCheck, StoreError> {
        let _w = self.writer.lock();
        let same = self.with_state(f, |s| {
            s.is_some_and(|s| {
                s.complete() && s.generation == token.generation && s.clears == token.clears
            })
        });
        if !same {
            return Ok(WholeCheck::NotComplete);
        }
        if actual != f.sha256 {
            return Ok(WholeCheck::Mismatch(actual));
        }
        self.index.set_whole_checked(f.sha256)?;
        if let Some(st) = self.blobs.lock().get_mut(&f.sha256) {
            st.whole_checked = true;
        }
        // A refusal of another entry with this sha256 is outlived: these bytes are the file.
        if self.refused.lock().contains_key(&f.sha256) {
            self.forget_refusal_locked(f.sha256)?;
        }
        Ok(WholeCheck::Match)
    }

    /// Hashes `f`'s complete blob whole and records the result (see [`Store::finish_check`]).
    /// Blocking: reads the whole file.
    pub fn check_whole(&self, f: &FileEntry) -> Result<WholeCheck, StoreError> {
        let Some((fd, token)) = self.begin_check(f) else {
            return Ok(if self.is_whole_checked(f) {
                WholeCheck::Match
            } else {
                WholeCheck::NotComplete
            });
        };
        let path = self.blob_path(f.sha256);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < f.size {
            let n = (f.size - off).min(buf.len() as u64) as usize;
            fd.read_exact_at(&mut buf[..n], off)
                .map_err(io_err(&path))?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        let found = self.finish_check(f, token, Digest(h.finalize().into()))?;
        if let (WholeCheck::Mismatch(_), Verification::Chunked(digests)) = (&found, &f.verification)
        {
            // Rare, so read again rather than hash every chunk on every check: a chunk that
            // rotted on disk since it was verified makes the whole differ too, and is the
            // disk's fault, not the entry's.
            let (_, chunks) = super::adopt::hash_blob(&fd, f).map_err(io_err(&path))?;
            let bad: Vec<u64> = (0..chunks.len() as u64)
                .filter(|i| chunks[*i as usize] != digests[*i as usize])
                .collect();
            if !bad.is_empty() {
                return Ok(WholeCheck::BadChunks(bad));
            }
        }
        Ok(found)
    }

    /// Marks a blob written whole and verified (`verify_whole`) as checked: its bytes were
    /// hashed whole against its name. Under `writer`, right after its chunks were marked.
    pub(super) fn set_checked_locked(&self, d: Digest) -> Result<(), StoreError> {
        self.index.set_whole_checked(d)?;
        if let Some(st) = self.blobs.lock().get_mut(&d) {
            st.whole_checked = st.complete();
        }
        Ok(())
    }

    /// Refuses `f`'s blob, whose bytes hash to `actual`: the refusal is recorded (index row,
    /// then memory) before the blob is dropped, so no restart in between can serve or fetch
    /// the file again without a word; then the blob goes as an eviction removes it (readers
    /// holding the file keep the bytes they have). Blocking.
    pub fn refuse(
        &self,
        f: &FileEntry,
        actual: Digest,
        model: &str,
    ) -> Result<Refusal, StoreError> {
        let refusal = Refusal {
            entry: entry_fingerprint(f),
            actual,
            model: model.to_string(),
            file: f.path.clone(),
            ts: now_secs(),
        };
        let persisted = {
            let _w = self.writer.lock();
            let persisted = self.index.add_refused(&RefusedRow {
                digest: f.sha256,
                entry: refusal.entry,
                actual,
                model: refusal.model.clone(),
                file: refusal.file.clone(),
                ts: refusal.ts,
            });
            // Refused in memory even if the index could not say so (a full disk): this
            // process must not serve it again either way.
            self.refused.lock().insert(f.sha256, refusal.clone());
            self.refused_any.store(true, Ordering::Release);
            persisted
        };
        let evicted = self.evict(f.sha256);
        persisted?;
        evicted?;
        Ok(refusal)
    }

    /// The refusal that applies to `f`, if any: one of its sha256 for this very entry.
    /// Costs an atomic load while nothing is refused (every read asks).
    pub fn refusal(&self, f: &FileEntry) -> Option<Refusal> {
        if !self.refused_any.load(Ordering::Acquire) {
            return None;
        }
        let r = self.refused.lock().get(&f.sha256).cloned()?;
        (r.entry == entry_fingerprint(f)).then_some(r)
    }

    /// Every refusal, by sha256.
    pub fn refusals(&self) -> HashMap<Digest, Refusal> {
        self.refused.lock().clone()
    }

    /// Forgets the refusal of blob `d` (an operator's `ensure --force-redownload`); whether
    /// there was one.
    pub fn clear_refusal(&self, d: Digest) -> Result<bool, StoreError> {
        let _w = self.writer.lock();
        self.forget_refusal_locked(d)
    }

    /// [`Store::clear_refusal`] with `writer` held: index row first, then memory.
    fn forget_refusal_locked(&self, d: Digest) -> Result<bool, StoreError> {
        let had = self.index.remove_refused(d)?;
        let mut refused = self.refused.lock();
        let had = refused.remove(&d).is_some() || had;
        self.refused_any
            .store(!refused.is_empty(), Ordering::Release);
        Ok(had)
    }

    /// Loads the refusals the index holds (at open).
    pub(super) fn load_refused(&self) -> Result<(), StoreError> {
        let rows = self.index.refused()?;
        let mut refused = self.refused.lock();
        for r in rows {
            refused.insert(
                r.digest,
                Refusal {
                    entry: r.entry,
                    actual: r.actual,
                    model: r.model,
                    file: r.file,
                    ts: r.ts,
                },
            );
        }
        self.refused_any
            .store(!refused.is_empty(), Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{commit, entry};

    /// Content of `len` bytes, and the same entry with its chunks (and chunk digests) taken
    /// from other content of the same size, the sha256 line kept: the forged entry of issue 19.
    fn forged(len: usize, chunk: u64) -> (FileEntry, Vec<u8>, FileEntry, Vec<u8>) {
        let good: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let other: Vec<u8> = good.iter().map(|b| b ^ 0x5a).collect();
        let f = entry(&good, chunk);
        let mut lie = entry(&other, chunk);
        lie.sha256 = f.sha256;
        (f, good, lie, other)
    }

    fn complete(s: &Store, f: &FileEntry, data: &[u8]) {
        for i in 0..f.layout().count() {
            commit(s, f, data, i);
        }
        assert!(s.is_complete(f));
    }

    #[test]
    fn a_complete_blob_is_checked_once_and_the_result_persists() {
        let dir = tempfile::tempdir().unwrap();
        let (f, good, _, _) = forged(100, 30);
        {
            let s = Store::open(dir.path()).unwrap();
            commit(&s, &f, &good, 0);
            assert_eq!(s.check_whole(&f).unwrap(), WholeCheck::NotComplete);
            complete(&s, &f, &good);
            assert!(!s.is_whole_checked(&f), "complete is not checked");
            assert!(
                s.open_complete_ro(&f).is_none(),
                "passthrough before the check"
            );
            assert_eq!(s.check_whole(&f).unwrap(), WholeCheck::Match);
            assert!(s.is_whole_checked(&f));
            assert!(s.open_complete_ro(&f).is_some());
        }
        let s = Store::open(dir.path()).unwrap();
        assert!(s.is_whole_checked(&f), "the check did not persist");
        // A chunk dropped (found corrupt) takes the check with it, on disk too.
        s.drop_chunk(&f, 1).unwrap();
        commit(&s, &f, &good, 1);
        assert!(s.is_complete(&f) && !s.is_whole_checked(&f));
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert!(!s.is_whole_checked(&f));
    }

    /// The forged entry: every chunk verifies, the whole does not; refusing drops the blob and
    /// is remembered across a restart, for that entry only.
    #[test]
    fn a_forged_entry_is_refused_and_stays_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (f, good, lie, other) = forged(100, 30);
        {
            let s = Store::open(dir.path()).unwrap();
            complete(&s, &lie, &other);
            let actual = Digest::of(&other);
            assert_eq!(s.check_whole(&lie).unwrap(), WholeCheck::Mismatch(actual));
            assert!(!s.is_whole_checked(&lie));
            let r = s.refuse(&lie, actual, "m@1.0.0").unwrap();
            assert_eq!(r.actual, actual);
            assert!(!s.blob_path(lie.sha256).exists(), "refused blob kept");
            assert_eq!(s.state(&lie), super::super::CacheState::NotPresent);
            assert!(s.refusal(&lie).is_some());
            assert!(
                s.refusal(&f).is_none(),
                "another entry of the sha256 refused"
            );
        }
        let s = Store::open(dir.path()).unwrap();
        let r = s.refusal(&lie).expect("the refusal did not persist");
        assert_eq!((r.model.as_str(), r.file.as_str()), ("m@1.0.0", "f"));
        // The true entry's bytes pass and outlive the refusal; clearing works too.
        complete(&s, &f, &good);
        assert_eq!(s.check_whole(&f).unwrap(), WholeCheck::Match);
        assert!(s.refusal(&lie).is_none() && s.refusals().is_empty());
        s.refuse(&lie, Digest::of(&other), "m@1.0.0").unwrap();
        assert!(s.clear_refusal(f.sha256).unwrap());
        assert!(s.refusal(&lie).is_none());
        drop(s);
        assert!(Store::open(dir.path()).unwrap().refusals().is_empty());
    }

    /// A byte rotted on disk fails the whole and its chunk: the chunk is named, nothing is
    /// refused.
    #[test]
    fn a_rotted_chunk_is_named_not_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (f, good, _, _) = forged(100, 30);
        let s = Store::open(dir.path()).unwrap();
        complete(&s, &f, &good);
        std::fs::OpenOptions::new()
            .write(true)
            .open(s.blob_path(f.sha256))
            .unwrap()
            .write_all_at(&[0xff], 65)
            .unwrap();
        assert_eq!(s.check_whole(&f).unwrap(), WholeCheck::BadChunks(vec![2]));
        assert!(!s.is_whole_checked(&f) && s.refusal(&f).is_none());
    }

    /// A check whose blob lost a chunk while it was read records nothing.
    #[test]
    fn a_check_of_a_blob_that_changed_meanwhile_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let (f, good, _, _) = forged(100, 30);
        let s = Store::open(dir.path()).unwrap();
        complete(&s, &f, &good);
        let (_, token) = s.begin_check(&f).unwrap();
        s.drop_chunk(&f, 2).unwrap();
        commit(&s, &f, &good, 2);
        assert_eq!(
            s.finish_check(&f, token, f.sha256).unwrap(),
            WholeCheck::NotComplete
        );
        assert!(!s.is_whole_checked(&f));
    }

    #[test]
    fn fingerprints_tell_entries_apart() {
        let (f, _, lie, _) = forged(100, 30);
        assert_eq!(entry_fingerprint(&f), entry_fingerprint(&f.clone()));
        assert_ne!(entry_fingerprint(&f), entry_fingerprint(&lie));
        let mut whole = f.clone();
        whole.verification = Verification::Whole;
        assert_ne!(entry_fingerprint(&f), entry_fingerprint(&whole));
    }
}
