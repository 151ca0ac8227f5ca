//! The HTTP endpoint: the control plane's routes, served by an accept loop of our own that
//! bounds what clients can hold.
//!
//! Every control route comes from the one table in [`crate::control::routes`]: a route reads
//! its `Request` off the path, query string and body, `Control::handle` answers it, and the
//! answer goes out as JSON with the status it carries (Prometheus text for `/metrics`). What
//! this file adds is HTTP's own: who may call, limits, and errors as JSON. `/blobs/{sha256}` is
//! served here alone: it is a byte stream for peers (ranges, a cap on bodies in flight), not an
//! operation on models.
//!
//! Reads are open to anyone who can reach the address (default 127.0.0.1:8000). Mutating
//! routes (POST) are refused with 403 unless the peer is this host's loopback address
//! (127.0.0.1 or ::1 exactly, IPv4-mapped forms included: other 127/8 addresses count as
//! remote, which is how tests play a remote client) or presents `Authorization: Bearer <token>`
//! matching the environment variable named by `http.token_env`. With `http.require_token`,
//! loopback clients need the token too.
//!
//! Browsers on this host are kept out, since any web page could otherwise reach 127.0.0.1:
//! every route refuses a `Host` that is not a name of this endpoint (DNS rebinding: see
//! [`host_allowed`]) unless the bearer token is presented, and mutating routes refuse a
//! request whose `Origin` is not the endpoint itself (a cross-site POST). Clients that send
//! no `Origin` (curl, the `wan` CLI, Prometheus) are not affected.
//!
//! At most [`MAX_CONNECTIONS`] connections are open at once, one request each, and a client
//! has [`READ_TIMEOUT`] to send its request head and body, and [`WRITE_STALL_TIMEOUT`] to take
//! each next byte of its answer: slow or stalled clients cannot take the daemon's file
//! descriptors, which its cold reads need. `/blobs` bodies, the only long answers, have at most
//! [`MAX_BLOB_STREAMS`] of those places and [`BLOB_PIECE`] of memory each, so the control routes
//! always keep room.
//!
//! Every request is held to what it may say: bodies and query strings with a field a route
//! does not take are refused (a typo is never read as "no selection", which would have meant
//! every model), and every refusal, axum's own included, is `{"error": "…"}`.

use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::service::Service as _;
use serde_json::json;
use tokio::sync::{Notify, Semaphore, watch};

use crate::control::Control;
use crate::control::request;
use crate::control::routes::{self, Method};
use crate::logging::untrusted;
use crate::store::PeerMiss;

/// Connections served at once. Each holds a file descriptor, and the daemon's descriptors also
/// hold the cache's blob files and the sources' sockets: unbounded, stalled clients took them
/// all and every cold read failed. Operators, the CLI and a scraper need a handful; 128 leaves
/// room for bursts of `wan models` runs and stays far below any soft `RLIMIT_NOFILE` (1024).
const MAX_CONNECTIONS: usize = 128;

/// How long a client has to send its request head (hyper's timer), and then its body. Every
/// client we serve sends both at once; 10 s absorbs a congested link, not a stalled client.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an answer may wait for the client to take its next byte. A client that asks for a
/// blob and never reads held its connection (and the piece in flight) for good: 140 of them
/// took every connection, and `/health` failed as long as they stayed. A peer reading at any
/// rate takes bytes every few milliseconds; 10 s without one is a client that is gone.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `/blobs` bodies being sent at once: half of [`MAX_CONNECTIONS`], so however many peers (or
/// stalled clients) fetch blobs, the other half stays for `/health`, the CLI and scrapers. A
/// peer refused with 503 asks its next source.
const MAX_BLOB_STREAMS: usize = MAX_CONNECTIONS / 2;

/// hyper's per-connection buffer, for the request head and for an answer's bytes not yet
/// taken by the socket. hyper's default (~400 KiB) is memory a stalled client keeps; heads
/// here are a few hundred bytes (64 KiB still takes a path of 20,000 characters).
const CONN_BUF_BYTES: usize = 64 << 10;

