//! `local://` and `file://` sources: a directory holding the model tree (a local mirror, NFS,
//! the demo fixtures).

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::{Source, SourceError};

pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    pub fn new(root: PathBuf) -> DirSource {
        DirSource { root }
    }
}

impl Source for DirSource {
    fn fetch<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, SourceError>> {
        let full = self.root.join(path);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&full).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => SourceError::NotFound,
                    std::io::ErrorKind::PermissionDenied => SourceError::Denied(0),
                    _ => SourceError::Transport(e.to_string()),
                })?;
                let want = range.end - range.start;
                let mut buf = vec![0u8; want as usize];
                let mut got = 0usize;
                while got < buf.len() {
                    match f.read_at(&mut buf[got..], range.start + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(SourceError::Transport(e.to_string())),
                    }
                }
                if (got as u64) < want {
                    return Err(SourceError::Short {
                        want,
                        got: got as u64,
                    });
                }
                Ok(Bytes::from(buf))
            })
            .await
            .map_err(|e| SourceError::Transport(e.to_string()))?
        })
    }
}
