//! The HTTP endpoint: axum routes over `Control` (no logic of their own).
//!
//! Reads are open to anyone who can reach the address (default 127.0.0.1:8000). Mutating
//! routes (POST) are refused with 403 unless the peer is this host's loopback address
//! (127.0.0.1 or ::1 exactly: other 127/8 addresses count as remote, which is how tests play a
//! remote client) or presents `Authorization: Bearer <token>` matching the environment
//! variable named by `http.token_env`. With `http.require_token`, loopback clients need the
//! token too.

use std::net::SocketAddr;
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

#[derive(Clone)]
struct AppState {
    control: Arc<Control>,
    token_env: String,
    require_token: bool,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Arc<Control>,
    http: crate::config::HttpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = router(control, http.token_env, http.require_token);
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

pub fn router(control: Arc<Control>, token_env: String, require_token: bool) -> Router {
    let state = AppState {
        control,
        token_env,
        require_token,
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

async fn authorize(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let local = match peer.ip() {
        std::net::IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        std::net::IpAddr::V6(v6) => v6 == std::net::Ipv6Addr::LOCALHOST,
    };
    let token = std::env::var(&st.token_env).ok().filter(|t| !t.is_empty());
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token_ok = matches!((&token, presented), (Some(t), Some(p)) if constant_time_eq(t.as_bytes(), p.as_bytes()));
    if (local && !st.require_token) || token_ok {
        return next.run(req).await;
    }
    tracing::warn!(%peer, path = %req.uri().path(), "refused a mutating HTTP call: not loopback and no valid token");
    (
        StatusCode::FORBIDDEN,
        axum::Json(
            json!({"error": "mutating calls need a loopback client or a valid bearer token"}),
        ),
    )
        .into_response()
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
