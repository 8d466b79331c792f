//! The SQLite backend (`sqlite:///abs/path/cache.db`): one file, no server, safe for several processes on one
//! machine. Real SQLite (rusqlite, `bundled`), WAL, `busy_timeout`, schema versioned by `user_version` and
//! marked with an `application_id` so a foreign database is refused rather than written into.
//!
//! Rows are JSON text keyed by `(task_type, fingerprint)`; binary values inside them are base64 envelopes
//! put there by the engine. Streamed blobs are chunk rows `(blob_id, seq, bytes)` of 256 KiB, each chunk
//! committed in its own short transaction (the write lock is never held for a whole blob), then a manifest
//! row in `blobs` written **last**: a blob exists only once its manifest does, so a crash mid-stream leaves
//! only chunks without a manifest, which the janitor lists as temps. Chunks are committed with
//! `synchronous=NORMAL` and the manifest with `FULL`: in WAL mode the manifest's fsync also makes every
//! earlier chunk durable, so a blob costs one fsync, not one per chunk. A delete removes the manifest,
//! and the chunks after its commit unless a stream of this process is reading them (its last reader
//! removes them then, see `Pins`): a download here never breaks off because its blob was deleted.
//!
//! All SQLite calls run on the blocking pool (point reads of rows inline, see `get_row`). One writer
//! connection (behind a mutex) and a small pool of reader connections: WAL lets readers proceed while the
//! writer writes; other processes wait on `busy_timeout`. Concurrent row puts share one transaction (group
//! commit). Laid out as cacache splits content from index: `schema.rs` (the file, migrations, WAL),
//! `rows.rs` (reads, decoding, the scan), `blobs.rs` (chunks, manifests, cleanup), and this file (the
//! connections and the trait).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;

use crate::blob::BlobDigest;
use crate::error::{Error, Result};
use crate::layout::millis;
use crate::store::{
    BlobEntry, BlobMeta, BlobStat, BlobState, ByteRange, ByteStream, Capabilities, CorruptEntry,
    OutputCache, Row, RowEntry, RowScan, RowVersion,
};
use crate::wire::{CacheRef, RowKey, parse_ref_name, refs_in};

mod blobs;
mod rows;
mod schema;

use blobs::*;
use rows::*;
use schema::*;

/// Prefix of every ref this backend hands out.
pub const REF_PREFIX: &str = "sqlite://blobs/";
/// Most a whole-blob read reserves up front from the manifest's size (it grows past it as chunks come).
const READ_RESERVE_LIMIT: i64 = 64 << 20;
/// Bytes per chunk row.
pub const CHUNK_SIZE: usize = 256 * 1024;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_IDLE_READERS: usize = 4;
/// Rows deleted per transaction by `delete_rows`.
const DELETE_BATCH: usize = 500;

/// Options for [`SqliteCache`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// `synchronous=FULL` for commits that publish rows and blobs (default true); false uses `NORMAL`
    /// everywhere (a power loss may lose the latest commits, never tear them).
    pub durable: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions { durable: true }
    }
}

impl SqliteOptions {
    /// Set [`SqliteOptions::durable`].
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
}

#[derive(Debug)]
struct Writer {
    conn: Connection,
    /// The `synchronous` level last set on `conn` (avoids a pragma per statement).
    full_sync: bool,
}

impl Writer {
    /// Start a write transaction (taking the write lock at once, so it never has to upgrade) whose
    /// commit is `synchronous=FULL` if `full`, else `NORMAL`.
    fn begin(&mut self, full: bool) -> rusqlite::Result<rusqlite::Transaction<'_>> {
        self.set_full_sync(full)?;
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
    }

    fn set_full_sync(&mut self, full: bool) -> rusqlite::Result<()> {
        if self.full_sync != full {
            let level = if full { "FULL" } else { "NORMAL" };
            self.conn.pragma_update(None, "synchronous", level)?;
            self.full_sync = full;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    /// The database file's identity (device, inode) when opened: a write checks the path still names
    /// it (see [`SqliteCache::begin`]).
    file_id: Option<(u64, u64)>,
    durable: bool,
    readers: Mutex<Vec<Connection>>,
    /// A reader with no busy timeout for inline point reads (see `get_row`).
    fast_reader: Mutex<Connection>,
    /// Declared after the readers, so it is closed last (fields drop in order): the last connection to
    /// close checkpoints the WAL into the database and removes the -wal and -shm files, which a
    /// read-only connection cannot do.
    writer: Mutex<Writer>,
    /// Rows waiting for the next group commit (see `save_row`).
    pending: Mutex<Pending>,
    /// Blobs being streamed (see [`Pins`]).
    pins: Pins,
    /// When reads last looked the file up (see [`SqliteCache::still_the_opened_file`]).
    identity: IdentityCheck,
}

/// The last lookup of the database path by a read.
#[derive(Debug)]
struct IdentityCheck {
    since: std::time::Instant,
    checked_ms: std::sync::atomic::AtomicU64,
    ours: std::sync::atomic::AtomicBool,
}

/// What a caller of [`SqliteCache::still_the_opened_file`] is about to do.
#[derive(Clone, Copy, Debug)]
enum Access {
    Read,
    Write,
}

/// How often reads look up the database path.
const IDENTITY_EVERY: Duration = Duration::from_secs(1);

/// The group commit's queue.
#[derive(Debug, Default)]
struct Pending {
    rows: Vec<PendingRow>,
    /// Whether a committer is running (it commits until it finds the queue empty).
    committing: bool,
}

/// The one running committer's claim: dropped (its work done, panicked, or never run because the
/// runtime shut down), it lets the next `save_row` start a committer, and fails rows still queued so
/// no caller waits forever.
struct Committer {
    cache: SqliteCache,
    /// False once the committer found the queue empty and cleared the flag itself.
    armed: bool,
}

impl Committer {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        if self.armed {
            let mut pending = lock(&self.cache.inner.pending);
            pending.committing = false;
            pending.rows.clear(); // their callers hear "abandoned"
        }
    }
}

