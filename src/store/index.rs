//! The cache index (`v1/index.sqlite`): which chunks of which blob are present and verified.
//! The only rusqlite user.
//!
//! A row in `chunks` is written only after the chunk's bytes were verified and made durable in
//! the blob file (`fdatasync`), so a row always means "on disk and verified". WAL with
//! synchronous=NORMAL: a power loss may forget the last few rows (those chunks are fetched
//! again), but never leaves a row without its bytes.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use crate::chunk::Digest;

/// Bumped when the schema changes incompatibly; pinned by a test.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    chunk_size  INTEGER NOT NULL,
    created     INTEGER NOT NULL,
    last_access INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    blob   TEXT NOT NULL,
    idx    INTEGER NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (blob, idx)
) WITHOUT ROWID;
";

#[derive(Debug, thiserror::Error)]
#[error("cache index {path}: {err}")]
pub struct IndexError {
    pub path: String,
    pub err: rusqlite::Error,
}

/// A blob as recorded in the index.
#[derive(Debug, Clone)]
pub struct BlobRow {
    pub digest: Digest,
    pub size: u64,
    pub chunk_size: u64,
    /// (index, digest) of every present chunk.
    pub chunks: Vec<(u64, Digest)>,
}

pub struct Index {
    path: String,
    conn: Mutex<Connection>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Index {
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let p = path.display().to_string();
        let wrap = |err| IndexError {
            path: p.clone(),
            err,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(wrap)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(wrap)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(wrap)?;
        conn.execute_batch(SCHEMA).map_err(wrap)?;
        let version: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(wrap)?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                    [SCHEMA_VERSION.to_string()],
                )
                .map_err(wrap)?;
            }
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(v) => {
                return Err(wrap(rusqlite::Error::InvalidParameterName(format!(
                    "index schema version {v} is not supported by this wan (want {SCHEMA_VERSION})"
                ))));
            }
        }
        Ok(Index {
            path: p,
            conn: Mutex::new(conn),
        })
    }

    fn err(&self, err: rusqlite::Error) -> IndexError {
        IndexError {
            path: self.path.clone(),
            err,
        }
    }

    /// Every blob with its present chunks.
    pub fn load(&self) -> Result<Vec<BlobRow>, IndexError> {
        let conn = self.conn.lock().unwrap();
        let mut blobs = Vec::new();
        let mut stmt = conn
            .prepare("SELECT digest, size, chunk_size FROM blobs")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (d, size, cs) = row.map_err(|e| self.err(e))?;
            let Ok(digest) = d.parse() else { continue };
            blobs.push(BlobRow {
                digest,
                size: size as u64,
                chunk_size: cs as u64,
                chunks: Vec::new(),
            });
        }
        let mut stmt = conn
            .prepare("SELECT idx, digest FROM chunks WHERE blob = ?1")
            .map_err(|e| self.err(e))?;
        for b in &mut blobs {
            let rows = stmt
                .query_map([b.digest.to_hex()], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(|e| self.err(e))?;
            for row in rows {
                let (idx, d) = row.map_err(|e| self.err(e))?;
                if let Ok(d) = d.parse() {
                    b.chunks.push((idx as u64, d));
                }
            }
        }
        Ok(blobs)
    }

    /// Records a blob (no chunks yet). If it exists with another chunk size, its chunk rows
    /// are dropped: presence is tracked per chunk of one layout.
    pub fn upsert_blob(
        &self,
        digest: Digest,
        size: u64,
        chunk_size: u64,
    ) -> Result<bool, IndexError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let hex = digest.to_hex();
        let existing: Option<(i64, i64)> = tx
            .query_row(
                "SELECT size, chunk_size FROM blobs WHERE digest = ?1",
                [&hex],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let reset = match existing {
            Some((s, cs)) if s as u64 == size && cs as u64 == chunk_size => false,
            Some(_) => {
                tx.execute("DELETE FROM chunks WHERE blob = ?1", [&hex])
                    .map_err(|e| self.err(e))?;
                tx.execute(
                    "UPDATE blobs SET size = ?2, chunk_size = ?3 WHERE digest = ?1",
                    params![hex, size as i64, chunk_size as i64],
                )
                .map_err(|e| self.err(e))?;
                true
            }
            None => {
                tx.execute(
                    "INSERT INTO blobs (digest, size, chunk_size, created, last_access) VALUES (?1, ?2, ?3, ?4, ?4)",
                    params![hex, size as i64, chunk_size as i64, now()],
                )
                .map_err(|e| self.err(e))?;
                false
            }
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(reset)
    }

    /// Marks chunks present. Call only after their bytes are verified and durable.
    pub fn mark_present(&self, blob: Digest, chunks: &[(u64, Digest)]) -> Result<(), IndexError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO chunks (blob, idx, digest) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| self.err(e))?;
            let hex = blob.to_hex();
            for (idx, d) in chunks {
                stmt.execute(params![hex, *idx as i64, d.to_hex()])
                    .map_err(|e| self.err(e))?;
            }
            tx.execute(
                "UPDATE blobs SET last_access = ?2 WHERE digest = ?1",
                params![hex, now()],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Forgets a blob and its chunks (its file must be removed after).
    pub fn forget_blob(&self, blob: Digest) -> Result<(), IndexError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let hex = blob.to_hex();
        tx.execute("DELETE FROM chunks WHERE blob = ?1", [&hex])
            .map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM blobs WHERE digest = ?1", [&hex])
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the on-disk format: changing the schema must bump SCHEMA_VERSION.
    #[test]
    fn schema_is_pinned() {
        assert_eq!(SCHEMA_VERSION, 1);
        assert!(SCHEMA.contains("PRIMARY KEY (blob, idx)"));
    }

    #[test]
    fn rows_survive_reopen_and_layout_change_resets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.sqlite");
        let b = Digest::of(b"blob");
        {
            let ix = Index::open(&p).unwrap();
            assert!(!ix.upsert_blob(b, 100, 10).unwrap());
            ix.mark_present(b, &[(3, Digest::of(b"c3"))]).unwrap();
        }
        let ix = Index::open(&p).unwrap();
        let rows = ix.load().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].chunks, vec![(3, Digest::of(b"c3"))]);
        assert!(ix.upsert_blob(b, 100, 20).unwrap());
        assert!(ix.load().unwrap()[0].chunks.is_empty());
        ix.forget_blob(b).unwrap();
        assert!(ix.load().unwrap().is_empty());
    }
}
