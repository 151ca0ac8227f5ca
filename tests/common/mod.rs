//! Shared harness of the integration tests: the HTTP origin ([`origin`]), the daemon under test
//! ([`mount`]), whether FUSE can mount here ([`fuse`]: a test that mounts begins with
//! `if no_fuse() { return; }`), an nginx cache tier ([`nginx`]), a systemd container
//! ([`systemd_ct`]), and helpers for files, manifests, xattrs and the on-disk cache.
//!
//! Each test binary uses a different part of it, hence `dead_code` is allowed here.
#![allow(dead_code)]

pub mod fuse;
pub mod mount;
pub mod nginx;
pub mod origin;
pub mod registry;
pub mod systemd_ct;

use std::collections::BTreeSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

#[allow(unused_imports)]
pub use fuse::{assert_fuse, fuse_available, no_fuse, skip};
#[allow(unused_imports)]
pub use mount::{
    DeadMount, Mount, MountSpec, config_toml, errno, force_unmount, hup, mount_count, test_config,
    write_config,
};
#[allow(unused_imports)]
pub use origin::{Fault, Origin, Request, wait_until};

/// True, after printing `SKIP: <test>: needs root: <why>`, when not run as root: for the few
/// checks of a mount that only root's requests reach (the kernel answers a user's itself).
/// CI runs as root.
pub fn not_root(why: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        skip(&format!("needs root: {why}"));
    }
    !root
}

/// The model ids of the fixtures.
pub const T2V: &str = "t2v-A14B@2.2.0";
pub const I2V: &str = "i2v-A14B@2.2.0";
pub const TI2V: &str = "ti2v-5B@2.2.0";
/// The VAE file, byte-identical in t2v and i2v.
pub const VAE: &str = "Wan2.1_VAE.safetensors";

/// `fixtures/` of the repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// `fixtures/models/`, the root an origin serves the fixtures from.
pub fn fixture_models() -> PathBuf {
    fixtures().join("models")
}

/// A fresh temporary directory for one test.
pub fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("wanfs-test-")
        .tempdir()
        .expect("tempdir")
}

/// Deterministic pseudo-random bytes (splitmix64), the same for the same `seed`.
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Writes `size` pseudo-random bytes to `path` (creating parents) and returns them.
pub fn write_random(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(size, seed);
    fs::create_dir_all(path.parent().expect("parent")).expect("create parent");
    fs::write(path, &data).expect("write random file");
    data
}

pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Panics with the first differing offset (not a megabyte dump) if `got != want`.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    panic!(
        "{what}: {} bytes read, {} expected; first difference at {:?}",
        got.len(),
        want.len(),
        first.or(Some(got.len().min(want.len())))
    );
}

/// The `wan` binary under test: `$WAN_TEST_BIN` if set (to test a saved build), else the one
/// cargo built with these tests.
pub fn wan_bin() -> PathBuf {
    std::env::var_os("WAN_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_wan").into())
}

/// Runs the `wan` binary with `args`, killing it after `timeout`.
pub fn run_wan<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Output {
    let mut cmd = Command::new(wan_bin());
    cmd.args(args).stdin(Stdio::null());
    run_with_timeout(cmd, timeout)
}

/// Runs `cmd` with captured output; panics if it does not exit within `timeout`.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    run_for(cmd, timeout)
        .unwrap_or_else(|| panic!("{what} did not start or exit within {timeout:?}"))
}

