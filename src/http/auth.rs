//! Who may call, and from where.
//!
//! Reads are open to anyone who can reach the address (default 127.0.0.1:8000). Mutating
//! routes (POST) are refused with 403 unless the peer is this host's loopback address
//! (127.0.0.1 or ::1 exactly, IPv4-mapped forms included: other 127/8 addresses count as
//! remote, which is how tests play a remote client) or presents `Authorization: Bearer <token>`
//! matching the environment variable named by `http.token_env`. With `http.require_token`,
//! loopback clients need the token too (and `/blobs` callers, see `blobs`).
//!
//! Browsers on this host are kept out, since any web page could otherwise reach 127.0.0.1:
//! every route refuses a `Host` that is not a name of this endpoint (DNS rebinding: see
//! [`host_allowed`]) unless the bearer token is presented, and mutating routes refuse a
//! request whose `Origin` is not the endpoint itself (a cross-site POST). Clients that send
//! no `Origin` (curl, the `wan` CLI, Prometheus) are not affected.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use super::{AppState, refuse};
use crate::logging::untrusted;

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
pub(super) fn token_ok(st: &AppState, headers: &HeaderMap) -> bool {
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
pub(super) fn hostname() -> Option<String> {
    let name = nix::unistd::gethostname().ok()?;
    let name = name.to_str()?.to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

/// Every route: refuses a `Host` that does not name this endpoint (DNS rebinding), unless the
/// bearer token is presented. A request without `Host` (HTTP/1.0) is not from a browser.
pub(super) async fn check_host(State(st): State<AppState>, req: Request, next: Next) -> Response {
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

pub(super) async fn authorize(
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
pub(super) fn token_needed(st: &AppState, what: &str) -> String {
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
