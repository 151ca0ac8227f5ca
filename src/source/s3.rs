//! `s3://bucket/prefix` sources: ranged GETs through the `object_store` crate (Apache Arrow's
//! maintained S3 client: SigV4, credentials from AWS_* variables, `AWS_ENDPOINT_URL` for
//! MinIO/Ceph), and the listing `wan manifest build s3://…` starts from. Its own retries are
//! off: retry, backoff and failover are the fetcher's (a build's, for a listing), the same for
//! every source. Keys are used exactly as written, never re-encoded.
//!
//! A chunk's GET streams: each piece of the body lands in the fetcher's pooled buffer and is
//! hashed there as it lands ([`Source::fetch_filling`]), as the HTTP source's are. Collected
//! whole first (`get_range`), every response was a fresh allocation (faulted in page by
//! page), copied into the chunk, then read back a second time to hash it.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use object_store::aws::AmazonS3Builder;
use object_store::{GetOptions, GetRange, ObjectStore};

use super::answer::body_too_long;
use super::{Source, SourceError};
use crate::chunk::Filler;

pub struct S3Source {
    store: Result<Arc<dyn ObjectStore>, String>,
    prefix: String,
}

impl S3Source {
    /// Configured from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_SESSION_TOKEN, AWS_REGION (default us-east-1), AWS_ENDPOINT_URL.
    pub fn new(bucket: &str, prefix: &str) -> S3Source {
        let endpoint = std::env::var("AWS_ENDPOINT_URL").ok();
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            });
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            b = b.with_region("us-east-1");
        }
        if let Some(ep) = &endpoint {
            // A custom endpoint (MinIO, Ceph) is usually path-style and may be plain HTTP.
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        // The client takes any text and panics signing its first request when the text is
        // no URL (`127.0.0.1:9000` without a scheme): refused here, naming the variable.
        let bad_endpoint = endpoint.as_ref().filter(|ep| super::http_url(ep).is_none());
        let store = match bad_endpoint {
            Some(ep) => Err(format!(
                "AWS_ENDPOINT_URL {ep:?} is not an http(s) URL with a host (such as http://minio:9000)"
            )),
            None => b
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
                .map_err(|e| format!("s3://{bucket}: {e}")),
        };
        S3Source {
            store,
            prefix: prefix.trim_matches('/').to_string(),
        }
    }
}

impl S3Source {
    /// Every object under the prefix: (path relative to the prefix, size), by path.
    /// `ListObjectsV2` with a `/` delimiter, one folder at a time (each paged by the client).
    ///
    /// A folder's own key (`prefix/`, `prefix/sub/`: the zero-byte markers S3 consoles create
    /// for "folders") is skipped: it names no file, and it would come back as a file with an
    /// empty path, or as a file `sub` that clashes with the directory `sub/`. The delimiter is
    /// what tells them apart, since the client strips a key's trailing `/`: a marker is the
    /// one object listed under its own folder's name. A marker that holds bytes is refused,
    /// naming it: no manifest path can name it.
    pub async fn list(&self) -> Result<Vec<(String, u64)>, SourceError> {
        let store = self
            .store
            .as_ref()
            .map_err(|e| SourceError::Unsupported(e.clone()))?;
        let root = self.key_path(&self.prefix)?;
        let mut folders = vec![root];
        let mut out: Vec<(String, u64)> = Vec::new();
        while let Some(folder) = folders.pop() {
            let listed = store
                .list_with_delimiter(Some(&folder).filter(|f| !f.as_ref().is_empty()))
                .await
                .map_err(classify)?;
            folders.extend(listed.common_prefixes);
            for m in listed.objects {
                if m.location == folder {
                    if m.size == 0 {
                        continue;
                    }
                    return Err(SourceError::Unsupported(format!(
                        "key {:?} ends in '/' but holds {} bytes: no file path can name it",
                        format!("{folder}/"),
                        m.size
                    )));
                }
                let key = m.location.as_ref();
                let rel = match self.prefix.is_empty() {
                    true => key,
                    false => key
                        .strip_prefix(self.prefix.as_str())
                        .map_or(key, |r| r.trim_start_matches('/')),
                };
                out.push((rel.to_string(), m.size));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The object key of `key` as written: `Path::from` would percent-encode characters
    /// such as `%`, `~` or `#` into another key (a key holding `%` was "not found").
    fn key_path(&self, key: &str) -> Result<object_store::path::Path, SourceError> {
        object_store::path::Path::parse(key).map_err(|e| {
            SourceError::Unsupported(format!(
                "{key:?} is not an S3 key this client can ask for: {e}"
            ))
        })
    }
}

fn classify(e: object_store::Error) -> SourceError {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => SourceError::NotFound,
        E::PermissionDenied { .. } => SourceError::Denied(403),
        E::Unauthenticated { .. } => SourceError::Denied(401),
        other => {
            let msg = crate::source::error_chain(&other);
            // The S3 error codes for bad credentials arrive as generic errors with a status.
            if msg.contains("403")
                || msg.contains("InvalidAccessKeyId")
                || msg.contains("SignatureDoesNotMatch")
            {
                SourceError::Denied(403)
            } else if msg.contains("416 Range Not Satisfiable") || msg.contains("InvalidRange") {
                // Asked past the object's end: what a build's size check looks for.
                SourceError::Status(416)
            } else if msg.contains("client error (Connect)") {
                // hyper's word for a connection never made (refused, no address): nothing is
                // serving, as an HTTP source says it.
                SourceError::Unreachable(msg)
            } else {
                SourceError::Transport(msg)
            }
        }
    }
}

impl S3Source {
    /// The client, or why there is none (a malformed endpoint), and the object key of `path`.
    fn target(
        &self,
        path: &str,
    ) -> Result<(&Arc<dyn ObjectStore>, object_store::path::Path), SourceError> {
        let store = self
            .store
            .as_ref()
            .map_err(|e| SourceError::Unsupported(e.clone()))?;
        let key = if self.prefix.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.prefix)
        };
        Ok((store, self.key_path(&key)?))
    }
}

impl Source for S3Source {
    fn fetch<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let (store, key) = self.target(path)?;
            let want = range.end - range.start;
            let bytes = store.get_range(&key, range).await.map_err(classify)?;
            if bytes.len() as u64 != want {
                return Err(SourceError::Short {
                    want,
                    got: bytes.len() as u64,
                });
            }
            Ok(bytes)
        })
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
            let (store, key) = self.target(path)?;
            let opts = GetOptions {
                range: Some(GetRange::Bounded(range)),
                ..Default::default()
            };
            let mut body = store
                .get_opts(&key, opts)
                .await
                .map_err(classify)?
                .into_stream();
            while let Some(piece) = body.next().await {
                if !into.fill(&piece.map_err(classify)?) {
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
        })
    }
}
