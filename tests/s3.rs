//! The `s3://` source against a real S3-compatible server (moto, from PyPI) on 127.0.0.1:
//! ranged reads verified end to end, wrong credentials refused with a clear error, and a
//! missing object failing the read with EIO. `.ci/run` installs `moto[server]`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts moto with authentication enforced after the setup calls, uploads `dir`, and returns
/// the server and the credentials of its S3 user.
fn moto_with(dir: &Path, bucket: &str, prefix: &str) -> (Moto, String, String) {
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
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
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
        MountSpec::new(w, &manifest)
            .config(WanConfig {
                read_timeout_secs: 5.0,
                ..WanConfig::default()
            })
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
