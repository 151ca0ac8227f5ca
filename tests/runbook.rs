//! The docs as written, against the code: every command line of docs/OPERATIONS.md's `sh`
//! blocks, in the runbook's order, with the real `wan` binary, curl and jq against a real
//! mounted daemon (a line either runs and must exit 0, or is skipped by a rule below that says
//! why); CONFIGURATION.md's examples of what `wan config check` reports; and its tables of
//! environment variables, against every `WAN_*` override the configuration accepts and every
//! variable the code reads.
//!
//! The runbook names host paths; here they live under the test's work dir `W` (see
//! [`Runbook::substitutions`]): `/etc/wan22/` is `W/etc/`, `/data/models` the test's mount,
//! `/var/cache/wan22` its cache, `127.0.0.1:8000` its HTTP endpoint,
//! `https://mirror.example/wan22` an HTTP origin on 127.0.0.1 serving the demo models, and
//! `/srv/wan22/…` (a model's local copy) the demo model's directory. `wan` on `PATH` is the
//! binary under test; it finds the daemon and the cache through `WAN_HTTP_ADDR`,
//! `WAN_CACHE_DIR` and `WAN_MANIFEST`, as `/etc/wan22/wan.toml` would tell it on a host.
//! `systemctl reload|restart|stop|start wan22` act on the test's daemon (SIGHUP, stop, start).
//! After each line the test waits for the jobs it started, as an operator reading the output
//! does before typing the next one.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn doc(name: &str) -> String {
    fs::read_to_string(repo().join("docs").join(name)).expect("read the doc")
}

/// The lines of every fenced block of `lang` (`""`: a fence with no language) in `text`, each
/// with its line number (1-based); a line ending in `\` is joined with the next.
fn blocks(text: &str, lang: &str) -> Vec<Vec<(usize, String)>> {
    let mut out = Vec::new();
    // Inside a fence: Some(lines) when it is of `lang`, None when of another language.
    let mut inside: Option<Option<Vec<(usize, String)>>> = None;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(fence) = line.trim_start().strip_prefix("```") {
            match inside.take() {
                Some(Some(b)) => out.push(b),
                Some(None) => {}
                None => inside = Some((fence.trim() == lang).then(Vec::new)),
            }
            continue;
        }
        let Some(Some(b)) = inside.as_mut() else {
            continue;
        };
        let (n, mut joined) = pending.take().unwrap_or((i + 1, String::new()));
        joined.push_str(line.trim());
        match joined.strip_suffix('\\') {
            Some(head) => pending = Some((n, format!("{} ", head.trim_end()))),
            None => b.push((n, joined)),
        }
    }
    assert!(inside.is_none(), "an unclosed code fence");
    out
}

