//! `/blobs/{sha256}`: a blob's bytes for peers, served apart from the control routes because
//! it is a byte stream (ranges, a cap on bodies in flight), not an operation on models. Only
//! chunks this cache holds verified are served; the caller verifies them again against its
//! own manifest. `/blobs` bodies, the endpoint's only long answers, have at most
//! [`MAX_BLOB_STREAMS`] places and [`BLOB_PIECE`] of memory each, so the control routes always
//! keep room.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;

use super::auth::{token_needed, token_ok};
use super::{AppState, refuse};
use crate::control::routes;
use crate::store::PeerMiss;

/// `/blobs` bodies being sent at once: half of
/// [`MAX_CONNECTIONS`](super::server::MAX_CONNECTIONS), so however many peers (or stalled
/// clients) fetch blobs, the other half stays for `/health`, the CLI and scrapers. A peer
/// refused with 503 asks its next source.
pub(super) const MAX_BLOB_STREAMS: usize = super::server::MAX_CONNECTIONS / 2;

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
/// piece hyper is writing (plus [`CONN_BUF_BYTES`](super::server::CONN_BUF_BYTES)). At 1 MiB,
/// 140 stalled clients grew the daemon by 130 MB; a peer's 1 MiB part is four reads.
const BLOB_PIECE: u64 = 256 << 10;

/// `GET`/`HEAD /blobs/<sha256>` (with `Range`): bytes of a blob for another daemon, answered
/// only from chunks this cache holds verified: 206 with the bytes, or 404 at once if any chunk
/// the range touches is absent, so the caller moves on to its next peer or the origin. The
/// caller verifies every chunk against its own manifest: nothing here is trusted by it.
/// Under `http.require_token` the bearer token is required, from loopback clients too.
pub(super) async fn blob(
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
}