/// The largest request body read (bulk id lists are a few KiB).
const MAX_BODY_BYTES: usize = 1 << 20;

/// How long shutdown waits for requests in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct AppState {
    control: Arc<Control>,
    token_env: String,
    require_token: bool,
    /// This machine's host name (lower case): a `Host` a remote scraper may rightly send.
    hostname: Option<String>,
    /// A place for each `/blobs` body being sent ([`MAX_BLOB_STREAMS`]).
    blob_streams: Arc<Semaphore>,
}

/// Serves until `shutdown` resolves, then gives requests in progress [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Arc<Control>,
    http: crate::config::HttpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = router(control, &http);
    let conns = Arc::new(Conns::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    // Both warnings below can come once per connection attempt: one line per 10 s is enough.
    let mut last_warning: Option<Instant> = None;
    let mut warn_now = move || {
        let due = last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10));
        if due {
            last_warning = Some(Instant::now());
        }
        due
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Typically EMFILE: wait for descriptors to come back rather than spin.
                    if warn_now() {
                        tracing::warn!(error = %e, "HTTP endpoint: accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        match conns.admit() {
            Some(slot) => {
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    app.clone(),
                    slot,
                    stop_rx.clone(),
                ));
            }
            None if warn_now() => {
                tracing::warn!(%peer, "HTTP endpoint: {MAX_CONNECTIONS} requests in progress; connections refused");
            }
            None => {}
        }
    }
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while conns.open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One connection: its request (keep-alive is off, so a served connection frees its slot and
/// an idle one cannot hold it), the header-read timeout, being shed, and shutdown.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
) {
    let started = slot.started.clone();
    let inner = hyper_util::service::TowerToHyperService::new(app);
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            started.store(true, Ordering::Relaxed);
            req.extensions_mut().insert(ConnectInfo(peer));
            inner.call(req)
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(CONN_BUF_BYTES)
        .keep_alive(false);
    let io = hyper_util::rt::TokioIo::new(StallGuard::new(stream, WRITE_STALL_TIMEOUT));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                // hyper's error names the step; its source says why (a stalled client).
                let why = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default();
                tracing::debug!(%peer, error = %e, %why, "HTTP connection ended with an error");
            }
        }
        _ = slot.shed.notified() => {
            tracing::debug!(%peer, "HTTP connection shed: no request head while the endpoint was full");
        }
        _ = async { drop(stop.wait_for(|s| *s).await) } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// A connection's socket whose writes fail once one has waited `limit` without the client
/// taking a byte: hyper has no write timeout, and a body a client does not read would wait on
/// the socket for ever. Progress of any size restarts the clock, so a slow reader is served.
struct StallGuard<T> {
    inner: T,
    limit: Duration,
    /// Running while a write waits; `None` after a write that made progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> StallGuard<T> {
    fn new(inner: T, limit: Duration) -> StallGuard<T> {
        StallGuard {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After the inner write answered `poll`: restarts the clock on progress, and on a wait
    /// polls the clock (so the task wakes when it runs out) and fails the write if it has.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let clock = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match clock.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took no byte of its answer for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Conns {
    open: Mutex<VecDeque<Entry>>,
    next_id: AtomicU64,
}

/// A connection as [`Conns`] sees it.
struct Entry {
    id: u64,
    /// Set once its request head has been read.
    started: Arc<AtomicBool>,
    /// Notified to close it.
    shed: Arc<Notify>,
}

/// A connection's place in [`Conns`], held by its task; dropping it frees the place.
struct Slot {
    id: u64,
    conns: Arc<Conns>,
    started: Arc<AtomicBool>,
    shed: Arc<Notify>,
}

impl Conns {
    /// A slot for a new connection. When all are taken, the oldest connection that has not
    /// sent a whole request head is closed to make room: a stalled client, not one being
    /// served, loses its place, so a fresh `/health` is answered at once however many clients
    /// stall. `None` when every connection is in a request.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut open = self.open.lock().unwrap();
        if open.len() >= MAX_CONNECTIONS {
            let idle = open
                .iter()
                .position(|e| !e.started.load(Ordering::Relaxed))?;
            let victim = open.remove(idle).expect("index in range");
            victim.shed.notify_one();
        }
        let entry = Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            started: Arc::new(AtomicBool::new(false)),
            shed: Arc::new(Notify::new()),
        };
        let slot = Slot {
            id: entry.id,
            conns: self.clone(),
            started: entry.started.clone(),
            shed: entry.shed.clone(),
        };
        open.push_back(entry);
        Some(slot)
    }