/// The command lines of OPERATIONS.md's `sh` blocks, in order (blank and comment lines left
/// out), each with its line number.
fn runbook_lines() -> Vec<(usize, String)> {
    blocks(&doc("OPERATIONS.md"), "sh")
        .into_iter()
        .flatten()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// What the test does with a runbook line that is not run as written.
enum Step {
    /// Run it (after the substitutions); it must exit 0.
    Run,
    /// `systemctl reload|restart|stop|start wan22`: done to the test's daemon.
    Daemon(&'static str),
    /// Not run, for this reason.
    Skip(&'static str),
}

/// The lines that cannot run here, each kind with the reason. A line of a kind not listed runs.
const SKIPS: &[(&str, &str)] = &[
    (
        "packaging/build-deb.sh",
        "builds a release package (minutes): tests/package.rs builds the package and installs it under a real systemd",
    ),
    (
        "apt ",
        "installs or removes a package on the host: tests/package.rs does it in a container",
    ),
    (
        "dpkg ",
        "asks the host's package database: tests/package.rs does it in a container",
    ),
    (
        "install ",
        "installs onto the host (/usr/local/bin, /etc): the test lays the same files out under its work dir",
    ),
    (
        "systemd-analyze verify ",
        "checks the unit files, which tests/ops.rs systemd_units_verify does with the binary under test",
    ),
    (
        "systemctl ",
        "drives the host's systemd (daemon-reload, enable, status): tests/systemd.rs runs the shipped units under a real systemd",
    ),
    (
        "journalctl ",
        "reads the host's journal: the lines it looks for are tested where they are logged (tests/ops.rs, tests/faults.rs, tests/hardening_http.rs)",
    ),
    (
        "ln -s /usr/local/bin/wan /sbin/mount.fuse.wan",
        "installs the mount helper on the host: tests/ops.rs mount_helper_mounts_in_the_background runs it",
    ),
    (
        "echo 'wanfs  /data/models  fuse.wan",
        "edits the host's /etc/fstab",
    ),
    (
        "mount /data/models",
        "mounts through the host's /etc/fstab (the helper is tested by tests/ops.rs)",
    ),
    ("HF_TOKEN=", "a line of /etc/wan22/wan.env, not a command"),
    (
        "AWS_ACCESS_KEY_ID=",
        "a line of /etc/wan22/wan.env, not a command",
    ),
    (
        "AWS_SECRET_ACCESS_KEY=",
        "a line of /etc/wan22/wan.env, not a command",
    ),
    (
        "WAN_HTTP_TOKEN=",
        "a line of /etc/wan22/wan.env, not a command",
    ),
    (
        "wan models report --daily | mail ",
        "mails the report: the report itself runs above, as `wan models report --daily --json`",
    ),
    (
        "fuser ",
        "lists the processes using the mount, and exits 1 when there are none, the case here",
    ),
    ("dmesg ", "reads the host's kernel log"),
    (
        "ps -o rss=,cmd= -p $(systemctl ",
        "asks the host's systemd for the daemon's PID",
    ),
    (
        "mkdir -p /backup",
        "writes a backup of the host's /etc/wan22 and unit",
    ),
    (
        "tar -czf /backup/",
        "writes a backup of the host's /etc/wan22 and unit",
    ),
    (
        "grep -rlaF 'KEY: ",
        "removes entries from nginx's cache on the cache host: tests/cache_tier.rs runs exactly this against a real nginx",
    ),
];

fn classify(line: &str) -> Step {
    let cmd = line.split('#').next().unwrap_or("").trim();
    for action in ["reload", "restart", "stop", "start"] {
        if cmd == format!("systemctl {action} wan22") {
            return Step::Daemon(action);
        }
    }
    for (prefix, why) in SKIPS {
        if line.starts_with(prefix) || line.contains(&format!("| {}", prefix.trim_start())) {
            return Step::Skip(why);
        }
    }
    Step::Run
}

/// Paths and addresses that are the host's: after the substitutions, a line that names one
/// is not run (it could act on the machine running the tests).
const HOST_PATHS: &[&str] = &[
    "/etc/",
    "/data/",
    "/var/",
    "/srv/",
    "/usr/",
    "/sbin/",
    "/backup",
    "/tmp/",
    "/opt/",
    "/root",
    "/home",
    "mirror.example",
];

/// Whether `line` names `host` (a path of the host, not one under the work dir `W/…`).
fn names_host(line: &str, host: &str) -> bool {
    line.match_indices(host).any(|(at, _)| {
        !line[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    })
}

/// The runbook's world: a daemon over the demo models, served by an HTTP origin, its config
/// and manifest where the runbook puts them (under the work dir).
struct Runbook {
    work: tempfile::TempDir,
    spec: MountSpec,
    mount: Option<Mount>,
    http: String,
    subs: Vec<(String, String)>,
    _origin: Origin,
}

impl Runbook {
    fn new() -> Runbook {
        let work = workdir();
        let w = work.path().to_path_buf();
        // The origin serves the demo models under /wan22/ID, as the runbook's mirror; the new
        // version §8 deploys is t2v's files under a new id.
        let served = w.join("origin/wan22");
        fs::create_dir_all(&served).unwrap();
        for (id, dir) in [
            (T2V, T2V),
            (I2V, I2V),
            (TI2V, TI2V),
            ("t2v-A14B@2.2.1", T2V),
        ] {
            std::os::unix::fs::symlink(fixture_models().join(dir), served.join(id)).unwrap();
        }
        let origin = Origin::start(w.join("origin"));
        let http = format!("127.0.0.1:{}", free_port());
        for dir in ["etc", "cwd", "bin"] {
            fs::create_dir_all(w.join(dir)).unwrap();
        }
        std::os::unix::fs::symlink(wan_bin(), w.join("bin/wan")).unwrap();
        let mut config = test_config();
        config.http.addr = http.clone();
        let mut rb = Runbook {
            spec: MountSpec::new(&w, &w.join("etc/models.toml")).config(config),
            mount: None,
            http,
            subs: Vec::new(),
            _origin: origin,
            work,
        };
        rb.subs = rb.substitutions();
        // /etc/wan22/models.toml: the demo models built as §1 says, t2v pinned (critical).
        let entries: Vec<String> = [T2V, I2V, TI2V]
            .iter()
            .map(|id| {
                let source = rb._origin.base(&format!("wan22/{id}"));
                let opts = BuildOpts {
                    chunk_size: None,
                    sources: vec![source],
                    whole_only: false,
                };
                let entry = manifest_build(&fixture_models().join(id), id, &opts);
                if *id == T2V {
                    entry.replacen("description = \"\"", "description = \"\"\npinned = true", 1)
                } else {
                    entry
                }
            })
            .collect();
        write_manifest(&w.join("etc/models.toml"), &entries);
        // /etc/wan22/wan.toml: §1's minimal file, as written.
        let minimal = blocks(&doc("OPERATIONS.md"), "toml")
            .into_iter()
            .next()
            .expect("§1's wan.toml");
        let minimal: String = minimal.iter().map(|(_, l)| format!("{l}\n")).collect();
        fs::write(w.join("etc/wan.toml"), rb.substitute(&minimal)).unwrap();
        fs::write(w.join("etc/wan.env"), "").unwrap();
        fs::write(
            w.join("etc/host-models.txt"),
            format!("# what this host serves\n{T2V}\n{I2V}\n"),
        )
        .unwrap();
        fs::write(w.join("corrupted-models.txt"), format!("{TI2V}\n")).unwrap();
        // §1: "Append the output to a file that starts with `schema_version = 1`".
        fs::write(w.join("cwd/models.toml"), "schema_version = 1\n").unwrap();
        rb.mount = Some(Mount::start(rb.spec.clone()));
        rb
    }

    fn w(&self) -> &Path {
        self.work.path()
    }

    /// The runbook's host paths and addresses, and what they are here, longest first.
    fn substitutions(&self) -> Vec<(String, String)> {
        let w = self.w().display().to_string();
        let t2v = fixture_models().join(T2V).display().to_string();
        vec![
            ("/srv/wan22/t2v-A14B-2.2.1".into(), t2v.clone()),
            ("/srv/wan22/t2v-A14B".into(), t2v),
            (
                "https://mirror.example/wan22".into(),
                self._origin.base("wan22"),
            ),
            ("/etc/wan22/".into(), format!("{w}/etc/")),
            ("/data/models".into(), format!("{w}/mnt")),
            ("/var/cache/wan22".into(), format!("{w}/cache")),
            (
                "/tmp/corrupted-models.txt".into(),
                format!("{w}/corrupted-models.txt"),
            ),
            ("127.0.0.1:8000".into(), self.http.clone()),
        ]
    }

    fn substitute(&self, line: &str) -> String {
        self.subs
            .iter()
            .fold(line.to_owned(), |l, (from, to)| l.replace(from, to))
    }

    /// Runs `line` with bash (pipefail) in `W/cwd`; returns (exit code, stdout, stderr).
    fn run(&self, line: &str) -> (i32, String, String) {
        let path = format!(
            "{}:{}",
            self.w().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("bash");
        cmd.args(["-o", "pipefail", "-c", line])
            .current_dir(self.w().join("cwd"));
        for (k, _) in std::env::vars() {
            if k.starts_with("WAN_") || k.starts_with("HF_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("PATH", path)
            .env("WAN_HTTP_ADDR", &self.http)
            .env("WAN_CACHE_DIR", self.w().join("cache"))
            .env("WAN_MANIFEST", self.w().join("etc/models.toml"));
        let out = run_with_timeout(cmd, Duration::from_secs(120));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn daemon(&mut self, action: &str) {
        match action {
            "reload" => {
                let m = self.mount.as_ref().expect("a daemon to reload");
                let done = |log: &str| {
                    log.matches("reloaded configuration and manifest").count()
                        + log.matches("reload refused").count()
                };
                let before = done(&m.log());
                // SAFETY: kill(2) on the daemon this test started.
                unsafe { libc::kill(m.pid() as libc::pid_t, libc::SIGHUP) };
                assert!(
                    wait_until(Duration::from_secs(20), || done(&m.log()) > before),
                    "no reload:\n{}",
                    m.log()
                );
                assert_eq!(
                    m.log().matches("reload refused").count(),
                    0,
                    "the reload was refused:\n{}",
                    m.log()
                );
            }
            "stop" => {
                let status = self.mount.take().expect("a daemon to stop").stop();
                assert!(status.success(), "the daemon exited with {status}");
            }
            "start" => {
                assert!(self.mount.is_none(), "started twice");
                self.mount = Some(Mount::start(self.spec.clone()));
            }
            "restart" => {
                self.daemon("stop");
                self.daemon("start");
            }
            other => unreachable!("{other}"),
        }
    }

    /// Waits until no job runs (what an operator does before the next line).
    fn settle(&self) {
        let Some(m) = &self.mount else { return };
        let running = || {
            fs::read_to_string(m.path(".wan/status"))
                .map(|s| {
                    s.contains("\"state\": \"running\"") || s.contains("\"state\":\"running\"")
                })
                .unwrap_or(false)
        };
        assert!(
            wait_until(Duration::from_secs(60), || !running()),
            "jobs still running after 60 s"
        );
    }
}

/// docs/OPERATIONS.md, every command line in order (see the module doc).
#[test]
fn every_command_line_of_the_runbook_runs_as_written() {
    if no_fuse() {
        return;
    }
    for tool in ["jq", "curl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is not installed: apt-get install -y {tool} (.ci/run does)"
        );
    }
    let mut rb = Runbook::new();
    let w = rb.w().display().to_string();
    let (mut ran, mut skipped) = (0, 0);
    for (n, line) in runbook_lines() {
        let what = format!("OPERATIONS.md:{n}: {line}");
        match classify(&line) {
            Step::Skip(why) => {
                eprintln!("skip {what}\n     ({why})");
                skipped += 1;
            }
            Step::Daemon(action) => {
                eprintln!("daemon {action} ({what})");
                rb.daemon(action);
            }
            Step::Run => {
                let sub = rb.substitute(&line);
                if let Some(host) = HOST_PATHS
                    .iter()
                    .find(|p| names_host(&sub.replace(&w, "W"), p))
                {
                    panic!(
                        "{what}\nnames {host} of the host after the substitutions: add a substitution, or a rule to SKIPS saying why it cannot run here"
                    );
                }
                let (code, stdout, stderr) = rb.run(&sub);
                assert_eq!(
                    code, 0,
                    "{what}\nran as: {sub}\nexit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
                );
                // `# ok: …` after a command is what it prints.
                if let Some(want) = line.split("# ok: ").nth(1) {
                    let want = format!("ok: {}", rb.substitute(want.trim()));
                    assert!(
                        stdout.contains(&want),
                        "{what}\nprinted {stdout:?}, not {want:?}"
                    );
                }
                rb.settle();
                ran += 1;
            }
        }
    }
    eprintln!("{ran} lines run, {skipped} skipped");
    assert!(ran >= 80, "only {ran} runbook lines ran");
}

/// The example errors CONFIGURATION.md shows for `wan config check` are what it prints: each
/// line of the "More examples" block, with the input that makes it (`…` stands for text the
/// doc leaves out, `bad.toml` for the file's path).
#[test]
fn the_config_check_examples_are_what_it_prints() {
    let text = doc("CONFIGURATION.md");
    let examples = blocks(&text, "")
        .into_iter()
        .find(|b| b.iter().any(|(_, l)| l.starts_with("bad.toml: ")))
        .expect("CONFIGURATION.md's block of config check examples");
    let dir = tempfile::tempdir().unwrap();
    // Each example: the file's text (None: a file that does not exist) and the environment.
    let input = |line: &str| -> (Option<&str>, Vec<(&str, &str)>) {
        match line {
            l if l.contains("invalid type: string \"lots\", expected u64") => {
                (Some("[gc]\nmax_bytes = \"lots\"\n"), vec![])
            }
            l if l.contains("fetch.read_timeout_secs") => {
                (Some("[fetch]\nread_timeout_secs = 0\n"), vec![])
            }
            l if l.contains("gc.min_free_percent") => {
                (Some("[gc]\nmin_free_percent = 100\n"), vec![])
            }
            l if l.contains("unknown field `token`") => (Some("[http]\ntoken = \"x\"\n"), vec![]),
            l if l.contains("watermarks") => (Some(""), vec![("WAN_GC_HIGH_WATERMARK", "0.7")]),
            l if l.contains("http.addr") => (Some(""), vec![("WAN_HTTP_ADDR", "localhost:8000")]),
            l if l.contains("cannot read") => (None, vec![]),
            l if l.contains("log.level") => (Some("[log]\nlevel = \"inf\"\n"), vec![]),
            l => panic!("CONFIGURATION.md shows {l:?}: add the input that makes it to this test"),
        }
    };
    for (n, line) in &examples {
        let (file, env) = input(line);
        let path = match file {
            Some(text) => {
                let p = dir.path().join("bad.toml");
                fs::write(&p, text).unwrap();
                p
            }
            None => dir.path().join("missing.toml"),
        };
        let mut cmd = Command::new(wan_bin());
        cmd.args(["config", "check"]).arg(&path);
        for (k, _) in std::env::vars() {
            if k.starts_with("WAN_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run_with_timeout(cmd, Duration::from_secs(10));
        let err = String::from_utf8_lossy(&out.stderr).replace('\n', " ");
        let want = line
            .replace("bad.toml", &path.display().to_string())
            .replace("/etc/wan22/missing.toml", &path.display().to_string());
        let parts: Vec<&str> = want.split(" … ").collect();
        let mut at = 0;
        for part in &parts {
            match err[at..].find(part) {
                Some(i) => at += i + part.len(),
                None => panic!(
                    "CONFIGURATION.md:{n} shows {line:?}\nwan config check printed: {err}\n(missing {part:?})"
                ),
            }
        }
        assert_eq!(out.status.code(), Some(1), "CONFIGURATION.md:{n}: {err}");
    }
}

/// Every `WAN_*` override the configuration accepts (one per key of every section, as
/// `Config::with_env` reads them) is in CONFIGURATION.md's table, and so is every other
/// variable the code reads by name.
#[test]
fn every_environment_variable_is_documented() {
    let text = doc("CONFIGURATION.md");
    let env = &text[text.find("## Environment").expect("an Environment section")..];
    let env = &env[..env[3..].find("\n## ").map_or(env.len(), |i| i + 3)];
    let tree = toml::Value::try_from(wanfs::config::Config::default()).unwrap();
    let mut names = vec![
        "WAN_MOUNTPOINT".to_owned(),
        "WAN_MANIFEST".to_owned(),
        "WAN_CACHE_DIR".to_owned(),
        // An Option the defaults leave unset, so absent from the tree.
        "WAN_MOUNT_ALLOW_OTHER".to_owned(),
    ];
    for (section, keys) in tree.as_table().unwrap() {
        let Some(keys) = keys.as_table() else {
            continue;
        };
        for key in keys.keys() {
            names.push(format!("WAN_{}_{}", section, key).to_ascii_uppercase());
        }
    }
    // Each is an override the code accepts: a value of the wrong type is refused by name.
    for name in &names {
        let key = name.trim_start_matches("WAN_").to_ascii_lowercase();
        let accepted = wanfs::config::Config::default()
            .with_env([(name.clone(), "[1, 2]".to_owned())])
            .map(|c| toml::Value::try_from(c).unwrap() != tree);
        assert!(
            matches!(accepted, Ok(true) | Err(_)),
            "{name} ({key}) is not an override the configuration takes"
        );
    }
    // Every variable the code reads by name.
    let mut read = Vec::new();
    let mut stack = vec![repo().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let src = fs::read_to_string(&p).unwrap();
            for call in ["var(\"", "var_os(\"", "try_from_env(\""] {
                for piece in src.split(call).skip(1) {
                    let name: String = piece
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if !name.is_empty() && piece[name.len()..].starts_with('"') {
                        read.push(name);
                    }
                }
            }
        }
    }
    assert!(read.iter().any(|n| n == "HF_TOKEN"), "found {read:?}");
    // The token variable's default name and the S3 credentials, read by the S3 client.
    names.extend(
        [
            "WAN_HTTP_TOKEN",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ]
        .map(String::from),
    );
    // PATH is where fusermount3 is looked for: the process's own, not a setting of wan's.
    names.extend(read.into_iter().filter(|n| n != "PATH"));
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !env.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "CONFIGURATION.md's Environment section leaves out {missing:?}"
    );
}

/// OPERATIONS.md §9's examples of what `wan cache rebuild-index` prints, as text and with
/// `--json`, are its output (digits stand for any number).
#[test]
fn rebuild_index_prints_what_the_runbook_shows() {
    if no_fuse() {
        return;
    }
    let text = doc("OPERATIONS.md");
    let at = text
        .find("`rebuild-index` prints what it adopted")
        .expect("§9's rebuild-index paragraph");
    let para = &text[at..at + text[at..].find("\n\n").unwrap()];
    let examples: Vec<&str> = para.split('`').skip(1).step_by(2).collect();
    let shown_text = examples
        .iter()
        .find(|e| e.starts_with("index rebuilt:"))
        .unwrap_or_else(|| panic!("no text example in {para:?}"));
    let shown_json = examples
        .iter()
        .find(|e| e.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON example in {para:?}"));

    let setup = GenSetup::new(&[("a.bin", 3 << 20)], 1 << 20, 33);
    let m = Mount::start(setup.spec(test_config()));
    std::fs::read(setup.mounted(&m, "a.bin")).unwrap();
    let spec = m.spec.clone();
    assert!(m.stop().success());
    let rebuild = |json: bool| {
        let mut args = vec!["cache".to_owned(), "rebuild-index".to_owned()];
        args.extend(["--manifest".to_owned(), spec.manifest.display().to_string()]);
        args.extend([
            "--cache-dir".to_owned(),
            spec.cache_dir.display().to_string(),
        ]);
        if json {
            args.push("--json".to_owned());
        }
        let out = run_wan(&args, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let digits = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_digit() { '0' } else { c })
            .collect::<String>()
            .split('0')
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("N")
    };
    let printed = rebuild(false);
    assert_eq!(
        digits(printed.trim()),
        digits(shown_text),
        "prints {printed:?}; OPERATIONS.md shows {shown_text:?}"
    );
    let printed: serde_json::Value = serde_json::from_str(&rebuild(true)).expect("JSON");
    let shown: serde_json::Value = serde_json::from_str(shown_json).expect("the doc's JSON");
    let keys = |v: &serde_json::Value| {
        v.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(keys(&printed), keys(&shown), "{printed}");
    assert_eq!(printed["blobs_adopted"], 1, "{printed}");
}

/// Every file under /etc/wan22 the docs name is one the runbook's table of paths lists (config,
/// manifest, secrets: the one the unit reads as its `EnvironmentFile`), or one a procedure
/// makes itself (listed here). §11 once sent the fleet token to `/etc/wan22/env`, a file the
/// unit does not read.
#[test]
fn the_docs_name_only_the_files_of_etc_wan22_that_exist() {
    let unit = fs::read_to_string(repo().join("systemd/wan22.service")).unwrap();
    let env_file = unit
        .lines()
        .find_map(|l| l.strip_prefix("EnvironmentFile="))
        .map(|p| p.trim_start_matches('-').to_owned())
        .expect("the unit's EnvironmentFile");
    let ops = doc("OPERATIONS.md");
    let paths = |text: &str| -> Vec<String> {
        text.match_indices("/etc/wan22/")
            .map(|(at, _)| {
                text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || "/._-".contains(*c))
                    .collect::<String>()
                    .trim_end_matches('.')
                    .to_owned()
            })
            .filter(|p| p.len() > "/etc/wan22/".len())
            .collect()
    };
    // The table "Paths used throughout", at the top.
    let table: Vec<String> = ops
        .lines()
        .skip_while(|l| !l.starts_with("| what | where |"))
        .take_while(|l| l.starts_with('|'))
        .flat_map(paths)
        .collect();
    assert!(
        table.contains(&env_file),
        "the runbook's table of paths does not name the unit's {env_file}: {table:?}"
    );
    let made = [
        // §4.1 and §6: the models a host must hold, written by the operator.
        "/etc/wan22/host-models.txt",
        // §8: the manifest before a deployment, kept for a rollback.
        "/etc/wan22/models.toml.prev",
        // CONFIGURATION.md: what `wan config check` says of a file that is not there.
        "/etc/wan22/missing.toml",
    ];
    for name in [
        "OPERATIONS.md",
        "CONFIGURATION.md",
        "CONTROL.md",
        "METRICS.md",
        "SEMANTICS.md",
    ] {
        for p in paths(&doc(name)) {
            assert!(
                table.contains(&p) || made.contains(&p.as_str()),
                "{name} names {p}, which is neither in the runbook's table of paths ({table:?}) nor made by a procedure"
            );
        }
    }
}

/// Every file of the repository that the docs, the fixtures and CI cite (`docs/…`,
/// `fixtures/…`, `tests/…`, `ops/…`, `systemd/…`, `benches/…`, `src/…`) exists:
/// fixtures/models.toml once sent its readers to a fixtures/README.md that was not there.
#[test]
fn every_repository_path_the_docs_cite_exists() {
    let mut citing = vec![
        repo().join("README.md"),
        repo().join("fixtures/models.toml"),
        repo().join("fixtures/make_fixtures.py"),
        repo().join(".ci/run"),
    ];
    for dir in ["docs", "fixtures"] {
        for e in fs::read_dir(repo().join(dir)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "md") {
                citing.push(e.path());
            }
        }
    }
    let roots = [
        "docs/",
        "fixtures/",
        "tests/",
        "ops/",
        "systemd/",
        "benches/",
        "src/",
    ];
    let mut missing = Vec::new();
    for file in &citing {
        let text = fs::read_to_string(file).unwrap();
        for root in roots {
            for (at, _) in text.match_indices(root) {
                // A path of its own, not the tail of one (`/etc/systemd/system/…`).
                let before = text[..at].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || "/._-".contains(c)) {
                    continue;
                }
                let path: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || "/._@-".contains(*c))
                    .collect();
                let path = path.trim_end_matches(['.', '/']);
                // `fixtures/models/ID`: a placeholder, not a path.
                let placeholder = path
                    .split('/')
                    .any(|c| c.len() > 1 && c.chars().all(|ch| ch.is_ascii_uppercase()));
                if path.len() > root.len() && !placeholder && !repo().join(path).exists() {
                    missing.push(format!("{} cites {path}", file.display()));
                }
            }
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
}
