//! The control routes, served from the one table in [`crate::control::routes`]: a route reads
//! its `Request` off the path, query string and body, `Control::handle` answers it, and the
//! answer goes out as JSON with the status it carries (Prometheus text for `/metrics`).
//!
//! Every request is held to what it may say: bodies are read within limits before any
//! handler runs ([`read_body`]), bodies and query strings with a field a route does not take
//! are refused (a typo is never read as "no selection", which would have meant every model),
//! and every refusal, axum's own included, is `{"error": "…"}` ([`json_errors`]).

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::server::READ_TIMEOUT;
use super::{AppState, refuse};
use crate::control::request;
use crate::control::routes;
use crate::logging::untrusted;

/// The largest request body read (bulk id lists are a few KiB).
const MAX_BODY_BYTES: usize = 1 << 20;

/// One route of the control plane: its [`request::Request`] read off the HTTP request (the
/// path's id, then the query string, then the body: the first wrong one is refused), answered
/// by [`Control::handle`](crate::control::Control::handle).
pub(super) async fn serve_route(
    st: AppState,
    route: &'static routes::Route,
    req: Request,
) -> Response {
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
pub(super) async fn json_errors(req: Request, next: Next) -> Response {
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

/// Reads the request body within [`READ_TIMEOUT`] and [`MAX_BODY_BYTES`], so a handler never
/// waits on a slow client.
pub(super) async fn read_body(req: Request, next: Next) -> Response {
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
