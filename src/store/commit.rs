//! Group commit: the chunks that finish writing while a commit is busy are made durable and
//! indexed together, with one `fdatasync` per blob file and one SQLite transaction for the lot,
//! instead of one of each per chunk.
//!
//! Leader/follower, no thread of its own: a committing thread writes its chunk (`pwrite`, not
//! synced), queues it, and if no batch is in progress becomes the leader: it takes everything
//! queued so far, syncs each distinct blob file, writes the index rows of the whole batch in one
//! transaction, sets the in-memory bits, and hands each queued thread its own result. Threads
//! that queue while a leader works wait; when it is done, one of them leads the next batch with
//! all of them. So an idle cache commits a lone chunk at once (a batch of one), and a busy one
//! batches as many chunks as were written during the previous batch's sync and transaction.
//!
//! The order per chunk stays `pwrite` → `fdatasync` → index row → in-memory bit: a chunk is
//! queued only after its write returned, and nothing is indexed before its file is synced. A
//! failed sync or index write fails the whole batch (its chunks are fetched again, as any failed
//! commit); a chunk whose blob was evicted after its write gets `Evicted`, the rest of its batch
//! is unaffected.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::chunk::Digest;
use crate::metrics::METRICS;

use super::{Marks, Store, StoreError, io_err};

/// A written chunk waiting to be made durable and marked present.
pub(super) struct Pending {
    pub(super) blob: Digest,
    /// The blob's generation when the chunk was written: a batch marks it only if its blob is
    /// still that one.
    pub(super) generation: u64,
    pub(super) idx: u64,
    pub(super) digest: Digest,
    /// The descriptor the chunk was written through (or, for a direct write, the blob's cached
    /// one): a buffered write's error is reported to a descriptor opened before it.
    pub(super) fd: Arc<File>,
}

/// The queue of chunks waiting for a group commit, and who leads the next one.
#[derive(Default)]
pub(super) struct GroupCommit {
    queue: Mutex<Queue>,
    /// Signalled when a batch ends: its chunks' results are in, and the next leader may go.
    done: Condvar,
    /// Held by a test to stop a leader between taking its batch and syncing it.
    #[cfg(test)]
    pub(super) pause: Mutex<()>,
    /// Set by a test: the next batches' sync fails.
    #[cfg(test)]
    pub(super) fail_sync: std::sync::atomic::AtomicBool,
    /// Set by a test: the leader of this batch (counting from 1) panics.
    #[cfg(test)]
    pub(super) panic_batch: std::sync::atomic::AtomicUsize,
    /// Sizes of the batches committed, for tests.
    #[cfg(test)]
    pub(super) sizes: Mutex<Vec<usize>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(u64, Pending)>,
    leading: bool,
    next_ticket: u64,
    results: HashMap<u64, Result<(), StoreError>>,
}

impl GroupCommit {
    /// The queue, poisoned or not: a leader that panics poisons it on purpose (see
    /// [`Leading`]), and the queue is consistent whenever its lock is free.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chunks queued and not taken by a leader yet (tests wait on it).
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.lock().waiting.len()
    }
}

/// If the leader panics, gives every chunk of its batch an error and leadership back, so the
/// followers do not wait forever (the queue's lock, taken while panicking, is left poisoned).
struct Leading<'a> {
    group: &'a GroupCommit,
    tickets: &'a [u64],
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut q = self.group.lock();
        q.leading = false;
        for t in self.tickets {
            q.results.insert(
                *t,
                Err(StoreError::Io {
                    path: "group commit".into(),
                    err: std::io::Error::other("the thread leading the commit panicked"),
                }),
            );
        }
        self.group.done.notify_all();
    }
}

