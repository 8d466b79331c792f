//! The database file: opening connections, the schema and its migrations (`user_version`), WAL.

use super::*;

/// `PRAGMA application_id` of an outcache database ("outc").
pub(super) const APPLICATION_ID: i64 = 0x6F75_7463;

/// The schema this build writes.
pub(super) const SCHEMA_VERSION: i64 = 1;

pub(super) const SCHEMA_V1: &str = "
CREATE TABLE rows (
    task_type   TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    output      TEXT    NOT NULL,
    refs        TEXT    NOT NULL,  -- JSON array of the ref strings in output (for the janitor)
    size        INTEGER NOT NULL,  -- bytes of output
    created_at  INTEGER NOT NULL,  -- ms since the epoch
    last_access INTEGER NOT NULL,  -- ms since the epoch (coarse; for size-budget eviction)
    PRIMARY KEY (task_type, fingerprint)  -- also the task-type index prefix deletes range over
);
CREATE INDEX rows_created_at ON rows (created_at);
CREATE TABLE blobs (
    id         TEXT    PRIMARY KEY,
    size       INTEGER NOT NULL,
    sha256     TEXT    NOT NULL,
    mime       TEXT,
    port       TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE chunks (
    blob_id    TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    bytes      BLOB    NOT NULL,
    written_at INTEGER NOT NULL,
    PRIMARY KEY (blob_id, seq)
);
";

pub(super) fn open_connection(path: &Path, read_only: bool) -> Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn =
        Connection::open_with_flags(path, flags).map_err(|e| match e.sqlite_error_code() {
            Some(ErrorCode::CannotOpen | ErrorCode::ReadOnly | ErrorCode::PermissionDenied) => {
                Error::Io {
                    op: "open database",
                    path: path.to_owned(),
                    source: std::io::Error::other(e),
                }
            }
            _ => sql_error(path, "open database", e),
        })?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sql_error(path, "set busy_timeout", e))?;
    Ok(conn)
}

/// Bring a new database to the current schema; refuse foreign, corrupt or newer ones untouched.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let refuse = |reason: String| Error::NotACache {
        location: path.display().to_string(),
        reason,
    };
    let err = |context: &str| {
        let context = context.to_owned();
        move |e| sql_error(path, &context, e)
    };
    // One read transaction, so the three values come from one snapshot even while another process is
    // migrating the same file.
    let read_header = |conn: &mut Connection| -> rusqlite::Result<(i64, i64, i64)> {
        let tx = conn.transaction()?;
        let tables: i64 = tx.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
        let app: i64 = tx.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        tx.commit()?;
        Ok((app, version, tables))
    };
    let (app, version, tables) = read_header(conn).map_err(err("read the database header"))?;
    if app != 0 && app != APPLICATION_ID {
        return Err(refuse(format!(
            "it belongs to another application (application_id {app:#x})"
        )));
    }
    if app == 0 && tables > 0 {
        return Err(refuse(
            "it is a SQLite database of another application (it has tables but no outcache mark)"
                .into(),
        ));
    }
    if version > SCHEMA_VERSION {
        return Err(refuse(format!(
            "its schema version {version} is newer than this build's {SCHEMA_VERSION}; upgrade outcache"
        )));
    }
    if tables == 0 {
        // Only a database without tables can take it: freed pages then go back to the file system
        // through `PRAGMA incremental_vacuum` (run after every prune) instead of staying in the file.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")
            .map_err(err("set auto_vacuum"))?;
    }
    let mode = enable_wal(conn).map_err(err("enable WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(refuse(format!(
            "cannot enable WAL (journal mode stays {mode})"
        )));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Exclusive)
        .map_err(err("begin migration"))?;
    // Another process may have migrated between our check and the lock.
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(err("read user_version"))?;
    if version == 0 {
        tx.execute_batch(SCHEMA_V1)
            .map_err(err("create schema v1"))?;
        tx.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
        ))
        .map_err(err("mark schema"))?;
    }
    tx.commit().map_err(err("commit migration"))
}

/// Switch to WAL (persistent in the file, so usually already on). The switch needs a moment with no
/// other connection in a transaction, and SQLite does not run the busy handler for it: retry within the
/// busy timeout, since several processes may open a fresh database at once.
pub(super) fn enable_wal(conn: &Connection) -> rusqlite::Result<String> {
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    if mode.eq_ignore_ascii_case("wal") {
        return Ok(mode);
    }
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)) {
            Err(e)
                if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}
