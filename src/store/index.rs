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

use crate::chunk::{Digest, Layout, LayoutKind};

/// Bumped when the schema changes; pinned by a test. Versions 1 (no `head_size`) and 2 (no
/// `layout`, no `whole_checked`) are migrated in place at open.
pub const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    chunk_size  INTEGER NOT NULL,
    head_size   INTEGER NOT NULL DEFAULT 0,
    layout      INTEGER NOT NULL DEFAULT 0,
    created     INTEGER NOT NULL,
    last_access INTEGER NOT NULL,
    whole_checked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS chunks (
    blob   TEXT NOT NULL,
    idx    INTEGER NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (blob, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS models (
    id            TEXT PRIMARY KEY,
    pinned        INTEGER,
    corrupt       INTEGER NOT NULL DEFAULT 0,
    last_verified INTEGER,
    last_error    TEXT
);
CREATE TABLE IF NOT EXISTS events (
    ts      INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    model   TEXT NOT NULL DEFAULT '',
    file    TEXT NOT NULL DEFAULT '',
    bytes   INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    status  TEXT NOT NULL DEFAULT '',
    detail  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE TABLE IF NOT EXISTS refused (
    digest TEXT PRIMARY KEY,
    entry  TEXT NOT NULL,
    actual TEXT NOT NULL,
    model  TEXT NOT NULL,
    file   TEXT NOT NULL,
    ts     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS storage_samples (
    ts    INTEGER PRIMARY KEY,
    used  INTEGER NOT NULL,
    total INTEGER NOT NULL
);
";

/// Per-model facts the operator sets or verification finds (the rest is derived from chunks).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelRow {
    /// `None`: as the manifest says; `Some`: the operator's pin/unpin.
    pub pinned: Option<bool>,
    pub corrupt: bool,
    pub last_verified: Option<u64>,
    pub last_error: Option<String>,
}

/// One line of history: a download, an eviction, a verification, an error.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Event {
    pub ts: u64,
    pub kind: String,
    pub model: String,
    pub file: String,
    pub bytes: u64,
    pub seconds: f64,
    pub status: String,
    pub detail: String,
}

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
    pub layout: Layout,
    pub last_access: u64,
    /// The complete blob's whole-file sha256 was checked against its name.
    pub whole_checked: bool,
    /// (index, digest) of every present chunk.
    pub chunks: Vec<(u64, Digest)>,
}

/// A blob refused by its whole-file check: the manifest entry (`entry`, a fingerprint of its
/// layout and chunk digests) whose chunks verified but whose bytes hash to `actual`, not to
/// the sha256 that names them (see `store/checked.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedRow {
    pub digest: Digest,
    pub entry: Digest,
    pub actual: Digest,
    pub model: String,
    pub file: String,
    pub ts: u64,
}

pub struct Index {
    path: String,
    conn: Mutex<Connection>,
}

