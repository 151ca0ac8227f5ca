//! The HTTP endpoint: axum routes over `Control` (no logic of their own).
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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::control::{Control, ControlError, GcMode};
use crate::logging::untrusted;

#[derive(Clone)]
struct AppState {
    control: Arc<Control>,
    token_env: String,
    require_token: bool,
    /// This machine's host name (lower case): a `Host` a remote scraper may rightly send.
    hostname: Option<String>,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Arc<Control>,
    http: crate::config::HttpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = router(control, &http);
    if let Err(e) = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    {
        tracing::error!(error = %e, "HTTP endpoint failed");
    }
}

pub fn router(control: Arc<Control>, http: &crate::config::HttpConfig) -> Router {
    let state = AppState {
        control,
        token_env: http.token_env.clone(),
        require_token: http.require_token,
        hostname: hostname(),
    };
    let mutating = Router::new()
        .route("/models/{id}/ensure", post(ensure_one))
        .route("/models/{id}/verify", post(verify_one))
        .route("/models/{id}/pin", post(pin))
        .route("/models/{id}/unpin", post(unpin))
        .route("/models/{id}/evict", post(evict))
        .route("/models/{id}/mark-corrupted", post(mark_one))
        .route("/ensure", post(ensure_many))
        .route("/verify", post(verify_many))
        .route("/mark-corrupted", post(mark_many))
        .route("/gc", post(gc))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .route("/health/models", get(health_models))
        .route("/config", get(config))
        .route("/metrics", get(metrics))
        .route("/models", get(models))
        .route("/models/{id}", get(model))
        .route("/events", get(events))
        .route("/report/daily", get(report_daily))
        .route("/report/storage", get(report_storage))
        .merge(mutating)
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .with_state(state)
}

struct ApiError(ControlError);

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(json!({"error": self.0.to_string()}))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(v: impl serde::Serialize) -> ApiResult {
    Ok(axum::Json(v).into_response())
}

fn refuse(status: StatusCode, error: &str) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
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
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.to_ascii_lowercase();
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
    tracing::warn!(%peer, path = %untrusted(req.uri().path()), "refused a mutating HTTP call: not loopback and no valid token");
    refuse(
        StatusCode::FORBIDDEN,
        "mutating calls need a loopback client or a valid bearer token",
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(st): State<AppState>) -> Response {
    let h = st.control.health(true).await;
    let code = if h.status == "unhealthy" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, axum::Json(h)).into_response()
}

async fn health_models(State(st): State<AppState>) -> ApiResult {
    let models = st.control.status(&[])?;
    ok(json!({
        "summary": st.control.summary(&models),
        "models": models.into_iter().map(|m| (m.id.clone(), m)).collect::<std::collections::BTreeMap<_, _>>(),
    }))
}

async fn config(State(st): State<AppState>) -> ApiResult {
    ok(st.control.config_view())
}

async fn metrics(State(st): State<AppState>) -> Response {
    st.control.usage();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
}

async fn models(State(st): State<AppState>) -> ApiResult {
    ok(st.control.status(&[])?)
}

async fn model(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(st.control.model_status(&st.control.resolve(&[id])?[0])?)
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn events(State(st): State<AppState>, Query(q): Query<Limit>) -> ApiResult {
    ok(st.control.events(q.limit.unwrap_or(200))?)
}

#[derive(Deserialize)]
struct Days {
    days: Option<u64>,
}

async fn report_daily(State(st): State<AppState>, Query(q): Query<Days>) -> ApiResult {
    ok(st.control.report_daily(q.days.unwrap_or(1))?)
}

async fn report_storage(State(st): State<AppState>, Query(q): Query<Days>) -> ApiResult {
    ok(st.control.report_storage(q.days.unwrap_or(30))?)
}

#[derive(Deserialize, Default)]
struct Flags {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    report_only: bool,
}

#[derive(Deserialize, Default)]
struct Bulk {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    report_only: bool,
}

fn accepted(v: serde_json::Value) -> ApiResult {
    Ok((StatusCode::ACCEPTED, axum::Json(v)).into_response())
}

async fn ensure_one(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(f): Query<Flags>,
) -> ApiResult {
    accepted(json!({"started": st.control.ensure(&[id], f.force)?}))
}

async fn verify_one(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(f): Query<Flags>,
) -> ApiResult {
    accepted(json!({"started": st.control.verify(&[id], f.report_only)?}))
}

async fn ensure_many(State(st): State<AppState>, body: Option<axum::Json<Bulk>>) -> ApiResult {
    let b = body.map(|b| b.0).unwrap_or_default();
    accepted(json!({"started": st.control.ensure(&b.ids, b.force)?}))
}

async fn verify_many(State(st): State<AppState>, body: Option<axum::Json<Bulk>>) -> ApiResult {
    let b = body.map(|b| b.0).unwrap_or_default();
    accepted(json!({"started": st.control.verify(&b.ids, b.report_only)?}))
}

async fn pin(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(st.control.set_pinned(&id, true)?)
}

async fn unpin(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(st.control.set_pinned(&id, false)?)
}

async fn evict(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let freed = st.control.evict(&id, false)?;
    ok(json!({"evicted": id, "freed_bytes": freed}))
}

async fn mark_one(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(json!({"marked": st.control.mark_corrupted(&[id])?}))
}

async fn mark_many(State(st): State<AppState>, body: Option<axum::Json<Bulk>>) -> ApiResult {
    let b = body.map(|b| b.0).unwrap_or_default();
    if b.ids.is_empty() {
        return Err(ControlError::BadRequest("mark-corrupted needs ids".into()).into());
    }
    ok(json!({"marked": st.control.mark_corrupted(&b.ids)?}))
}

#[derive(Deserialize)]
struct GcQuery {
    mode: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn gc(State(st): State<AppState>, Query(q): Query<GcQuery>) -> ApiResult {
    let mode: GcMode = q.mode.as_deref().unwrap_or("auto").parse()?;
    ok(st.control.gc(mode, q.dry_run).await?)
}

#[cfg(test)]
mod tests {
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
