//! A complete third-party backend, as the guide (`WRITING_A_BACKEND.md`) builds it: rows in memory, blobs
//! as files in a directory of its own. It uses the helpers the crate ships — `layout::blob_name` (unique
//! names carrying the owner's key tag), `blob::BlobDigest`, `wire::parse_ref_name`, `blob::cascade_delete`
//! (the ownership rule), `blob::reader_stream` — and passes the whole conformance suite, which the test
//! command runs (`cargo test --all-features --example skeleton_backend`).
//!
//! Run it as a program to see the suite's report: `cargo run --all-features --example skeleton_backend`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::StreamExt;
use outcache::blob::{BlobDigest, cascade_delete, reader_stream};
use outcache::layout::{blob_name, is_blob_name};
use outcache::wire::{parse_ref_name, refs_in};
use outcache::{
    BlobEntry, BlobMeta, BlobStat, BlobState, ByteRange, ByteStream, CacheRef, Capabilities, Error,
    OutputCache, Result, Row, RowEntry, RowKey, RowScan, async_trait,
};
use serde_json::Value;

/// Every ref this backend hands out starts with its own scheme, so no other backend's ref resolves here.
const REF_PREFIX: &str = "skeleton://blobs/";

#[derive(Debug)]
struct StoredRow {
    output: Value,
    created_at: SystemTime,
}

/// Rows in memory, blobs as files in `dir`: `<name>` published, `tmp-<name>` while a write is in flight.
#[derive(Debug, Clone)]
pub struct SkeletonBackend {
    rows: Arc<Mutex<BTreeMap<RowKey, StoredRow>>>,
    dir: PathBuf,
}

impl std::fmt::Display for SkeletonBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "skeleton({})", self.dir.display())
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |e| Error::io(action, path, e)
}

impl SkeletonBackend {
    /// A backend keeping its blobs in `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        Ok(SkeletonBackend {
            rows: Arc::default(),
            dir,
        })
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, BTreeMap<RowKey, StoredRow>> {
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file of a ref, if the ref is one of ours (strictly: one clean name segment).
    fn blob_path(&self, reference: &str) -> Option<PathBuf> {
        parse_ref_name(reference, REF_PREFIX, "").map(|name| self.dir.join(name))
    }

    /// Remove the rows `pick` selects and delete the blobs they own.
    async fn remove_rows(&self, pick: impl Fn(&RowKey, &StoredRow) -> bool) -> Result<u64> {
        let removed: Vec<(RowKey, Value)> = {
            let mut rows = self.rows();
            let doomed: Vec<RowKey> = rows
                .iter()
                .filter(|(k, r)| pick(k, r))
                .map(|(k, _)| k.clone())
                .collect();
            doomed
                .into_iter()
                .filter_map(|k| rows.remove(&k).map(|r| (k, r.output)))
                .collect()
        };
        for (key, output) in &removed {
            cascade_delete(self, key, output).await?;
        }
        Ok(removed.len() as u64)
    }
}