    fn open(&self) -> usize {
        self.open.lock().unwrap().len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.open.lock().unwrap().retain(|e| e.id != self.id);
    }
}

pub fn router(control: Arc<Control>, http: &crate::config::HttpConfig) -> Router {
    let state = AppState {
        control,
        token_env: http.token_env.clone(),
        require_token: http.require_token,
        hostname: hostname(),
        blob_streams: Arc::new(Semaphore::new(MAX_BLOB_STREAMS)),
    };
    let (mut reads, mut mutating) = (Router::new(), Router::new());
    for route in routes::ROUTES {
        let serve = move |State(st): State<AppState>, req: Request| serve_route(st, route, req);
        match route.method {
            Method::Get => reads = reads.route(route.path, get(serve)),
            Method::Post => mutating = mutating.route(route.path, post(serve)),
        }
    }
    let mutating = mutating.route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    let routes = reads
        .route("/blobs/{sha256}", get(blob))
        .merge(mutating)
        .layer(middleware::from_fn(read_body))
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .with_state(state);
    // `Router::layer` wraps each route's handlers, inside the step that adds `Allow` to a 405:
    // the JSON rewrite wraps the whole router instead, as the fallback of an empty one.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn(json_errors))
}

/// One route of the control plane: its [`request::Request`] read off the HTTP request (the
/// path's id, then the query string, then the body: the first wrong one is refused), answered
/// by [`Control::handle`].
async fn serve_route(st: AppState, route: &'static routes::Route, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let id = if route.takes_id() {
        match Path::<String>::from_request_parts(&mut parts, &st).await {
            Ok(Path(id)) => id,
            Err(refused) => return refused.into_response(),
        }
    } else {
        String::new()
    };
    // `read_body` has read it within its limits already: this only takes it.
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(_) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or cut short",
            );
        }
    };
    let wire = routes::Wire {
        id,
        query: parts.uri.query().unwrap_or_default(),
        body: &body,
        json: is_json(&parts.headers),
    };
    let asked = match route.decode(&wire) {
        Ok(asked) => asked,
        Err(e) => return refuse(status(e.http_status()), &e.to_string()),
    };
    match st.control.handle(asked).await {
        Ok(request::Response::Metrics(text)) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(answer) => (status(answer.http_status()), axum::Json(answer)).into_response(),
        Err(e) => refuse(status(e.http_status()), &e.to_string()),
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn refuse(status: StatusCode, error: &str) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

/// Whether a message's `Content-Type` is JSON (`application/json`, or a `+json` type).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(mime) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
    else {
        return false;
    };
    let mime = mime.trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// The largest error body of axum's own that is turned into JSON (its texts are one line).
const MAX_ERROR_TEXT: usize = 16 << 10;

/// Every error as `{"error": "…"}`, the shape of [`refuse`]: axum answers
/// an unknown route (404) and a wrong method (405) with an empty body, and a query string or
/// path it cannot parse with plain text; those are rewritten here, so a client that reads
/// `.error` never meets another shape.
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(resp.headers()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_TEXT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let path = untrusted(&path);
    let error = match status {
        StatusCode::NOT_FOUND if text.is_empty() => {
            format!("no route {method} {path} (the routes are in docs/CONTROL.md)")
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            let allow = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("another method");
            format!("{method} is not allowed on {path}: use {allow}")
        }
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase(),
        _ => text,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(json!({ "error": error }).to_string()))
}

/// A header's value for a log line (it is the client's text).
fn header_text(headers: &HeaderMap, name: header::HeaderName) -> String {
    headers
        .get(name)
        .map(|v| untrusted(&String::from_utf8_lossy(v.as_bytes())))
        .unwrap_or_default()
}

/// Whether the peer is this host's loopback address. An IPv4 client of a listener on `[::]`
/// arrives as `::ffff:127.0.0.1`: it is mapped back to IPv4 first.
fn is_loopback_peer(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST,
    }
}

