//! The HTTP endpoint and the control files against hostile or careless clients, through a real
//! `wan mount` and its real HTTP endpoint: cross-site requests and DNS rebinding, stalled
//! connections, IPv4 clients of a dual-stack endpoint, forged log lines, and the metric series
//! alerts need from the first scrape.
//!
//! Clients here are raw `TcpStream`s on 127.0.0.1, so each test controls every header byte.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const KIB: usize = 1024;
const CS: u64 = 256 * 1024;

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A daemon over a generated model with its HTTP endpoint at `addr` (`{port}` is replaced by a
/// free port); returns it and the address to connect to on 127.0.0.1.
fn start(setup: &GenSetup, addr: &str) -> (Mount, SocketAddr) {
    let port = free_port();
    let config = WanConfig {
        http_addr: addr.replace("{port}", &port.to_string()),
        ..WanConfig::default()
    };
    let mount = Mount::start(setup.spec(config));
    (mount, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// One HTTP/1.1 exchange: `head` is the request line and headers (without the blank line).
/// Returns the status and the body.
fn exchange(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let len = if body.is_empty() && head.starts_with("GET") {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    write!(s, "{head}\r\n{len}Connection: close\r\n\r\n{body}").expect("send request");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read response");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

fn get(addr: SocketAddr, path: &str, host: &str) -> (u16, String) {
    exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: {host}"), "")
}

/// The daemon's log lines that contain `needle`.
fn log_lines(mount: &Mount, needle: &str) -> Vec<String> {
    mount
        .log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn cross_site_mutations_and_foreign_hosts_are_refused() {
    let setup = GenSetup::new(&[("a.bin", 300 * KIB)], CS, 6001);
    let (d, addr) = start(&setup, "127.0.0.1:{port}");
    let here = addr.to_string();
    let file = setup.mounted(&d, "a.bin");
    assert_bytes_eq(
        &fs::read(&file).expect("read"),
        setup.data("a.bin"),
        "a.bin",
    );
    assert_eq!(wait_state(&file, "COMPLETE"), "COMPLETE");

    // A page on evil.example POSTing to the endpoint: the browser adds its Origin.
    let evict =
        format!("POST /models/{GEN}/evict HTTP/1.1\r\nHost: {here}\r\nOrigin: http://evil.example");
    let (code, body) = exchange(addr, &evict, "");
    assert_eq!(code, 403, "cross-site evict: {body}");
    assert!(body.contains("cross-site"), "the refusal says why: {body}");
    assert_eq!(state(&file), "COMPLETE", "a refused evict evicted");
    let gc = format!(
        "POST /gc?mode=aggressive HTTP/1.1\r\nHost: {here}\r\nOrigin: http://localhost:3000"
    );
    let (code, body) = exchange(addr, &gc, "");
    assert_eq!(
        code, 403,
        "a page on another local port is another origin: {body}"
    );
    assert_eq!(state(&file), "COMPLETE", "a refused gc evicted");

    // DNS rebinding: evil.example resolves to 127.0.0.1, and the browser says so in Host.
    for path in ["/health", "/metrics", "/models", "/nowhere"] {
        let (code, body) = get(addr, path, "evil.example");
        assert_eq!(code, 403, "GET {path} for Host evil.example: {body}");
        assert!(body.contains("Host"), "{body}");
    }
    let rebound = format!(
        "POST /gc?mode=aggressive HTTP/1.1\r\nHost: evil.example:{}",
        addr.port()
    );
    assert_eq!(exchange(addr, &rebound, "").0, 403);
    assert_eq!(state(&file), "COMPLETE");

    // Loopback names, with or without port, still answer.
    for host in [
        here.clone(),
        "127.0.0.1".to_owned(),
        format!("localhost:{}", addr.port()),
        "LocalHost".to_owned(),
        format!("[::1]:{}", addr.port()),
        "[::1]".to_owned(),
    ] {
        let (code, body) = get(addr, "/health", &host);
        assert_eq!(code, 200, "GET /health for Host {host}: {body}");
    }
    // Mutations without Origin (curl, the CLI) and from the endpoint's own origin still work.
    let dry = format!("POST /gc?dry_run=true HTTP/1.1\r\nHost: {here}");
    assert_eq!(exchange(addr, &dry, "").0, 200);
    let same = format!("POST /gc?dry_run=true HTTP/1.1\r\nHost: {here}\r\nOrigin: http://{here}");
    assert_eq!(exchange(addr, &same, "").0, 200);
    let (code, body) = exchange(
        addr,
        &format!("POST /models/{GEN}/evict HTTP/1.1\r\nHost: {here}"),
        "",
    );
    assert_eq!(code, 200, "evict from a plain loopback client: {body}");
    assert_eq!(wait_state(&file, "NOT_PRESENT"), "NOT_PRESENT");

    // The refusals are logged, and a long path the client chose is cut in the log.
    let long = "x".repeat(20_000);
    let (code, _) = exchange(
        addr,
        &format!(
            "POST /models/{long}/evict HTTP/1.1\r\nHost: {here}\r\nOrigin: http://evil.example"
        ),
        "",
    );
    assert_eq!(code, 403);
    let refused = log_lines(&d, "cross-site");
    assert!(refused.len() >= 3, "refusals not logged:\n{}", d.log());
    assert!(
        refused.iter().all(|l| l.len() < 1000),
        "a refusal line carries the client's whole path: {} bytes",
        refused.iter().map(String::len).max().unwrap_or(0)
    );
    assert!(!log_lines(&d, "foreign Host").is_empty(), "{}", d.log());
}

#[test]
fn stalled_clients_neither_exhaust_the_daemon_nor_stay_open() {
    const STALLED: usize = 300;
    let setup = GenSetup::new(&[("cold.bin", 600 * KIB)], CS, 6002);
    let (d, addr) = start(&setup, "127.0.0.1:{port}");
    let fds = |pid: u32| fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |r| r.count());
    let before = fds(d.pid());

    // A client that sends its head, then half of its body, then nothing.
    let mut slow_body = TcpStream::connect(addr).expect("connect");
    write!(
        slow_body,
        "POST /ensure HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 100\r\n\r\n{{\"ids\":"
    )
    .unwrap();
    // Give the daemon time to read that head: a connection whose head is not read yet is one
    // the endpoint may shed when full, which is what the stalled clients below are for.
    std::thread::sleep(Duration::from_millis(500));
    // Clients that send half a request line and stall, or connect and send nothing.
    let mut stalled: Vec<TcpStream> = (0..STALLED)
        .map(|i| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            if i % 2 == 0 {
                s.write_all(b"GET /hea").expect("half a request");
            }
            s
        })
        .collect();
    let t0 = Instant::now();

    // A fresh client is answered at once, and a cold read (which needs descriptors for the
    // blob and the origin) works.
    let (code, body) = get(addr, "/health", &addr.to_string());
    assert_eq!(code, 200, "{body}");
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(3), "/health took {waited:?}");
    let got = read_fresh(&setup.mounted(&d, "cold.bin"));
    assert_bytes_eq(
        &got,
        setup.data("cold.bin"),
        "cold read while clients stall",
    );
    let during = fds(d.pid());
    assert!(
        during < before + 200,
        "the daemon holds {during} descriptors with {STALLED} stalled clients ({before} before)"
    );

    // Within the read timeout (10 s) and a margin, every stalled connection is closed.
    let deadline = t0 + Duration::from_secs(20);
    let mut open = STALLED;
    while open > 0 && Instant::now() < deadline {
        open = 0;
        for s in &mut stalled {
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            let mut b = [0u8; 256];
            match s.read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => open += 1,
                _ => {} // EOF, a reset or a 408: closed by the daemon
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        open,
        0,
        "{open} stalled connections still open after {:?}",
        t0.elapsed()
    );
    slow_body
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = slow_body.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "slow body: {answer:?}");
    let (code, _) = get(addr, "/health", "localhost");
    assert_eq!(code, 200);
}

/// Reads a whole file with the page cache dropped first.
fn read_fresh(path: &Path) -> Vec<u8> {
    drop_page_cache(path);
    fs::read(path).expect("read through the mount")
}

#[test]
fn ipv4_clients_of_a_dual_stack_endpoint_are_loopback() {
    let setup = GenSetup::new(&[("a.bin", 100 * KIB)], CS, 6003);
    let (d, addr) = start(&setup, "[::]:{port}");
    // 127.0.0.1 reaches a [::] listener as ::ffff:127.0.0.1.
    let (code, body) = exchange(
        addr,
        &format!("POST /gc?dry_run=true HTTP/1.1\r\nHost: {addr}"),
        "",
    );
    assert_eq!(
        code,
        200,
        "POST from 127.0.0.1 to [::]: {body}\n{}",
        d.log()
    );
}

#[test]
fn control_writes_are_logged_on_one_bounded_line() {
    let setup = GenSetup::new(&[("a.bin", 100 * KIB)], CS, 6004);
    let d = Mount::start(setup.spec(WanConfig::default()));
    let write = |name: &str, data: &[u8]| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(d.path(&format!(".wan/{name}")))
            .expect("open control file");
        f.write_all(data)
    };
    let forged =
        "nosuch\n2026-01-01T00:00:00.000000Z  INFO wanfs::control: FORGED ensure completed";
    assert!(
        write("ensure", forged.as_bytes()).is_err(),
        "a bad id is refused"
    );
    let big = vec![b'a'; 1 << 20];
    assert!(write("pin", &big).is_err(), "a 1 MiB id is refused");

    let log = d.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("FORGED") && !l.contains("control write refused")),
        "a write forged a log line:\n{log}"
    );
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("control write refused"))
        .collect();
    assert!(refused.len() >= 2, "refusals not logged:\n{log}");
    let longest = refused.iter().map(|l| l.len()).max().unwrap();
    assert!(longest < 1000, "a refusal line of {longest} bytes");
    assert!(log.len() < 64 * 1024, "the log grew to {} bytes", log.len());
    assert!(
        refused.iter().any(|l| l.contains("bytes)")),
        "a cut input says how long it was:\n{}",
        refused.join("\n")
    );
}

