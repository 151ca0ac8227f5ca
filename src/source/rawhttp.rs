//! Ranged GETs over plain `http://` that read each body straight into the caller's buffer.
//!
//! Why not reqwest here: hyper reads a body into its own buffers and hands out `Bytes`, so
//! every byte of a cold read was copied once more in user space (`memmove`, ~10 % of the
//! daemon's CPU on a cold read, and the connection task's hand-offs on top). A range
//! response has a known length, so after the head is parsed the body is `read` directly into
//! the chunk buffer's slice: socket → chunk buffer is the only copy. Each `read`'s bytes are
//! handed to the [`Filler`] at once, which hashes them while they are still in cache.
//!
//! Only the plain case is taken here: `http://` without credentials in the URL and no proxy
//! in the environment. Anything else a response may need (a redirect, a chunked body, a
//! missing `Content-Length`) is answered [`Raw::Fallback`], and the request goes through
//! reqwest as before, so behaviour never depends on this path understanding the server.
//! After a fallback this path is left for good ([`RawHttp::in_use`]): a server that answers
//! so once most likely always does, and each request would otherwise be sent twice.
//!
//! Connections are kept alive in a small idle pool. One taken from the pool may have been
//! closed by the server meanwhile; if it fails before any byte of the answer arrives, the
//! request is sent once more on a fresh connection.

use std::fmt::Write;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::SourceError;
use super::answer::{body_too_long, check_status};
use crate::chunk::Filler;

/// The most a response head may take; a range answer's head is a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;
/// The most one `read` of a body takes: 1 MiB hashes in 0.2 ms (BLAKE3) to 0.6 ms (sha256).
const MAX_READ: usize = 1 << 20;
/// An idle connection older than this is not reused (servers close idle ones: nginx after 75 s).
const IDLE: Duration = Duration::from_secs(50);

pub(super) struct RawHttp {
    /// `host:port`, as connected to and sent in `Host`.
    authority: String,
    /// Where the path starts in a URL on this base as `Url` serializes it (`http://` and the
    /// authority, without a default port).
    pub(super) path_at: usize,
    connect_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
    /// Set by the first [`Raw::Fallback`]: from then on requests go to reqwest only.
    fell_back: AtomicBool,
}

/// What a request came to.
pub(super) enum Raw {
    Done,
    Failed(SourceError),
    /// The answer needs what reqwest does (a redirect, a chunked body...): ask it instead.
    Fallback,
}

/// How far an attempt got before it failed: a reused connection that failed before any byte
/// of the answer was probably closed by the server while idle.
enum Attempt {
    Done { reuse: bool },
    Failed { err: SourceError, answered: bool },
    Fallback,
}

impl RawHttp {
    /// For `base` (an `http://` URL without userinfo) when no proxy is configured; `None`
    /// where reqwest must be used. URLs on this base must start as `Url` serializes it
    /// ([`RawHttp::path_at`]).
    pub(super) fn for_base(
        base: &str,
        connect_timeout: Duration,
        max_idle: usize,
    ) -> Option<RawHttp> {
        const PROXY_VARS: [&str; 4] = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"];
        if PROXY_VARS
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
        {
            return None;
        }
        let url = reqwest::Url::parse(base).ok()?;
        if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() {
            return None;
        }
        let authority = format!("{}:{}", url.host_str()?, url.port_or_known_default()?);
        // Serialized without userinfo, the authority ends at the path's leading `/`.
        let after_scheme = "http://".len();
        let path_at = after_scheme + url.as_str()[after_scheme..].find('/')?;
        Some(RawHttp {
            authority,
            path_at,
            connect_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
            fell_back: AtomicBool::new(false),
        })
    }

    /// Whether to try this path at all: not once a response needed reqwest.
    pub(super) fn in_use(&self) -> bool {
        !self.fell_back.load(Ordering::Relaxed)
    }