/// Whether the bearer token is configured and presented.
fn token_ok(st: &AppState, headers: &HeaderMap) -> bool {
    let token = std::env::var(&st.token_env).ok().filter(|t| !t.is_empty());
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    matches!((&token, presented), (Some(t), Some(p)) if constant_time_eq(t.as_bytes(), p.as_bytes()))
}

/// Whether `authority` (a `Host` header: name or address, optional port) names this endpoint.
/// DNS rebinding gives an attacker's page a name of its own that resolves to 127.0.0.1: the
/// browser then sends that name as `Host`. So a name is accepted only if it is `localhost` or
/// this machine's host name exactly, and an address of any kind is accepted (the configured
/// `http.addr`, or another of this host's: a page cannot make a browser send an address as
/// `Host` unless it was loaded from that address).
fn host_allowed(authority: &str, hostname: Option<&str>) -> bool {
    let authority = authority.trim().to_ascii_lowercase();
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6] or [v6]:port
        let Some((addr, port)) = rest.split_once(']') else {
            return false;
        };
        let port_ok = port.is_empty() || port.strip_prefix(':').is_some_and(valid_port);
        return addr.parse::<Ipv6Addr>().is_ok() && port_ok;
    }
    let name = match authority.rsplit_once(':') {
        Some((name, port)) if valid_port(port) => name,
        Some(_) => return false,
        None => authority.as_str(),
    };
    name == "localhost" || name.parse::<Ipv4Addr>().is_ok() || hostname == Some(name)
}

fn valid_port(port: &str) -> bool {
    port.parse::<u16>().is_ok()
}

/// This machine's host name, lower case.
fn hostname() -> Option<String> {
    let name = nix::unistd::gethostname().ok()?;
    let name = name.to_str()?.to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

/// Every route: refuses a `Host` that does not name this endpoint (DNS rebinding), unless the
/// bearer token is presented. A request without `Host` (HTTP/1.0) is not from a browser.
async fn check_host(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host_ok = match headers.get(header::HOST).map(|h| h.to_str()) {
        None => true,
        Some(Ok(h)) => host_allowed(h, st.hostname.as_deref()),
        Some(Err(_)) => false,
    };
    if host_ok || token_ok(&st, headers) {
        return next.run(req).await;
    }
    tracing::warn!(
        host = %header_text(headers, header::HOST),
        path = %untrusted(req.uri().path()),
        "refused an HTTP request for a foreign Host (DNS rebinding?)"
    );
    refuse(
        StatusCode::FORBIDDEN,
        "the Host header does not name this endpoint: use localhost, an IP address, this \
         machine's host name, or the bearer token",
    )
}

/// Reads the request body within [`READ_TIMEOUT`] and [`MAX_BODY_BYTES`], so a handler never
/// waits on a slow client.
async fn read_body(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(READ_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large or cut short",
        ),
        Err(_) => refuse(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        ),
    }
}

/// Whether a mutation's `Origin` (if any) is the endpoint itself: `http://` plus the `Host`
/// the request was sent to. Browsers send `Origin` on every cross-site POST; a page elsewhere
/// (another port of localhost included) is a different origin. No `Origin`: not a browser.
fn origin_allowed(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (
        origin.to_str().ok().and_then(|o| o.strip_prefix("http://")),
        host,
    ) {
        (Some(authority), Some(host)) => authority.eq_ignore_ascii_case(host),
        _ => false,
    }
}

