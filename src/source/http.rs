//! `http(s)://` and `hf://` sources: ranged GETs with reqwest, or for plain `http://`
//! with `rawhttp` (straight into the caller's buffer).
//!
//! The bearer token (HF_TOKEN) is sent only to the configured host: reqwest drops the
//! Authorization header when a redirect leaves the host (as the Hub's CDN redirects do).

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use reqwest::header::{AUTHORIZATION, RANGE};

use super::answer::{body_too_long, check_status, retry_after_header};
use super::rawhttp::{Raw, RawHttp};
use super::{Source, SourceError};
use crate::chunk::Filler;
use crate::config::FetchConfig;

/// The one HTTP client of the daemon: a pool of keep-alive connections shared by all sources
/// (peers have their own, for its shorter `connect_timeout`).
pub fn http_client(
    cfg: &FetchConfig,
    connect_timeout: std::time::Duration,
) -> anyhow::Result<reqwest::Client> {
    Ok(client_builder(cfg, connect_timeout)
        .redirect(reqwest::redirect::Policy::custom(
            |a| match refused_redirect(a.previous(), a.url()) {
                Some(why) => a.error(why),
                None => a.follow(),
            },
        ))
        .build()?)
}

/// How many redirects one request follows: reqwest's own default.
const MAX_REDIRECTS: usize = 10;

/// Why a redirect to `to`, after the URLs `before` (the one asked first, then each redirect
/// so far), is not followed: from `https` to plain `http` (an origin or registry asked over
/// TLS must not have its bytes, or a presigned URL's signature, sent in clear: docker and oras
/// refuse the same), or one hop too many.
fn refused_redirect(before: &[reqwest::Url], to: &reqwest::Url) -> Option<String> {
    if before.len() > MAX_REDIRECTS {
        return Some(format!("more than {MAX_REDIRECTS} redirects"));
    }
    let from = before.last()?;
    (from.scheme() == "https" && to.scheme() == "http").then(|| {
        format!(
            "{} redirected from https to plain http ({}): not followed",
            from.host_str().unwrap_or(""),
            to.host_str().unwrap_or("")
        )
    })
}

