//! Blob storage: chunk rows with a manifest written last, cleanup of unfinished writes, giving pages back.

use super::*;

/// Return every free page to the file system. Each step of the pragma frees one page, so it is stepped
/// until done (a single `execute` frees one).
pub(super) fn incremental_vacuum(conn: &Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("PRAGMA incremental_vacuum")?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

pub(super) fn delete_blob_in(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM blobs WHERE id = ?1", [id])?;
    conn.execute("DELETE FROM chunks WHERE blob_id = ?1", [id])?;
    Ok(())
}

/// The manifest of blob `id`: (size, sha256).
pub(super) fn manifest(conn: &Connection, id: &str) -> rusqlite::Result<Option<(i64, String)>> {
    conn.query_row("SELECT size, sha256 FROM blobs WHERE id = ?1", [id], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

/// Deletes a blob's chunks if its write does not reach the manifest (error, failed stream, dropped
/// future). On drop it finishes in the background, after any chunk insert still in flight.
pub(super) struct ChunkGuard {
    pub(super) cache: SqliteCache,
    pub(super) id: String,
    pub(super) pending: Option<tokio::task::JoinHandle<Result<()>>>,
    pub(super) armed: bool,
}

/// Wait for the chunk insert still in flight, then delete every chunk of `id` and give their pages back
/// now, not at the next prune.
async fn remove_chunks(
    cache: SqliteCache,
    id: String,
    pending: Option<tokio::task::JoinHandle<Result<()>>>,
) {
    if let Some(p) = pending {
        let _ = p.await;
    }
    let _ = cache
        .write(move |_, w| {
            let _ = w
                .conn
                .execute("DELETE FROM chunks WHERE blob_id = ?1", [&id]);
            let _ = incremental_vacuum(&w.conn);
            Ok(())
        })
        .await;
}

impl ChunkGuard {
    pub(super) async fn cleanup_now(&mut self) {
        self.armed = false;
        remove_chunks(self.cache.clone(), self.id.clone(), self.pending.take()).await;
    }
}

impl Drop for ChunkGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let cleanup = remove_chunks(self.cache.clone(), self.id.clone(), self.pending.take());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(cleanup);
            }
            // No runtime (dropped outside one): the janitor removes the chunks later.
            Err(_) => drop(cleanup),
        }
    }
}