#[test]
fn metrics_show_alert_series_at_zero_from_the_start() {
    let setup = GenSetup::new(&[("a.bin", 100 * KIB)], CS, 6005);
    let (d, addr) = start(&setup, "127.0.0.1:{port}");
    // Per model: its downloads and their durations; per source (the model's only one): its
    // bytes and each result of its requests; per FUSE operation: latency and errors.
    let series = |model: &str| {
        let source = setup.origin.base(model);
        let mut want = vec![
            format!("model_downloads_total{{model=\"{model}\",status=\"failed\"}} 0"),
            format!("model_downloads_total{{model=\"{model}\",status=\"success\"}} 0"),
            format!("model_download_duration_seconds_bucket{{model=\"{model}\",le=\"+Inf\"}} 0"),
            format!("model_download_duration_seconds_count{{model=\"{model}\"}} 0"),
            format!("wan_source_bytes_total{{source=\"{source}\"}} 0"),
        ];
        for result in ["ok", "error", "wrong_bytes"] {
            want.push(format!(
                "wan_source_requests_total{{result=\"{result}\",source=\"{source}\"}} 0"
            ));
        }
        for op in ["lookup", "open", "read", "getxattr", "readdir", "statfs"] {
            want.push(format!("wan_fuse_errors_total{{op=\"{op}\"}} 0"));
            want.push(format!(
                "wan_fuse_request_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}}"
            ));
        }
        for kind in [
            "source",
            "integrity",
            "read",
            "read_timeout",
            "store",
            "verify",
        ] {
            want.push(format!("model_errors_total{{kind=\"{kind}\"}} 0"));
        }
        want
    };
    // A line, or (a latency bucket, whose count the scrape itself may have raised) its start.
    let has = |text: &str, want: &str| {
        text.lines()
            .any(|l| l == want || (want.ends_with('}') && l.starts_with(want)))
    };
    let (code, text) = get(addr, "/metrics", "localhost");
    assert_eq!(code, 200);
    for line in series(GEN) {
        assert!(has(&text, &line), "{line} missing:\n{text}");
    }
    assert!(
        text.contains("# TYPE model_storage_capacity_bytes gauge"),
        "capacity is not a gauge:\n{text}"
    );

    // A model added by a reload has its series at once too.
    let added = "added@1.0.0";
    let src = setup.work.path().join("src");
    gen_files(&src, added, &[("b.bin", 10 * KIB)], 6006);
    let entry = manifest_build(
        &src.join(added),
        added,
        &BuildOpts {
            chunk_size: Some(CS),
            sources: vec![setup.origin.base(added)],
            whole_only: false,
        },
    );
    write_manifest(&setup.manifest, &[setup.entry.clone(), entry]);
    // SAFETY: kill(2) on the pid of the daemon this test started.
    unsafe { libc::kill(d.pid() as libc::pid_t, libc::SIGHUP) };
    let mut last = String::new();
    let reloaded = wait_until(Duration::from_secs(10), || {
        last = get(addr, "/metrics", "localhost").1;
        series(added).iter().all(|want| has(&last, want))
    });
    assert!(
        reloaded,
        "series of {added} missing after reload:\n{last}\n{}",
        d.log()
    );
}
