//! Compressed tar layers (`tar+gzip`, `tar+zstd`) of OCI artifacts: fetched whole once,
//! checked against the layer's digest as the bytes land, unpacked once into a spool, and their
//! files served from there by [`super::oci::OciSource`].
//!
//! Owns the spool: one unlinked file per layer (in the cache directory for the daemon, the
//! temp directory for a build), holding the layer's uncompressed tar, shared by every source
//! of the process (a layer two models list is fetched and unpacked once), bounded by
//! `[oci] unpack_max_mib` per layer and in total (least recently read layers let go first),
//! and gone with the process (nothing to clean after a crash). A layer becomes readable only
//! after its sha256 and size equal the manifest's; its files' bytes are still verified chunk
//! by chunk by the fetcher, as every source's are. Not its concern: where the files are in
//! the tar (`oci.rs` walks the headers, as for an uncompressed tar layer).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt, Shared};
use sha2::{Digest as _, Sha256};

use super::SourceError;

/// How long a layer's body may send nothing before its fetch fails (the download runs apart
/// from any reader's deadline, so it needs its own).
const STALL: Duration = Duration::from_secs(30);

/// Compressed bytes in flight between the download and the unpacking thread: a few MB.
const PIPE_PIECES: usize = 64;

/// How a layer is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Codec {
    Gzip,
    Zstd,
}

impl Codec {
    /// The codec of a packed layer's kind (`Layer::packed`): `None` for `tar`.
    pub(crate) fn of(kind: &str) -> Option<Codec> {
        match kind {
            "tar+gzip" => Some(Codec::Gzip),
            "tar+zstd" => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// One layer unpacked: its uncompressed tar in an unlinked file.
pub(crate) struct Unpacked {
    file: File,
    /// Bytes of uncompressed tar.
    pub(crate) size: u64,
    /// When it was last read, in ms since the spool began: what eviction orders by.
    used: AtomicU64,
}

impl Unpacked {
    /// `range` of the uncompressed tar, read off the runtime's threads.
    pub(crate) async fn read(self: &Arc<Self>, range: Range<u64>) -> Result<Vec<u8>, SourceError> {
        self.used.store(spool().now_ms(), Ordering::Relaxed);
        if range.end > self.size {
            return Err(SourceError::Status(416));
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            me.file.read_exact_at(&mut buf, range.start).map(|_| buf)
        })
        .await
        .map_err(|e| SourceError::Transport(format!("reading the unpacked layer: {e}")))?
        .map_err(|e| SourceError::Transport(format!("reading the unpacked layer: {e}")))
    }
}

type Pending = Shared<BoxFuture<'static, Result<Arc<Unpacked>, SourceError>>>;

/// Every layer unpacked or being unpacked, by digest.
pub(crate) struct Spool {
    dir: Mutex<Option<PathBuf>>,
    layers: Mutex<HashMap<String, Pending>>,
    began: Instant,
}

static SPOOL: OnceLock<Spool> = OnceLock::new();

/// The process's spool.
pub(crate) fn spool() -> &'static Spool {
    SPOOL.get_or_init(|| Spool {
        dir: Mutex::new(None),
        layers: Mutex::new(HashMap::new()),
        began: Instant::now(),
    })
}

/// Layers unpacked from now on are spooled in `dir` (the daemon's cache directory: a temp
/// directory may be a small tmpfs); a build keeps the temp directory.
pub fn spool_in(dir: &Path) {
    *spool().dir.lock().unwrap() = Some(dir.to_path_buf());
}

impl Spool {
    fn now_ms(&self) -> u64 {
        self.began.elapsed().as_millis() as u64
    }

    /// The layer `digest` unpacked, or being unpacked: readers wait on one download.
    pub(crate) fn pending(&self, digest: &str) -> Option<Pending> {
        self.layers.lock().unwrap().get(digest).cloned()
    }

    /// Starts unpacking layer `digest` from `body` (the whole blob's answer), unless another
    /// read started it first; either way the one download to wait on. It runs as its own
    /// task, so a reader that gives up (a deadline) does not abort it for the others.
    pub(crate) fn start(
        &'static self,
        digest: &str,
        size: u64,
        codec: Codec,
        limit: u64,
        what: String,
        body: reqwest::Response,
    ) -> Pending {
        let mut layers = self.layers.lock().unwrap();
        if let Some(p) = layers.get(digest) {
            return p.clone();
        }
        let dir = self.dir.lock().unwrap().clone();
        let key = digest.to_string();
        let want = digest.strip_prefix("sha256:").unwrap_or(digest).to_string();
        let task = tokio::spawn(async move {
            let got = unpack(dir, codec, limit, body, size, &want, &what).await;
            let spool = spool();
            match &got {
                Ok(u) => {
                    u.used.store(spool.now_ms(), Ordering::Relaxed);
                    spool.evict(&key, limit);
                }
                // Not kept: the next read asks again.
                Err(_) => {
                    spool.layers.lock().unwrap().remove(&key);
                }
            }
            got
        });
        let pending: Pending = async move {
            task.await
                .unwrap_or_else(|e| Err(SourceError::Transport(format!("unpacking a layer: {e}"))))
        }
        .boxed()
        .shared();
        layers.insert(digest.to_string(), pending.clone());
        pending
    }