/// A row `save_row` queued for the next group commit, and where to tell its caller how it went.
struct PendingRow {
    key: RowKey,
    text: String,
    refs: String,
    done: tokio::sync::oneshot::Sender<Result<()>>,
}

impl std::fmt::Debug for PendingRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PendingRow({})", self.key)
    }
}

/// A cache in one SQLite database file. Cloning shares the connections.
#[derive(Clone, Debug)]
pub struct SqliteCache {
    inner: Arc<Inner>,
}

impl std::fmt::Display for SqliteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sqlite({})", self.inner.path.display())
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// The (device, inode) of the file at `path`, where the platform has them.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the connection usable (a failed statement rolls back its
    // transaction when the Transaction is dropped), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SqliteCache {
    /// Open (creating if needed) the database at `path`. Refuses, without modifying it, a file that is not
    /// a SQLite database, a SQLite database that is not outcache's, or one with a newer schema.
    pub fn open(path: impl Into<PathBuf>, options: SqliteOptions) -> Result<Self> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("create database directory", parent, e))?;
        }
        // Only a regular file (or none yet) is opened: SQLite given a device or a FIFO (`/dev/null`)
        // would leave its journal files beside it, outside any cache, or hang on the FIFO.
        if let Ok(meta) = std::fs::metadata(&path) {
            let kind = meta.file_type();
            let what = if kind.is_dir() {
                Some("a directory")
            } else if kind.is_file() {
                None
            } else {
                Some("a device, FIFO or socket")
            };
            if let Some(what) = what {
                return Err(Error::NotACache {
                    location: path.display().to_string(),
                    reason: format!("is {what}, not a database file"),
                });
            }
        }
        let opened = open_connection(&path, false).and_then(|mut conn| {
            migrate(&mut conn, &path)?;
            Ok(conn)
        });
        // A file refused as not ours says so wherever it is; other failures may be the directory's.
        let conn = opened.map_err(|e| match e {
            Error::NotACache { .. } => e,
            e => unwritable_directory(&path).unwrap_or(e),
        })?;
        let fast_reader = open_connection(&path, true)?;
        fast_reader
            .busy_timeout(Duration::ZERO)
            .map_err(|e| sql_error(&path, "set busy_timeout", e))?;
        let full_sync = options.durable;
        conn.pragma_update(
            None,
            "synchronous",
            if full_sync { "FULL" } else { "NORMAL" },
        )
        .map_err(|e| sql_error(&path, "set synchronous", e))?;
        let file_id = file_id(&path);
        Ok(SqliteCache {
            inner: Arc::new(Inner {
                path,
                file_id,
                durable: options.durable,
                writer: Mutex::new(Writer { conn, full_sync }),
                readers: Mutex::new(Vec::new()),
                fast_reader: Mutex::new(fast_reader),
                pending: Mutex::new(Pending::default()),
                pins: Pins::default(),
                identity: IdentityCheck {
                    since: std::time::Instant::now(),
                    checked_ms: std::sync::atomic::AtomicU64::new(0),
                    ours: std::sync::atomic::AtomicBool::new(true),
                },
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Start a write transaction on `w` (see [`Writer::begin`]), first checking that the path still
    /// names the file this cache opened. Deleted or replaced under a running process (an operator
    /// clearing the cache), the open connections would go on writing into a file nobody will see again;
    /// the write fails instead, naming the path, until the cache is opened anew.
    fn begin<'w>(&self, w: &'w mut Writer, full: bool) -> Result<rusqlite::Transaction<'w>> {
        self.still_the_opened_file(Access::Write, Duration::ZERO)?;
        w.begin(full).map_err(self.err("begin"))
    }

    /// Fails, naming the path, if the path no longer names the file this cache opened: looked up at
    /// most once per `every` (reads check once a second, a point read being cheaper than the lookup;
    /// writes every time). Reads from the old file would serve a cache its operator removed, and a
    /// reader connection opened now would read another file than the rest.
    fn still_the_opened_file(&self, to: Access, every: Duration) -> Result<()> {
        let Some(opened) = self.inner.file_id else {
            return Ok(());
        };
        use std::sync::atomic::Ordering::Relaxed;
        let identity = &self.inner.identity;
        let now = u64::try_from(identity.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = identity.checked_ms.load(Relaxed);
        let ours = if !every.is_zero() && now.saturating_sub(last) < every.as_millis() as u64 {
            identity.ours.load(Relaxed)
        } else {
            let ours = file_id(&self.inner.path) == Some(opened);
            identity.ours.store(ours, Relaxed);
            identity.checked_ms.store(now, Relaxed);
            ours
        };
        if ours {
            return Ok(());
        }
        let (op, verb) = match to {
            Access::Read => ("read database", "read"),
            Access::Write => ("write to database", "write to"),
        };
        Err(Error::io(
            op,
            &self.inner.path,
            std::io::Error::other(format!(
                "was removed or replaced since the cache was opened; open the cache again \
                 (restart the server) to {verb} the file that is there now"
            )),
        ))
    }

    fn err(&self, context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
        let context = context.into();
        move |e| sql_error(&self.inner.path, &context, e)
    }

    /// Run `f` with the writer connection on the blocking pool.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteCache, &mut Writer) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        blocking(move || {
            let mut writer = lock(&this.inner.writer);
            f(&this, &mut writer)
        })
        .await
    }

    /// Run `f` with a reader connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteCache, &Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.still_the_opened_file(Access::Read, IDENTITY_EVERY)?;
        let this = self.clone();
        blocking(move || {
            let conn = match lock(&this.inner.readers).pop() {
                Some(c) => c,
                None => {
                    // A new connection opens whatever the path names now: it must be our file.
                    this.still_the_opened_file(Access::Read, Duration::ZERO)?;
                    open_connection(&this.inner.path, true)?
                }
            };
            let result = f(&this, &conn);
            let mut idle = lock(&this.inner.readers);
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
            result
        })
        .await
    }

    /// Delete rows matching `where_sql` (with `args`) and, in the same transaction, the blobs their refs
    /// name. Returns the number of rows deleted.
    async fn delete_rows_where(
        &self,
        where_sql: &'static str,
        args: Vec<rusqlite::types::Value>,
    ) -> Result<u64> {
        self.write(move |this, w| {
            let tx = this.begin(w, this.inner.durable)?;
            // The blobs the deleted rows own (the ownership rule): refs they only cite stay.
            let refs: Vec<String> = {
                let mut stmt = tx
                    .prepare(&format!(
                        "SELECT task_type, fingerprint, refs FROM rows WHERE {where_sql}"
                    ))
                    .map_err(this.err("select rows to delete"))?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                        ))
                    })
                    .map_err(this.err("select rows to delete"))?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(this.err("select rows to delete"))?;
                rows.iter()
                    .flat_map(|(task, fp, refs)| owned_in_column(task, fp, refs))
                    .collect()
            };
            let n = tx
                .execute(
                    &format!("DELETE FROM rows WHERE {where_sql}"),
                    rusqlite::params_from_iter(args.iter()),
                )
                .map_err(this.err("delete rows"))?;
            let mut ids = Vec::new();
            for r in refs {
                if let Some(id) = parse_ref_name(&r, REF_PREFIX, "") {
                    delete_manifest_in(&tx, id).map_err(this.err(format!("delete blob {r}")))?;
                    ids.push(id.to_owned());
                }
            }
            tx.commit().map_err(this.err("commit delete"))?;
            this.release_chunks(w, ids);
            Ok(n as u64)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::stream(format!("blocking task failed: {e}"))))
}