impl Store {
    /// Makes a written chunk durable and marks it present, in a batch with whatever other
    /// chunks are committing now. Blocking; returns when this chunk's batch is done.
    pub(super) fn group_commit(&self, p: Pending) -> Result<(), StoreError> {
        let group = &self.group;
        let mut q = group.lock();
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.waiting.push((ticket, p));
        loop {
            if let Some(r) = q.results.remove(&ticket) {
                return r;
            }
            if q.leading {
                q = group.done.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            q.leading = true;
            let (tickets, batch): (Vec<u64>, Vec<Pending>) =
                std::mem::take(&mut q.waiting).into_iter().unzip();
            drop(q);
            let leading = Leading {
                group,
                tickets: &tickets,
            };
            let results = self.commit_batch(&batch);
            drop(leading);
            q = group.lock();
            q.results.extend(tickets.into_iter().zip(results));
            q.leading = false;
            // Everyone: the followers find their results, and those queued meanwhile elect
            // the next leader.
            group.done.notify_all();
        }
    }

    /// One group commit: sync, index, bits. A result per chunk of `batch`, in order.
    fn commit_batch(&self, batch: &[Pending]) -> Vec<Result<(), StoreError>> {
        #[cfg(test)]
        {
            drop(self.group.pause.lock().unwrap_or_else(|e| e.into_inner()));
            let mut sizes = self.group.sizes.lock().unwrap();
            sizes.push(batch.len());
            let n = sizes.len();
            drop(sizes);
            if self
                .group
                .panic_batch
                .load(std::sync::atomic::Ordering::Relaxed)
                == n
            {
                panic!("injected panic of a group commit's leader");
            }
        }
        METRICS.commit_batch_chunks.observe(batch.len() as f64);
        let fail_all = |e: StoreError| -> Vec<Result<(), StoreError>> {
            if batch.len() == 1 {
                return vec![Err(e)];
            }
            let e = Arc::new(e);
            batch
                .iter()
                .map(|_| Err(StoreError::GroupCommit(e.clone())))
                .collect()
        };
        if let Err(e) = self.sync_batch(batch) {
            return fail_all(e);
        }
        // A blob's chunks of one generation are marked together; a blob evicted (and maybe
        // created again) since a chunk was written fails only that blob's chunks.
        let mut keys: Vec<(Digest, u64)> = Vec::new();
        let mut chunks: Vec<Vec<(u64, Digest)>> = Vec::new();
        let group_of: Vec<usize> = batch
            .iter()
            .map(|p| {
                let key = (p.blob, p.generation);
                let g = keys.iter().position(|k| *k == key).unwrap_or_else(|| {
                    keys.push(key);
                    chunks.push(Vec::new());
                    keys.len() - 1
                });
                chunks[g].push((p.idx, p.digest));
                g
            })
            .collect();
        let marks: Vec<Marks> = keys
            .iter()
            .zip(&chunks)
            .map(|(&(blob, generation), chunks)| Marks {
                blob,
                generation,
                chunks,
            })
            .collect();
        let marked = {
            let _w = self.writer.lock();
            self.mark_many_locked(&marks)
        };
        match marked {
            Err(e) => fail_all(e),
            Ok(live) => batch
                .iter()
                .zip(group_of)
                .map(|(p, g)| {
                    if live[g] {
                        Ok(())
                    } else {
                        Err(StoreError::Evicted(p.blob))
                    }
                })
                .collect(),
        }
    }

    /// `fdatasync`s every blob file of the batch once. Outside `writer`: a sync takes
    /// milliseconds, and evictions and other index changes need not wait for it (a blob evicted
    /// meanwhile is caught by its generation when marking).
    fn sync_batch(&self, batch: &[Pending]) -> Result<(), StoreError> {
        #[cfg(test)]
        if self
            .group
            .fail_sync
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(StoreError::Io {
                path: "test".into(),
                err: std::io::Error::other("injected fdatasync failure"),
            });
        }
        // By descriptor, not by blob: a blob's descriptor dropped from the cache of open files
        // and opened again between two writes is another descriptor, and only the one a
        // buffered write went through is sure to report that write's error.
        let mut synced: Vec<*const File> = Vec::new();
        for p in batch {
            let ptr = Arc::as_ptr(&p.fd);
            if synced.contains(&ptr) {
                continue;
            }
            synced.push(ptr);
            p.fd.sync_data().map_err(io_err(&self.blob_path(p.blob)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::bufpool::AlignedBuf;
    use crate::chunk::VerifiedChunk;
    use crate::manifest::FileEntry;
    use crate::store::tests::entry;

    const CS: u64 = 4096;

    /// Chunk `idx` of `f` verified, in a page-aligned buffer (as fetches deliver them), so
    /// whole chunks take the `O_DIRECT` path and a file's short last chunk the buffered one.
    fn verified(f: &FileEntry, data: &[u8], idx: u64) -> VerifiedChunk {
        let r = f.layout().range(idx);
        let mut buf = AlignedBuf::zeroed((r.end - r.start) as usize);
        buf.as_mut_slice()
            .copy_from_slice(&data[r.start as usize..r.end as usize]);
        VerifiedChunk::verify(
            f.check(idx),
            f.verification.chunk(idx).unwrap(),
            buf.freeze(),
        )
        .unwrap()
    }

    /// `n` files of a few chunks each, the last one short.
    fn files(n: u8) -> Vec<(FileEntry, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let data: Vec<u8> = (0..5 * CS as usize + 100)
                    .map(|b| (b as u8).wrapping_mul(31).wrapping_add(i))
                    .collect();
                (entry(&data, CS), data)
            })
            .collect()
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !cond() {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn leading(s: &Store) -> bool {
        s.group.lock().leading
    }

    /// Commits `chunks` (file, chunk) of `files` on a thread each, while a leader is held
    /// paused, so all but the first form one batch; returns each commit's result in order.
    fn commit_held(
        s: &Arc<Store>,
        files: &Arc<Vec<(FileEntry, Vec<u8>)>>,
        chunks: &[(usize, u64)],
        while_held: impl FnOnce(),
    ) -> Vec<Result<bool, StoreError>> {
        let pause = s.group.pause.lock().unwrap();
        let spawn = |(fi, idx): (usize, u64)| {
            let (s, files) = (s.clone(), files.clone());
            std::thread::spawn(move || {
                let (f, data) = &files[fi];
                s.commit_chunk(f, idx, &verified(f, data, idx))
            })
        };
        let first = spawn(chunks[0]);
        wait_for("the first commit to lead", || leading(s));
        let mut threads = vec![first];
        threads.extend(chunks[1..].iter().map(|c| spawn(*c)));
        wait_for("the others to queue", || {
            s.group.queued() == chunks.len() - 1
        });
        while_held();
        drop(pause);
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    fn rows(s: &Store, f: &FileEntry) -> Vec<(u64, Digest)> {
        let mut rows = s.index().chunk_digests(f.sha256).unwrap();
        rows.sort();
        rows
    }

    fn expected_rows(f: &FileEntry) -> Vec<(u64, Digest)> {
        let digests = f.verification.chunks().unwrap();
        (0..digests.len() as u64)
            .map(|i| (i, digests[i as usize]))
            .collect()
    }

    /// Many threads committing chunks of several blobs at once: every chunk ends up present,
    /// on disk and in the index. Batching (fewer group commits than chunks) is checked by the
    /// first half, where a held leader makes the rest queue into one batch; the free-running
    /// second half checks only that every chunk lands, since how its commits group is timing.
    #[test]
    fn concurrent_commits_are_batched_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(dir.path()).unwrap());
        let files = Arc::new(files(4));
        let all: Vec<(usize, u64)> = (0..files.len())
            .flat_map(|fi| (0..files[fi].0.layout().count()).map(move |i| (fi, i)))
            .collect();
        // Deterministic: one leader held while the rest queue behind it.
        let (first, rest) = all.split_at(all.len() / 2);
        for r in commit_held(&s, &files, first, || {}) {
            r.unwrap();
        }
        assert_eq!(*s.group.sizes.lock().unwrap(), [1, first.len() - 1]);
        // Free-running: eight threads at once, each through a different order of chunks.
        let rest = Arc::new(rest.to_vec());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (s, files, rest) = (s.clone(), files.clone(), rest.clone());
                std::thread::spawn(move || {
                    for k in 0..rest.len() {
                        let (fi, idx) = rest[(k * 7 + t * 5) % rest.len()];
                        let (f, data) = &files[fi];
                        s.commit_chunk(f, idx, &verified(f, data, idx)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for (f, data) in files.iter() {
            assert!(s.is_complete(f));
            assert_eq!(rows(&s, f), expected_rows(f));
            let mut back = vec![0u8; data.len()];
            s.reader(f, 0..f.layout().count())
                .unwrap()
                .read_exact_at(&mut back, 0)
                .unwrap();
            assert!(back == *data, "blob bytes differ");
        }
        assert_eq!(s.used_bytes(), s.used_bytes_summed());
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        for (f, _) in files.iter() {
            assert!(s.is_complete(f), "not complete after reopening");
        }
    }

    /// A chunk is written before it joins a batch: when a leader starts syncing, the bytes of
    /// every chunk of its batch and of those queued behind it are in the blob file, and none
    /// of them is marked present yet.
    #[test]
    fn chunks_are_on_disk_and_unmarked_when_their_batch_starts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(dir.path()).unwrap());
        let files = Arc::new(files(2));
        let chunks = [(0, 1), (1, 0), (0, 5), (1, 3)];
        let results = commit_held(&s, &files, &chunks, || {
            for (fi, idx) in chunks {
                let (f, data) = &files[fi];
                let r = f.layout().range(idx);
                let mut got = vec![0u8; (r.end - r.start) as usize];
                File::open(s.blob_path(f.sha256))
                    .unwrap()
                    .read_exact_at(&mut got, r.start)
                    .unwrap();
                assert!(
                    got == data[r.start as usize..r.end as usize],
                    "chunk {idx} of file {fi} queued for a group commit before it was written"
                );
                assert!(
                    !s.has_chunk(f, idx),
                    "chunk {idx} of file {fi} marked before its sync"
                );
            }
            assert!(rows(&s, &files[0].0).is_empty() && rows(&s, &files[1].0).is_empty());
        });
        for r in results {
            r.unwrap();
        }
    }

    /// A leader that panics leaves its followers an error, not a wait without end, and the
    /// next batch has a leader again.
    #[test]
    fn a_panicking_leader_fails_its_batch_and_hands_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(dir.path()).unwrap());
        let files = Arc::new(files(1));
        let pause = s.group.pause.lock().unwrap();
        let spawn = |idx: u64| {
            let (s, files) = (s.clone(), files.clone());
            std::thread::spawn(move || {
                let (f, data) = &files[0];
                s.commit_chunk(f, idx, &verified(f, data, idx))
            })
        };
        let first = spawn(0);
        wait_for("a leader", || leading(&s));
        let queued = [spawn(1), spawn(2)];
        wait_for("two queued", || s.group.queued() == 2);
        s.group.panic_batch.store(2, Ordering::Relaxed);
        drop(pause);
        first.join().unwrap().unwrap();
        wait_for("the panicked batch's threads to end", || {
            queued.iter().all(|t| t.is_finished())
        });
        let [a, b] = queued.map(|t| t.join());
        let (leader, follower) = if a.is_err() { (a, b) } else { (b, a) };
        assert!(leader.is_err(), "the second batch's leader did not panic");
        let follower = follower.expect("the follower panicked too");
        assert!(
            matches!(&follower, Err(StoreError::Io { err, .. }) if err.to_string().contains("panicked")),
            "{follower:?}"
        );
        assert!(!leading(&s) && s.group.queued() == 0);
        let (f, data) = &files[0];
        for idx in [1, 2] {
            s.commit_chunk(f, idx, &verified(f, data, idx)).unwrap();
        }
        assert_eq!(rows(&s, f).len(), 3);
    }

    /// A blob evicted between its chunks' writes and their group commit: those chunks fail
    /// with `Evicted` and leave no row; the other blob's chunks in the same batch land.
    #[test]
    fn eviction_racing_a_batch_fails_only_that_blobs_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(dir.path()).unwrap());
        let files = Arc::new(files(2));
        let (x, y) = (&files[0].0, &files[1].0);
        let results = commit_held(
            &s,
            &files,
            &[(1, 0), (0, 0), (1, 1), (0, 5), (1, 5)],
            || {
                s.evict(x.sha256).unwrap();
            },
        );
        assert_eq!(*s.group.sizes.lock().unwrap(), [1, 4]);
        let evicted: Vec<bool> = results
            .iter()
            .map(|r| matches!(r, Err(StoreError::Evicted(d)) if *d == x.sha256))
            .collect();
        assert_eq!(evicted, [false, true, false, true, false], "{results:?}");
        assert!(results[0].is_ok() && results[2].is_ok() && results[4].is_ok());
        assert!(rows(&s, x).is_empty());
        assert!(!s.has_chunk(x, 0) && !s.has_chunk(x, 5));
        assert_eq!(rows(&s, y), [0, 1, 5].map(|i| expected_rows(y)[i]).to_vec());
        assert!(s.has_chunk(y, 0) && s.has_chunk(y, 1) && s.has_chunk(y, 5));
        assert_eq!(s.used_bytes(), s.used_bytes_summed());
    }

    /// A failed sync or index write fails every chunk of the batch, marks none of them, and
    /// the next commits of the same chunks succeed.
    #[test]
    fn a_failed_sync_or_index_write_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(dir.path()).unwrap());
        let files = Arc::new(files(2));
        let chunks = [(0, 0), (1, 2), (0, 5), (1, 5)];
        let none_marked = |s: &Store| {
            for (f, _) in files.iter() {
                assert!(rows(s, f).is_empty(), "rows of a failed batch");
                assert_eq!(s.cached_bytes(f), 0, "bits of a failed batch");
            }
        };

        s.group.fail_sync.store(true, Ordering::Relaxed);
        let results = commit_held(&s, &files, &chunks, || {});
        s.group.fail_sync.store(false, Ordering::Relaxed);
        assert!(
            matches!(results[0], Err(StoreError::Io { .. })),
            "{results:?}"
        );
        assert!(
            results[1..]
                .iter()
                .all(|r| matches!(r, Err(StoreError::GroupCommit(_)))),
            "{results:?}"
        );
        none_marked(&s);

        let side = rusqlite::Connection::open(s.root().join("index.sqlite")).unwrap();
        side.execute_batch("ALTER TABLE chunks RENAME TO chunks_aside")
            .unwrap();
        let results = commit_held(&s, &files, &chunks, || {});
        side.execute_batch("ALTER TABLE chunks_aside RENAME TO chunks")
            .unwrap();
        assert!(results.iter().all(Result::is_err), "{results:?}");
        none_marked(&s);

        for r in commit_held(&s, &files, &chunks, || {}) {
            r.unwrap();
        }
        assert_eq!(s.cached_bytes(&files[0].0), CS + 100);
        assert_eq!(rows(&s, &files[1].0).len(), 2);
    }
}
