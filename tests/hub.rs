//! `wan manifest build hf://org/repo@rev` against a local server shaped like the Hub: the test
//! origin serves `api/models/{repo}/tree/{rev}` (the tree listing, as JSON) and
//! `{repo}/resolve/{rev}/{path}` (the files), logging every request. Whole-file entries come
//! from the listing alone (LFS files are never downloaded; git-stored files, downloaded to be
//! hashed, get chunk lists unless `--whole-only`), `--chunked` fetches each file once
//! and matches a local build of the same files, a listing that lies is refused, and the entry
//! mounts and reads back through the `hf://` source.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::*;

const REPO: &str = "org/demo";
const ID: &str = "demo@1.0.0";
const TOKEN: &str = "hf_t3st";

/// A small but real safetensors file: 8-byte header length, JSON header, then the data.
fn safetensors(data_len: usize, seed: u64) -> Vec<u8> {
    let header = format!(
        "{{\"w\":{{\"dtype\":\"F16\",\"shape\":[{}],\"data_offsets\":[0,{data_len}]}}}}",
        data_len / 2
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&random_bytes(data_len, seed));
    out
}

struct Hub {
    work: tempfile::TempDir,
    origin: Origin,
    /// The files as the repository holds them: (path, bytes, stored in LFS).
    files: Vec<(String, Vec<u8>, bool)>,
}

impl Hub {
    /// A repository with an LFS safetensors file, a git-stored config and a nested file;
    /// `lie` makes the listing give the safetensors file a wrong sha256.
    fn new(lie: bool) -> Hub {
        let work = workdir();
        let root = work.path().join("hub");
        let files = vec![
            (
                "config.json".to_string(),
                b"{\"dim\": 64}\n".to_vec(),
                false,
            ),
            (
                "model.safetensors".to_string(),
                safetensors(3 << 20, 7),
                true,
            ),
            (
                "tokenizer/vocab.txt".to_string(),
                b"a\nb\nc\n".to_vec(),
                false,
            ),
        ];
        let resolve = root.join(REPO).join("resolve/main");
        let mut tree = Vec::new();
        for (path, data, lfs) in &files {
            let p = resolve.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, data).unwrap();
            let mut e = serde_json::json!({
                "type": "file", "oid": "0000000000000000000000000000000000000000",
                "size": if *lfs { 134 } else { data.len() }, "path": path,
            });
            if *lfs {
                let oid = if lie {
                    sha256_hex(b"something else")
                } else {
                    sha256_hex(data)
                };
                e["lfs"] = serde_json::json!({"oid": oid, "size": data.len(), "pointerSize": 134});
            }
            tree.push(e);
        }
        tree.push(
            serde_json::json!({"type": "directory", "oid": "1", "size": 0, "path": "tokenizer"}),
        );
        let api = root.join("api/models").join(REPO).join("tree");
        fs::create_dir_all(&api).unwrap();
        fs::write(api.join("main"), serde_json::to_vec(&tree).unwrap()).unwrap();
        let origin = Origin::start(&root);
        Hub {
            work,
            origin,
            files,
        }
    }

    /// `wan manifest build hf://org/demo@main --id demo@1.0.0 EXTRA...` with the Hub's
    /// variables set.
    fn build(&self, extra: &[&str]) -> std::process::Output {
        build_output(&self.origin.url(), extra, &[], Duration::from_secs(60))
    }

    fn data(&self, path: &str) -> &[u8] {
        &self.files.iter().find(|f| f.0 == path).unwrap().1
    }
}