/// Why a database that failed to open cannot be used, when the reason is its directory: SQLite creates
/// its `-wal` and `-shm` files beside the database even to read it, so a database on a read-only mount
/// or in a directory this process cannot write fails with only "unable to open database file".
fn unwritable_directory(path: &Path) -> Option<Error> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty())?;
    let probe = tempfile::Builder::new()
        .prefix(".outcache-probe")
        .tempfile_in(dir);
    let e = probe.err()?;
    let why = match e.kind() {
        std::io::ErrorKind::ReadOnlyFilesystem => "is on a read-only file system",
        std::io::ErrorKind::PermissionDenied => "is one this user cannot write to",
        _ => return None,
    };
    Some(Error::Io {
        op: "open database",
        path: path.to_owned(),
        source: std::io::Error::new(
            e.kind(),
            format!(
                "its directory {why}, and SQLite writes its -wal and -shm files there even to \
                 read (copy the database somewhere writable, or use the fs backend, which reads \
                 from read-only media)"
            ),
        ),
    })
}

fn sql_error(path: &Path, context: &str, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Error::NotACache {
            location: path.display().to_string(),
            reason: format!("{context}: {e}"),
        },
        _ => Error::Backend {
            backend: format!("sqlite({})", path.display()),
            context: context.to_owned(),
            source: Box::new(e),
        },
    }
}

