//! A real HTTP/1.1 origin for the integration tests: axum on its own tokio runtime, serving a
//! directory with `Range` support, logging every request, with faults switchable at run time.
//!
//! It owns its runtime so sync `#[test]`s can use it, and so `stop()` can drop every task and
//! socket at once (a listener closed but keep-alive connections still open would not be "down").

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request as HttpRequest, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use axum::serve::IncomingStream;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// A misbehaviour of the origin, applied to the requests a [`Rule`] matches.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer with this status (and a short body) instead of the file.
    Status(u16),
    /// Send the head and this many body bytes, then reset the connection (TCP RST).
    ResetAfter(usize),
    /// Announce the full Content-Length, send only this many body bytes, then close (FIN).
    Truncate(usize),
    /// Wait this long before sending anything.
    Delay(Duration),
    /// Send the head at once, then wait this long before the body.
    DelayBody(Duration),
    /// Send the body at this many bytes per second.
    Trickle(u64),
    /// Serve the right length with one byte of the body flipped.
    Corrupt,
    /// Answer with this status on about `percent` % of requests (a fixed pseudo-random
    /// sequence, so runs repeat), and serve the others normally: a flaky mirror.
    Flaky { status: u16, percent: u64 },
}

/// Which requests a fault applies to and how many more times.
#[derive(Clone, Debug)]
struct Rule {
    fault: Fault,
    /// Applies only to request paths containing this string.
    path_contains: Option<String>,
    /// Applies only to requests whose `Range` starts at this byte.
    range_from: Option<u64>,
    /// `None`: every matching request; `Some(n)`: the next `n` matching requests.
    remaining: Option<u64>,
}

/// One request as the origin saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Percent-decoded path, starting with `/`.
    pub path: String,
    /// The raw `Range` header, if any.
    pub range_header: Option<String>,
    /// The resolved inclusive byte range, when the header was valid for the file.
    pub range: Option<(u64, u64)>,
    /// Every header, names lowercase.
    pub headers: Vec<(String, String)>,
    /// Status sent (0 until the handler decided).
    pub status: u16,
    /// The fault applied to this request, if any.
    pub fault: Option<Fault>,
    pub at: Instant,
}

impl Request {
    /// The value of a header (name lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Shared {
    root: PathBuf,
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<Request>>,
    /// When set, every request is answered `302 Location: {redirect}{path}`.
    redirect: Mutex<Option<String>>,
    /// Draws made for [`Fault::Flaky`].
    draws: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Takes the first rule matching `path`, counting down its remaining uses.
    fn take_fault(&self, path: &str, range_header: Option<&str>) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        let pos = rules.iter().position(|r| {
            r.remaining != Some(0)
                && r.path_contains.as_deref().is_none_or(|p| path.contains(p))
                && r.range_from.is_none_or(|n| {
                    range_header.is_some_and(|h| h.starts_with(&format!("bytes={n}-")))
                })
        })?;
        let rule = &mut rules[pos];
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
        }
        if let Fault::Flaky { status, percent } = rule.fault {
            // splitmix64 of a counter: a fixed sequence of draws.
            let n = self
                .draws
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut z = n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            return (z % 100 < percent).then_some(Fault::Status(status));
        }
        Some(rule.fault.clone())
    }
}

/// The HTTP origin. Dropping it stops it.
pub struct Origin {
    shared: Arc<Shared>,
    addr: SocketAddr,
    runtime: Mutex<Option<Runtime>>,
}

impl Origin {
    /// Serves `root` on 127.0.0.1 at a free port.
    pub fn start(root: impl AsRef<Path>) -> Origin {
        Origin::start_on("127.0.0.1", root)
    }

    /// Serves `root` on `ip` (a loopback address) at a free port.
    pub fn start_on(ip: &str, root: impl AsRef<Path>) -> Origin {
        let ip: IpAddr = ip.parse().expect("origin ip");
        let shared = Arc::new(Shared {
            root: root.as_ref().to_path_buf(),
            rules: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            redirect: Mutex::new(None),
            draws: Default::default(),
        });
        let (runtime, addr) = launch(shared.clone(), SocketAddr::new(ip, 0));
        Origin {
            shared,
            addr,
            runtime: Mutex::new(Some(runtime)),
        }
    }

