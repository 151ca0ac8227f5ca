//! `wan models` and the daemon's endpoint, through the real binary: the token it sends under
//! `http.require_token` (read from the variable the config names, as the daemon reads it),
//! the explicit "every model" it sends for `--all`, what it says when no daemon answers and
//! the cache cannot be opened either, and usage errors that exit 2.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use wanfs::config::{Config, HttpConfig};

const KIB: usize = 1024;
const CS: u64 = 256 * 1024;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `wan models --config CONFIG --manifest M --cache-dir C ARGS` with no `WAN_*` of the
/// caller's environment, plus `env`.
fn models(config: &Path, spec: &MountSpec, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(wan_bin());
    cmd.arg("models")
        .arg("--config")
        .arg(config)
        .arg("--manifest")
        .arg(&spec.manifest)
        .arg("--cache-dir")
        .arg(&spec.cache_dir)
        .args(args)
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("WAN_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(cmd, Duration::from_secs(60))
}

/// The `[http]` section a daemon and its CLI share, at `addr`.
fn http_config(addr: &str) -> HttpConfig {
    HttpConfig {
        addr: addr.to_owned(),
        require_token: true,
        token_env: "WAN_TEST_CLI_TOKEN".into(),
    }
}

/// A config file of the CLI at `path` with only `http` set.
fn cli_config(path: &Path, http: HttpConfig) {
    let config = Config {
        http,
        ..Config::default()
    };
    write_config(path, &config);
}

/// `GET /models/ID` through the CLI's own view: `wan models --json status --only ID`.
fn pinned(config: &Path, spec: &MountSpec, env: &[(&str, &str)]) -> bool {
    let out = models(config, spec, env, &["--json", "status", "--only", GEN]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}{}", text(&out.stdout), text(&out.stderr)));
    v[0]["pinned"].as_bool().expect("pinned")
}

#[test]
fn under_require_token_the_cli_sends_the_token_its_config_names() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("a.bin", 300 * KIB)], CS, 7001);
    let addr = format!("127.0.0.1:{}", free_port());
    let secret = "tok-cli-5e1d-SECRET";
    let mut config = test_config();
    config.http = http_config(&addr);
    let d = Mount::start(setup.spec(config).env("WAN_TEST_CLI_TOKEN", secret));
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(
            &addr
        )
        .is_ok()),
        "HTTP endpoint {addr} never answered:\n{}",
        d.log()
    );
    let cli_config = setup.work.path().join("cli.toml");
    self::cli_config(&cli_config, http_config(&addr));
    let spec = &d.spec;
    let with_token = [("WAN_TEST_CLI_TOKEN", secret)];

    // The operator's shell has the token: the CLI on the host gets in.
    let out = models(&cli_config, spec, &with_token, &["pin", GEN]);
    assert!(
        out.status.success(),
        "pin with the token: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(pinned(&cli_config, spec, &[]), "reads need no token");
    // `--all` goes as the explicit form the daemon takes.
    for args in [["ensure", "--all"], ["verify", "--all"]] {
        let out = models(&cli_config, spec, &with_token, &args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    // No token, or a wrong one: refused, saying what is needed (the header, the variable),
    // never the token, and not offering loopback, which require_token shuts.
    for env in [&[][..], &[("WAN_TEST_CLI_TOKEN", "wrong")][..]] {
        let out = models(&cli_config, spec, env, &["unpin", GEN]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "unpin with {env:?}: {err}");
        for says in [
            "Authorization: Bearer",
            "WAN_TEST_CLI_TOKEN",
            "require_token",
        ] {
            assert!(
                err.contains(says),
                "with {env:?}, {err:?} does not say {says:?}"
            );
        }
        assert!(!err.contains("loopback"), "with {env:?}: {err}");
        assert!(!err.contains(secret), "the token leaked: {err}");
        if env.is_empty() {
            assert!(err.contains("not set"), "says the CLI had none: {err}");
        }
    }
    assert!(pinned(&cli_config, spec, &[]), "a refused unpin acted");
}

#[test]
fn without_a_daemon_the_cli_says_where_it_looked_and_why_the_cache_failed() {
    let work = workdir();
    let spec = MountSpec::new(work.path(), &work.path().join("missing-models.toml"));
    let port = free_port();
    let config = work.path().join("cli.toml");
    cli_config(
        &config,
        HttpConfig {
            addr: format!("127.0.0.1:{port}"),
            ..HttpConfig::default()
        },
    );
    let out = models(&config, &spec, &[], &["status"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for says in [
        &format!("no daemon answered at 127.0.0.1:{port}") as &str,
        "refused",
        "missing-models.toml",
    ] {
        assert!(
            err.to_lowercase().contains(&says.to_lowercase()),
            "{err:?} does not say {says:?}"
        );
    }
    // With the endpoint switched off there is no address to try, and it says that.
    let out = models(&config, &spec, &[], &["--http", "", "list"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("http.addr is empty"), "{err}");
    assert!(err.contains("missing-models.toml"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let work = workdir();
    let spec = MountSpec::new(work.path(), &work.path().join("models.toml"));
    let config = work.path().join("cli.toml");
    cli_config(
        &config,
        HttpConfig {
            addr: format!("127.0.0.1:{}", free_port()),
            ..HttpConfig::default()
        },
    );
    let empty: PathBuf = work.path().join("empty.txt");
    fs::write(&empty, "# nobody\n\n").unwrap();
    let empty = empty.to_str().unwrap();
    for args in [
        &["ensure"][..],
        &["verify"],
        &["verify", "--report-only"],
        &["mark-corrupted"],
        &["mark-corrupted", "--all"],
        &["ensure", "--only", ","],
        &["verify", "--only", ""],
        &["ensure", "--model-list", empty],
        &["mark-corrupted", "--model-list", empty],
        &["ensure", "--all", "--only", GEN],
        &["gc", "--auto", "--aggressive"],
        &["report", "--daily", "--storage"],
        &["pin"],
        &["status", "--bogus"],
    ] {
        let out = models(&config, &spec, &[], args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "wan models {args:?}: {err}");
        assert!(err.contains("Usage:"), "wan models {args:?}: {err}");
    }
    let out = run_wan(
        &[
            "manifest",
            "build",
            work.path().to_str().unwrap(),
            "--id",
            "x@1.0.0",
            "--chunked",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