#[async_trait]
impl OutputCache for SqliteCache {
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        let text = serde_json::to_string(output).map_err(|e| Error::InvalidInput {
            what: format!("output for {key}"),
            reason: e.to_string(),
        })?;
        let refs: Vec<String> = refs_in(output).into_iter().map(|r| r.reference).collect();
        let refs = serde_json::to_string(&refs).unwrap_or_else(|_| "[]".into());
        // Group commit: queue the row; the first caller to find no committer running starts one, which
        // commits everything queued in one transaction (one fsync), then what was queued meanwhile, until
        // the queue is empty. The others only wait for their answer (no thread of their own contends for
        // the write lock). No caller hears "written" before its commit returned.
        let (done, answer) = tokio::sync::oneshot::channel();
        let start_committer = {
            let mut pending = lock(&self.inner.pending);
            pending.rows.push(PendingRow {
                key: key.clone(),
                text,
                refs,
                done,
            });
            !std::mem::replace(&mut pending.committing, true)
        };
        if start_committer {
            let mut committer = Committer {
                cache: self.clone(),
                armed: true,
            };
            tokio::task::spawn_blocking(move || {
                let this = committer.cache.clone();
                let mut writer = lock(&this.inner.writer);
                loop {
                    let batch = {
                        let mut pending = lock(&this.inner.pending);
                        if pending.rows.is_empty() {
                            // In the same critical section as the check: a row queued after it
                            // starts a committer of its own.
                            pending.committing = false;
                            committer.disarm();
                            break;
                        }
                        std::mem::take(&mut pending.rows)
                    };
                    this.commit_batch(&mut writer, batch);
                }
            });
        }
        answer.await.unwrap_or_else(|_| {
            Err(Error::stream(format!(
                "the commit of row {key} was abandoned"
            )))
        })
    }

    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        // Fast path: a point read by primary key on the calling thread, with a connection that never
        // waits for a lock. It is one B-tree descent, usually in the page cache, and the hop to the
        // blocking pool would cost several times as much. Contention or a busy database falls through
        // to the pool, where the read may wait for `busy_timeout`.
        self.still_the_opened_file(Access::Read, IDENTITY_EVERY)?;
        if let Ok(fast) = self.inner.fast_reader.try_lock() {
            match read_row(&fast, key) {
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => {}
                other => return decode_row(self, key, other),
            }
        }
        let key = key.clone();
        self.read(move |this, conn| decode_row(this, &key, read_row(conn, &key)))
            .await
    }

    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        let rows = keys.iter().map(|k| (k.clone(), None)).collect();
        Ok(self.delete_batches(rows).await?.len() as u64)
    }

    async fn delete_rows_listed(&self, rows: &[RowVersion]) -> Result<Vec<RowKey>> {
        // The version check and the delete are one statement, in one transaction per batch.
        let rows = rows
            .iter()
            .map(|r| (r.key.clone(), Some(millis(r.created_at) as i64)))
            .collect();
        self.delete_batches(rows).await
    }

    async fn delete_prefix(&self, task_type_prefix: &str) -> Result<u64> {
        match prefix_upper_bound(task_type_prefix) {
            Some(upper) => {
                let args = vec![task_type_prefix.to_owned().into(), upper.into()];
                self.delete_rows_where("task_type >= ?1 AND task_type < ?2", args)
                    .await
            }
            None => {
                let args = vec![task_type_prefix.to_owned().into()];
                self.delete_rows_where("task_type >= ?1", args).await
            }
        }
    }

    async fn scan_rows(&self) -> Result<RowScan> {
        self.read(|this, conn| {
            let (rows, unreadable) = scan_rows(this, conn)?;
            Ok(RowScan {
                rows,
                unreadable,
                listing_only: false,
            })
        })
        .await
    }

    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        let Ok(rowid) = id.parse::<i64>() else {
            return Ok(false);
        };
        self.write(move |this, w| {
            let tx = this.begin(w, this.inner.durable)?;
            let row = tx
                .query_row(
                    "SELECT task_type, fingerprint, refs, json_valid(output) FROM rows WHERE rowid = ?1",
                    [rowid],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, bool>(3)?)),
                )
                .optional()
                .map_err(this.err(format!("read row {rowid}")))?;
            let Some((task, fp, refs, valid)) = row else {
                return Ok(false);
            };
            if corruption(&task, &fp, &refs, valid).is_none() {
                return Ok(false); // rewritten since it was listed: keep it
            }
            tx.execute("DELETE FROM rows WHERE rowid = ?1", [rowid])
                .map_err(this.err(format!("remove corrupt row {rowid}")))?;
            tx.commit().map_err(this.err("commit"))?;
            Ok(true)
        })
        .await
    }

    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        self.read(|this, conn| {
            // Published blobs are manifests; temps are chunks whose manifest was never written.
            let queries = [
                (
                    "SELECT id, size, created_at FROM blobs",
                    BlobState::Published,
                    REF_PREFIX,
                ),
                (
                    "SELECT blob_id, sum(length(bytes)), max(written_at) FROM chunks
                     WHERE blob_id NOT IN (SELECT id FROM blobs) GROUP BY blob_id",
                    BlobState::Temp,
                    "",
                ),
            ];
            let mut out = Vec::new();
            for (sql, state, id_prefix) in queries {
                let mut stmt = conn.prepare(sql).map_err(this.err("list blobs"))?;
                let entries = stmt
                    .query_map([], |r| {
                        Ok(BlobEntry {
                            id: format!("{id_prefix}{}", r.get::<_, String>(0)?),
                            state,
                            size: r.get::<_, i64>(1)? as u64,
                            modified: from_ms(r.get(2)?),
                        })
                    })
                    .map_err(this.err("list blobs"))?;
                for entry in entries {
                    out.push(entry.map_err(this.err("list blobs"))?);
                }
            }
            // Scratch databases an interrupted `conformance` or `bench` left beside this one.
            out.extend(crate::layout::scratch_dirs(&this.scratch_parent()));
            Ok(out)
        })
        .await
    }

    async fn remove_temp(&self, id: &str) -> Result<bool> {
        if id.starts_with(crate::layout::SCRATCH_ID_PREFIX) {
            let dir = self.scratch_parent();
            let id = id.to_owned();
            return blocking(move || crate::layout::remove_scratch(&dir, &id)).await;
        }
        if self.inner.pins.is_pinned(id) {
            return Ok(false); // a deleted blob a stream is still reading: its last reader removes it
        }
        let id = id.to_owned();
        self.write(move |this, w| {
            let n = w
                .conn
                .execute(
                    "DELETE FROM chunks WHERE blob_id = ?1 AND NOT EXISTS (SELECT 1 FROM blobs WHERE id = ?1)",
                    [&id],
                )
                .map_err(this.err(format!("remove temp {id}")))?;
            Ok(n > 0)
        })
        .await
    }

    async fn reclaim_space(&self) -> Result<()> {
        self.write(|this, w| {
            // Free pages go back to the file system (with auto_vacuum=INCREMENTAL, which new databases
            // have), and the log is checkpointed into the database and truncated.
            incremental_vacuum(&w.conn).map_err(this.err("incremental vacuum"))?;
            w.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(this.err("checkpoint"))?;
            Ok(())
        })
        .await
    }

    async fn storage_bytes(&self) -> Result<Option<u64>> {
        let path = self.inner.path.clone();
        blocking(move || {
            let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
            let mut wal = path.clone().into_os_string();
            wal.push("-wal");
            Ok(Some(size(&path) + size(Path::new(&wal))))
        })
        .await
    }

    async fn touch_rows(&self, keys: &[RowKey], at: SystemTime) -> Result<()> {
        let keys = keys.to_vec();
        let at = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.write(move |this, w| {
            // Access times are advisory: no fsync for them.
            let tx = this.begin(w, false)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE rows SET last_access = max(last_access, ?1)
                         WHERE task_type = ?2 AND fingerprint = ?3",
                    )
                    .map_err(this.err("touch rows"))?;
                for key in &keys {
                    stmt.execute(params![at, key.task_type(), key.fingerprint()])
                        .map_err(this.err(format!("touch row {key}")))?;
                }
            }
            tx.commit().map_err(this.err("commit touch"))
        })
        .await
    }

    async fn write_blob(&self, meta: &BlobMeta, mut data: ByteStream) -> Result<CacheRef> {
        let id = crate::layout::blob_name(meta);
        let mut guard = ChunkGuard {
            cache: self.clone(),
            id: id.clone(),
            pending: None,
            armed: true,
            abandoned: Arc::default(),
        };
        let mut digest = BlobDigest::new();
        let mut page = BytesMut::with_capacity(CHUNK_SIZE);
        let mut seq: i64 = 0;
        let mut stream_error = None;
        loop {
            let next = data.next().await;
            let end = match next {
                Some(Ok(chunk)) => {
                    digest.update(&chunk);
                    let mut rest = &chunk[..];
                    while !rest.is_empty() {
                        let take = (CHUNK_SIZE - page.len()).min(rest.len());
                        page.extend_from_slice(&rest[..take]);
                        rest = &rest[take..];
                        if page.len() == CHUNK_SIZE {
                            self.insert_chunk(&mut guard, seq, page.split().freeze())
                                .await?;
                            seq += 1;
                        }
                    }
                    false
                }
                Some(Err(e)) => {
                    stream_error = Some(e);
                    true
                }
                None => true,
            };
            if end {
                break;
            }
        }
        if let Some(e) = stream_error {
            guard.cleanup_now().await;
            return Err(match e {
                e @ Error::Stream { .. } => e,
                other => Error::stream(other),
            });
        }
        if !page.is_empty() {
            self.insert_chunk(&mut guard, seq, page.split().freeze())
                .await?;
        }
        if let Err(e) = guard.finish_pending().await {
            guard.cleanup_now().await;
            return Err(e);
        }
        let reference = format!("{REF_PREFIX}{id}");
        let cache_ref = digest.into_ref(reference, meta);
        let (size, sha) = (
            cache_ref.size.unwrap_or(0) as i64,
            cache_ref.sha256.clone().unwrap_or_default(),
        );
        let (mime, port, manifest_id) = (meta.mime.clone(), meta.port.clone(), id.clone());
        let abandoned = guard.abandoned.clone();
        let published = self
            .write(move |this, w| {
                // FULL here also makes every chunk committed before it durable (WAL order).
                let tx = this.begin(w, this.inner.durable)?;
                // The manifest says the blob is whole, so check it is, in the same transaction: a
                // producer that stalled past the janitor's grace may have had its chunks swept as a
                // temp. Then the write fails and nothing is published (DESIGN §7 invariant 14).
                let (count, first, last, total): (i64, Option<i64>, Option<i64>, i64) = tx
                    .query_row(
                        "SELECT count(*), min(seq), max(seq), coalesce(sum(length(bytes)), 0)
                         FROM chunks WHERE blob_id = ?1",
                        [&manifest_id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .map_err(this.err(format!("check blob {manifest_id}")))?;
                let whole = total == size
                    && first.is_none_or(|f| f == 0)
                    && last.map_or(0, |l| l + 1) == count;
                if abandoned.load(std::sync::atomic::Ordering::SeqCst) {
                    // Its writer is gone: the guard's cleanup takes the chunks.
                    return Err(Error::stream("the write was dropped"));
                }
                if !whole {
                    return Err(Error::Backend {
                        backend: this.to_string(),
                        context: format!("publish blob {manifest_id}"),
                        source: format!(
                            "{count} chunk(s) of {total} bytes are left of {size} written: the write \
                             stalled past the janitor's grace period and its chunks were swept as a temp"
                        )
                        .into(),
                    });
                }
                tx.execute(
                    "INSERT INTO blobs (id, size, sha256, mime, port, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![manifest_id, size, sha, mime, port, now_ms()],
                )
                .map_err(this.err(format!("publish blob {manifest_id}")))?;
                tx.commit().map_err(this.err(format!("publish blob {manifest_id}")))
            })
            .await;
        if let Err(e) = published {
            guard.cleanup_now().await;
            return Err(e);
        }
        guard.armed = false;
        Ok(cache_ref)
    }

    async fn stat_blob(&self, reference: &str) -> Result<Option<BlobStat>> {
        let Some(id) = parse_ref_name(reference, REF_PREFIX, "").map(str::to_owned) else {
            return Ok(None);
        };
        self.read(move |this, conn| {
            Ok(manifest(conn, &id)
                .map_err(this.err(format!("stat blob {id}")))?
                .map(|(size, sha256)| BlobStat {
                    size: u64::try_from(size).unwrap_or(0),
                    sha256: Some(sha256),
                }))
        })
        .await
    }

    async fn read_blob(&self, reference: &str) -> Result<Option<Bytes>> {
        let Some(id) = parse_ref_name(reference, REF_PREFIX, "").map(str::to_owned) else {
            return Ok(None);
        };
        self.read(move |this, conn| {
            let Some((size, _)) =
                manifest(conn, &id).map_err(this.err(format!("read blob {id}")))?
            else {
                return Ok(None);
            };
            // The manifest's size is data on disk: a garbled one must not size an allocation.
            let mut out = BytesMut::with_capacity(size.clamp(0, READ_RESERVE_LIMIT) as usize);
            let mut stmt = conn
                .prepare_cached("SELECT bytes FROM chunks WHERE blob_id = ?1 ORDER BY seq")
                .map_err(this.err(format!("read blob {id}")))?;
            let mut rows = stmt
                .query([&id])
                .map_err(this.err(format!("read blob {id}")))?;
            while let Some(row) = rows.next().map_err(this.err(format!("read blob {id}")))? {
                let bytes = row
                    .get_ref(0)
                    .and_then(|v| Ok(v.as_blob()?))
                    .map_err(this.err(format!("read blob {id}")))?;
                out.extend_from_slice(bytes);
            }
            Ok(Some(out.freeze()))
        })
        .await
    }

    async fn open_blob(
        &self,
        reference: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        self.open_range(reference, range).await
    }

    async fn delete_blob(&self, reference: &str) -> Result<()> {
        let Some(id) = parse_ref_name(reference, REF_PREFIX, "").map(str::to_owned) else {
            return Ok(());
        };
        self.write(move |this, w| {
            let tx = this.begin(w, this.inner.durable)?;
            delete_manifest_in(&tx, &id).map_err(this.err(format!("delete blob {id}")))?;
            tx.commit().map_err(this.err(format!("delete blob {id}")))?;
            this.release_chunks(w, vec![id]);
            Ok(())
        })
        .await
    }
}

impl SqliteCache {
    /// Commit `batch` in one transaction and answer each row's caller (under the write lock).
    fn commit_batch(&self, w: &mut Writer, batch: Vec<PendingRow>) {
        let mut results: Vec<Result<()>> = Vec::with_capacity(batch.len());
        let committed = (|| -> Result<()> {
            let tx = self.begin(w, self.inner.durable)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO rows (task_type, fingerprint, output, refs, size, created_at, last_access)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
                         ON CONFLICT (task_type, fingerprint) DO UPDATE SET
                           output = excluded.output, refs = excluded.refs, size = excluded.size,
                           created_at = excluded.created_at, last_access = excluded.last_access",
                    )
                    .map_err(self.err("prepare row insert"))?;
                let now = now_ms();
                for row in &batch {
                    let (key, text) = (&row.key, &row.text);
                    results.push(
                        stmt.execute(params![
                            key.task_type(),
                            key.fingerprint(),
                            text,
                            row.refs,
                            text.len() as i64,
                            now
                        ])
                        .map(|_| ())
                        .map_err(self.err(format!("save row {key}"))),
                    );
                }
            }
            tx.commit().map_err(self.err("commit rows"))
        })();
        for (i, row) in batch.into_iter().enumerate() {
            let result = match (&committed, results.get_mut(i)) {
                (Err(e), _) => Err(Error::Backend {
                    backend: self.to_string(),
                    context: format!("save row {}", row.key),
                    source: e.to_string().into(),
                }),
                (Ok(()), Some(result)) => std::mem::replace(result, Ok(())),
                (Ok(()), None) => Err(Error::stream("the group commit lost a row")),
            };
            let _ = row.done.send(result);
        }
    }

    /// Where `outcache conformance` and `outcache bench` put their scratch databases: beside this one.
    fn scratch_parent(&self) -> PathBuf {
        self.inner
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }

    /// Delete `rows` (each only if its `created_at` is the one given, when one is) with the blobs they own,
    /// a few hundred per transaction: one fsync per batch, and the write lock is never held for long.
    /// Returns the keys deleted.
    async fn delete_batches(&self, rows: Vec<(RowKey, Option<i64>)>) -> Result<Vec<RowKey>> {
        let mut deleted = Vec::new();
        for batch in rows.chunks(DELETE_BATCH) {
            let batch = batch.to_vec();
            deleted.extend(
                self.write(move |this, w| {
                    let tx = this.begin(w, this.inner.durable)?;
                    let mut deleted = Vec::new();
                    let mut ids = Vec::new();
                    for (key, version) in batch {
                        let refs: Option<String> = tx
                            .prepare_cached(
                                "DELETE FROM rows WHERE task_type = ?1 AND fingerprint = ?2
                                 AND (?3 IS NULL OR created_at = ?3) RETURNING refs",
                            )
                            .and_then(|mut stmt| {
                                stmt.query_row(
                                    params![key.task_type(), key.fingerprint(), version],
                                    |r| r.get(0),
                                )
                                .optional()
                            })
                            .map_err(this.err(format!("delete row {key}")))?;
                        let Some(refs) = refs else { continue };
                        for r in owned_in_column(key.task_type(), key.fingerprint(), &refs) {
                            if let Some(id) = parse_ref_name(&r, REF_PREFIX, "") {
                                delete_manifest_in(&tx, id)
                                    .map_err(this.err(format!("delete blob {r}")))?;
                                ids.push(id.to_owned());
                            }
                        }
                        deleted.push(key);
                    }
                    tx.commit().map_err(this.err("commit delete"))?;
                    this.release_chunks(w, ids);
                    Ok(deleted)
                })
                .await?,
            );
        }
        Ok(deleted)
    }

    /// Stream the blob behind `reference`, all of it or `range`: starts at the chunk holding the first
    /// byte and stops after the one holding the last, reading one chunk row per step (memory stays at
    /// one chunk, and no connection is held between steps).
    async fn open_range(
        &self,
        reference: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        let Some(id) = parse_ref_name(reference, REF_PREFIX, "").map(str::to_owned) else {
            return Ok(None);
        };
        // Pinned before the manifest is read, so a delete either comes first (no manifest: a miss) or
        // leaves the chunks to this stream (see `Pins`).
        let pin = ReadPin::new(self, &id);
        let id_for_manifest = id.clone();
        let found = self
            .read(move |this, conn| manifest(conn, &id_for_manifest).map_err(this.err("open blob")))
            .await?;
        let Some((size, _)) = found else {
            return Ok(None);
        };
        let size = size.max(0) as u64;
        let span = match range {
            Some(range) => range.resolve(reference, size)?,
            None => 0..size,
        };
        let chunk = CHUNK_SIZE as u64;
        let first = (span.start / chunk) as i64;
        let end_seq = span.end.div_ceil(chunk) as i64;
        let this = self.clone();
        let stream = futures::stream::try_unfold(first, move |seq| {
            let _pinned_while_the_stream_lives = &pin;
            let (this, id, span) = (this.clone(), id.clone(), span.clone());
            async move {
                if seq >= end_seq || span.start == span.end {
                    return Ok(None);
                }
                let bytes = this
                    .read(move |this, conn| {
                        let context = format!("read blob {id} chunk {seq}");
                        conn.query_row(
                            "SELECT bytes FROM chunks WHERE blob_id = ?1 AND seq = ?2",
                            params![id, seq],
                            |r| r.get::<_, Vec<u8>>(0),
                        )
                        .optional()
                        .map_err(this.err(&context))?
                        .ok_or_else(|| {
                            // With the manifest still there, the blob is not being deleted: the
                            // manifest claims bytes the chunks do not hold.
                            match manifest(conn, &id) {
                                Ok(Some((size, _))) => Error::Integrity {
                                    reference: format!("{REF_PREFIX}{id}"),
                                    expected: format!("size:{size}"),
                                    actual: format!("chunks end before chunk {seq}"),
                                },
                                _ => Error::Backend {
                                    backend: this.to_string(),
                                    context,
                                    source:
                                        "the chunk is gone (another process deleted the blob while this one read it)"
                                            .into(),
                                },
                            }
                        })
                    })
                    .await?;
                // Trim the first and last chunk to the span.
                let chunk_start = seq as u64 * chunk;
                let from = span.start.saturating_sub(chunk_start) as usize;
                let to = ((span.end - chunk_start) as usize).min(bytes.len());
                let bytes = Bytes::from(bytes).slice(from.min(to)..to);
                Ok(Some((bytes, seq + 1)))
            }
        });
        Ok(Some(stream.boxed()))
    }

    /// Commit one chunk row in its own short transaction, on the blocking pool, while the caller goes on
    /// hashing the next page (one insert in flight at a time).
    async fn insert_chunk(&self, guard: &mut ChunkGuard, seq: i64, page: Bytes) -> Result<()> {
        guard.finish_pending().await?;
        let this = self.clone();
        let id = guard.id.clone();
        guard.pending = Some(tokio::task::spawn_blocking(move || {
            let mut w = lock(&this.inner.writer);
            w.set_full_sync(false)
                .map_err(this.err("set synchronous"))?;
            w.conn
                .execute(
                    "INSERT INTO chunks (blob_id, seq, bytes, written_at) VALUES (?1, ?2, ?3, ?4)",
                    params![id, seq, &page[..], now_ms()],
                )
                .map_err(this.err(format!("write blob {id} chunk {seq}")))?;
            Ok(())
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_upper_bounds_cover_exactly_the_prefix() {
        assert_eq!(prefix_upper_bound(""), None);
        assert_eq!(prefix_upper_bound("build-").as_deref(), Some("build."));
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_upper_bound("\u{10FFFF}"), None);
        assert_eq!(prefix_upper_bound("\u{D7FF}").as_deref(), Some("\u{E000}"));
        let upper = prefix_upper_bound("session1").unwrap();
        for inside in ["session1", "session1-", "session1\u{10FFFF}x"] {
            assert!(inside >= "session1" && inside < upper.as_str(), "{inside}");
        }
        for outside in ["session2", "session", "sessiom"] {
            assert!(
                !(outside >= "session1" && outside < upper.as_str()),
                "{outside}"
            );
        }
    }
}