/// Runs `cmd` with captured output (stdin closed); `None` if it could not start or did not exit
/// within `timeout` (it is killed then).
pub fn run_for(mut cmd: Command, timeout: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().ok()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Some(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Options of `wan manifest build`.
#[derive(Clone, Debug, Default)]
pub struct BuildOpts {
    pub chunk_size: Option<u64>,
    pub sources: Vec<String>,
    pub whole_only: bool,
}

/// `wan manifest build DIR --id ID ...`: the TOML entry it prints (no `schema_version`). Chunk
/// digests are BLAKE3 (`--chunk-hash blake3`, the form these tests were written for) unless
/// `extra` names a `--chunk-hash` (`blake3-tree`, the CLI's default, or `sha256`).
pub fn manifest_build(dir: &Path, id: &str, opts: &BuildOpts) -> String {
    manifest_build_with(dir, id, opts, &[])
}

/// [`manifest_build`] with more arguments (e.g. `--chunk-hash sha256`).
pub fn manifest_build_with(dir: &Path, id: &str, opts: &BuildOpts, extra: &[&str]) -> String {
    let mut args: Vec<String> = vec![
        "manifest".into(),
        "build".into(),
        dir.to_string_lossy().into_owned(),
        "--id".into(),
        id.into(),
    ];
    if let Some(cs) = opts.chunk_size {
        args.extend(["--chunk-size".into(), cs.to_string()]);
    }
    for s in &opts.sources {
        args.extend(["--source".into(), s.clone()]);
    }
    if opts.whole_only {
        args.push("--whole-only".into());
    }
    if !extra.contains(&"--chunk-hash") {
        args.extend(["--chunk-hash".into(), "blake3".into()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = run_wan(&args, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "wan {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let entry = String::from_utf8(out.stdout).expect("manifest is utf-8");
    assert!(
        !entry.contains("schema_version"),
        "manifest build must print only the entry:\n{entry}"
    );
    entry
}

/// Writes a manifest file: `schema_version = 1` then the entries.
pub fn write_manifest(path: &Path, entries: &[String]) {
    let mut text = String::from("schema_version = 1\n");
    for e in entries {
        text.push('\n');
        text.push_str(e);
        text.push('\n');
    }
    fs::write(path, text).expect("write manifest");
}

/// One file of a manifest entry.
#[derive(Clone, Debug)]
pub struct ManifestFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub chunk_size: Option<u64>,
    /// The first chunk's size where it differs from `chunk_size`.
    pub head_size: Option<u64>,
    /// `chunk_hash` where given (`blake3`, `blake3-tree`; sha256 when absent).
    pub chunk_hash: Option<String>,
    pub chunks: Vec<String>,
}

impl ManifestFile {
    /// The layout its chunks are cut by: the aligned one for `blake3-tree`.
    pub fn layout(&self) -> wanfs::chunk::Layout {
        let cs = self.chunk_size.expect("a chunked file");
        let hash: wanfs::chunk::ChunkHash = self
            .chunk_hash
            .as_deref()
            .map_or(Ok(Default::default()), str::parse)
            .expect("a known chunk_hash");
        wanfs::chunk::Layout::of(
            hash.layout_kind(),
            self.size,
            cs,
            self.head_size.unwrap_or(cs),
        )
    }

    /// The byte range `start..end` of each chunk, the head first.
    pub fn chunk_ranges(&self) -> Vec<std::ops::Range<u64>> {
        let layout = self.layout();
        (0..layout.count()).map(|i| layout.range(i)).collect()
    }
}

/// The files of model `id` in a manifest entry (or whole manifest) text.
pub fn manifest_files(text: &str, id: &str) -> Vec<ManifestFile> {
    let doc: toml::Table =
        toml::from_str(text).unwrap_or_else(|e| panic!("manifest does not parse: {e}\n{text}"));
    let files = doc["models"][id]["files"].as_array().expect("files array");
    files
        .iter()
        .map(|f| ManifestFile {
            path: f["path"].as_str().expect("path").to_owned(),
            size: f["size"].as_integer().expect("size") as u64,
            sha256: f["sha256"].as_str().expect("sha256").to_owned(),
            chunk_size: f
                .get("chunk_size")
                .and_then(|v| v.as_integer())
                .map(|v| v as u64),
            head_size: f
                .get("head_size")
                .and_then(|v| v.as_integer())
                .map(|v| v as u64),
            chunk_hash: f
                .get("chunk_hash")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            chunks: f
                .get("chunks")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .map(|c| c.as_str().expect("chunk digest").to_owned())
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// getxattr(2) on `path`.
pub fn xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let n = CString::new(name).expect("name without NUL");
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid NUL-terminated strings and a buffer of the length passed.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// An xattr as a string (trailing NUL or newline trimmed); panics if it cannot be read.
#[track_caller]
pub fn xattr_str(path: &Path, name: &str) -> String {
    let v = xattr(path, name).unwrap_or_else(|e| panic!("getxattr {} {name}: {e}", path.display()));
    String::from_utf8(v)
        .expect("xattr is utf-8")
        .trim_end_matches(['\0', '\n'])
        .to_owned()
}

/// `user.wan.state` of a mounted file.
#[track_caller]
pub fn state(path: &Path) -> String {
    xattr_str(path, "user.wan.state")
}

/// `user.wan.cached_bytes` of a mounted file.
#[track_caller]
pub fn cached_bytes(path: &Path) -> u64 {
    let s = xattr_str(path, "user.wan.cached_bytes");
    s.parse()
        .unwrap_or_else(|_| panic!("user.wan.cached_bytes of {} is {s:?}", path.display()))
}

/// Reads up to `len` bytes at `off` (fewer only at end of file).
pub fn read_range(path: &Path, off: u64, len: usize) -> io::Result<Vec<u8>> {
    read_range_in(&File::open(path)?, off, len)
}

/// Like [`read_range`] on an open file.
pub fn read_range_in(file: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// Drops the page cache of `path` so the next read goes to the filesystem again.
pub fn drop_page_cache(path: &Path) {
    let f = File::open(path).expect("open for fadvise");
    // SAFETY: fadvise on an fd we own.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise DONTNEED {}", path.display());
}

/// Runs `f`, returning its result and how long it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let v = f();
    (v, start.elapsed())
}

/// Asserts that `r` failed with EIO.
#[track_caller]
pub fn assert_eio<T>(r: io::Result<T>, what: &str) {
    match r {
        Ok(_) => panic!("{what}: read succeeded, expected EIO"),
        Err(e) => assert_eq!(errno(&e), libc::EIO, "{what}: expected EIO, got {e}"),
    }
}

/// A read-only view of a cache directory's `v1/` layout.
pub struct CacheView {
    pub dir: PathBuf,
}

/// One row of `chunks`: chunk `idx` of blob `blob` is present and verified with `digest`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkRow {
    pub blob: String,
    pub idx: u64,
    pub digest: String,
}

impl CacheView {
    pub fn new(cache_dir: &Path) -> CacheView {
        CacheView {
            dir: cache_dir.to_path_buf(),
        }
    }

    pub fn index_path(&self) -> PathBuf {
        self.dir.join("v1/index.sqlite")
    }

    /// `v1/blobs/<first 2 hex>/<64 hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("v1/blobs").join(&digest[..2]).join(digest)
    }

    fn open(&self) -> rusqlite::Connection {
        use rusqlite::OpenFlags;
        let path = self.index_path();
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()));
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy_timeout");
        conn
    }

    /// Every row of `chunks`, sorted (empty if the index does not exist yet).
    pub fn chunk_rows(&self) -> Vec<ChunkRow> {
        if !self.index_path().exists() {
            return Vec::new();
        }
        let conn = self.open();
        let mut stmt = conn
            .prepare("SELECT blob, idx, digest FROM chunks")
            .expect("select chunks");
        let mut rows: Vec<ChunkRow> = stmt
            .query_map([], |r| {
                Ok(ChunkRow {
                    blob: r.get(0)?,
                    idx: r.get::<_, i64>(1)? as u64,
                    digest: r.get(2)?,
                })
            })
            .expect("query chunks")
            .map(|r| r.expect("chunk row"))
            .collect();
        rows.sort();
        rows
    }

    /// Indices of the chunks of `blob` marked present.
    pub fn present(&self, blob: &str) -> BTreeSet<u64> {
        self.chunk_rows()
            .into_iter()
            .filter(|r| r.blob == blob)
            .map(|r| r.idx)
            .collect()
    }

    /// `(size, chunk_size)` of a row of `blobs`.
    pub fn blob_row(&self, digest: &str) -> Option<(u64, Option<u64>)> {
        if !self.index_path().exists() {
            return None;
        }
        let conn = self.open();
        conn.query_row(
            "SELECT size, chunk_size FROM blobs WHERE digest = ?1",
            [digest],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                ))
            },
        )
        .ok()
    }

    /// Digests of every row of `blobs`.
    pub fn blob_digests(&self) -> Vec<String> {
        if !self.index_path().exists() {
            return Vec::new();
        }
        let conn = self.open();
        let mut stmt = conn
            .prepare("SELECT digest FROM blobs")
            .expect("select blobs");
        stmt.query_map([], |r| r.get(0))
            .expect("query blobs")
            .map(|r| r.expect("blob row"))
            .collect()
    }

    /// Every file under `v1/blobs/`.
    pub fn blob_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(fans) = fs::read_dir(self.dir.join("v1/blobs")) else {
            return out;
        };
        for fan in fans.flatten() {
            if let Ok(files) = fs::read_dir(fan.path()) {
                out.extend(files.flatten().map(|f| f.path()).filter(|p| p.is_file()));
            }
        }
        out.sort();
        out
    }

    /// Checks that every chunk row has bytes on disk matching its digest. Returns the number of
    /// rows checked, or every inconsistency found.
    pub fn check_consistent(&self) -> Result<usize, String> {
        let rows = self.chunk_rows();
        let mut problems = Vec::new();
        for row in &rows {
            let Some((size, Some(cs))) = self.blob_row(&row.blob) else {
                problems.push(format!("{row:?}: no blobs row with a chunk_size"));
                continue;
            };
            let off = row.idx * cs;
            if off >= size {
                problems.push(format!("{row:?}: chunk beyond the blob size {size}"));
                continue;
            }
            let len = cs.min(size - off) as usize;
            let path = self.blob_path(&row.blob);
            match File::open(&path).and_then(|f| read_range_in(&f, off, len)) {
                // Rows hold digests under the file's chunk hash: sha256, BLAKE3, or the
                // chunk's subtree at its place (blake3-tree).
                Ok(bytes)
                    if bytes.len() == len
                        && (sha256_hex(&bytes) == row.digest
                            || wanfs::chunk::ChunkHash::Blake3.digest(&bytes).to_hex()
                                == row.digest
                            || tree_digest(size, cs, row.idx, &bytes)
                                .is_some_and(|d| d == row.digest)) => {}
                Ok(bytes) => problems.push(format!(
                    "{row:?}: {} bytes on disk at {off} hash to {} (want {len} bytes)",
                    bytes.len(),
                    sha256_hex(&bytes)
                )),
                Err(e) => problems.push(format!("{row:?}: {}: {e}", path.display())),
            }
        }
        if problems.is_empty() {
            Ok(rows.len())
        } else {
            Err(problems.join("\n"))
        }
    }
}

