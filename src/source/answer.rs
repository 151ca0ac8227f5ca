//! What an HTTP answer to a ranged GET means, whichever client read its head: reqwest's
//! (`http.rs`) or the plain-`http://` reader's (`rawhttp.rs`). Both ask here, so the two
//! cannot disagree on which status is a body to read, a miss, a denial or a wait.

use std::ops::Range;
use std::time::Duration;

use super::SourceError;

/// Whether an answer with `status` (and `Content-Length` `length`, `Retry-After`
/// `retry_after`) to a GET of `range` is one to read the body of. `rawhttp` hands a redirect
/// to reqwest before it asks.
pub(super) fn check_status(
    status: u16,
    range: &Range<u64>,
    length: Option<u64>,
    retry_after: Option<Duration>,
) -> Result<(), SourceError> {
    match status {
        206 => Ok(()),
        // A server that ignores Range is fine only when we asked for everything.
        200 if range.start == 0 && length == Some(range.end - range.start) => Ok(()),
        200 => Err(SourceError::Transport(
            "server ignored the Range header (answered 200 to a partial request)".into(),
        )),
        404 | 410 => Err(SourceError::NotFound),
        401 | 403 => Err(SourceError::Denied(status)),
        // Only a client that follows no redirects (a peer's) sees one here.
        300..=399 => Err(SourceError::Transport(format!(
            "answered {status}, a redirect, which is not followed: a peer must serve its chunks itself"
        ))),
        429 | 503 if let Some(after) = retry_after => {
            Err(SourceError::RetryAfter { status, after })
        }
        s => Err(SourceError::Status(s)),
    }
}

/// A `Retry-After` value: delay-seconds, or an HTTP-date (taken as the time from now until
/// it, nothing if it is past). `None` if it is neither.
pub(crate) fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // An IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT") is an RFC 2822 date.
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    let at = u64::try_from(at.timestamp()).unwrap_or(0);
    Some(Duration::from_secs(at.saturating_sub(now.as_secs())))
}

/// The `Retry-After` of a head reqwest read, as [`retry_after`] takes it.
pub(crate) fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(retry_after)
}

/// A body with more than the `want` bytes asked for.
pub(super) fn body_too_long(want: u64) -> SourceError {
    SourceError::Transport(format!("body longer than the {want} bytes asked for"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let later = chrono::DateTime::from_timestamp(now.as_secs() as i64 + 120, 0)
            .unwrap()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let got = retry_after(&later).unwrap();
        assert!((118..=120).contains(&got.as_secs()), "{later}: {got:?}");
        assert_eq!(retry_after("soon"), None);
        let e = check_status(429, &(0..1), None, Some(Duration::from_secs(3)));
        assert!(
            matches!(e, Err(SourceError::RetryAfter { status: 429, after })
                if after == Duration::from_secs(3)),
            "{e:?}"
        );
        let e = check_status(429, &(0..1), None, None);
        assert!(matches!(e, Err(SourceError::Status(429))), "{e:?}");
    }
}