    /// Whether layer `digest` is unpacked now: for status.
    pub(crate) fn holds(&self, digest: &str) -> bool {
        let layers = self.layers.lock().unwrap();
        layers
            .get(digest)
            .is_some_and(|p| matches!(p.peek(), Some(Ok(_))))
    }

    /// Lets go of the least recently read unpacked layers (not `keep`) while the spool holds
    /// more than `limit` bytes. A reader holding one still reads it; its space is freed
    /// when the last reader is done, and a later read fetches the layer again.
    fn evict(&self, keep: &str, limit: u64) {
        let mut layers = self.layers.lock().unwrap();
        let mut done: Vec<(String, u64, u64)> = layers
            .iter()
            .filter_map(|(k, p)| match p.peek() {
                Some(Ok(u)) => Some((k.clone(), u.size, u.used.load(Ordering::Relaxed))),
                _ => None,
            })
            .collect();
        let mut total: u64 = done.iter().map(|d| d.1).sum();
        done.sort_by_key(|d| d.2);
        for (k, size, _) in done {
            if total <= limit {
                break;
            }
            if k != keep {
                layers.remove(&k);
                total -= size;
            }
        }
    }
}

/// Streams `body` through the sha256 and the decoder into a spool file. The bytes are
/// decompressed once, as they land; the layer is readable only if the compressed bytes are
/// exactly the layer (`size` bytes whose sha256 is `want`).
async fn unpack(
    dir: Option<PathBuf>,
    codec: Codec,
    limit: u64,
    body: reqwest::Response,
    size: u64,
    want: &str,
    what: &str,
) -> Result<Arc<Unpacked>, SourceError> {
    // Where the daemon said, else (a build, or that directory gone) the temp directory.
    let file = dir
        .and_then(|d| tempfile::tempfile_in(d).ok())
        .map_or_else(tempfile::tempfile, Ok)
        .map_err(|e| SourceError::Transport(format!("no spool file: {e}")))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(PIPE_PIECES);
    let worker = tokio::task::spawn_blocking(move || unpack_blocking(codec, rx, file, limit));
    let mut stream = body.bytes_stream();
    let mut landed = 0u64;
    let mut failed = None;
    loop {
        let piece = match tokio::time::timeout(STALL, stream.next()).await {
            Err(_) => {
                failed = Some(SourceError::Timeout);
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                failed = Some(super::http::transport(e));
                break;
            }
            Ok(Some(Ok(p))) => p,
        };
        landed += piece.len() as u64;
        if landed > size {
            failed = Some(SourceError::Unsupported(format!(
                "{what}: the registry sent more than the layer's {size} bytes: not served"
            )));
            break;
        }
        // The unpacker stopped (a bad stream): its own error says why.
        if tx.send(piece).await.is_err() {
            break;
        }
    }
    drop(tx);
    let (sha, done) = worker
        .await
        .map_err(|e| SourceError::Transport(format!("unpacking {what}: {e}")))?;
    if let Some(e) = failed {
        return Err(e);
    }
    if landed != size {
        return Err(SourceError::Short {
            want: size,
            got: landed,
        });
    }
    if sha != want {
        return Err(SourceError::Unsupported(format!(
            "{what}: the registry's bytes have sha256 {sha}, not the layer's digest: not served"
        )));
    }
    let (unpacked, file) = done.map_err(|e| {
        SourceError::Unsupported(format!("{what} cannot be unpacked, not served: {e}"))
    })?;
    Ok(Arc::new(Unpacked {
        file,
        size: unpacked,
        used: AtomicU64::new(0),
    }))
}

/// The unpacking thread: hashes every compressed byte, decodes them into `file`, refuses to
/// write more than `limit` bytes. Returns the sha256 (hex) of all it was fed, and the bytes
/// unpacked and the file, or why they could not be.
fn unpack_blocking(
    codec: Codec,
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    file: File,
    limit: u64,
) -> (String, Result<(u64, File), String>) {
    let mut input = Pipe {
        rx,
        piece: Bytes::new(),
        sha: Sha256::new(),
    };
    let mut out = Capped {
        inner: io::BufWriter::with_capacity(1 << 20, file),
        written: 0,
        limit,
    };
    let decoded = match codec {
        Codec::Gzip => io::copy(&mut flate2::read::MultiGzDecoder::new(&mut input), &mut out)
            .map(|_| ())
            .map_err(|e| format!("gzip: {e}")),
        Codec::Zstd => zstd_frames(&mut input, &mut out),
    };
    // What follows the compressed stream (or a bad one) is hashed too: the digest covers
    // every byte, and a layer that is not its digest's is named so, whatever its codec says.
    let _ = io::copy(&mut input, &mut io::sink());
    let sha: String = input
        .sha
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let unpacked = decoded.and_then(|()| {
        let file = out
            .inner
            .into_inner()
            .map_err(|e| format!("writing the spool: {}", e.error()))?;
        Ok((out.written, file))
    });
    (sha, unpacked)
}

/// Every zstd frame of the stream, one after the other (`zstd` writes one per input, and a
/// concatenation is a valid stream).
fn zstd_frames(input: &mut Pipe, out: &mut Capped) -> Result<(), String> {
    loop {
        let mut frame = ruzstd::decoding::StreamingDecoder::new(&mut *input)
            .map_err(|e| format!("zstd: {e}"))?;
        io::copy(&mut frame, out).map_err(|e| format!("zstd: {e}"))?;
        if input.at_end() {
            return Ok(());
        }
    }
}

/// The compressed bytes as they land, hashed as they are read.
struct Pipe {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    piece: Bytes,
    sha: Sha256,
}

impl Pipe {
    /// Whether every byte has been read (waits for the next piece to tell).
    fn at_end(&mut self) -> bool {
        self.fill();
        self.piece.is_empty()
    }

