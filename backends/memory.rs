//! The in-memory backend (`memory://`): every capability, nothing durable. For tests, for the engine's own
//! tests, and as the reference behaviour the conformance suite is checked against.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::Value;

use crate::blob::{BlobDigest, cascade_delete, chunked};
use crate::error::Result;
use crate::store::{
    BlobEntry, BlobMeta, BlobStat, BlobState, ByteRange, ByteStream, Capabilities, OutputCache,
    Row, RowEntry, RowScan,
};
use crate::wire::{CacheRef, RowKey, parse_ref_name, refs_in};

const REF_PREFIX: &str = "memory://blobs/";

#[derive(Debug)]
struct StoredRow {
    output: Value,
    created_at: SystemTime,
    last_access: SystemTime,
    size: u64,
}

#[derive(Debug)]
struct StoredBlob {
    bytes: Bytes,
    sha256: String,
    modified: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    rows: BTreeMap<RowKey, StoredRow>,
    blobs: HashMap<String, StoredBlob>,
    /// In-flight writes: name → (bytes so far, last write).
    temps: HashMap<String, (u64, SystemTime)>,
}

/// An in-memory cache. Cloning shares the same storage.
#[derive(Debug, Clone, Default)]
pub struct MemoryCache {
    state: Arc<Mutex<State>>,
}

impl MemoryCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated (every update is one insert or
        // remove), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove_rows(&self, pick: impl Fn(&RowKey, &StoredRow) -> bool) -> Vec<(RowKey, Value)> {
        let mut state = self.lock();
        let doomed: Vec<RowKey> = state
            .rows
            .iter()
            .filter(|(k, r)| pick(k, r))
            .map(|(k, _)| k.clone())
            .collect();
        doomed
            .iter()
            .filter_map(|k| state.rows.remove(k).map(|r| (k.clone(), r.output)))
            .collect()
    }

    async fn cascade(&self, outputs: Vec<(RowKey, Value)>) -> Result<u64> {
        for (key, output) in &outputs {
            cascade_delete(self, key, output).await?;
        }
        Ok(outputs.len() as u64)
    }
}

impl std::fmt::Display for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("memory")
    }
}

/// Removes an in-flight write's temp entry however the write ends (success, error or drop).
struct TempGuard {
    cache: MemoryCache,
    name: String,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        self.cache.lock().temps.remove(&self.name);
    }
}

#[async_trait]
impl OutputCache for MemoryCache {
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        let size = serde_json::to_vec(output).map_or(0, |v| v.len() as u64);
        let now = SystemTime::now();
        let row = StoredRow {
            output: output.clone(),
            created_at: now,
            last_access: now,
            size,
        };
        self.lock().rows.insert(key.clone(), row);
        Ok(())
    }

    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        Ok(self.lock().rows.get(key).map(|r| Row {
            output: r.output.clone(),
            created_at: r.created_at,
        }))
    }

    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        let outputs: Vec<(RowKey, Value)> = {
            let mut inner = self.lock();
            keys.iter()
                .filter_map(|key| inner.rows.remove(key).map(|row| (key.clone(), row.output)))
                .collect()
        };
        self.cascade(outputs).await
    }

    async fn delete_prefix(&self, task_type_prefix: &str) -> Result<u64> {
        let outputs = self.remove_rows(|k, _| k.task_type().starts_with(task_type_prefix));
        self.cascade(outputs).await
    }

    async fn scan_rows(&self) -> Result<RowScan> {
        // Rows are kept as decoded values: nothing can be unreadable.
        let rows = self
            .lock()
            .rows
            .iter()
            .map(|(key, r)| RowEntry {
                key: key.clone(),
                created_at: r.created_at,
                size: r.size,
                refs: refs_in(&r.output)
                    .into_iter()
                    .map(|r| r.reference)
                    .collect(),
                last_access: Some(r.last_access),
                version: None,
            })
            .collect();
        Ok(RowScan {
            rows,
            unreadable: Vec::new(),
            listing_only: false,
        })
    }

    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        let _ = id;
        Ok(false)
    }

    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        let state = self.lock();
        let published = state.blobs.iter().map(|(name, b)| BlobEntry {
            id: format!("{REF_PREFIX}{name}"),
            state: BlobState::Published,
            size: b.bytes.len() as u64,
            modified: b.modified,
        });
        let temps = state
            .temps
            .iter()
            .map(|(name, (size, modified))| BlobEntry {
                id: name.clone(),
                state: BlobState::Temp,
                size: *size,
                modified: *modified,
            });
        Ok(published.chain(temps).collect())
    }

    async fn remove_temp(&self, id: &str) -> Result<bool> {
        // A memory temp belongs to a live future in this process; the future's guard removes it. Dropping
        // the entry here only hides it, which is what "remove" can mean for a write nobody can crash.
        Ok(self.lock().temps.remove(id).is_some())
    }

    async fn touch_rows(&self, keys: &[RowKey], at: SystemTime) -> Result<()> {
        let mut state = self.lock();
        for key in keys {
            if let Some(row) = state.rows.get_mut(key) {
                row.last_access = row.last_access.max(at);
            }
        }
        Ok(())
    }

    async fn write_blob(&self, meta: &BlobMeta, mut data: ByteStream) -> Result<CacheRef> {
        let name = crate::layout::blob_name(meta);
        self.lock()
            .temps
            .insert(name.clone(), (0, SystemTime::now()));
        let _guard = TempGuard {
            cache: self.clone(),
            name: name.clone(),
        };
        let mut digest = BlobDigest::new();
        let mut buf = BytesMut::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            digest.update(&chunk);
            buf.extend_from_slice(&chunk);
            if let Some(t) = self.lock().temps.get_mut(&name) {
                *t = (buf.len() as u64, SystemTime::now());
            }
        }
        let cache_ref = digest.into_ref(format!("{REF_PREFIX}{name}"), meta);
        let blob = StoredBlob {
            bytes: buf.freeze(),
            sha256: cache_ref.sha256.clone().unwrap_or_default(),
            modified: SystemTime::now(),
        };
        self.lock().blobs.insert(name.clone(), blob);
        Ok(cache_ref)
    }

    async fn stat_blob(&self, reference: &str) -> Result<Option<BlobStat>> {
        let Some(name) = parse_ref_name(reference, REF_PREFIX, "") else {
            return Ok(None);
        };
        Ok(self.lock().blobs.get(name).map(|b| BlobStat {
            size: b.bytes.len() as u64,
            sha256: Some(b.sha256.clone()),
        }))
    }

    async fn read_blob(&self, reference: &str) -> Result<Option<Bytes>> {
        let Some(name) = parse_ref_name(reference, REF_PREFIX, "") else {
            return Ok(None);
        };
        Ok(self.lock().blobs.get(name).map(|b| b.bytes.clone()))
    }

    async fn open_blob(
        &self,
        reference: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        let Some(bytes) = self.read_blob(reference).await? else {
            return Ok(None);
        };
        let Some(range) = range else {
            return Ok(Some(chunked(bytes)));
        };
        let span = range.resolve(reference, bytes.len() as u64)?;
        Ok(Some(chunked(
            bytes.slice(span.start as usize..span.end as usize),
        )))
    }

    async fn delete_blob(&self, reference: &str) -> Result<()> {
        if let Some(name) = parse_ref_name(reference, REF_PREFIX, "") {
            self.lock().blobs.remove(name);
        }
        Ok(())
    }
}