    /// GETs `range` of `target` (the URL's path and query) into `into` (exactly its length).
    pub(super) async fn fetch_into(
        &self,
        target: &str,
        range: &Range<u64>,
        token: Option<&str>,
        into: &mut Filler<'_>,
    ) -> Raw {
        let mut req = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nRange: bytes={}-{}\r\nUser-Agent: wanfs/{}\r\n",
            self.authority,
            range.start,
            range.end - 1,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(t) = token {
            let _ = write!(req, "Authorization: Bearer {t}\r\n");
        }
        req.push_str("\r\n");
        let pooled = self.take_idle();
        let reused = pooled.is_some();
        let mut stream = match pooled {
            Some(s) => s,
            None => match self.connect().await {
                Ok(s) => s,
                Err(e) => return Raw::Failed(e),
            },
        };
        let mut outcome = exchange(&mut stream, req.as_bytes(), range, into).await;
        if reused
            && matches!(
                outcome,
                Attempt::Failed {
                    answered: false,
                    ..
                }
            )
        {
            stream = match self.connect().await {
                Ok(s) => s,
                Err(e) => return Raw::Failed(e),
            };
            into.reset();
            outcome = exchange(&mut stream, req.as_bytes(), range, into).await;
        }
        match outcome {
            Attempt::Done { reuse } => {
                if reuse {
                    self.put_idle(stream);
                }
                Raw::Done
            }
            Attempt::Failed { err, .. } => Raw::Failed(err),
            Attempt::Fallback => {
                self.fell_back.store(true, Ordering::Relaxed);
                Raw::Fallback
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, SourceError> {
        let s = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.authority.as_str()),
        )
        .await
        {
            Err(_) => return Err(SourceError::Timeout),
            Ok(Err(e)) => return Err(SourceError::Unreachable(format!("connecting: {e}"))),
            Ok(Ok(s)) => s,
        };
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    fn take_idle(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap();
        idle.retain(|(_, t)| t.elapsed() < IDLE);
        idle.pop().map(|(s, _)| s)
    }

    fn put_idle(&self, s: TcpStream) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < self.max_idle {
            idle.push((s, Instant::now()));
        }
    }
}

/// One request and its answer on `s`.
async fn exchange(
    s: &mut TcpStream,
    req: &[u8],
    range: &Range<u64>,
    into: &mut Filler<'_>,
) -> Attempt {
    let failed = |err, answered| Attempt::Failed { err, answered };
    if let Err(e) = s.write_all(req).await {
        return failed(
            SourceError::Transport(format!("sending the request: {e}")),
            false,
        );
    }
    let mut head = vec![0u8; 4096];
    let mut filled = 0;
    let (status, head_len, length, keep_alive, retry_after) = loop {
        if filled == head.len() {
            if head.len() >= MAX_HEAD {
                return failed(
                    SourceError::Transport("response head too large".into()),
                    true,
                );
            }
            head.resize(head.len() * 2, 0);
        }
        match s.read(&mut head[filled..]).await {
            Ok(0) => {
                let msg = "connection closed before the response head";
                return failed(SourceError::Transport(msg.into()), filled > 0);
            }
            Ok(n) => filled += n,
            Err(e) => return failed(SourceError::Transport(format!("reading: {e}")), filled > 0),
        }
        let mut headers = [httparse::EMPTY_HEADER; 48];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&head[..filled]) {
            Ok(httparse::Status::Partial) => continue,
            Err(e) => {
                return failed(
                    SourceError::Transport(format!("bad response head: {e}")),
                    true,
                );
            }
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(0);
                let mut length = None;
                let mut chunked = false;
                let mut close = resp.version == Some(0);
                let mut content_range = None;
                let mut retry_after = None;
                for h in resp.headers.iter() {
                    let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = v.parse::<u64>().ok();
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = true;
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close |= v.eq_ignore_ascii_case("close");
                    } else if h.name.eq_ignore_ascii_case("content-range") {
                        content_range = Some(v);
                    } else if h.name.eq_ignore_ascii_case("retry-after") {
                        retry_after = super::answer::retry_after(v);
                    }
                }
                if (200..300).contains(&status) && (chunked || length.is_none()) {
                    return Attempt::Fallback;
                }
                if status == 206
                    && let Some(cr) = content_range
                    && range_start(cr) != Some(range.start)
                {
                    let msg = format!("answered {cr:?} to a request for bytes {}-", range.start);
                    return failed(SourceError::Transport(msg), true);
                }
                break (status, n, length, !close, retry_after);
            }
        }
    };
    if (300..=399).contains(&status) {
        return Attempt::Fallback;
    }
    if let Err(e) = check_status(status, range, length, retry_after) {
        return failed(e, true);
    }
    let want = range.end - range.start;
    let length = length.expect("checked for a 2xx answer");
    if length > want {
        return failed(body_too_long(want), true);
    }
    // Body bytes that came with the head: at most a few KiB.
    let early = filled - head_len;
    if early as u64 > length {
        return failed(
            SourceError::Transport("more bytes than Content-Length".into()),
            true,
        );
    }
    into.fill(&head[head_len..filled]);
    let end = length as usize;
    while into.filled() < end {
        // Bounded, so one read's hash (on an async worker) stays well under a millisecond.
        let more = (end - into.filled()).min(MAX_READ);
        match s.read(&mut into.unfilled()[..more]).await {
            Ok(0) => break,
            Ok(n) => into.advance(n),
            Err(e) => {
                return failed(
                    SourceError::Transport(format!("reading the body: {e}")),
                    true,
                );
            }
        }
    }
    if (into.filled() as u64) < want {
        return failed(
            SourceError::Short {
                want,
                got: into.filled() as u64,
            },
            true,
        );
    }
    Attempt::Done { reuse: keep_alive }
}

