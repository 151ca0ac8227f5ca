//! The HTTP endpoint and the control files against hostile or careless clients, through a real
//! `wan mount` and its real HTTP endpoint: cross-site requests and DNS rebinding, stalled
//! connections and stalled blob downloads, bodies and query strings with fields a route does
//! not take, every refusal as a JSON error, range headers, IPv4 clients of a dual-stack
//! endpoint, forged log lines, and the metric series alerts need from the first scrape.
//!
//! Clients here are raw `TcpStream`s on 127.0.0.1, so each test controls every header byte.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const KIB: usize = 1024;
const CS: u64 = 256 * 1024;

/// A daemon over a generated model with its HTTP endpoint at `addr` (`{port}` is replaced by a
/// free port); returns it and the address to connect to on 127.0.0.1.
fn start(setup: &GenSetup, addr: &str) -> (Mount, SocketAddr) {
    let port = free_port();
    let mut config = test_config();
    config.http.addr = addr.replace("{port}", &port.to_string());
    let mount = Mount::start(setup.spec(config));
    (mount, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// One HTTP/1.1 exchange: `head` is the request line and headers (without the blank line).
/// Returns the status and the body.
fn exchange(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    let (status, _, body) = exchange_bytes(addr, head, body.as_bytes());
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// [`exchange`] with the response's head (status line and headers) and its body as bytes.
fn exchange_bytes(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let len = if body.is_empty() && head.starts_with("GET") {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    write!(s, "{head}\r\n{len}Connection: close\r\n\r\n").expect("send request head");
    // A body the daemon refuses part way (too large) is cut short by its close: what it
    // answered is still read below.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&out)));
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    (status, head, out[end + 4..].to_vec())
}

/// The value of header `name` in a response head.
fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
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
    if no_fuse() {
        return;
    }
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
    if no_fuse() {
        return;
    }
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
    if no_fuse() {
        return;
    }
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
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("a.bin", 100 * KIB)], CS, 6004);
    let d = Mount::start(setup.spec(test_config()));
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
    if no_fuse() {
        return;
    }
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

/// The JSON of a daemon answer; panics naming what answered otherwise.
#[track_caller]
fn json_of(what: &str, body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body:?}"))
}

#[test]
fn bulk_calls_name_their_models_and_no_route_drops_a_field() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("a.bin", 300 * KIB)], CS, 6007);
    let (d, addr) = start(&setup, "127.0.0.1:{port}");
    let here = addr.to_string();
    let file = setup.mounted(&d, "a.bin");
    fs::read(&file).expect("read");
    assert_eq!(wait_state(&file, "COMPLETE"), "COMPLETE");
    let post = |path: &str, body: &str| {
        exchange(
            addr,
            &format!("POST {path} HTTP/1.1\r\nHost: {here}\r\nContent-Type: application/json"),
            body,
        )
    };
    let model = || {
        let (code, body) = get(addr, &format!("/models/{GEN}"), &here);
        assert_eq!(code, 200, "{body}");
        json_of("GET /models/ID", &body)
    };

    // Each is refused with 400, saying what was wrong, and nothing starts: a typo'd field, no
    // body, an empty selection, a flag the route does not take, a query key it does not take.
    let ensure_one = format!("/models/{GEN}/ensure?forse=true");
    let pin = format!("/models/{GEN}/pin");
    let refused: &[(&str, &str, &[&str])] = &[
        ("/ensure", r#"{"idz": []}"#, &["idz", "ids", "all", "force"]),
        ("/ensure", "", &["ids", "all"]),
        ("/ensure", "{}", &["ids", "all"]),
        ("/ensure", r#"{"ids": []}"#, &["ids", "all"]),
        ("/ensure", r#"{"all": false}"#, &["ids", "all"]),
        (
            "/ensure",
            r#"{"ids": ["gen@1.0.0"], "all": true}"#,
            &["not both"],
        ),
        (
            "/verify",
            r#"{"all": true, "force": true}"#,
            &["force", "report_only"],
        ),
        ("/mark-corrupted", r#"{"all": true}"#, &["all", "ids"]),
        ("/mark-corrupted", "", &["ids"]),
        (&ensure_one, "", &["forse", "force"]),
        (&pin, r#"{"force": true}"#, &["force"]),
        // A typo'd dry_run must not be an aggressive GC for real.
        (
            "/gc?mode=aggressive&dryrun=true",
            "",
            &["dryrun", "dry_run"],
        ),
    ];
    for (path, body, says) in refused {
        let (code, text) = post(path, body);
        assert_eq!(code, 400, "POST {path} {body:?}: {text}");
        let error = json_of(path, &text)["error"]
            .as_str()
            .unwrap_or_else(|| panic!("POST {path}: no error text: {text}"))
            .to_owned();
        for word in *says {
            assert!(
                error.contains(word),
                "POST {path} {body:?}: {error:?} does not say {word:?}"
            );
        }
    }
    for path in [
        "/models?state=CORRUPT",
        "/events?limitt=5",
        "/health?verbose=1",
    ] {
        let (code, text) = get(addr, path, &here);
        assert_eq!(code, 400, "GET {path}: {text}");
        assert!(json_of(path, &text)["error"].is_string(), "{text}");
    }
    let m = model();
    assert_eq!(
        m["job"],
        serde_json::Value::Null,
        "a refused call started a job: {m:#}"
    );
    assert_eq!(m["state"], "COMPLETE", "a refused call dropped data: {m:#}");
    assert_eq!(m["pinned"], false);

    // Said outright, every model; ids, those.
    let (code, text) = post("/ensure", r#"{"all": true}"#);
    assert_eq!(code, 202, "{text}");
    assert_eq!(
        json_of("/ensure", &text)["started"],
        serde_json::json!([GEN])
    );
    assert!(wait_until(
        Duration::from_secs(10),
        || model()["job"]["state"] == "done"
    ));
    let (code, text) = post(
        "/verify",
        &format!(r#"{{"ids": ["{GEN}"], "report_only": true}}"#),
    );
    assert_eq!(code, 202, "{text}");
    assert!(wait_until(Duration::from_secs(10), || {
        let m = model();
        m["job"]["kind"] == "verify" && m["job"]["state"] == "done"
    }));
    let (code, text) = post(&pin, "{}");
    assert_eq!(code, 200, "an empty object is no field: {text}");
    assert_eq!(model()["pinned"], true);
}

#[test]
fn every_refusal_is_a_json_error_and_ranges_may_carry_spaces() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("a.bin", 300 * KIB)], CS, 6008);
    let (d, addr) = start(&setup, "127.0.0.1:{port}");
    let here = addr.to_string();
    let file = setup.mounted(&d, "a.bin");
    fs::read(&file).expect("read");
    assert_eq!(wait_state(&file, "COMPLETE"), "COMPLETE");
    let blob = format!("/blobs/{}", setup.file("a.bin").sha256);
    let json = "\r\nContent-Type: application/json";
    let too_large = "x".repeat((1 << 20) + 1);
    let cases: Vec<(String, &str, u16)> = vec![
        (format!("POST /ensure HTTP/1.1{json}"), r#"{"ids": "#, 400),
        (
            "POST /ensure HTTP/1.1".into(),
            r#"{"ids": ["gen@1.0.0"]}"#,
            415,
        ),
        (format!("POST /ensure HTTP/1.1{json}"), &too_large, 413),
        ("GET /nowhere HTTP/1.1".into(), "", 404),
        ("POST /nowhere HTTP/1.1".into(), "", 404),
        ("GET /ensure HTTP/1.1".into(), "", 405),
        (format!("POST /models/{GEN} HTTP/1.1"), "", 405),
        (format!("DELETE /models/{GEN}/pin HTTP/1.1"), "", 405),
        ("GET /events?limit=many HTTP/1.1".into(), "", 400),
        ("GET /models/%FF HTTP/1.1".into(), "", 400),
        ("GET /models/nope@1.0.0 HTTP/1.1".into(), "", 404),
        ("GET /blobs/xyz HTTP/1.1".into(), "", 400),
        (
            format!("GET {blob} HTTP/1.1\r\nRange: bytes=999999999-"),
            "",
            416,
        ),
        (
            format!("GET {blob} HTTP/1.1\r\nRange: bytes=0-1, 5-6"),
            "",
            416,
        ),
    ];
    for (head, body, want) in &cases {
        let line = head.lines().next().unwrap_or_default();
        let head = head.replacen("\r\n", &format!("\r\nHost: {here}\r\n"), 1);
        let head = if head.contains("Host:") {
            head
        } else {
            format!("{head}\r\nHost: {here}")
        };
        let (code, resp_head, text) = exchange_bytes(addr, &head, body.as_bytes());
        let text = String::from_utf8_lossy(&text);
        assert_eq!(code, *want, "{line}: {resp_head}\n{text}");
        let kind = header_of(&resp_head, "content-type").unwrap_or_default();
        assert!(
            kind.starts_with("application/json"),
            "{line}: {code} as {kind:?}: {text:?}"
        );
        let error = json_of(line, &text)["error"].as_str().map(str::to_owned);
        assert!(
            error.as_deref().is_some_and(|e| !e.is_empty()),
            "{line}: {code} without an error text: {text}"
        );
        if *want == 405 {
            let allow = header_of(&resp_head, "allow").expect("405 with Allow");
            assert!(
                error.unwrap().contains(&format!("use {allow}")),
                "{line}: does not say which method ({allow}): {text}"
            );
        }
    }

    // RFC 9110 lets a range set carry spaces and empty elements: still one range.
    let data = setup.data("a.bin");
    for range in [
        "bytes= 0-10",
        "bytes=0-10 ",
        "bytes=\t0-10,",
        "Bytes=0-10",
        "bytes= , 0-10",
    ] {
        let (code, resp_head, body) = exchange_bytes(
            addr,
            &format!("GET {blob} HTTP/1.1\r\nHost: {here}\r\nRange: {range}"),
            b"",
        );
        assert_eq!(code, 206, "Range: {range:?}: {resp_head}");
        assert_eq!(
            header_of(&resp_head, "content-range"),
            Some(&*format!("bytes 0-10/{}", data.len()))
        );
        assert_bytes_eq(&body, &data[..11], range);
    }
}

/// The daemon's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

#[test]
fn stalled_blob_downloads_leave_room_for_control_calls() {
    if no_fuse() {
        return;
    }
    const STALLED: usize = 140;
    const MIB: u64 = 1 << 20;
    // Larger than what the socket buffers of a client that never reads take.
    let size = 16 << 20;
    let setup = GenSetup::new(&[("big.bin", size)], 4 * MIB, 6009);
    let (d, addr) = start(&setup, "127.0.0.1:{port}");
    let here = addr.to_string();
    let file = setup.mounted(&d, "big.bin");
    assert_bytes_eq(
        &fs::read(&file).expect("read"),
        setup.data("big.bin"),
        "big.bin",
    );
    assert_eq!(wait_state(&file, "COMPLETE"), "COMPLETE");
    let blob = format!("/blobs/{}", setup.file("big.bin").sha256);
    let fetch_blob = || exchange_bytes(addr, &format!("GET {blob} HTTP/1.1\r\nHost: {here}"), b"");
    // One whole blob first, so what its serving allocates once is in the baseline.
    let (code, _, body) = fetch_blob();
    assert_eq!(code, 200);
    assert_bytes_eq(&body, setup.data("big.bin"), "blob before the stall");
    let fds = |pid: u32| fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |r| r.count());
    let (fds_before, rss_before) = (fds(d.pid()), rss(d.pid()));

    // Clients that ask for the blob and never read a byte of it.
    let stalled: Vec<TcpStream> = (0..STALLED)
        .map(|_| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            write!(s, "GET {blob} HTTP/1.1\r\nHost: {here}\r\n\r\n").expect("send request");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();

    // Control calls are answered at once, a read and a mutation.
    let (code, body) = get(addr, "/health", &here);
    assert_eq!(code, 200, "{body}");
    let (code, body) = exchange(
        addr,
        &format!("POST /gc?dry_run=true HTTP/1.1\r\nHost: {here}"),
        "",
    );
    assert_eq!(code, 200, "{body}");
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "control calls took {waited:?}"
    );
    // Another blob is refused at once while every blob place is taken, and says so.
    let (code, head, body) = fetch_blob();
    assert_eq!(code, 503, "{head}");
    assert!(header_of(&head, "retry-after").is_some(), "{head}");
    assert!(json_of("503", &String::from_utf8_lossy(&body))["error"].is_string());
    let grown = rss(d.pid()).saturating_sub(rss_before);
    assert!(
        grown < 48 * MIB,
        "{STALLED} stalled blob downloads grew the daemon by {} MiB",
        grown / MIB
    );
    let (_, metrics) = get(addr, "/metrics", &here);
    let busy = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wan_peer_requests_total{result=\"busy\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no busy count:\n{metrics}"));
    assert!(busy >= 1.0, "refusals for want of a place are not counted");

    // The stalled answers are given up within the stall timeout (10 s) and a margin: their
    // connections and places come back, and a blob is served whole again.
    let recovered = wait_until(Duration::from_secs(25), || fds(d.pid()) <= fds_before + 5);
    assert!(
        recovered,
        "the daemon still holds {} descriptors after {:?} ({fds_before} before the stall)",
        fds(d.pid()),
        t0.elapsed()
    );
    let (code, _, body) = fetch_blob();
    assert_eq!(code, 200);
    assert_bytes_eq(&body, setup.data("big.bin"), "blob after the stall");
    assert!(
        !log_lines(&d, "took no byte of its answer").is_empty(),
        "the give-ups are not logged:\n{}",
        d.log()
    );
    drop(stalled);
}