fn stdout_ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn whole_file_entry_from_the_listing_alone_mounts_and_reads() {
    if no_fuse() {
        return;
    }
    let hub = Hub::new(false);
    let entry = stdout_ok(&hub.build(&[]));
    let files = manifest_files(&entry, ID);
    assert_eq!(
        files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["config.json", "model.safetensors", "tokenizer/vocab.txt"]
    );
    for f in &files {
        let data = hub.data(&f.path);
        assert_eq!(
            (f.size, &f.sha256),
            (data.len() as u64, &sha256_hex(data)),
            "{}",
            f.path
        );
        // What the build downloads anyway gets its chunk list: the git-stored files.
        assert_eq!(
            f.chunks.is_empty(),
            f.path == "model.safetensors",
            "{}: a whole-file digest for the LFS file only",
            f.path
        );
    }
    assert!(entry.contains(&format!("\"hf://{REPO}@main\"")), "{entry}");
    // The LFS file was never downloaded; the git-stored ones were, to hash them, and asked
    // for one byte past their listed end, to check they end there (416).
    assert!(hub.origin.gets("model.safetensors").is_empty());
    let config = hub.origin.gets("resolve/main/config.json");
    let len = hub.data("config.json").len() as u64;
    assert_eq!(
        config
            .iter()
            .map(|r| (r.range_header.clone().unwrap_or_default(), r.status))
            .collect::<Vec<_>>(),
        [
            (format!("bytes=0-{}", len - 1), 206),
            (format!("bytes={len}-{len}"), 416)
        ]
    );
    let api = hub.origin.gets("tree/main");
    assert_eq!(api.len(), 1);
    assert_eq!(
        api[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let whole = manifest_files(&stdout_ok(&hub.build(&["--whole-only"])), ID);
    assert!(whole.iter().all(|f| f.chunks.is_empty()), "--whole-only");

    // The entry mounts, and the hf:// source serves it.
    let manifest = hub.work.path().join("models.toml");
    write_manifest(&manifest, &[entry]);
    let spec = MountSpec::new(hub.work.path(), &manifest)
        .env("HF_ENDPOINT", &hub.origin.url())
        .env("HF_TOKEN", TOKEN);
    let m = Mount::start(spec);
    for (path, data, _) in &hub.files {
        let got = fs::read(m.path(&format!("{ID}/{path}"))).unwrap();
        assert_bytes_eq(&got, data, path);
    }
}

#[test]
fn chunked_build_fetches_each_file_once_and_matches_a_local_build() {
    let hub = Hub::new(false);
    let cs = 1 << 20;
    let entry = stdout_ok(&hub.build(&["--chunked", "--chunk-size", &cs.to_string()]));
    // Both with the CLI's default chunk hash, blake3-tree (the remote build names none).
    let local = manifest_build_with(
        &hub.work.path().join("hub").join(REPO).join("resolve/main"),
        ID,
        &BuildOpts {
            chunk_size: Some(cs),
            sources: vec![format!("hf://{REPO}@main")],
            ..BuildOpts::default()
        },
        &["--chunk-hash", "blake3-tree"],
    );
    let (remote, local) = (manifest_files(&entry, ID), manifest_files(&local, ID));
    assert_eq!(remote.len(), local.len());
    for (r, l) in remote.iter().zip(&local) {
        assert_eq!(
            (&r.path, r.size, &r.sha256, r.chunk_size, &r.chunks),
            (&l.path, l.size, &l.sha256, l.chunk_size, &l.chunks),
            "{}",
            r.path
        );
    }
    assert!(remote.iter().any(|f| f.chunks.len() > 1));
    // Once per file: the bytes requested add up to the file, plus the safetensors length.
    let asked: u64 = hub
        .origin
        .gets("model.safetensors")
        .iter()
        .filter_map(|r| r.range)
        .map(|(a, b)| b - a + 1)
        .sum();
    assert_eq!(asked, hub.data("model.safetensors").len() as u64 + 8);
}

#[test]
fn a_listing_that_lies_or_refuses_is_an_error_naming_it() {
    let hub = Hub::new(true);
    let out = hub.build(&["--chunked"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("model.safetensors") && err.contains("hash to"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no entry is printed");

    hub.origin
        .add_fault(Fault::Status(401), Some("/api/"), None);
    let out = hub.build(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("HF_TOKEN") && err.contains("401"),
        "{err}"
    );
    // A local directory with --chunked is a usage error, not a silent no-op.
    let out = run_wan(
        &[
            "manifest",
            "build",
            &hub.work.path().to_string_lossy(),
            "--id",
            ID,
            "--chunked",
        ],
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--chunked is for"));
}

/// One request as a [`Scripted`] hub saw it.
#[derive(Clone, Debug)]
struct Seen {
    /// The request target as sent: path and query, not decoded.
    target: String,
    /// Every header, names lowercase.
    headers: Vec<(String, String)>,
    at: std::time::Instant,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// What a [`Scripted`] hub sends back.
enum Reply {
    /// Status, headers, body.
    Answer(u16, Vec<(String, String)>, Vec<u8>),
    /// Nothing, ever: the connection stays open until the hub is dropped.
    Stall,
}

fn ok_json(v: serde_json::Value) -> Reply {
    Reply::Answer(200, vec![], serde_json::to_vec(&v).unwrap())
}

/// A hub whose every answer the test scripts, for what the fixed origin cannot say: `Link`
/// headers, `Retry-After`, a stall, a listing that lies. HTTP/1.1 on 127.0.0.1, one thread per
/// connection, each answer closing its connection. The script gets the request and how many
/// requests for the same path came before it.
struct Scripted {
    addr: std::net::SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

type Script = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

impl Scripted {
    fn start(script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Scripted {
        use std::sync::atomic::Ordering;
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let script: Arc<Script> = Arc::new(script);
        let (log2, done2) = (log.clone(), done.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if done2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (log, done, script) = (log2.clone(), done2.clone(), script.clone());
                std::thread::spawn(move || serve(conn, &log, &done, &*script));
            }
        });
        Scripted { addr, log, done }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    /// Requests whose path contains `part`.
    fn seen_at(&self, part: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path().contains(part))
            .collect()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so that it sees `done`.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

fn serve(
    mut conn: std::net::TcpStream,
    log: &std::sync::Mutex<Vec<Seen>>,
    done: &std::sync::atomic::AtomicBool,
    script: &Script,
) {
    use std::io::{Read, Write};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("")
        .to_string();
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let seen = Seen {
        target,
        headers,
        at: std::time::Instant::now(),
    };
    let before = {
        let mut log = log.lock().unwrap();
        let n = log.iter().filter(|s| s.path() == seen.path()).count();
        log.push(seen.clone());
        n
    };
    match script(&seen, before) {
        Reply::Stall => {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Reply::Answer(status, headers, body) => {
            let mut out = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (n, v) in headers {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
            out.push_str("\r\n");
            let _ = conn.write_all(out.as_bytes());
            let _ = conn.write_all(&body);
        }
    }
}

/// `data` as a file server answers a GET: the `Range` asked for (206), past the end (416),
/// or all of it.
fn ranged(seen: &Seen, data: &[u8]) -> Reply {
    let Some(range) = seen.header("range") else {
        return Reply::Answer(200, vec![], data.to_vec());
    };
    let (a, b) = range
        .trim_start_matches("bytes=")
        .split_once('-')
        .expect("a bytes=A-B range");
    let a: usize = a.parse().unwrap();
    if a >= data.len() {
        return Reply::Answer(416, vec![], Vec::new());
    }
    let b = b.parse::<usize>().unwrap().min(data.len() - 1);
    let cr = format!("bytes {a}-{b}/{}", data.len());
    Reply::Answer(
        206,
        vec![("Content-Range".into(), cr)],
        data[a..=b].to_vec(),
    )
}

const TREE: &str = "/api/models/org/demo/tree/main";
const RESOLVE: &str = "/org/demo/resolve/main/";

/// A git-stored file's tree entry (no sha256 in the listing).
fn git_entry(path: &str, size: u64) -> serde_json::Value {
    serde_json::json!({"type": "file", "oid": "0", "size": size, "path": path})
}

/// `wan manifest build hf://org/demo@main` against `hub`, with HF_TOKEN and `env`.
fn build_output(
    hub: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> std::process::Output {
    let mut cmd = Command::new(wan_bin());
    cmd.args([
        "manifest",
        "build",
        &format!("hf://{REPO}@main"),
        "--id",
        ID,
    ])
    .args(extra)
    .env("HF_ENDPOINT", hub)
    .env("HF_TOKEN", TOKEN);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(cmd, timeout)
}

/// [`build_output`]: whether it succeeded, its stdout and its stderr.
fn build_at(
    hub: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (bool, String, String) {
    let out = build_output(hub, extra, env, timeout);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A next page on another server (here another port) is not followed: HF_TOKEN goes with
/// every page, and redirects already keep it on HF_ENDPOINT's host.
#[test]
fn a_next_page_on_another_server_is_refused_and_gets_no_token() {
    let other = Scripted::start(|_, _| ok_json(serde_json::json!([])));
    let next = format!(
        "<{}{TREE}?recursive=true&cursor=2>; rel=\"next\"",
        other.url()
    );
    let hub = Scripted::start(move |s, _| match s.path() {
        TREE => {
            let tree = serde_json::json!([git_entry("config.json", 2)]);
            let body = serde_json::to_vec(&tree).unwrap();
            Reply::Answer(200, vec![("Link".into(), next.clone())], body)
        }
        _ => ranged(s, b"{}"),
    });
    let (ok, _, err) = build_at(&hub.url(), &[], &[], Duration::from_secs(30));
    assert!(
        other.seen().is_empty(),
        "the other server was asked (token {:?})",
        other.seen()[0].header("authorization")
    );
    assert!(!ok, "a listing continued on another server was taken");
    assert!(
        err.contains("another server") && err.contains(&other.url()) && err.contains(&hub.url()),
        "{err}"
    );
    // Nothing was downloaded either: the listing failed first.
    assert!(hub.seen_at(RESOLVE).is_empty());
}

/// A page that links to itself, or two that link to each other, end the build at once,
/// naming the cycle (it once ran 685 pages in 30 s and never ended).
#[test]
fn a_pagination_cycle_ends_the_build_naming_it() {
    let page = |cursor: &str| format!("{TREE}?recursive=true&cursor={cursor}");
    for (name, links) in [
        ("a page linking to itself", [("", "a"), ("a", "a")]),
        ("two pages linking to each other", [("", "a"), ("a", "b")]),
    ] {
        let map: Vec<(String, String)> = links
            .iter()
            .map(|(from, to)| (from.to_string(), page(to)))
            .collect();
        let hub = Scripted::start(move |s, _| {
            let cursor = s.target.split("cursor=").nth(1).unwrap_or("");
            // b links back to a.
            let to = map
                .iter()
                .find(|(from, _)| from == cursor)
                .map_or(page("a"), |(_, to)| to.clone());
            // Absolute, as the Hub writes them.
            let host = s.header("host").expect("a Host header");
            let link = format!("<http://{host}{to}>; rel=\"next\"");
            let body = serde_json::to_vec(&serde_json::json!([])).unwrap();
            Reply::Answer(200, vec![("Link".into(), link)], body)
        });
        let (ok, _, err) = build_at(&hub.url(), &[], &[], Duration::from_secs(30));
        assert!(!ok && err.contains("cycle"), "{name}: {err}");
        assert!(
            hub.seen().len() <= 3,
            "{name}: {} pages asked",
            hub.seen().len()
        );
    }
}

/// A listing request that never answers fails the build after the read timeout (and a few
/// retries), naming the URL; it once hung the build forever.
#[test]
fn a_stalled_listing_times_out_naming_the_url() {
    let hub = Scripted::start(|_, _| Reply::Stall);
    let t0 = std::time::Instant::now();
    let env = [("WAN_FETCH_READ_TIMEOUT_SECS", "1")];
    let (ok, _, err) = build_at(&hub.url(), &[], &env, Duration::from_secs(60));
    assert!(!ok, "{err}");
    assert!(
        err.contains(&format!("{}{TREE}", hub.url()))
            && err.contains("within 1 s")
            && err.contains("tried 5 times"),
        "{err}"
    );
    assert_eq!(hub.seen().len(), 5);
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}

/// Names and sizes no manifest could hold are refused at listing time, every one named,
/// before any file is fetched: `../x` and `/etc/passwd` were downloaded, with the token,
/// before the build refused them.
#[test]
fn a_hostile_listing_is_refused_before_any_download() {
    let long = "n".repeat(5000);
    let tree = serde_json::json!([
        git_entry("config.json", 2),
        git_entry("../x", 2),
        git_entry("/etc/passwd", 2),
        git_entry(&long, 2),
        {"type": "file", "oid": "0", "size": 134, "path": "huge.safetensors",
         "lfs": {"oid": sha256_hex(b"x"), "size": 9223372036854775808u64, "pointerSize": 134}},
    ]);
    let hub = Scripted::start(move |s, _| match s.path() {
        TREE => ok_json(tree.clone()),
        _ => ranged(s, b"{}"),
    });
    let (ok, out, err) = build_at(&hub.url(), &["--chunked"], &[], Duration::from_secs(30));
    assert!(!ok && out.is_empty(), "{err}");
    for want in [
        "file \"../x\": path must not contain '..'",
        "file \"/etc/passwd\": path must be relative",
        "NAME_MAX",
        "file \"huge.safetensors\": size 9223372036854775808",
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }
    assert!(
        hub.seen_at(RESOLVE).is_empty(),
        "files were fetched: {:?}",
        hub.seen_at(RESOLVE)
    );
}

/// A git-stored file is fetched and hashed at the size the listing gives: listed at 10 bytes
/// but 4096 long, it was written as a silently truncated entry. Now the build checks the
/// file ends where listed, and refuses either lie naming the file.
#[test]
fn a_file_of_another_size_than_listed_is_refused_naming_it() {
    let data = random_bytes(4096, 3);
    for (listed, want) in [(10, "longer"), (8192, "shorter")] {
        let data = data.clone();
        let tree = serde_json::json!([git_entry("config.json", listed)]);
        let hub = Scripted::start(move |s, _| match s.path() {
            TREE => ok_json(tree.clone()),
            _ => ranged(s, &data),
        });
        let (ok, out, err) = build_at(&hub.url(), &[], &[], Duration::from_secs(30));
        assert!(!ok && out.is_empty(), "listed {listed}: {out}{err}");
        assert!(
            err.contains("config.json")
                && err.contains(&format!("gives {listed} bytes"))
                && err.contains(want),
            "listed {listed}: {err}"
        );
    }
}

/// A throttled listing and a throttled download (429 with `Retry-After: 1`) are retried
/// after the wait asked for, and the build succeeds; a 429 ended it before.
#[test]
fn throttled_listing_and_downloads_wait_as_asked_and_succeed() {
    let config = b"{\"dim\": 64}\n".to_vec();
    let tree = serde_json::json!([git_entry("config.json", config.len() as u64)]);
    let data = config.clone();
    let hub = Scripted::start(move |s, n| {
        let throttle = || Reply::Answer(429, vec![("Retry-After".into(), "1".into())], Vec::new());
        match s.path() {
            TREE if n == 0 => throttle(),
            TREE => ok_json(tree.clone()),
            p if p.ends_with("config.json") && n == 0 => throttle(),
            _ => ranged(s, &data),
        }
    });
    let (ok, out, err) = build_at(&hub.url(), &[], &[], Duration::from_secs(30));
    assert!(ok, "{err}");
    let files = manifest_files(&out, ID);
    assert_eq!(
        (files[0].size, files[0].sha256.as_str()),
        (config.len() as u64, sha256_hex(&config).as_str())
    );
    for part in [TREE, "config.json"] {
        let seen = hub.seen_at(part);
        assert!(seen.len() >= 2, "{part}: {seen:?}");
        let waited = seen[1].at - seen[0].at;
        assert!(
            waited >= Duration::from_millis(950),
            "{part}: retried after {waited:?}"
        );
    }
}

/// Network errors name the URL and the cause, not `error sending request` or `builder error`.
#[test]
fn network_errors_name_the_url_and_the_cause() {
    let (ok, _, err) = build_at("127.0.0.1:9", &[], &[], Duration::from_secs(30));
    assert!(
        !ok && err.contains("HF_ENDPOINT \"127.0.0.1:9\"") && err.contains("http(s)"),
        "{err}"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let (ok, _, err) = build_at(&endpoint, &[], &[], Duration::from_secs(30));
    assert!(
        !ok && err.contains(&format!("GET {endpoint}{TREE}"))
            && err.to_lowercase().contains("connection refused"),
        "{err}"
    );
}
