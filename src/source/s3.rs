//! `s3://bucket/prefix` sources: ranged GETs through the `object_store` crate (Apache Arrow's
//! maintained S3 client: SigV4, credentials from AWS_* variables, `AWS_ENDPOINT_URL` for
//! MinIO/Ceph). Its own retries are off: retry, backoff and failover are the fetcher's, the
//! same for every source.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

use super::{Source, SourceError};

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
        S3Source {
            store: b
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
                .map_err(|e| format!("s3://{bucket}: {e}")),
            prefix: prefix.trim_matches('/').to_string(),
        }
    }
}

impl S3Source {
    /// Every object under the prefix: (path relative to the prefix, size), by path.
    /// `ListObjectsV2`, paged by the client.
    pub async fn list(&self) -> Result<Vec<(String, u64)>, SourceError> {
        use futures::TryStreamExt;
        let store = self
            .store
            .as_ref()
            .map_err(|e| SourceError::Unsupported(e.clone()))?;
        let prefix =
            (!self.prefix.is_empty()).then(|| object_store::path::Path::from(self.prefix.as_str()));
        let mut out: Vec<(String, u64)> = store
            .list(prefix.as_ref())
            .map_ok(|m| {
                let key = m.location.as_ref();
                let rel = match self.prefix.is_empty() {
                    true => key,
                    false => key
                        .strip_prefix(self.prefix.as_str())
                        .map_or(key, |r| r.trim_start_matches('/')),
                };
                (rel.to_string(), m.size)
            })
            .try_collect()
            .await
            .map_err(classify)?;
        out.sort();
        Ok(out)
    }
}

fn classify(e: object_store::Error) -> SourceError {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => SourceError::NotFound,
        E::PermissionDenied { .. } => SourceError::Denied(403),
        E::Unauthenticated { .. } => SourceError::Denied(401),
        other => {
            let msg = other.to_string();
            // The S3 error codes for bad credentials arrive as generic errors with a status.
            if msg.contains("403")
                || msg.contains("InvalidAccessKeyId")
                || msg.contains("SignatureDoesNotMatch")
            {
                SourceError::Denied(403)
            } else {
                SourceError::Transport(msg)
            }
        }
    }
}

impl Source for S3Source {
    fn fetch<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let store = self
                .store
                .as_ref()
                .map_err(|e| SourceError::Unsupported(e.clone()))?;
            let key = if self.prefix.is_empty() {
                path.to_string()
            } else {
                format!("{}/{path}", self.prefix)
            };
            let want = range.end - range.start;
            let bytes = store
                .get_range(&object_store::path::Path::from(key), range)
                .await
                .map_err(classify)?;
            if bytes.len() as u64 != want {
                return Err(SourceError::Short {
                    want,
                    got: bytes.len() as u64,
                });
            }
            Ok(bytes)
        })
    }
}
