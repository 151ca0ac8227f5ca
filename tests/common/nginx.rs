//! A real nginx as an HTTP cache tier (`proxy_cache` with the `slice` module) in front of an
//! origin, in its own prefix on a free 127.0.0.1 port: the configuration of docs/OPERATIONS.md,
//! "A cache tier in front of the origin". Used by tests/cache_tier.rs and the tier benchmark in
//! tests/s3.rs.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::origin::wait_until;

/// The cache tier's configuration as docs/OPERATIONS.md gives it, with paths under `dir`.
/// `user` is needed only when the master runs as root (workers would otherwise run as `nobody`,
/// who cannot write a test's private directory).
fn nginx_conf(dir: &Path, port: u16, origin: SocketAddr, slice: u64) -> String {
    let d = dir.display();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root root;"
    } else {
        ""
    };
    format!(
        r#"{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format tier '$upstream_cache_status $status "$http_range" $slice_range';
    access_log {d}/access.log tier;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;

    proxy_cache_path {d}/cache levels=1:2 keys_zone=wanfs:10m max_size=1g inactive=30d use_temp_path=off;

    upstream origin {{
        server {origin};
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{port};
        location / {{
            slice {slice};
            proxy_cache wanfs;
            proxy_cache_key $uri$is_args$args$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 30d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_cache_lock_age 60s;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://origin;
        }}
    }}
}}
"#
    )
}

/// A real nginx on 127.0.0.1, in its own prefix. Dropping it stops it.
pub struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx proxying `origin` with a `slice`-sized cache, or returns `None` (after
    /// printing SKIP) when no nginx with the slice module is installed.
    pub fn start(dir: &Path, origin: SocketAddr, slice: u64) -> Option<Nginx> {
        let bin = ["nginx", "/usr/sbin/nginx"]
            .into_iter()
            .find(|b| Command::new(b).arg("-v").output().is_ok());
        let Some(bin) = bin else {
            eprintln!("SKIP: nginx is not installed (.ci/run installs it)");
            return None;
        };
        // `nginx -V` prints its build options on stderr; slice is not in every build.
        let built = Command::new(bin).arg("-V").output().expect("nginx -V");
        if !String::from_utf8_lossy(&built.stderr).contains("http_slice_module") {
            eprintln!("SKIP: {bin} was built without the slice module");
            return None;
        }
        fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let port = free_port();
        let conf = dir.join("nginx.conf");
        fs::write(&conf, nginx_conf(dir, port, origin, slice)).expect("write nginx.conf");
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .args(["-e", "stderr", "-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = nginx.child.try_wait().expect("try_wait nginx") {
                panic!(
                    "nginx exited with {status}; error.log:\n{}",
                    nginx.error_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx not listening within 10 s; error.log:\n{}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(nginx)
    }

    /// `http://127.0.0.1:port/{sub}`: a source base for a manifest.
    pub fn base(&self, sub: &str) -> String {
        format!("http://127.0.0.1:{}/{sub}", self.port)
    }

    /// `proxy_cache_path`: one file per cached slice, each holding a `KEY: ` line.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Every request answered so far, in order: its `$upstream_cache_status` (`-` for a
    /// request that did not use the cache) and the bytes its `Range` asked for (0 without
    /// one). nginx writes a request's line as it finishes it, which can be just after the
    /// client has the last byte, so this waits until the log stops growing.
    pub fn requests(&self) -> Vec<(String, u64)> {
        let read = || {
            fs::read_to_string(self.dir.join("access.log"))
                .unwrap_or_default()
                .lines()
                .map(|l| {
                    let status = l.split(' ').next().unwrap_or("").to_owned();
                    let asked = l
                        .split('"')
                        .nth(1)
                        .and_then(|r| r.strip_prefix("bytes="))
                        .and_then(|r| r.split_once('-'))
                        .and_then(|(a, b)| {
                            Some(b.parse::<u64>().ok()? + 1 - a.parse::<u64>().ok()?)
                        })
                        .unwrap_or(0);
                    (status, asked)
                })
                .collect::<Vec<_>>()
        };
        let mut last = read();
        wait_until(Duration::from_secs(2), || {
            std::thread::sleep(Duration::from_millis(50));
            let now = read();
            std::mem::replace(&mut last, now).len() == last.len()
        });
        last
    }

    /// A plain HTTP/1.0 GET of `path` with `Range: bytes=first-last`; the status and body.
    pub fn get_range(&self, path: &str, first: u64, last: u64) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect nginx");
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nRange: bytes={first}-{last}\r\n\r\n"
        )
        .expect("send request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read response");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        (status, raw[split + 4..].to_vec())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers; SIGKILL would leave them running.
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let exited = wait_until(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- nginx error.log ----\n{}\n---- end ----",
                self.error_log()
            );
        }
    }
}

pub fn free_port() -> u16 {
    super::free_port()
}