async fn authorize(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if !origin_allowed(&headers) {
        tracing::warn!(
            %peer,
            origin = %header_text(&headers, header::ORIGIN),
            path = %untrusted(req.uri().path()),
            "refused a cross-site mutating HTTP call"
        );
        return refuse(
            StatusCode::FORBIDDEN,
            "cross-site request refused: mutating calls are not accepted from web pages (Origin \
             is not this endpoint)",
        );
    }
    if (is_loopback_peer(peer.ip()) && !st.require_token) || token_ok(&st, &headers) {
        return next.run(req).await;
    }
    tracing::warn!(%peer, path = %untrusted(req.uri().path()), require_token = st.require_token, "refused a mutating HTTP call: no valid token");
    refuse(StatusCode::FORBIDDEN, &token_needed(&st, "mutating calls"))
}

/// Why a call without a valid token is refused, and how to send one: the header, and the
/// environment variable that holds the token (never the token). Under `http.require_token`
/// loopback is no way in, so it is not offered.
fn token_needed(st: &AppState, what: &str) -> String {
    let how = format!(
        "`Authorization: Bearer TOKEN`, TOKEN being the value of the environment variable {} \
         (http.token_env; `wan models` sends it when it is set)",
        st.token_env
    );
    if st.require_token {
        format!("{what} need a valid bearer token (http.require_token is on): send {how}")
    } else {
        format!("{what} need a loopback client (127.0.0.1 or ::1) or a valid bearer token: {how}")
    }
}

/// A token compare whose time does not depend on where the bytes differ (`subtle`); the
/// length is not secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// A `Range` header's one byte range, before the blob's size resolves it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ByteRange {
    /// `bytes=a-b` (inclusive) or `bytes=a-`.
    From(u64, Option<u64>),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Parses a single-range `Range` header; multiple ranges are not served (peers never ask).
/// The unit is matched without case, and the whitespace and empty list elements RFC 9110
/// (§5.6.1, §14.2) lets a range set carry are skipped: `bytes= 0-10` and `bytes=0-10, ` are
/// one range. Within a range no space is allowed.
fn parse_range(v: &str) -> Option<ByteRange> {
    let (unit, set) = v.trim().split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut ranges = set
        .split(',')
        .map(|r| r.trim_matches([' ', '\t']))
        .filter(|r| !r.is_empty());
    let (Some(spec), None) = (ranges.next(), ranges.next()) else {
        return None;
    };
    let (a, b) = spec.split_once('-')?;
    if !(a.bytes().all(|c| c.is_ascii_digit()) && b.bytes().all(|c| c.is_ascii_digit())) {
        return None;
    }
    if a.is_empty() {
        return Some(ByteRange::Suffix(b.parse().ok()?));
    }
    let a = a.parse().ok()?;
    let b = if b.is_empty() {
        None
    } else {
        Some(b.parse().ok()?)
    };
    if b.is_some_and(|b| b < a) {
        return None;
    }
    Some(ByteRange::From(a, b))
}

/// Bytes a blob body is read and sent in, and so what a client that stops reading holds: the
/// piece hyper is writing (plus [`CONN_BUF_BYTES`]). At 1 MiB, 140 stalled clients grew the
/// daemon by 130 MB; a peer's 1 MiB part is four reads.
const BLOB_PIECE: u64 = 256 << 10;