/// The `blake3-tree` digest of chunk `idx` (`bytes`) of a blob of `size` bytes in `cs`-byte
/// chunks, where such chunks can be BLAKE3 subtrees.
fn tree_digest(size: u64, cs: u64, idx: u64, bytes: &[u8]) -> Option<String> {
    use wanfs::chunk::{ChunkCheck, ChunkHash, Layout};
    let layout = Layout::new(size, cs);
    layout.is_tree().then(|| {
        ChunkCheck::of(ChunkHash::Blake3Tree, &layout, idx)
            .digest(bytes)
            .to_hex()
    })
}

/// The id of generated test models.
pub const GEN: &str = "gen@1.0.0";

/// Writes pseudo-random files `(relative path, size)` under `root/<id>/` (each with its own
/// seed derived from `seed`) and returns `(path, bytes)` in the same order.
pub fn gen_files(
    root: &Path,
    id: &str,
    files: &[(&str, usize)],
    seed: u64,
) -> Vec<(String, Vec<u8>)> {
    files
        .iter()
        .enumerate()
        .map(|(i, (rel, size))| {
            let data = write_random(&root.join(id).join(rel), *size, seed * 1000 + i as u64);
            ((*rel).to_owned(), data)
        })
        .collect()
}

/// The bytes of `rel` among generated files.
#[track_caller]
pub fn data_of<'a>(files: &'a [(String, Vec<u8>)], rel: &str) -> &'a [u8] {
    &files
        .iter()
        .find(|(p, _)| p == rel)
        .unwrap_or_else(|| panic!("no generated file {rel}"))
        .1
}

