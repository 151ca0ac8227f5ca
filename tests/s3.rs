//! The `s3://` source against a real S3-compatible server (moto, from PyPI) on 127.0.0.1:
//! ranged reads verified end to end, wrong credentials refused with a clear error, and a
//! missing object failing the read with EIO; and S3 as a scale-out origin: concurrent readers
//! of one object with many ranged GETs in flight at once. `.ci/run` installs `moto[server]`;
//! where it is missing, the tests that need it print `SKIP: …` and pass.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// True, after printing `SKIP: …`, where python3 cannot import `modules` (moto's server and
/// boto3, which `.ci/run` installs): the calling test returns, as the mount tests do without
/// FUSE.
fn no_python(modules: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip(&format!(
            "python3 cannot import {modules} (pip install 'moto[server]>=5,<6'; .ci/run \
             installs it)"
        ));
    }
    !found
}

/// [`no_python`] for what moto and the upload script need.
fn no_moto() -> bool {
    no_python("moto.server, boto3")
}

struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts moto with authentication enforced after the setup calls, uploads `dir`, and returns
/// the server and the credentials of its S3 user.
fn moto_with(dir: &Path, bucket: &str, prefix: &str) -> (Moto, String, String) {
    moto_enforcing(dir, bucket, prefix, true)
}

/// [`moto_with`], with authentication enforced or not: moto 5 refuses the signature of every
/// ListObjectsV2 once it enforces authentication (boto3's own included), so a listing test
/// runs it open.
fn moto_enforcing(dir: &Path, bucket: &str, prefix: &str, auth: bool) -> (Moto, String, String) {
    moto_with_keys(dir, bucket, prefix, auth, &[])
}

/// [`moto_enforcing`], with `empty_keys` put as zero-byte objects too.
fn moto_with_keys(
    dir: &Path,
    bucket: &str,
    prefix: &str,
    auth: bool,
    empty_keys: &[&str],
) -> (Moto, String, String) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env(
            "INITIAL_NO_AUTH_ACTION_COUNT",
            if auth { "3" } else { "1000000" },
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 with moto (pip install 'moto[server]') must be installed");
    let endpoint = format!("http://127.0.0.1:{port}");
    let moto = Moto { child, endpoint };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "moto_server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/s3_setup.py");
    let out = Command::new("python3")
        .arg(setup)
        .args([&moto.endpoint, bucket, prefix])
        .arg(dir)
        .args(empty_keys)
        .output()
        .expect("run s3_setup.py");
    assert!(
        out.status.success(),
        "s3 setup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = String::from_utf8(out.stdout).unwrap();
    let mut it = keys.split_whitespace();
    let (ak, sk) = (
        it.next().unwrap().to_string(),
        it.next().unwrap().to_string(),
    );
    (moto, ak, sk)
}

#[test]
fn s3_source_serves_verified_bytes_and_refuses_bad_credentials_and_missing_objects() {
    if no_fuse() {
        return;
    }
    if no_moto() {
        return;
    }
    let work = workdir();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data = write_random(&src.join("weights/model.safetensors"), 5 << 20, 42);
    let (moto, ak, sk) = moto_with(&src, "models", "wan22/s3m-v1");

    let source = "s3://models/wan22/s3m-v1".to_string();
    let opts = BuildOpts {
        chunk_size: Some(1 << 20),
        sources: vec![source.clone()],
        whole_only: false,
    };
    // A second file, written after the upload: listed in the manifest, absent from the bucket.
    std::fs::write(src.join("missing.bin"), b"not uploaded").unwrap();
    let entry = manifest_build(&src, "s3m@1.0.0", &opts);
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[entry]);

    let spec = |w: &Path, key: &str, secret: &str| {
        let mut config = test_config();
        config.fetch.read_timeout_secs = 5.0;
        MountSpec::new(w, &manifest)
            .config(config)
            .env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_ENDPOINT_URL", &moto.endpoint)
            .env("AWS_REGION", "us-east-1")
    };

    // Right credentials: ranged reads across chunk boundaries equal the uploaded bytes.
    let good = tempfile::tempdir().unwrap();
    {
        let m = Mount::start(spec(good.path(), &ak, &sk));
        let f = m.path("s3m@1.0.0/weights/model.safetensors");
        let got = read_range(&f, (1 << 20) - 100, 300_000).expect("read through s3");
        assert_bytes_eq(
            &got,
            &data[(1 << 20) - 100..(1 << 20) - 100 + 300_000],
            "s3 ranged read",
        );
        let all = std::fs::read(&f).expect("whole read");
        assert_bytes_eq(&all, &data, "s3 whole read");
        assert_eq!(wait_state(&f, "COMPLETE"), "COMPLETE");

        // The object that is not in the bucket: EIO, and the log says not found.
        let missing = m.path("s3m@1.0.0/missing.bin");
        assert_eio(std::fs::read(&missing), "missing object");
        assert!(
            m.log().contains("not found"),
            "log should say not found:\n{}",
            m.log()
        );
    }

    // Wrong credentials: EIO fast, and a clear error in the log.
    let bad = tempfile::tempdir().unwrap();
    let m = Mount::start(spec(bad.path(), &ak, "wrong-secret"));
    let f = m.path("s3m@1.0.0/weights/model.safetensors");
    let (r, took) = timed(|| read_range(&f, 0, 4096));
    assert_eio(r, "wrong credentials");
    assert!(
        took < Duration::from_secs(5),
        "denied reads must fail fast, took {took:?}"
    );
    assert!(
        m.log().contains("access denied"),
        "log should explain the denial:\n{}",
        m.log()
    );
}