/// The first byte's position in a `Content-Range` value (`bytes 10-14/100`).
fn range_start(content_range: &str) -> Option<u64> {
    let (start, _) = content_range.strip_prefix("bytes ")?.split_once('-')?;
    if start.is_empty() || !start.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    start.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkHash;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// What the test server sends for its n-th request.
    type Answer = fn(usize) -> Vec<u8>;

    /// A server on 127.0.0.1 that answers each request with `answer(n)` (n counts requests
    /// over all connections) and then, if `close_after` says so, closes the connection
    /// without saying so. Returns its address and the numbers of connections accepted and of
    /// requests answered.
    async fn server(answer: Answer, close_after: fn(usize) -> bool) -> Served {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, served) = (conns.clone(), (addr, conns, requests.clone()));
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let requests = requests.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let i = requests.fetch_add(1, Ordering::SeqCst);
                            if s.write_all(&answer(i)).await.is_err() || close_after(i) {
                                return;
                            }
                        }
                    }
                });
            }
        });
        served
    }

    type Served = (String, Arc<AtomicUsize>, Arc<AtomicUsize>);

    fn ok_206(_: usize) -> Vec<u8> {
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-14/100\r\nContent-Length: 5\r\n\r\nhello"
            .to_vec()
    }

    /// One GET of bytes 10-14 through a hashing `Filler`; a completed one must have hashed
    /// exactly the bytes it left in the buffer.
    async fn get(raw: &RawHttp) -> (Raw, Vec<u8>) {
        let mut buf = vec![0u8; 5];
        let mut into = Filler::whole(ChunkHash::Blake3, &mut buf);
        let r = raw.fetch_into("/f", &(10..15), None, &mut into).await;
        let hashed = into.finish();
        if matches!(r, Raw::Done) {
            let hashed = hashed.expect("a completed GET filled every byte");
            assert_eq!(hashed.digest(), Some(ChunkHash::Blake3.digest(&buf)));
        }
        (r, buf)
    }

    fn raw(addr: &str) -> RawHttp {
        RawHttp::for_base(&format!("http://{addr}"), Duration::from_secs(2), 4).unwrap()
    }

    #[tokio::test]
    async fn reads_the_body_into_the_buffer_and_reuses_the_connection() {
        let (addr, conns, _) = server(ok_206, |_| false).await;
        let raw = raw(&addr);
        for _ in 0..3 {
            let (r, buf) = get(&raw).await;
            assert!(matches!(r, Raw::Done));
            assert_eq!(buf, b"hello");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "one keep-alive connection");
    }

    /// The server closes each connection after one answer without `Connection: close` (as an
    /// idle timeout does): the next request fails on the pooled connection before any answer
    /// and is sent again on a fresh one.
    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_is_replaced() {
        let (addr, conns, _) = server(ok_206, |_| true).await;
        let raw = raw(&addr);
        for _ in 0..3 {
            let (r, buf) = get(&raw).await;
            assert!(matches!(r, Raw::Done), "request failed");
            assert_eq!(buf, b"hello");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn what_it_does_not_handle_falls_back_and_wrong_answers_fail() {
        let chunked: Answer = |_| {
            b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
        };
        let redirect: Answer =
            |_| b"HTTP/1.1 302 Found\r\nLocation: /g\r\nContent-Length: 0\r\n\r\n".to_vec();
        for answer in [chunked, redirect] {
            let (addr, _, _) = server(answer, |_| false).await;
            assert!(matches!(get(&raw(&addr)).await.0, Raw::Fallback));
        }
        let cases: [(Answer, &str); 5] = [
            (
                |_| {
                    b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4/100\r\nContent-Length: 5\r\n\r\nhello".to_vec()
                },
                "transport: answered \"bytes 0-4/100\"",
            ),
            (
                |_| b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\n\r\nhel".to_vec(),
                "short body: wanted 5 bytes, got 3",
            ),
            (
                |_| b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec(),
                "transport: server ignored the Range header",
            ),
            (
                |_| b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                "not found",
            ),
            (
                |_| b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n".to_vec(),
                "HTTP 503",
            ),
        ];
        for (answer, want) in cases {
            let (addr, _, _) = server(answer, |_| true).await;
            match get(&raw(&addr)).await.0 {
                Raw::Failed(e) => assert!(e.to_string().starts_with(want), "{e} / {want}"),
                _ => panic!("{want}: not a failure"),
            }
        }
    }

    /// A server whose answers always need reqwest (here a chunked body): the first fetch
    /// asks both paths, every later one reqwest only.
    #[tokio::test]
    async fn after_a_fallback_requests_go_to_reqwest_only() {
        use crate::source::Source;
        let chunked: Answer = |_| {
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-14/100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
        };
        let (addr, _, requests) = server(chunked, |_| false).await;
        let src = super::super::http::HttpSource::new(
            reqwest::Client::new(),
            format!("http://{addr}"),
            None,
            Duration::from_secs(2),
            4,
        );
        for sent in [2, 3, 4] {
            let mut buf = vec![0u8; 5];
            src.fetch_into("f", 10..15, &mut buf).await.unwrap();
            assert_eq!(buf, b"hello");
            assert_eq!(
                requests.load(Ordering::SeqCst),
                sent,
                "requests sent so far"
            );
        }
    }

    #[test]
    fn only_plain_http_without_credentials() {
        let t = Duration::from_secs(1);
        let a = |b: &str| RawHttp::for_base(b, t, 4).map(|r| r.authority);
        assert_eq!(
            a("http://127.0.0.1:8080/base").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            a("http://mirror.local/x").as_deref(),
            Some("mirror.local:80")
        );
        assert_eq!(a("http://[::1]:9000").as_deref(), Some("[::1]:9000"));
        assert_eq!(a("http://[::1]/m").as_deref(), Some("[::1]:80"));
        assert_eq!(a("https://h/x"), None);
        assert_eq!(a("http://user:pw@h/x"), None);
    }
}