/// A test with a generated model served over HTTP: the work dir, the origin serving
/// `work/src`, the generated files and a manifest at `work/models.toml` naming the origin.
pub struct GenSetup {
    pub work: tempfile::TempDir,
    pub origin: Origin,
    pub files: Vec<(String, Vec<u8>)>,
    pub entry: String,
    pub manifest: PathBuf,
}

impl GenSetup {
    /// Generates `files` under `work/src/gen@1.0.0/`, starts an origin on them and builds a
    /// manifest with `--chunk-size chunk_size` whose only source is the origin.
    pub fn new(files: &[(&str, usize)], chunk_size: u64, seed: u64) -> GenSetup {
        GenSetup::build(files, seed, Some(chunk_size), false)
    }

    /// Like [`GenSetup::new`] with `--whole-only` (no chunk digests).
    pub fn whole_only(files: &[(&str, usize)], seed: u64) -> GenSetup {
        GenSetup::build(files, seed, None, true)
    }

    fn build(
        files: &[(&str, usize)],
        seed: u64,
        chunk_size: Option<u64>,
        whole_only: bool,
    ) -> GenSetup {
        let work = workdir();
        let src = work.path().join("src");
        let files = gen_files(&src, GEN, files, seed);
        let origin = Origin::start(&src);
        let opts = BuildOpts {
            chunk_size,
            sources: vec![origin.base(GEN)],
            whole_only,
        };
        let entry = manifest_build(&src.join(GEN), GEN, &opts);
        let manifest = work.path().join("models.toml");
        write_manifest(&manifest, std::slice::from_ref(&entry));
        GenSetup {
            work,
            origin,
            files,
            entry,
            manifest,
        }
    }