/// `GET`/`HEAD /blobs/<sha256>` (with `Range`): bytes of a blob for another daemon, answered
/// only from chunks this cache holds verified: 206 with the bytes, or 404 at once if any chunk
/// the range touches is absent, so the caller moves on to its next peer or the origin. The
/// caller verifies every chunk against its own manifest: nothing here is trusted by it.
/// Under `http.require_token` the bearer token is required, from loopback clients too.
async fn blob(
    State(st): State<AppState>,
    Path(hex): Path<String>,
    _: NoQuery,
    headers: HeaderMap,
) -> Response {
    if st.require_token && !token_ok(&st, &headers) {
        return refuse(StatusCode::UNAUTHORIZED, &token_needed(&st, "/blobs calls"));
    }
    let Ok(digest) = hex.parse::<crate::chunk::Digest>() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a blob is named by its sha256: 64 hex digits",
        );
    };
    let store = st.control.store().clone();
    let miss = |why: &str| {
        crate::metrics::METRICS
            .peer_requests
            .with_label_values(&["miss"])
            .inc();
        refuse(StatusCode::NOT_FOUND, why)
    };
    // The header is parsed before the blob is looked up, but a blob this cache lacks is a 404
    // whatever the header says: the caller moves on either way.
    let asked = headers
        .get(header::RANGE)
        .map(|v| v.to_str().ok().and_then(parse_range));
    let resolve = |size: u64| match asked {
        None => Ok(0..size),
        Some(None) => Err(Box::new(refuse(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "only one byte range (bytes=a-b, a- or -n) is served",
        ))),
        Some(Some(r)) => {
            let range = match r {
                ByteRange::From(a, b) => a..b.map_or(size, |b| b.saturating_add(1).min(size)),
                ByteRange::Suffix(n) => size.saturating_sub(n)..size,
            };
            if range.start < range.end {
                Ok(range)
            } else {
                let mut answer = refuse(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    &format!("the range is past the end of the blob ({size} bytes)"),
                );
                answer.headers_mut().insert(
                    header::CONTENT_RANGE,
                    format!("bytes */{size}").parse().expect("valid header"),
                );
                Err(Box::new(answer))
            }
        }
    };
    let (size, range, file) = match store.peer_reader(digest, resolve) {
        Ok(held) => held,
        Err(PeerMiss::Absent) => return miss("this cache does not hold the blob"),
        Err(PeerMiss::Refused(answer)) => return *answer,
        Err(PeerMiss::Incomplete) => {
            return miss("this cache does not hold every chunk of that range");
        }
    };
    // Held by the body until it is sent or its connection ends.
    let Ok(place) = st.blob_streams.clone().try_acquire_owned() else {
        crate::metrics::METRICS
            .peer_requests
            .with_label_values(&["busy"])
            .inc();
        let mut busy = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "{MAX_BLOB_STREAMS} /blobs answers are being sent: ask another source, or again later"
            ),
        );
        busy.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return busy;
    };
    crate::metrics::METRICS
        .peer_requests
        .with_label_values(&["hit"])
        .inc();
    let len = range.end - range.start;
    // Read piece by piece on blocking threads: a whole-blob GET must not sit in memory.
    let pieces = futures::stream::try_unfold(range.start, move |at| {
        let file = file.clone();
        let end = range.end;
        async move {
            if at >= end {
                return Ok(None);
            }
            let n = (end - at).min(BLOB_PIECE);
            let piece = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; n as usize];
                file.read_exact_at(&mut buf, at).map(|()| buf)
            })
            .await
            .map_err(std::io::Error::other)??;
            crate::metrics::METRICS.peer_served_bytes.inc_by(n);
            Ok::<_, std::io::Error>(Some((axum::body::Bytes::from(piece), at + n)))
        }
    });
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes");
    resp = if asked.is_some() {
        resp.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", range.start, range.end - 1),
        )
    } else {
        resp.status(StatusCode::OK)
    };
    let pieces = futures::StreamExt::map(pieces, move |piece| {
        let _held = &place;
        piece
    });
    resp.body(Body::from_stream(pieces))
        .expect("valid response")
}

/// The query string of a route that takes none.
type NoQuery = Query<routes::Nothing>;