/// The client peers are asked through: like [`http_client`], but a redirect is an answer, not
/// followed. A peer serves the chunks of its own cache; one that sends its callers elsewhere
/// (misconfigured, or hostile: every daemon of the fleet would follow it, token stripped or
/// not) is failing, and cools down like any failing peer.
pub fn peer_client(
    cfg: &FetchConfig,
    connect_timeout: std::time::Duration,
) -> anyhow::Result<reqwest::Client> {
    Ok(client_builder(cfg, connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

fn client_builder(cfg: &FetchConfig, connect_timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.connections)
        .pool_idle_timeout(std::time::Duration::from_secs(300))
        .tcp_nodelay(true)
        .connect_timeout(connect_timeout)
        .user_agent(concat!("wanfs/", env!("CARGO_PKG_VERSION")))
}

pub struct HttpSource {
    client: reqwest::Client,
    /// Plain `http://` without a proxy: bodies read straight into the caller's buffer.
    raw: Option<RawHttp>,
    /// The base URL up to its query string.
    base: String,
    /// The base URL's query (`X-Amz-Signature=…` of a signed URL), sent with every request.
    query: Option<String>,
    token: Option<String>,
}

impl HttpSource {
    /// `connect_timeout` and `max_idle` are for the plain-`http://` path (reqwest's client
    /// has its own).
    pub fn new(
        client: reqwest::Client,
        base: String,
        token: Option<String>,
        connect_timeout: std::time::Duration,
        max_idle: usize,
    ) -> HttpSource {
        let (base, query) = match base.split_once('?') {
            Some((b, q)) => (b.to_string(), Some(q.to_string())),
            None => (base, None),
        };
        // As reqwest would send it (a space in the path percent-encoded...), so that the
        // plain-`http://` path, which sends the path as written here, sends the same.
        let base = reqwest::Url::parse(&base).map(String::from).unwrap_or(base);
        HttpSource {
            client,
            raw: RawHttp::for_base(&base, connect_timeout, max_idle),
            base: base.trim_end_matches('/').to_string(),
            query,
            token,
        }
    }

    /// The file's path goes before the base's query, never after it.
    fn url(&self, path: &str) -> String {
        let mut url = self.base.clone();
        for seg in path.split('/') {
            url.push('/');
            encode_segment(seg, &mut url);
        }
        if let Some(q) = &self.query {
            url.push('?');
            url.push_str(q);
        }
        url
    }
}

/// What a path segment keeps as is: RFC 3986 unreserved characters and a few safe ones.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@')
    .remove(b'+')
    .remove(b'=')
    .remove(b',');

/// Percent-encodes one path segment.
pub(crate) fn encode_segment(seg: &str, out: &mut String) {
    out.extend(percent_encoding::utf8_percent_encode(seg, SEGMENT));
}

/// The URL is left out of the message: it may carry a signature in its query, and the
/// source's masked name already says where the error came from.
/// Lands the body of `resp`, an answer to a GET of `want` bytes, in `into` as it arrives:
/// exactly `want` bytes, or an error (too long, too short, cut).
pub(super) async fn fill_body(
    resp: reqwest::Response,
    want: u64,
    into: &mut Filler<'_>,
) -> Result<(), SourceError> {
    let mut body = resp.bytes_stream();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(transport)?;
        if !into.fill(&piece) {
            return Err(body_too_long(want));
        }
    }
    if (into.filled() as u64) < want {
        return Err(SourceError::Short {
            want,
            got: into.filled() as u64,
        });
    }
    Ok(())
}

pub(super) fn transport(e: reqwest::Error) -> SourceError {
    let e = e.without_url();
    let connect = e.is_connect();
    if e.is_timeout() {
        SourceError::Timeout
    } else {
        // The chain carries the useful part ("connection refused", "reset by peer").
        let msg = super::error_chain(&e);
        if connect {
            SourceError::Unreachable(msg)
        } else if e.is_redirect() {
            // A redirect refused ([`refused_redirect`]) will be refused again: not retried.
            SourceError::Unsupported(msg)
        } else {
            SourceError::Transport(msg)
        }
    }
}

impl HttpSource {
    /// Sends the ranged GET and checks the answer's status.
    async fn get(&self, path: &str, range: &Range<u64>) -> Result<reqwest::Response, SourceError> {
        let mut req = self
            .client
            .get(self.url(path))
            .header(RANGE, format!("bytes={}-{}", range.start, range.end - 1));
        if let Some(t) = &self.token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = req.send().await.map_err(transport)?;
        check_status(
            resp.status().as_u16(),
            range,
            resp.content_length(),
            retry_after_header(resp.headers()),
        )?;
        Ok(resp)
    }
}

impl Source for HttpSource {
    fn fetch<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, SourceError>> {
        super::fetch_filled(self, path, range)
    }

    fn streams(&self) -> bool {
        true
    }

    fn fetch_filling<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
        into: &'a mut Filler<'_>,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let want = range.end - range.start;
            if want == 0 {
                return Ok(());
            }
            // Skipped for good once the server answered what only reqwest reads.
            if let Some(raw) = self.raw.as_ref().filter(|r| r.in_use()) {
                let url = self.url(path);
                match raw
                    .fetch_into(&url[raw.path_at..], &range, self.token.as_deref(), into)
                    .await
                {
                    Raw::Done => return Ok(()),
                    Raw::Failed(e) => return Err(e),
                    Raw::Fallback => into.reset(),
                }
            }
            let resp = self.get(path, &range).await?;
            fill_body(resp, want, into).await
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_redirect_from_https_to_plain_http_is_refused() {
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        let registry = u("https://registry.example/v2/m/blobs/sha256:00");
        let why = super::refused_redirect(
            std::slice::from_ref(&registry),
            &u("http://storage.example/blob?X-Amz-Signature=secret"),
        )
        .expect("refused");
        assert!(
            why.contains("registry.example") && why.contains("storage.example"),
            "{why}"
        );
        // Nothing of the URL but its hosts: a presigned URL's signature stays out of logs.
        assert!(!why.contains("secret"), "{why}");
        // https to https (a presigned URL, the Hub's CDN), and plain http anywhere, are followed.
        let tls = u("https://storage.example/blob");
        assert_eq!(
            super::refused_redirect(std::slice::from_ref(&registry), &tls),
            None
        );
        let plain = u("http://127.0.0.1:5000/v2/m/blobs/sha256:00");
        assert_eq!(
            super::refused_redirect(std::slice::from_ref(&plain), &u("http://127.0.0.1:6000/b")),
            None
        );
        // An https hop anywhere before counts from the hop that redirects now.
        assert!(super::refused_redirect(&[plain, tls.clone()], &u("http://x.example/")).is_some());
        assert!(super::refused_redirect(&vec![tls; 11], &registry).is_some());
    }

    #[test]
    fn path_goes_before_the_query_of_a_signed_base() {
        let s = super::HttpSource::new(
            reqwest::Client::new(),
            "http://h/base/?X-Amz-Signature=s3cr3t&x=1".into(),
            None,
            std::time::Duration::from_secs(1),
            1,
        );
        assert_eq!(
            s.url("vae/a b.pth"),
            "http://h/base/vae/a%20b.pth?X-Amz-Signature=s3cr3t&x=1"
        );
    }

    /// The plain-`http://` path sends the base's path encoded as reqwest would.
    #[test]
    fn the_base_is_sent_as_reqwest_sends_it() {
        let s = super::HttpSource::new(
            reqwest::Client::new(),
            "http://H:80/my models/".into(),
            None,
            std::time::Duration::from_secs(1),
            1,
        );
        let url = s.url("f");
        assert_eq!(url, "http://h/my%20models/f");
        if let Some(raw) = &s.raw {
            assert_eq!(&url[raw.path_at..], "/my%20models/f");
        }
    }

    #[test]
    fn segments_are_encoded() {
        let mut s = String::new();
        super::encode_segment("a b#?%@1.0.0", &mut s);
        assert_eq!(s, "a%20b%23%3F%25@1.0.0");
    }
}
