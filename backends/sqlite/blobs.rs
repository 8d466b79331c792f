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

/// Deletes blob `id`'s manifest: from the commit on, the blob no longer exists for new readers. Its
/// chunks go with [`SqliteCache::release_chunks`] once the transaction has committed, and not while a
/// stream of this process is still reading them.
pub(super) fn delete_manifest_in(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM blobs WHERE id = ?1", [id])?;
    Ok(())
}

/// Blobs that streams of this process are reading, and whether each was deleted meanwhile.
///
/// A stream reads one chunk row per step, each in its own read transaction, so a delete committed
/// half-way through would cut it off, where an open file outlives its unlink and an S3 GET its DELETE
/// (the `read_stream_outlives_the_blobs_deletion` conformance case). A stream therefore pins its blob
/// before it reads the manifest; a delete removes the manifest, commits, and only then looks here: a
/// pinned blob's chunks are left to its last reader, which removes them when it is done. No reader can
/// slip between the two: one that pins after the look finds the manifest already gone.
#[derive(Debug, Default)]
pub(super) struct Pins(Mutex<std::collections::HashMap<String, Pin>>);

#[derive(Debug, Default)]
struct Pin {
    readers: usize,
    deleted: bool,
}

/// One stream's pin on a blob; dropped, it removes the chunks if the blob was deleted meanwhile and
/// this was its last reader.
pub(super) struct ReadPin {
    cache: SqliteCache,
    id: String,
}

impl ReadPin {
    pub(super) fn new(cache: &SqliteCache, id: &str) -> Self {
        lock(&cache.inner.pins.0)
            .entry(id.to_owned())
            .or_default()
            .readers += 1;
        ReadPin {
            cache: cache.clone(),
            id: id.to_owned(),
        }
    }
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        let release = {
            let mut pins = lock(&self.cache.inner.pins.0);
            let Some(pin) = pins.get_mut(&self.id) else {
                return;
            };
            pin.readers -= 1;
            if pin.readers > 0 {
                return;
            }
            pins.remove(&self.id).is_some_and(|pin| pin.deleted)
        };
        if !release {
            return;
        }
        let cleanup = remove_chunks(self.cache.clone(), self.id.clone(), None);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(cleanup)),
            // No runtime: the chunks have no manifest, so the janitor sweeps them as a temp.
            Err(_) => drop(cleanup),
        }
    }
}

impl Pins {
    /// True if a stream of this process is reading blob `id`.
    pub(super) fn is_pinned(&self, id: &str) -> bool {
        lock(&self.0).contains_key(id)
    }
}

impl SqliteCache {
    /// Removes the chunks of the blobs in `ids`, whose manifests a committed transaction deleted,
    /// except those a stream is reading (their last reader removes them). Not durable: chunks a crash
    /// leaves behind have no manifest, and the janitor sweeps them as temps.
    pub(super) fn release_chunks(&self, w: &mut Writer, ids: Vec<String>) {
        let free: Vec<String> = {
            let mut pins = lock(&self.inner.pins.0);
            ids.into_iter()
                .filter(|id| match pins.get_mut(id) {
                    Some(pin) => {
                        pin.deleted = true;
                        false
                    }
                    None => true,
                })
                .collect()
        };
        if free.is_empty() {
            return;
        }
        let removed = (|| -> rusqlite::Result<()> {
            let tx = w.begin(false)?;
            {
                let mut stmt = tx.prepare_cached("DELETE FROM chunks WHERE blob_id = ?1")?;
                for id in &free {
                    stmt.execute([id])?;
                }
            }
            tx.commit()
        })();
        if let Err(e) = removed {
            tracing::warn!(
                target: "outcache::sqlite",
                "removing the chunks of {} deleted blob(s) failed ({e}); the janitor sweeps them as temps",
                free.len()
            );
        }
    }
}

/// The manifest of blob `id`: (size, sha256).
pub(super) fn manifest(conn: &Connection, id: &str) -> rusqlite::Result<Option<(i64, String)>> {
    conn.query_row("SELECT size, sha256 FROM blobs WHERE id = ?1", [id], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

/// Deletes a blob's chunks if its write does not reach the manifest (error, failed stream, dropped
/// future). On drop it finishes in the background, after any chunk insert still in flight, and takes
/// the manifest too: a write dropped while its manifest was being committed publishes nothing, whichever
/// of the two gets the write lock first (the commit checks [`ChunkGuard::abandoned`] under it).
pub(super) struct ChunkGuard {
    pub(super) cache: SqliteCache,
    pub(super) id: String,
    pub(super) pending: Option<tokio::task::JoinHandle<Result<()>>>,
    pub(super) armed: bool,
    /// Set when dropped armed: its writer is gone.
    pub(super) abandoned: Arc<std::sync::atomic::AtomicBool>,
}

/// Wait for the chunk insert still in flight, then delete every chunk of `id` (and its manifest, if a
/// dropped write's commit landed) and give their pages back now, not at the next prune.
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
            let _ = w.conn.execute("DELETE FROM blobs WHERE id = ?1", [&id]);
            let _ = w
                .conn
                .execute("DELETE FROM chunks WHERE blob_id = ?1", [&id]);
            let _ = incremental_vacuum(&w.conn);
            Ok(())
        })
        .await;
}

impl ChunkGuard {
    /// Waits for the chunk insert in flight, if any. It stays the guard's while awaited: a write
    /// dropped meanwhile leaves it to the cleanup, which waits for it before deleting the chunks (taken
    /// out first, an insert landing after the cleanup left a chunk behind).
    pub(super) async fn finish_pending(&mut self) -> Result<()> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(());
        };
        let inserted = pending
            .await
            .unwrap_or_else(|e| Err(Error::stream(format!("chunk insert failed: {e}"))));
        self.pending = None;
        inserted
    }

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
        self.abandoned
            .store(true, std::sync::atomic::Ordering::SeqCst);
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