/// `model_downloads_active` (chunk fetches in flight) from the mount's `.wan/metrics`.
fn downloads_active(m: &Mount) -> Option<u64> {
    let text = std::fs::read_to_string(m.path(".wan/metrics")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("model_downloads_active "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// How many TCP connections to 127.0.0.1:`port` are established now (client sides, from
/// /proc/net/tcp). The S3 client opens a connection only when no idle one is free, so N open at
/// once means about N requests were in flight together. Not an upper bound on them: a
/// connection whose answer was just read may not be back in the pool when the next request
/// starts, so the pool can grow past `fetch.connections` (seen: 25 with 16).
fn connections_to(port: u16) -> usize {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2].ends_with(&want) && f[3] == "01"
        })
        .count()
}

/// The sum of `wan_source_requests_total` samples with `result="ok"`.
fn ok_requests(m: &Mount) -> u64 {
    let text = std::fs::read_to_string(m.path(".wan/metrics")).expect("read .wan/metrics");
    text.lines()
        .filter(|l| l.starts_with("wan_source_requests_total{") && l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

const LOAD_MIB: usize = 1 << 20;
const LOAD_PART_KIB: u32 = 256;

/// The object of the load tests: `src/weights/big.bin`, 32 MiB and a bit, and its bytes.
fn load_object(src: &Path) -> Vec<u8> {
    write_random(&src.join("weights/big.bin"), 32 * LOAD_MIB + 4097, 43)
}

/// S3 as a scale-out origin: the object of [`load_object`], uploaded under
/// `s3://models/wan22/load` of the server at `endpoint`, read at once by sequential and random
/// readers through the mount, with 16 connections, small chunks and small parts, so many ranged
/// GETs are in flight against the server together. Every byte must be right and the cache must
/// end consistent (each chunk row matching the bytes on disk).
fn concurrent_readers(work: &Path, src: &Path, data: &[u8], endpoint: &str, ak: &str, sk: &str) {
    const MIB: usize = LOAD_MIB;
    const PART_KIB: u32 = LOAD_PART_KIB;
    let size = data.len();
    let opts = BuildOpts {
        chunk_size: Some(MIB as u64),
        sources: vec!["s3://models/wan22/load".into()],
        whole_only: false,
    };
    let entry = manifest_build(src, "load@1.0.0", &opts);
    let chunks = manifest_files(&entry, "load@1.0.0")[0].chunks.len();
    let manifest = work.join("models.toml");
    write_manifest(&manifest, &[entry]);
    let mut config = test_config();
    config.fetch.connections = 16;
    config.fetch.part_size_kib = PART_KIB.into();
    config.fetch.readahead_chunks = 8;
    // One S3 server on a small machine: let a slow answer be slow, not failed.
    config.fetch.request_timeout_secs = 10.0;
    config.fetch.read_timeout_secs = 30.0;
    let m = Mount::start(
        MountSpec::new(work, &manifest)
            .config(config)
            .env("AWS_ACCESS_KEY_ID", ak)
            .env("AWS_SECRET_ACCESS_KEY", sk)
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("AWS_REGION", "us-east-1"),
    );
    let f = m.path("load@1.0.0/weights/big.bin");

    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let ((max_active, max_conns), took) = timed(|| {
        std::thread::scope(|s| {
            // Samples the chunk fetches and the connections to S3 while the readers run.
            let sampler = s.spawn(|| {
                let (mut active, mut conns) = (0, 0);
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    active = active.max(downloads_active(&m).unwrap_or(0));
                    conns = conns.max(connections_to(port));
                    std::thread::sleep(Duration::from_millis(5));
                }
                (active, conns)
            });
            let mut readers = Vec::new();
            // Two sequential readers: the whole file at once, and 3 MiB at a time.
            readers.push(s.spawn(|| assert_bytes_eq(&std::fs::read(&f).unwrap(), data, "seq")));
            readers.push(s.spawn(|| {
                let file = std::fs::File::open(&f).unwrap();
                for off in (0..size).step_by(3 * MIB) {
                    let got = read_range_in(&file, off as u64, 3 * MIB).unwrap();
                    let want = &data[off..(off + 3 * MIB).min(size)];
                    assert_bytes_eq(&got, want, "sequential 3 MiB reads");
                }
            }));
            // Four random readers, each with its own fixed sequence of offsets and lengths.
            for t in 0..4u64 {
                let f = &f;
                readers.push(s.spawn(move || {
                    let file = std::fs::File::open(f).unwrap();
                    let draws = random_bytes(16 * 40, 100 + t);
                    for d in draws.chunks(16) {
                        let off = u64::from_le_bytes(d[..8].try_into().unwrap()) as usize % size;
                        let len =
                            1 + u64::from_le_bytes(d[8..].try_into().unwrap()) as usize % (2 * MIB);
                        let got = read_range_in(&file, off as u64, len).unwrap();
                        let want = &data[off..(off + len).min(size)];
                        assert_bytes_eq(&got, want, "random read");
                    }
                }));
            }
            for r in readers {
                r.join().expect("reader");
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            sampler.join().expect("sampler")
        })
    });
    let requests = ok_requests(&m);
    eprintln!(
        "s3 load: {size} bytes in {took:?} by 6 readers; {requests} ranged GETs; \
         at most {max_active} chunk fetches and {max_conns} connections to S3 at once"
    );
    // Every part of every chunk is its own GET.
    let parts = size.div_ceil(PART_KIB as usize * 1024) as u64;
    assert!(requests >= parts, "{requests} GETs for {parts} parts");
    assert!(
        max_conns >= 8,
        "expected many GETs in flight at once (16 connections allowed), saw at most {max_conns} connections"
    );
    assert_eq!(wait_state(&f, "COMPLETE"), "COMPLETE");
    let view = CacheView::new(&m.spec.cache_dir);
    assert_eq!(view.check_consistent(), Ok(chunks));
}

/// [`concurrent_readers`] against moto.
#[test]
fn s3_source_serves_concurrent_readers_with_many_ranged_gets_in_flight() {
    if no_fuse() {
        return;
    }
    if no_moto() {
        return;
    }
    let work = workdir();
    let src = work.path().join("src");
    let data = load_object(&src);
    let (moto, ak, sk) = moto_with(&src, "models", "wan22/load");
    concurrent_readers(work.path(), &src, &data, &moto.endpoint, &ak, &sk);
}

/// A throwaway Ceph (monitor, in-memory OSD, radosgw) started by tests/support/ceph_rgw.sh.
/// Dropping it stops its daemons, by the pids they wrote.
struct Ceph {
    dir: std::path::PathBuf,
    endpoint: String,
}

impl Ceph {
    /// Boots Ceph under `dir` with an S3 user `ak`/`sk`; `None` (after printing SKIP) where
    /// Debian's ceph-mon, ceph-osd and radosgw are not installed, or the cluster does not boot.
    fn start(dir: &Path, ak: &str, sk: &str) -> Option<Ceph> {
        let tools = [
            "monmaptool",
            "ceph",
            "ceph-mon",
            "ceph-osd",
            "radosgw",
            "radosgw-admin",
        ];
        let path = std::env::var_os("PATH").unwrap_or_default();
        let missing: Vec<&str> = tools
            .into_iter()
            .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "SKIP: no Ceph here ({} missing; apt-get install ceph-mon ceph-osd radosgw)",
                missing.join(", ")
            );
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ceph_rgw.sh");
        let (mon, rgw) = (free_port(), free_port());
        let mut ceph = Ceph {
            dir: dir.to_path_buf(),
            endpoint: String::new(),
        };
        let mut cmd = Command::new("bash");
        cmd.arg(script)
            .arg(dir)
            .args([mon.to_string(), rgw.to_string()])
            .args([ak, sk]);
        let out = run_with_timeout(cmd, Duration::from_secs(120));
        if !out.status.success() {
            // A cluster that does not boot here says nothing about wanfs: the same load runs
            // against moto above. Skip, saying why, as the systemd test does.
            eprintln!(
                "SKIP: the throwaway Ceph did not boot: {}\nlogs in {}",
                String::from_utf8_lossy(&out.stderr),
                dir.join("log").display()
            );
            return None;
        }
        ceph.endpoint = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Some(ceph)
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let pids: Vec<libc::pid_t> = std::fs::read_dir(self.dir.join("run"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
            .collect();
        // SAFETY: kill(2) of the daemons this test started, by the pids they wrote.
        let alive = |sig| {
            pids.iter()
                .filter(|p| unsafe { libc::kill(**p, sig) } == 0)
                .count()
        };
        alive(libc::SIGTERM);
        // Nothing to keep (the OSD holds its data in memory): a short grace, then SIGKILL.
        if !wait_until(Duration::from_secs(3), || alive(0) == 0) {
            alive(libc::SIGKILL);
        }
    }
}

/// [`concurrent_readers`] against Ceph's S3 gateway (radosgw, Debian's package), where Ceph is
/// installed. moto copies the whole object for every ranged GET; radosgw is a production S3
/// server, with its own HTTP stack (beast), chunked object storage and SigV4 checks.
#[test]
fn s3_source_serves_concurrent_readers_from_ceph_radosgw() {
    if no_fuse() {
        return;
    }
    // The upload script's client.
    if no_python("boto3") {
        return;
    }
    let work = workdir();
    let (ak, sk) = (
        "WANFSTESTACCESSKEY01",
        "wanfs-test-secret-key-for-radosgw-0001",
    );
    let Some(ceph) = Ceph::start(&work.path().join("ceph"), ak, sk) else {
        return;
    };
    let src = work.path().join("src");
    let data = load_object(&src);
    let put = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/s3_put.py");
    let mut cmd = Command::new("python3");
    cmd.arg(put)
        .args([&ceph.endpoint, ak, sk, "models", "wan22/load"])
        .arg(&src);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "upload to radosgw failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    concurrent_readers(work.path(), &src, &data, &ceph.endpoint, ak, sk);
}

/// Not a check: cold sequential reads of one 64 MiB file by a fresh daemon (default fetch
/// settings, 8 MiB chunks) from the test origin, through an nginx cache tier (cold, then warm),
/// from moto and, where Ceph is installed, from radosgw, for docs/BENCHMARKS.md. Run by hand,
/// with a release binary: `WAN_TEST_BIN=target/release/wan cargo test --test s3 -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_cold_read_origin_tier_and_s3() {
    if no_fuse() {
        return;
    }
    if no_moto() {
        return;
    }
    const MIB: usize = 1 << 20;
    let size = 64 * MIB;
    let work = workdir();
    let src = work.path().join("src");
    let data = &gen_files(&src, GEN, &[("w.bin", size)], 7)[0].1;
    let origin = Origin::start(&src);
    let Some(nginx) =
        common::nginx::Nginx::start(&work.path().join("nginx"), origin.addr(), 1 << 20)
    else {
        return;
    };
    let (moto, ak, sk) = moto_with(&src.join(GEN), "models", "bench");
    // Ceph's radosgw too, where it is installed (same keys as moto's user, same object).
    let ceph = Ceph::start(&work.path().join("ceph"), &ak, &sk);
    if let Some(ceph) = &ceph {
        let put = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/s3_put.py");
        let mut cmd = Command::new("python3");
        cmd.arg(put)
            .args([&ceph.endpoint, &ak, &sk, "models", "bench"])
            .arg(src.join(GEN));
        assert!(
            run_with_timeout(cmd, Duration::from_secs(60))
                .status
                .success()
        );
    }
    let mut config = test_config();
    config.fetch.request_timeout_secs = 30.0;
    config.fetch.read_timeout_secs = 60.0;
    let run = |name: &str, source: String, endpoint: &str| {
        let opts = BuildOpts {
            chunk_size: None,
            sources: vec![source],
            whole_only: false,
        };
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = dir.join("models.toml");
        write_manifest(&manifest, &[manifest_build(&src.join(GEN), GEN, &opts)]);
        let m = Mount::start(
            MountSpec::new(&dir, &manifest)
                .config(config.clone())
                .env("AWS_ACCESS_KEY_ID", &ak)
                .env("AWS_SECRET_ACCESS_KEY", &sk)
                .env("AWS_ENDPOINT_URL", endpoint)
                .env("AWS_REGION", "us-east-1"),
        );
        let (got, took) = timed(|| std::fs::read(m.path(&format!("{GEN}/w.bin"))).unwrap());
        assert_bytes_eq(&got, data, name);
        eprintln!(
            "bench {name}: {:.0} MB/s ({took:.2?} for {size} bytes)",
            size as f64 / took.as_secs_f64() / 1e6
        );
    };
    for round in 0..3 {
        let none = "";
        run(&format!("origin-{round}"), origin.base(GEN), none);
        let tier = if round == 0 { "tier-cold" } else { "tier-warm" };
        run(&format!("{tier}-{round}"), nginx.base(GEN), none);
        run(
            &format!("moto-{round}"),
            "s3://models/bench".into(),
            &moto.endpoint,
        );
        if let Some(ceph) = &ceph {
            run(
                &format!("radosgw-{round}"),
                "s3://models/bench".into(),
                &ceph.endpoint,
            );
        }
    }
}

/// `wan manifest build s3://bucket/prefix`: the listing (ListObjectsV2) names every object
/// under the prefix; S3 gives no sha256, so each is fetched and hashed, and gets the same
/// chunk digests as a local build of the same files, by default as with `--chunked`;
/// `--whole-only` lists whole-file digests only.
#[test]
fn manifest_build_from_an_s3_prefix_matches_a_local_build() {
    if no_moto() {
        return;
    }
    let work = workdir();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("weights/model.safetensors"), 3 << 20, 77);
    std::fs::write(src.join("config.json"), b"{\"dim\": 8}\n").unwrap();
    let (moto, ak, sk) = moto_enforcing(&src, "models", "wan22/built", false);
    let url = "s3://models/wan22/built";
    let build = |extra: &[&str]| {
        let mut cmd = Command::new(wan_bin());
        cmd.args(["manifest", "build", url, "--id", "s3b@1.0.0"])
            .args(extra)
            .env("AWS_ACCESS_KEY_ID", &ak)
            .env("AWS_SECRET_ACCESS_KEY", &sk)
            .env("AWS_ENDPOINT_URL", &moto.endpoint);
        let out = run_with_timeout(cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // Both with the CLI's default chunk hash, blake3-tree (the remote build names none).
    let local = manifest_build_with(
        &src,
        "s3b@1.0.0",
        &BuildOpts {
            chunk_size: Some(1 << 20),
            sources: vec![url.into()],
            whole_only: false,
        },
        &["--chunk-hash", "blake3-tree"],
    );
    let local = manifest_files(&local, "s3b@1.0.0");
    let chunked = manifest_files(
        &build(&["--chunked", "--chunk-size", "1048576"]),
        "s3b@1.0.0",
    );
    let default = manifest_files(&build(&["--chunk-size", "1048576"]), "s3b@1.0.0");
    let whole = manifest_files(&build(&["--whole-only"]), "s3b@1.0.0");
    assert_eq!(local.len(), 2);
    for (((l, c), d), w) in local.iter().zip(&chunked).zip(&default).zip(&whole) {
        assert_eq!(
            (&c.path, c.size, &c.sha256, &c.chunks),
            (&l.path, l.size, &l.sha256, &l.chunks)
        );
        assert_eq!(
            (&d.path, d.size, &d.sha256, &d.chunks),
            (&l.path, l.size, &l.sha256, &l.chunks),
            "a build downloads every object anyway: chunk lists by default"
        );
        assert!(!d.chunks.is_empty());
        assert_eq!((&w.path, &w.sha256), (&l.path, &l.sha256));
        assert!(
            w.chunks.is_empty(),
            "whole-file digests only with --whole-only"
        );
    }
}

/// What consoles and odd names leave in a bucket, built from: the zero-byte folder markers
/// (`prefix/`, `prefix/weights/`, and an empty folder's) are skipped, not listed as a file with
/// an empty path or one that clashes with its directory; keys holding `%`, `~` or `#` are
/// listed and fetched as themselves (`%` was "not found"); a key holding `\` is refused,
/// naming it, before anything is fetched (a manifest path cannot hold a backslash).
#[test]
fn manifest_build_from_s3_skips_folder_markers_and_takes_odd_keys() {
    if no_moto() {
        return;
    }
    let work = workdir();
    let src = work.path().join("src");
    let model = write_random(&src.join("weights/model.bin"), 100_000, 5);
    std::fs::write(src.join("100%.json"), b"{}\n").unwrap();
    std::fs::write(src.join("a~b#c.txt"), b"odd\n").unwrap();
    let (moto, ak, sk) = moto_with_keys(
        &src,
        "models",
        "wan22/odd",
        false,
        &[
            "wan22/odd/",
            "wan22/odd/weights/",
            "wan22/odd/empty/",
            "wan22/bad/sub/x\\y.bin",
        ],
    );
    let build = |url: &str| {
        let mut cmd = Command::new(wan_bin());
        cmd.args(["manifest", "build", url, "--id", "odd@1.0.0"])
            .env("AWS_ACCESS_KEY_ID", &ak)
            .env("AWS_SECRET_ACCESS_KEY", &sk)
            .env("AWS_ENDPOINT_URL", &moto.endpoint);
        run_with_timeout(cmd, Duration::from_secs(60))
    };
    let out = build("s3://models/wan22/odd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let files = manifest_files(&String::from_utf8(out.stdout).unwrap(), "odd@1.0.0");
    let got: Vec<(&str, u64, &str)> = files
        .iter()
        .map(|f| (f.path.as_str(), f.size, f.sha256.as_str()))
        .collect();
    let want = [
        ("100%.json", 3, sha256_hex(b"{}\n")),
        ("a~b#c.txt", 4, sha256_hex(b"odd\n")),
        ("weights/model.bin", 100_000, sha256_hex(&model)),
    ];
    let want: Vec<(&str, u64, &str)> = want.iter().map(|(p, n, s)| (*p, *n, s.as_str())).collect();
    assert_eq!(got, want);

    let out = build("s3://models/wan22/bad");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a key with a backslash was taken");
    assert!(
        stderr.contains("s3://models/wan22/bad")
            && stderr.contains(r#""sub/x\\y.bin""#)
            && stderr.contains("backslash"),
        "{stderr}"
    );
}

/// S3 errors name the endpoint and the cause (it once said `error sending request` and no
/// more), a server that refuses connections fails the build at once, and an endpoint that is
/// no URL is refused naming the variable (the S3 client panicked on it). Needs no server.
#[test]
fn s3_network_errors_name_the_endpoint_and_the_cause() {
    let port = free_port();
    let build = |endpoint: &str| {
        let mut cmd = Command::new(wan_bin());
        cmd.args(["manifest", "build", "s3://models/m", "--id", "m@1.0.0"])
            .env("AWS_ACCESS_KEY_ID", "k")
            .env("AWS_SECRET_ACCESS_KEY", "s")
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("RUST_BACKTRACE", "0");
        timed(|| run_with_timeout(cmd, Duration::from_secs(30)))
    };
    let (out, took) = build(&format!("http://127.0.0.1:{port}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("http://127.0.0.1:{port}/models"))
            && stderr.to_lowercase().contains("connection refused"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}: {stderr}");
    let (out, _) = build(&format!("127.0.0.1:{port}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(&format!(
                "AWS_ENDPOINT_URL \"127.0.0.1:{port}\" is not an http(s) URL"
            ))
            && !stderr.contains("panicked"),
        "{stderr}"
    );
}