    /// `http://ip:port` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ip:port/{sub}`: a source base for a manifest.
    pub fn base(&self, sub: &str) -> String {
        format!("http://{}/{}", self.addr, sub.trim_start_matches('/'))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving: the listener and every open connection are closed, new connections are
    /// refused. Returns once a connect is refused.
    pub fn stop(&self) {
        if let Some(rt) = self.runtime.lock().unwrap().take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        let refused = wait_until(Duration::from_secs(5), || {
            TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err()
        });
        assert!(
            refused,
            "origin {} still accepts connections after stop",
            self.addr
        );
    }

    /// Serves again on the same address (after [`Origin::stop`]). Log and faults are kept.
    pub fn restart(&self) {
        let mut slot = self.runtime.lock().unwrap();
        assert!(slot.is_none(), "origin {} is already running", self.addr);
        let (runtime, addr) = launch(self.shared.clone(), self.addr);
        assert_eq!(addr, self.addr);
        *slot = Some(runtime);
    }

    /// Applies `fault` to the next `times` requests (every request when `None`) whose path
    /// contains `path_contains` (any path when `None`). Rules are tried in the order added.
    pub fn add_fault(&self, fault: Fault, path_contains: Option<&str>, times: Option<u64>) {
        self.add_fault_at(fault, path_contains, None, times);
    }

    /// Like [`Origin::add_fault`], only for requests whose `Range` starts at `range_from`.
    pub fn add_fault_at(
        &self,
        fault: Fault,
        path_contains: Option<&str>,
        range_from: Option<u64>,
        times: Option<u64>,
    ) {
        self.shared.rules.lock().unwrap().push(Rule {
            fault,
            path_contains: path_contains.map(str::to_owned),
            range_from,
            remaining: times,
        });
    }

    /// The next `n` requests are answered with `status`.
    pub fn fail_next(&self, n: u64, status: u16) {
        self.add_fault(Fault::Status(status), None, Some(n));
    }

    pub fn clear_faults(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// Answers every request with a redirect to `target` + the request path (`None` stops).
    pub fn redirect_to(&self, target: Option<String>) {
        *self.shared.redirect.lock().unwrap() = target;
    }

    /// Every request seen so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Number of requests seen so far (a mark for [`Origin::requests_since`]).
    pub fn request_count(&self) -> usize {
        self.shared.log.lock().unwrap().len()
    }

    /// The requests after `mark` (a value of [`Origin::request_count`]).
    pub fn requests_since(&self, mark: usize) -> Vec<Request> {
        self.shared.log.lock().unwrap()[mark..].to_vec()
    }

    /// GET requests whose path ends with `suffix`.
    pub fn gets(&self, suffix: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(suffix))
            .collect()
    }

    /// How many GETs asked for each byte range of paths ending with `suffix` (a request with
    /// no `Range` counts as the range `(0, u64::MAX)`).
    pub fn range_counts(&self, suffix: &str) -> BTreeMap<(u64, u64), usize> {
        let mut counts = BTreeMap::new();
        for r in self.gets(suffix) {
            *counts.entry(r.range.unwrap_or((0, u64::MAX))).or_insert(0) += 1;
        }
        counts
    }

    pub fn clear_log(&self) {
        self.shared.log.lock().unwrap().clear();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Builds a runtime, binds `addr` (retrying while the port is still held) and serves on it.
fn launch(shared: Arc<Shared>, addr: SocketAddr) -> (Runtime, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("origin")
        .enable_all()
        .build()
        .expect("origin runtime");
    let listener = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("origin: bind {addr}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("origin: bind {addr}: {e}"),
            }
        }
    });
    let bound = listener.local_addr().expect("origin local addr");
    let app = Router::new()
        .fallback(handle)
        .with_state(shared)
        .into_make_service_with_connect_info::<Conn>();
    runtime.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("origin {bound}: serve ended: {e}");
        }
    });
    (runtime, bound)
}

/// The connection a request came on: its socket, so a fault can reset it.
#[derive(Clone, Copy, Debug)]
struct Conn {
    fd: RawFd,
}

impl Connected<IncomingStream<'_, TcpListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Conn {
            fd: stream.io().as_raw_fd(),
        }
    }
}

/// Makes the next close of `fd` send a RST instead of a FIN.
fn set_linger_zero(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: fd is the live socket of the connection this handler is serving; the pointer and
    // length describe a valid `linger`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    req: HttpRequest,
) -> Response {
    let raw_path = req.uri().path().to_owned();
    let path = percent_decode(&raw_path);
    let range_header = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let fault = shared.take_fault(&path, range_header.as_deref());
    let file = shared.root.join(path.trim_start_matches('/'));
    let size = std::fs::metadata(&file)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    let range = match (&range_header, size) {
        (Some(h), Some(size)) => parse_range(h, size).ok(),
        _ => None,
    };
    let index = {
        let mut log = shared.log.lock().unwrap();
        log.push(Request {
            method: req.method().to_string(),
            path: path.clone(),
            range_header: range_header.clone(),
            range,
            headers,
            status: 0,
            fault: fault.clone(),
            at: Instant::now(),
        });
        log.len() - 1
    };
    if let Some(Fault::Delay(d)) = &fault {
        tokio::time::sleep(*d).await;
    }
    let redirect = shared.redirect.lock().unwrap().clone();
    let response = if let Some(target) = redirect {
        let location = format!("{}{}", target.trim_end_matches('/'), req.uri());
        plain(StatusCode::FOUND, "redirect").map_location(&location)
    } else if let Some(Fault::Status(code)) = &fault {
        plain(
            StatusCode::from_u16(*code).expect("fault status"),
            "injected failure",
        )
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only")
    } else {
        serve_file(
            &file,
            size,
            range_header.as_deref(),
            req.method() == Method::HEAD,
            fault.as_ref(),
            conn,
        )
    };
    shared.log.lock().unwrap()[index].status = response.status().as_u16();
    response
}