#[cfg(test)]
impl Index {
    /// Holds the connection, as a slow SQLite write (a busy disk) would.
    pub(crate) fn stall(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap()
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now() -> i64 {
    now_secs() as i64
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
        Index::init(conn, p)
    }

    /// For a cache on a read-only filesystem: an index in memory, starting as a copy of the
    /// one at `path` (read as an immutable file: rows a crash left in its write-ahead log are
    /// not seen, and their chunks are simply not present), or empty where there is none. It
    /// takes the writes of a running daemon (model states, events) and forgets them at exit.
    pub fn open_copy_in_memory(path: &Path) -> Result<Index, IndexError> {
        let p = format!("{} (in memory: read-only cache)", path.display());
        let wrap = |err| IndexError {
            path: p.clone(),
            err,
        };
        let mut conn = Connection::open_in_memory().map_err(wrap)?;
        if path.exists() {
            use rusqlite::OpenFlags;
            let mut uri = String::from("file:");
            uri.push_str(
                &percent_encoding::utf8_percent_encode(
                    &path.to_string_lossy(),
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .to_string()
                .replace("%2F", "/"),
            );
            uri.push_str("?immutable=1");
            let disk = Connection::open_with_flags(
                &uri,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
            )
            .map_err(wrap)?;
            rusqlite::backup::Backup::new(&disk, &mut conn)
                .and_then(|b| b.run_to_completion(1024, std::time::Duration::ZERO, None))
                .map_err(wrap)?;
        }
        Index::init(conn, p)
    }

    /// Creates or migrates the schema on `conn`.
    fn init(conn: Connection, p: String) -> Result<Index, IndexError> {
        let wrap = |err| IndexError {
            path: p.clone(),
            err,
        };
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
            // Version 1 had uniform chunks only: every blob's head is its chunk size (0).
            // Versions 1 and 2 had the head grid only (`LayoutKind::Head`, code 0), and never
            // checked a whole file: every blob is checked again once.
            Some(v) if v == "1" || v == "2" => {
                let head = match v.as_str() {
                    "1" => "ALTER TABLE blobs ADD COLUMN head_size INTEGER NOT NULL DEFAULT 0;",
                    _ => "",
                };
                conn.execute_batch(&format!(
                    "BEGIN;
                     {head}
                     ALTER TABLE blobs ADD COLUMN layout INTEGER NOT NULL DEFAULT 0;
                     ALTER TABLE blobs ADD COLUMN whole_checked INTEGER NOT NULL DEFAULT 0;
                     UPDATE meta SET value = '3' WHERE key = 'schema_version';
                     COMMIT;",
                ))
                .map_err(wrap)?;
            }
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
            .prepare(
                "SELECT digest, size, chunk_size, head_size, last_access, layout, whole_checked \
                 FROM blobs",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (d, size, cs, head, la, kind, checked) = row.map_err(|e| self.err(e))?;
            let Ok(digest) = d.parse() else { continue };
            let (cs, head) = (cs as u64, head as u64);
            let head = if head == 0 { cs } else { head };
            // A row no layout can describe is skipped: its chunks are simply fetched again.
            let Some(kind) = u8::try_from(kind).ok().and_then(LayoutKind::from_code) else {
                continue;
            };
            if !kind.fits(cs, head) {
                continue;
            }
            blobs.push(BlobRow {
                digest,
                layout: Layout::of(kind, size as u64, cs, head),
                last_access: la as u64,
                whole_checked: checked != 0,
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

    /// Records a blob (no chunks yet). If it exists with another layout (sizes or kind), its
    /// chunk rows are dropped: presence is tracked per chunk of one layout.
    pub fn upsert_blob(&self, digest: Digest, layout: Layout) -> Result<bool, IndexError> {
        let (size, cs, head, kind) = (
            layout.size as i64,
            layout.chunk_size as i64,
            layout.head as i64,
            i64::from(layout.kind.code()),
        );
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let hex = digest.to_hex();
        let existing: Option<(i64, i64, i64, i64)> = tx
            .query_row(
                "SELECT size, chunk_size, head_size, layout FROM blobs WHERE digest = ?1",
                [&hex],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let reset = match existing {
            Some((s, c, h, k))
                if s == size && c == cs && (h == head || (h == 0 && head == cs)) && k == kind =>
            {
                false
            }
            Some(_) => {
                tx.execute("DELETE FROM chunks WHERE blob = ?1", [&hex])
                    .map_err(|e| self.err(e))?;
                tx.execute(
                    "UPDATE blobs SET size = ?2, chunk_size = ?3, head_size = ?4, layout = ?5, whole_checked = 0 WHERE digest = ?1",
                    params![hex, size, cs, head, kind],
                )
                .map_err(|e| self.err(e))?;
                true
            }
            None => {
                tx.execute(
                    "INSERT INTO blobs (digest, size, chunk_size, head_size, layout, created, last_access) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                    params![hex, size, cs, head, kind, now()],
                )
                .map_err(|e| self.err(e))?;
                false
            }
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(reset)
    }

    /// Marks chunks of several blobs present in one transaction (a group commit): one
    /// journal write for the lot, all or none. Call only after their bytes are verified and
    /// durable.
    pub fn mark_present_many(
        &self,
        blobs: &[(Digest, &[(u64, Digest)])],
    ) -> Result<(), IndexError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO chunks (blob, idx, digest) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| self.err(e))?;
            let mut touch = tx
                .prepare_cached("UPDATE blobs SET last_access = ?2 WHERE digest = ?1")
                .map_err(|e| self.err(e))?;
            let now = now();
            for (blob, chunks) in blobs {
                let hex = blob.to_hex();
                for (idx, d) in *chunks {
                    insert
                        .execute(params![hex, *idx as i64, d.to_hex()])
                        .map_err(|e| self.err(e))?;
                }
                touch.execute(params![hex, now]).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Forgets one chunk (found corrupt); the blob is no longer whole-checked.
    pub fn forget_chunk(&self, blob: Digest, idx: u64) -> Result<(), IndexError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "DELETE FROM chunks WHERE blob = ?1 AND idx = ?2",
            params![blob.to_hex(), idx as i64],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE blobs SET whole_checked = 0 WHERE digest = ?1",
            [blob.to_hex()],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Records that a complete blob's whole-file sha256 was checked and matched.
    pub fn set_whole_checked(&self, blob: Digest) -> Result<(), IndexError> {
        let conn = self.conn.lock().unwrap();
        conn.execute(
            "UPDATE blobs SET whole_checked = 1 WHERE digest = ?1",
            [blob.to_hex()],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records a refused blob (replacing an earlier refusal of the same digest).
    pub fn add_refused(&self, r: &RefusedRow) -> Result<(), IndexError> {
        let conn = self.conn.lock().unwrap();
        conn.execute(
            "INSERT OR REPLACE INTO refused (digest, entry, actual, model, file, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                r.digest.to_hex(),
                r.entry.to_hex(),
                r.actual.to_hex(),
                r.model,
                r.file,
                r.ts as i64
            ],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Forgets a blob's refusal; whether there was one.
    pub fn remove_refused(&self, blob: Digest) -> Result<bool, IndexError> {
        let conn = self.conn.lock().unwrap();
        let n = conn
            .execute("DELETE FROM refused WHERE digest = ?1", [blob.to_hex()])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    /// Every refused blob.
    pub fn refused(&self) -> Result<Vec<RefusedRow>, IndexError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn
            .prepare("SELECT digest, entry, actual, model, file, ts FROM refused")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (d, entry, actual, model, file, ts) = row.map_err(|e| self.err(e))?;
            // A row that does not parse refuses nothing: it is skipped.
            if let (Ok(digest), Ok(entry), Ok(actual)) = (d.parse(), entry.parse(), actual.parse())
            {
                out.push(RefusedRow {
                    digest,
                    entry,
                    actual,
                    model,
                    file,
                    ts: ts as u64,
                });
            }
        }
        Ok(out)
    }

    /// Digests of a blob's present chunks, as recorded at commit.
    pub fn chunk_digests(&self, blob: Digest) -> Result<Vec<(u64, Digest)>, IndexError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn
            .prepare_cached("SELECT idx, digest FROM chunks WHERE blob = ?1")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([blob.to_hex()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (idx, d) = row.map_err(|e| self.err(e))?;
            if let Ok(d) = d.parse() {
                out.push((idx as u64, d));
            }
        }
        Ok(out)
    }

    pub fn set_last_access(&self, rows: &[(Digest, u64)]) -> Result<(), IndexError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        for (d, ts) in rows {
            tx.execute(
                "UPDATE blobs SET last_access = ?2 WHERE digest = ?1",
                params![d.to_hex(), *ts as i64],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    pub fn model(&self, id: &str) -> Result<ModelRow, IndexError> {
        let conn = self.conn.lock().unwrap();
        conn.query_row(
            "SELECT pinned, corrupt, last_verified, last_error FROM models WHERE id = ?1",
            [id],
            |r| {
                Ok(ModelRow {
                    pinned: r.get::<_, Option<i64>>(0)?.map(|v| v != 0),
                    corrupt: r.get::<_, i64>(1)? != 0,
                    last_verified: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                    last_error: r.get(3)?,
                })
            },
        )
        .optional()
        .map(Option::unwrap_or_default)
        .map_err(|e| self.err(e))
    }

    pub fn update_model(
        &self,
        id: &str,
        f: impl FnOnce(&mut ModelRow),
    ) -> Result<ModelRow, IndexError> {
        let mut row = self.model(id)?;
        f(&mut row);
        let conn = self.conn.lock().unwrap();
        conn.execute(
            "INSERT INTO models (id, pinned, corrupt, last_verified, last_error) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO UPDATE SET pinned = ?2, corrupt = ?3, last_verified = ?4, last_error = ?5",
            params![
                id,
                row.pinned.map(i64::from),
                row.corrupt as i64,
                row.last_verified.map(|v| v as i64),
                row.last_error
            ],
        )
        .map_err(|e| self.err(e))?;
        Ok(row)
    }

    pub fn add_event(&self, e: &Event) -> Result<(), IndexError> {
        let conn = self.conn.lock().unwrap();
        conn.execute(
            "INSERT INTO events (ts, kind, model, file, bytes, seconds, status, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![e.ts as i64, e.kind, e.model, e.file, e.bytes as i64, e.seconds, e.status, e.detail],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Events at or after `since`, oldest first, at most `limit`, newest kept.
    pub fn events(&self, since: u64, limit: usize) -> Result<Vec<Event>, IndexError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn
            .prepare_cached(
                "SELECT ts, kind, model, file, bytes, seconds, status, detail FROM events
                 WHERE ts >= ?1 ORDER BY rowid DESC LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![since as i64, limit as i64], |r| {
                Ok(Event {
                    ts: r.get::<_, i64>(0)? as u64,
                    kind: r.get(1)?,
                    model: r.get(2)?,
                    file: r.get(3)?,
                    bytes: r.get::<_, i64>(4)? as u64,
                    seconds: r.get(5)?,
                    status: r.get(6)?,
                    detail: r.get(7)?,
                })
            })
            .map_err(|e| self.err(e))?;
        let mut out: Vec<Event> = rows.collect::<Result<_, _>>().map_err(|e| self.err(e))?;
        out.reverse();
        Ok(out)
    }

    pub fn add_storage_sample(&self, ts: u64, used: u64, total: u64) -> Result<(), IndexError> {
        let conn = self.conn.lock().unwrap();
        conn.execute(
            "INSERT OR REPLACE INTO storage_samples (ts, used, total) VALUES (?1, ?2, ?3)",
            params![ts as i64, used as i64, total as i64],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// (ts, used, total) samples at or after `since`, oldest first.
    pub fn storage_samples(&self, since: u64) -> Result<Vec<(u64, u64, u64)>, IndexError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn
            .prepare_cached(
                "SELECT ts, used, total FROM storage_samples WHERE ts >= ?1 ORDER BY ts",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([since as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Rewrites the database compactly (deep-clean).
    pub fn vacuum(&self) -> Result<(), IndexError> {
        let conn = self.conn.lock().unwrap();
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;")
            .map_err(|e| self.err(e))
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
        assert_eq!(SCHEMA_VERSION, 3);
        assert!(SCHEMA.contains("PRIMARY KEY (blob, idx)"));
        assert!(SCHEMA.contains("head_size   INTEGER NOT NULL DEFAULT 0"));
        assert!(SCHEMA.contains("whole_checked INTEGER NOT NULL DEFAULT 0"));
        assert!(SCHEMA.contains("CREATE TABLE IF NOT EXISTS refused ("));
        assert!(SCHEMA.contains("layout      INTEGER NOT NULL DEFAULT 0"));
        assert_eq!(
            LayoutKind::Head.code(),
            0,
            "what rows of versions 1 and 2 mean"
        );
    }

    /// A cache written by a version-2 wan (the head grid only) opens, keeps its chunks, and
    /// reads its blobs under the head grid; a blob seen again under the aligned layout of the
    /// same sizes is another grid, its presence reset; the kind survives a reopen.
    #[test]
    fn version_2_index_is_migrated_and_the_layout_kind_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.sqlite");
        let b = Digest::of(b"old");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                &SCHEMA
                    .replace("    layout      INTEGER NOT NULL DEFAULT 0,\n", "")
                    .replace(",\n    whole_checked INTEGER NOT NULL DEFAULT 0", ""),
            )
            .unwrap();
            c.execute_batch(&format!(
                "INSERT INTO meta VALUES ('schema_version', '2');
                 INSERT INTO blobs (digest, size, chunk_size, head_size, created, last_access)
                     VALUES ('{b}', 10000, 4096, 1024, 0, 0);
                 INSERT INTO chunks VALUES ('{b}', 1, '{}');",
                Digest::of(b"c1")
            ))
            .unwrap();
        }
        let ix = Index::open(&p).unwrap();
        let rows = ix.load().unwrap();
        let head = Layout::with_head(10000, 4096, 1024);
        assert_eq!(rows[0].layout, head);
        assert_eq!(rows[0].chunks, vec![(1, Digest::of(b"c1"))]);
        assert!(!ix.upsert_blob(b, head).unwrap());
        let aligned = Layout::aligned(10000, 4096, 1024);
        assert!(ix.upsert_blob(b, aligned).unwrap(), "another grid");
        assert!(ix.load().unwrap()[0].chunks.is_empty());
        ix.mark_present_many(&[(b, &[(2, Digest::of(b"c2"))])])
            .unwrap();
        drop(ix);
        let ix = Index::open(&p).unwrap();
        let rows = ix.load().unwrap();
        assert_eq!((rows[0].layout, rows[0].chunks.len()), (aligned, 1));
        assert!(!ix.upsert_blob(b, aligned).unwrap());
    }

    /// A cache written by a version-1 wan (uniform chunks) opens, keeps its chunks, and
    /// reads its blobs with head = chunk_size.
    #[test]
    fn version_1_index_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.sqlite");
        let b = Digest::of(b"old");
        {
            let c = Connection::open(&p).unwrap();
            let v1 = SCHEMA
                .replace("    head_size   INTEGER NOT NULL DEFAULT 0,\n", "")
                .replace("    layout      INTEGER NOT NULL DEFAULT 0,\n", "")
                .replace(",\n    whole_checked INTEGER NOT NULL DEFAULT 0", "");
            c.execute_batch(&v1).unwrap();
            c.execute_batch(&format!(
                "INSERT INTO meta VALUES ('schema_version', '1');
                 INSERT INTO blobs (digest, size, chunk_size, created, last_access)
                     VALUES ('{b}', 100, 10, 0, 0);
                 INSERT INTO chunks VALUES ('{b}', 3, '{}');",
                Digest::of(b"c3")
            ))
            .unwrap();
        }
        let ix = Index::open(&p).unwrap();
        let rows = ix.load().unwrap();
        assert_eq!(rows[0].layout, Layout::new(100, 10));
        assert_eq!(rows[0].chunks, vec![(3, Digest::of(b"c3"))]);
        assert!(!ix.upsert_blob(b, Layout::new(100, 10)).unwrap());
        drop(ix);
        assert!(Index::open(&p).is_ok(), "the migration is not repeated");
    }

    /// A version-2 cache opens with every blob not yet whole-checked, and keeps its chunks.
    #[test]
    fn version_2_index_is_migrated_unchecked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.sqlite");
        let b = Digest::of(b"v2");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                &SCHEMA
                    .replace("    layout      INTEGER NOT NULL DEFAULT 0,\n", "")
                    .replace(",\n    whole_checked INTEGER NOT NULL DEFAULT 0", ""),
            )
            .unwrap();
            c.execute_batch(&format!(
                "INSERT INTO meta VALUES ('schema_version', '2');
                 INSERT INTO blobs (digest, size, chunk_size, head_size, created, last_access)
                     VALUES ('{b}', 100, 10, 10, 0, 0);
                 INSERT INTO chunks VALUES ('{b}', 3, '{}');",
                Digest::of(b"c3")
            ))
            .unwrap();
        }
        let ix = Index::open(&p).unwrap();
        let rows = ix.load().unwrap();
        assert!(!rows[0].whole_checked);
        assert_eq!(rows[0].chunks, vec![(3, Digest::of(b"c3"))]);
        ix.set_whole_checked(b).unwrap();
        assert!(ix.load().unwrap()[0].whole_checked);
        ix.forget_chunk(b, 3).unwrap();
        assert!(
            !ix.load().unwrap()[0].whole_checked,
            "a dropped chunk kept the check"
        );
        drop(ix);
        assert!(Index::open(&p).is_ok(), "the migration is not repeated");
    }

    #[test]
    fn rows_survive_reopen_and_layout_change_resets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.sqlite");
        let b = Digest::of(b"blob");
        {
            let ix = Index::open(&p).unwrap();
            assert!(!ix.upsert_blob(b, Layout::new(100, 10)).unwrap());
            ix.mark_present_many(&[(b, &[(3, Digest::of(b"c3"))])])
                .unwrap();
        }
        let ix = Index::open(&p).unwrap();
        let rows = ix.load().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].chunks, vec![(3, Digest::of(b"c3"))]);
        assert!(ix.upsert_blob(b, Layout::new(100, 20)).unwrap());
        assert!(ix.upsert_blob(b, Layout::with_head(100, 20, 5)).unwrap());
        assert_eq!(ix.load().unwrap()[0].layout.head, 5);
        assert!(ix.load().unwrap()[0].chunks.is_empty());
        ix.forget_blob(b).unwrap();
        assert!(ix.load().unwrap().is_empty());
    }
}