#[cfg(test)]
mod tests {
    #[test]
    fn byte_ranges() {
        use super::{ByteRange::*, parse_range};
        assert_eq!(parse_range("bytes=0-1023"), Some(From(0, Some(1023))));
        assert_eq!(parse_range("bytes=5-"), Some(From(5, None)));
        assert_eq!(parse_range("bytes=-10"), Some(Suffix(10)));
        assert_eq!(parse_range("bytes=9-3"), None);
        assert_eq!(parse_range("bytes=0-1,5-6"), None);
        assert_eq!(parse_range("items=0-1"), None);
        // RFC 9110's optional whitespace and empty list elements; the unit without case.
        for spaced in [
            "bytes= 0-10",
            "bytes=0-10 ",
            "bytes=\t0-10",
            "bytes=0-10,",
            "bytes= ,0-10",
            "BYTES=0-10",
        ] {
            assert_eq!(parse_range(spaced), Some(From(0, Some(10))), "{spaced:?}");
        }
        assert_eq!(parse_range("bytes= -10"), Some(Suffix(10)));
        for bad in [
            "bytes=0 - 10",
            "bytes=0-1, 5-6",
            "bytes=",
            "bytes= , ",
            "bytes=+1-2",
            "bytes=-",
        ] {
            assert_eq!(parse_range(bad), None, "{bad:?}");
        }
    }

    use super::*;

    #[test]
    fn ipv4_mapped_loopback_is_loopback() {
        assert!(is_loopback_peer("127.0.0.1".parse().unwrap()));
        assert!(is_loopback_peer("::1".parse().unwrap()));
        assert!(is_loopback_peer("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback_peer("::ffff:127.0.0.2".parse().unwrap()));
        assert!(!is_loopback_peer("127.0.0.2".parse().unwrap()));
        assert!(!is_loopback_peer("::ffff:10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn a_full_endpoint_sheds_the_oldest_connection_without_a_request() {
        use futures::FutureExt;
        let conns = Arc::new(Conns::default());
        let slots: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|_| conns.admit().expect("room"))
            .collect();
        slots[0].started.store(true, Ordering::Relaxed);
        let newcomer = conns.admit().expect("room made");
        assert_eq!(conns.open(), MAX_CONNECTIONS);
        assert!(
            slots[1].shed.notified().now_or_never().is_some(),
            "oldest idle not shed"
        );
        assert!(
            slots[0].shed.notified().now_or_never().is_none(),
            "a served one was shed"
        );
        for s in &slots {
            s.started.store(true, Ordering::Relaxed);
        }
        newcomer.started.store(true, Ordering::Relaxed);
        assert!(conns.admit().is_none(), "every connection is in a request");
        drop(newcomer);
        assert_eq!(
            conns.open(),
            MAX_CONNECTIONS - 1,
            "a closed connection frees its place"
        );
        assert!(conns.admit().is_some());
    }

    #[test]
    fn hosts_that_name_this_endpoint() {
        let me = Some("gpu-17");
        for ok in [
            "localhost",
            "LOCALHOST:8000",
            "127.0.0.1",
            "127.0.0.1:8000",
            "[::1]",
            "[::1]:8000",
            "10.1.2.3:8000",
            "[fe80::1]:80",
            "gpu-17:8000",
        ] {
            assert!(host_allowed(ok, me), "{ok} refused");
        }
        for bad in [
            "evil.example",
            "evil.example:8000",
            "localhost.evil.example",
            "gpu-17.evil.example",
            "127.0.0.1.nip.io",
            "localhost:99999",
            "[::1]8000",
            "[::1",
            "",
        ] {
            assert!(!host_allowed(bad, me), "{bad} allowed");
        }
        assert!(!host_allowed("gpu-17", None));
    }

    #[test]
    fn origins_of_mutations() {
        let headers = |pairs: &[(header::HeaderName, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(k.clone(), v.parse().unwrap());
            }
            h
        };
        assert!(origin_allowed(&headers(&[(
            header::HOST,
            "127.0.0.1:8000"
        )])));
        assert!(origin_allowed(&headers(&[
            (header::HOST, "127.0.0.1:8000"),
            (header::ORIGIN, "http://127.0.0.1:8000"),
        ])));
        for origin in [
            "http://evil.example",
            "http://localhost:3000",
            "null",
            "https://127.0.0.1:8000",
        ] {
            assert!(
                !origin_allowed(&headers(&[
                    (header::HOST, "127.0.0.1:8000"),
                    (header::ORIGIN, origin),
                ])),
                "{origin} allowed"
            );
        }
    }
}