trait ResponseExt {
    fn map_location(self, location: &str) -> Response;
}

impl ResponseExt for Response {
    fn map_location(mut self, location: &str) -> Response {
        self.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_str(location).expect("location"),
        );
        self
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = status;
    r
}

fn serve_file(
    file: &Path,
    size: Option<u64>,
    range_header: Option<&str>,
    head: bool,
    fault: Option<&Fault>,
    conn: Conn,
) -> Response {
    let Some(size) = size else {
        return plain(StatusCode::NOT_FOUND, "no such file");
    };
    let (status, start, end) = match range_header {
        None => (StatusCode::OK, 0, size.saturating_sub(1)),
        Some(h) => match parse_range(h, size) {
            Ok((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b),
            Err(()) => {
                let mut r = plain(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
                r.headers_mut()
                    .insert(header::CONTENT_RANGE, hv(format!("bytes */{size}")));
                return r;
            }
        },
    };
    let len = if size == 0 { 0 } else { end - start + 1 };
    let mut builder = Response::builder()
        .status(status)
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
    }
    if head {
        return builder
            .header(header::CONTENT_LENGTH, len)
            .body(Body::empty())
            .expect("head response");
    }
    let mut data = vec![0u8; len as usize];
    if let Err(e) = File::open(file).and_then(|f| f.read_exact_at(&mut data, start)) {
        eprintln!("origin: read {}: {e}", file.display());
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "read failed");
    }
    let body = match fault {
        Some(Fault::Corrupt) => {
            if let Some(b) = data.get_mut((len / 2) as usize) {
                *b ^= 0xff;
            }
            Body::from(data)
        }
        Some(Fault::ResetAfter(n)) => {
            builder = builder.header(header::CONTENT_LENGTH, len);
            partial_body(
                Bytes::from(data).slice(..(*n).min(len as usize)),
                Some(conn.fd),
            )
        }
        Some(Fault::Truncate(n)) => {
            builder = builder.header(header::CONTENT_LENGTH, len);
            partial_body(Bytes::from(data).slice(..(*n).min(len as usize)), None)
        }
        Some(Fault::DelayBody(d)) => {
            builder = builder.header(header::CONTENT_LENGTH, len);
            let (d, data) = (*d, Bytes::from(data));
            Body::from_stream(futures::stream::once(async move {
                tokio::time::sleep(d).await;
                Ok::<_, io::Error>(data)
            }))
        }
        Some(Fault::Trickle(rate)) => {
            builder = builder.header(header::CONTENT_LENGTH, len);
            let piece = ((*rate / 20).max(1)) as usize;
            let data = Bytes::from(data);
            Body::from_stream(futures::stream::unfold(0usize, move |pos| {
                let data = data.clone();
                async move {
                    if pos >= data.len() {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let end = (pos + piece).min(data.len());
                    Some((Ok::<_, io::Error>(data.slice(pos..end)), end))
                }
            }))
        }
        _ => Body::from(data),
    };
    builder.body(body).expect("file response")
}

/// A body that sends `sent` and then fails, which makes hyper drop the connection: with
/// `reset_fd`, a RST on that socket; without, a plain close (FIN) short of Content-Length.
fn partial_body(sent: Bytes, reset_fd: Option<RawFd>) -> Body {
    Body::from_stream(futures::stream::unfold(0u8, move |step| {
        let sent = sent.clone();
        async move {
            match step {
                0 => Some((Ok(sent), 1)),
                1 => {
                    // Let the head and the partial body reach the client first.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Some(fd) = reset_fd {
                        set_linger_zero(fd);
                    }
                    Some((Err(io::Error::other("injected failure mid-body")), 2))
                }
                _ => None,
            }
        }
    }))
}

fn hv(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).expect("header value")
}

/// Resolves a single-range `Range` header against a file of `size` bytes into an inclusive
/// range; `Err` means 416.
pub fn parse_range(header: &str, size: u64) -> Result<(u64, u64), ()> {
    let spec = header.trim().strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') || size == 0 {
        return Err(());
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size - 1
        } else {
            b.parse::<u64>().map_err(|_| ())?.min(size - 1)
        };
        (start, end)
    };
    if start >= size || start > end {
        return Err(());
    }
    Ok((start, end))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