    fn fill(&mut self) {
        while self.piece.is_empty() {
            match self.rx.blocking_recv() {
                Some(p) => {
                    self.sha.update(&p);
                    self.piece = p;
                }
                None => return,
            }
        }
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.fill();
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece[..n]);
        let _ = self.piece.split_to(n);
        Ok(n)
    }
}

/// The spool file, refusing to grow past the limit (a small layer may unpack to anything).
struct Capped {
    inner: io::BufWriter<File>,
    written: u64,
    limit: u64,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(io::Error::other(format!(
                "it unpacks to more than {} MiB ([oci] unpack_max_mib)",
                self.limit >> 20
            )));
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(pieces: Vec<Vec<u8>>, codec: Codec, limit: u64) -> Result<(String, Vec<u8>), String> {
        let (tx, rx) = tokio::sync::mpsc::channel(pieces.len().max(1));
        for p in pieces {
            tx.try_send(Bytes::from(p)).unwrap();
        }
        drop(tx);
        let file = tempfile::tempfile().unwrap();
        let (sha, done) = unpack_blocking(codec, rx, file, limit);
        let (n, file) = done?;
        let mut buf = vec![0u8; n as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        Ok((sha, buf))
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn hex_sha(b: &[u8]) -> String {
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    }

    #[test]
    fn gzip_members_are_unpacked_and_every_byte_hashed() {
        let a: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut layer = gzip(&a[..60_000]);
        layer.extend(gzip(&a[60_000..]));
        // Landing in odd pieces, as a body does.
        let pieces: Vec<Vec<u8>> = layer.chunks(777).map(|c| c.to_vec()).collect();
        let (sha, out) = fed(pieces, Codec::Gzip, 1 << 20).unwrap();
        assert_eq!(out, a);
        assert_eq!(sha, hex_sha(&layer));
    }

    #[test]
    fn zstd_frames_are_unpacked_one_after_the_other() {
        let a: Vec<u8> = (0..50_000u32).map(|i| (i % 13) as u8).collect();
        let mut layer = ruzstd::encoding::compress_to_vec(
            &a[..20_000],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        layer.extend(ruzstd::encoding::compress_to_vec(
            &a[20_000..],
            ruzstd::encoding::CompressionLevel::Fastest,
        ));
        let pieces: Vec<Vec<u8>> = layer.chunks(1000).map(|c| c.to_vec()).collect();
        let (sha, out) = fed(pieces, Codec::Zstd, 1 << 20).unwrap();
        assert_eq!(out, a);
        assert_eq!(sha, hex_sha(&layer));
    }

    #[test]
    fn a_layer_that_unpacks_past_the_limit_or_is_no_gzip_is_refused() {
        let big = vec![0u8; 2 << 20];
        let e = fed(vec![gzip(&big)], Codec::Gzip, 1 << 20).unwrap_err();
        assert!(e.contains("unpack_max_mib"), "{e}");
        let e = fed(vec![b"not gzip at all".to_vec()], Codec::Gzip, 1 << 20).unwrap_err();
        assert!(e.contains("gzip"), "{e}");
        let e = fed(vec![b"not zstd at all".to_vec()], Codec::Zstd, 1 << 20).unwrap_err();
        assert!(e.contains("zstd"), "{e}");
    }
}