    pub fn data(&self, rel: &str) -> &[u8] {
        data_of(&self.files, rel)
    }

    /// The manifest's record of `rel`.
    pub fn file(&self, rel: &str) -> ManifestFile {
        manifest_files(&self.entry, GEN)
            .into_iter()
            .find(|f| f.path == rel)
            .expect("file in manifest")
    }

    /// A mount spec over this setup's manifest with `config`.
    pub fn spec(&self, config: wanfs::config::Config) -> MountSpec {
        MountSpec::new(self.work.path(), &self.manifest).config(config)
    }

    /// `mountpoint/gen@1.0.0/rel`.
    pub fn mounted(&self, mount: &Mount, rel: &str) -> PathBuf {
        mount.path(&format!("{GEN}/{rel}"))
    }
}

/// The byte range `(first, last)` of chunk `idx` in a file of `size` bytes.
pub fn chunk_range(idx: u64, chunk_size: u64, size: u64) -> (u64, u64) {
    let start = idx * chunk_size;
    (start, (start + chunk_size).min(size) - 1)
}

/// Polls `user.wan.state` of `path` until it is `want` (at most 5 s) and returns the last state
/// seen. The daemon answers a read as soon as its chunks are verified and commits them to the
/// cache just after, so the state of a file may lag its last read by a few milliseconds.
#[track_caller]
pub fn wait_state(path: &Path, want: &str) -> String {
    let mut last = String::new();
    wait_until(Duration::from_secs(5), || {
        last = state(path);
        last == want
    });
    last
}

/// A TCP port nobody listens on now, for a server a test starts next (a daemon's endpoint,
/// nginx, moto). Drawn below the kernel's ephemeral range (`ip_local_port_range`: 32768 and up
/// by default), where no outgoing connection is given a port: a port from `bind(0)` lies in
/// that range, and a test opening many client sockets at the same time (stalled clients, a
/// load) could take it between the draw and the server's own bind (`Address already in use`).
pub fn free_port() -> u16 {
    use std::net::TcpListener;
    for _ in 0..1000 {
        let port: u16 = rand::random_range(20_000..32_000);
        let v4 = TcpListener::bind(("0.0.0.0", port)).is_ok();
        let v6 = match TcpListener::bind(("::", port)) {
            Ok(_) => true,
            // A host without IPv6 cannot clash there.
            Err(e) => e.kind() != io::ErrorKind::AddrInUse,
        };
        if v4 && v6 {
            return port;
        }
    }
    panic!("no free TCP port between 20000 and 32000");
}
