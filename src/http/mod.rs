//! The HTTP endpoint: the control plane's routes and `/blobs` for peers, served by an accept
//! loop of our own that bounds what clients can hold. Each file owns one part:
//!
//! - `server`: the accept loop and its bounds (connections, timeouts, shedding, shutdown).
//! - `auth`: who may call: loopback or the bearer token for mutations, `Host` and `Origin`
//!   checks that keep browsers out.
//! - `routes`: the control routes, from `control::routes`' table through `Control::handle`;
//!   bodies read within limits, every refusal as `{"error": "…"}`.
//! - `blobs`: `GET /blobs/{sha256}`, a blob's verified bytes for peers.
//!
//! This file puts them together ([`router`]) and holds what they share: [`AppState`] and the
//! error shape ([`refuse`]).

mod auth;
mod blobs;
mod routes;
mod server;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::Semaphore;

pub use server::serve;

use crate::control::Control;
use crate::control::routes::{self as control_routes, Method};

#[derive(Clone)]
struct AppState {
    control: Arc<Control>,
    token_env: String,
    require_token: bool,
    /// This machine's host name (lower case): a `Host` a remote scraper may rightly send.
    hostname: Option<String>,
    /// A place for each `/blobs` body being sent ([`MAX_BLOB_STREAMS`](blobs::MAX_BLOB_STREAMS)).
    blob_streams: Arc<Semaphore>,
}

/// Every route: the control table's, reads open and mutations authorized, and `/blobs`; each
/// request's `Host` checked and its body read within limits; every error as JSON.
pub fn router(control: Arc<Control>, http: &crate::config::HttpConfig) -> Router {
    let state = AppState {
        control,
        token_env: http.token_env.clone(),
        require_token: http.require_token,
        hostname: auth::hostname(),
        blob_streams: Arc::new(Semaphore::new(blobs::MAX_BLOB_STREAMS)),
    };
    let (mut reads, mut mutating) = (Router::new(), Router::new());
    for route in control_routes::ROUTES {
        let serve =
            move |State(st): State<AppState>, req: Request| routes::serve_route(st, route, req);
        match route.method {
            Method::Get => reads = reads.route(route.path, get(serve)),
            Method::Post => mutating = mutating.route(route.path, post(serve)),
        }
    }
    let mutating = mutating.route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::authorize,
    ));
    let app = reads
        .route("/blobs/{sha256}", get(blobs::blob))
        .merge(mutating)
        .layer(middleware::from_fn(routes::read_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::check_host,
        ))
        .with_state(state);
    // `Router::layer` wraps each route's handlers, inside the step that adds `Allow` to a 405:
    // the JSON rewrite wraps the whole router instead, as the fallback of an empty one.
    Router::new()
        .fallback_service(app)
        .layer(middleware::from_fn(routes::json_errors))
}

/// The one shape of every refusal: `{"error": "…"}` with its status.
fn refuse(status: StatusCode, error: &str) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}