/// Removes a temp file if the write does not get as far as publishing it (error or dropped future).
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[async_trait]
impl OutputCache for SkeletonBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities::rows_only()
            .with_write_blob()
            .with_open_blob()
            .with_delete_blob()
    }

    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        let row = StoredRow {
            output: output.clone(),
            created_at: SystemTime::now(),
        };
        self.rows().insert(key.clone(), row);
        Ok(())
    }

    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        Ok(self.rows().get(key).map(|r| Row {
            output: r.output.clone(),
            created_at: r.created_at,
        }))
    }

    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        self.remove_rows(|k, _| keys.contains(k)).await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.remove_rows(|k, _| k.task_type().starts_with(prefix))
            .await
    }

    async fn scan_rows(&self) -> Result<RowScan> {
        let rows = self
            .rows()
            .iter()
            .map(|(key, r)| RowEntry {
                key: key.clone(),
                created_at: r.created_at,
                size: r.output.to_string().len() as u64,
                refs: refs_in(&r.output)
                    .into_iter()
                    .map(|r| r.reference)
                    .collect(),
                last_access: None, // no access tracking: the janitor falls back to commit times
                version: None, // commit times tell versions apart here (see `RowEntry::version`)
            })
            .collect();
        // Rows are decoded values here: nothing can be unreadable. A backend that stores bytes lists
        // what it cannot decode in `unreadable` (see `CorruptKind`).
        Ok(RowScan {
            rows,
            unreadable: Vec::new(),
            listing_only: false, // every row was read: refs are known
        })
    }

    async fn remove_corrupt(&self, _id: &str) -> Result<bool> {
        Ok(false)
    }

    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io("list", &self.dir))? {
            let entry = entry.map_err(io("list", &self.dir))?;
            let meta = entry.metadata().map_err(io("stat", &entry.path()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let (id, state) = match name.strip_prefix("tmp-") {
                // Temps must be listed: `stats` counts them and the janitor removes dead ones.
                Some(blob) if is_blob_name(blob) => (name, BlobState::Temp),
                None if is_blob_name(&name) => {
                    (format!("{REF_PREFIX}{name}"), BlobState::Published)
                }
                // Not a name this backend gives: someone else's file (the directory may hold more
                // than the cache). Listed, the janitor would sweep it as an orphan.
                _ => continue,
            };
            out.push(BlobEntry {
                id,
                state,
                size: meta.len(),
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        Ok(out)
    }

    async fn remove_temp(&self, id: &str) -> Result<bool> {
        if !id.starts_with("tmp-") || parse_ref_name(id, "", "").is_none() {
            return Ok(false); // not one of our temp names: never touch it
        }
        let path = self.dir.join(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove", path, e)),
        }
    }

    async fn write_blob(&self, meta: &BlobMeta, mut data: ByteStream) -> Result<CacheRef> {
        use tokio::io::AsyncWriteExt;
        // The name carries the owning row's key tag (the ownership rule) and is unique per write.
        let name = blob_name(meta);
        let tmp = self.dir.join(format!("tmp-{name}"));
        // Created and guarded with no await in between (one quick syscall, so done in place): a
        // caller dropped while an awaited creation ran on the blocking pool would leave the file
        // behind with no guard to remove it (the suite's `write_dropped_at_any_await_leaves_nothing`).
        let file = std::fs::File::create_new(&tmp).map_err(io("create", &tmp))?;
        let guard = TempFile(Some(tmp.clone()));
        let mut file = tokio::fs::File::from_std(file);
        let mut digest = BlobDigest::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk?; // the producer's error; the guard removes the temp
            digest.update(&chunk);
            file.write_all(&chunk).await.map_err(io("write", &tmp))?;
        }
        file.sync_all().await.map_err(io("fsync", &tmp))?;
        drop(file);
        let dest = self.dir.join(&name);
        // Renamed and disarmed with no await in between, for the same reason: a rename still running
        // for a dropped caller would publish a blob nobody was told of.
        std::fs::rename(&tmp, &dest).map_err(io("publish", &dest))?;
        std::mem::forget(guard); // published: nothing to remove
        Ok(digest.into_ref(format!("{REF_PREFIX}{name}"), meta))
    }

    async fn stat_blob(&self, reference: &str) -> Result<Option<BlobStat>> {
        let Some(path) = self.blob_path(reference) else {
            return Ok(None);
        };
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(BlobStat {
                size: m.len(),
                sha256: None,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", path, e)),
        }
    }

    async fn open_blob(
        &self,
        reference: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let Some(path) = self.blob_path(reference) else {
            return Ok(None);
        };
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open", path, e)),
        };
        let span = match range {
            None => 0..u64::MAX,
            Some(range) => {
                let size = file
                    .metadata()
                    .await
                    .map_err(|e| Error::io("stat", &path, e))?
                    .len();
                // `resolve` turns every range form into `start..end`, and refuses one past the end.
                let span = range.resolve(reference, size)?;
                file.seek(std::io::SeekFrom::Start(span.start))
                    .await
                    .map_err(|e| Error::io("seek", &path, e))?;
                span
            }
        };
        // Chunks of at most 1 MiB (`MAX_READ_CHUNK`); dropping the stream closes the file.
        let limited = file.take(span.end - span.start);
        Ok(Some(reader_stream(
            limited,
            outcache::store::MAX_READ_CHUNK,
        )))
    }

    async fn delete_blob(&self, reference: &str) -> Result<()> {
        let Some(path) = self.blob_path(reference) else {
            return Ok(()); // not ours: nothing to do
        };
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
            _ => Ok(()),
        }
    }
}

/// The runner a backend crate ships: every case against a fresh backend, one line each, a closing line.
#[tokio::main]
async fn main() {
    let report = outcache::conformance::run(
        || async {
            let dir = tempfile::tempdir().expect("a temp dir");
            let backend = SkeletonBackend::open(dir.path()).expect("open the backend");
            outcache::conformance::Fixture::with_guard(Arc::new(backend), dir)
        },
        outcache::conformance::RunOptions::default().print(true),
    )
    .await;
    std::process::exit(i32::from(report.failed() > 0));
}

#[cfg(test)]
mod conformance {
    use super::*;

    outcache::conformance_tests!(|| async {
        let dir = tempfile::tempdir().unwrap();
        let backend = SkeletonBackend::open(dir.path()).unwrap();
        let root = dir.path().to_path_buf();
        // State what the backend claims, so that losing a capability fails instead of waiving cases,
        // show the suite everything it stores, so a leaked temp cannot hide from the listing, and let
        // it plant other people's files in the backend's directories, so a janitor that deletes what
        // the backend did not write fails.
        outcache::conformance::Fixture::with_guard(Arc::new(backend), dir)
            .with_neighbours(outcache::conformance::DirNeighbours::new(&root))
            .with_storage(move || outcache::conformance::files_under(&root))
            .expect(
                Capabilities::rows_only()
                    .with_write_blob()
                    .with_open_blob()
                    .with_delete_blob(),
            )
    });
}
