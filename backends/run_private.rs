//! The run-private wrapper: a private tier of any backend for one pipeline run, whose rows only that run
//! sees (crash-resume of a run) and which vanishes with [`RunPrivate::clear_run`].
//!
//! **Namespace.** Every row of run `R` is stored in the backing store under the task type
//! `run/<byte length of R>:<R>/r/<task type>`. The length prefix makes namespaces prefix-free: no run's
//! namespace is a prefix of another's (`session1` vs `session1-`), and the run id is kept verbatim, so no
//! sanitising can merge two ids.
//!
//! **Blob ownership.** Blobs keep the backing store's own refs, so cascades and the backing store's
//! janitor work unchanged. Each blob the run writes gets a marker row `run/<len>:<R>/b/` +
//! `sha256(ref)` whose output is the ref: the wrapper resolves, lists and deletes only refs with a
//! marker in its own namespace, so another run's refs and the shared tier's never resolve through it
//! (reads give `None`, deletes do nothing), and a forged ref does not either. The marker also keeps the
//! run's blobs referenced in the backing store until the run is cleared, so a janitor on the shared tier
//! never removes them. Incomplete writes cannot be attributed to a run: every temp of the backing store
//! is listed through the wrapper, and removed (past the janitor's grace) like anywhere else.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::store::{
    BlobEntry, BlobMeta, BlobStat, ByteRange, ByteStream, Capabilities, OutputCache, Row, RowEntry,
    RowScan, RowVersion,
};
use crate::wire::{CacheRef, MAX_TASK_TYPE_LEN, RowKey, owned_refs, refs_in, sha256_hex};

/// Longest run id accepted, in bytes.
pub const MAX_RUN_ID_LEN: usize = 200;

/// The namespace prefix of run `run_id`: `run/<len>:<id>/`. Prefix-free across run ids.
pub fn run_namespace(run_id: &str) -> String {
    format!("run/{}:{run_id}/", run_id.len())
}

/// Whether `task_type` lies in some run's namespace (`run/<digits>:…`), where only a run-private tier
/// writes. The engine refuses such task types from its callers: a row planted there would read as the
/// run's own, and the run's `clear_run` would remove it.
pub fn in_run_namespace(task_type: &str) -> bool {
    task_type
        .strip_prefix("run/")
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(len, _)| !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()))
}

/// A run-private view of `inner`.
#[derive(Debug, Clone)]
pub struct RunPrivate {
    inner: Arc<dyn OutputCache>,
    run_id: String,
    /// `run/<len>:<id>/`: everything of this run.
    namespace: String,
    /// `run/<len>:<id>/r/`: prefix of this run's row task types.
    rows: String,
    /// `run/<len>:<id>/b/`: task type of this run's blob markers.
    markers: String,
}

impl std::fmt::Display for RunPrivate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "run-private({:?}, {})", self.run_id, self.inner)
    }
}

impl RunPrivate {
    /// The private tier of run `run_id` over `inner`. Refuses an empty run id, one longer than 200 bytes
    /// or one with control characters.
    pub fn new(inner: Arc<dyn OutputCache>, run_id: &str) -> Result<Self> {
        let reason = if run_id.is_empty() {
            Some("must not be empty")
        } else if run_id.len() > MAX_RUN_ID_LEN {
            Some("is longer than 200 bytes")
        } else if run_id.chars().any(char::is_control) {
            Some("must not contain control characters")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Error::InvalidInput {
                what: "run id".into(),
                reason: reason.into(),
            });
        }
        let ns = run_namespace(run_id);
        Ok(RunPrivate {
            inner,
            run_id: run_id.to_owned(),
            rows: format!("{ns}r/"),
            markers: format!("{ns}b/"),
            namespace: ns,
        })
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The backing store.
    pub fn inner(&self) -> &Arc<dyn OutputCache> {
        &self.inner
    }

    /// Remove exactly this run's rows and blobs: one prefix delete on the backing store (rows and
    /// markers), then every blob a marker named, i.e. every blob the run wrote. Blobs of the shared tier
    /// that the run's rows cite are not the run's and stay. Safe to call twice or on a run that wrote
    /// nothing. Returns the number of backing rows removed (rows and markers).
    pub async fn clear_run(&self) -> Result<u64> {
        let written = self.owned_refs().await?;
        let removed = self.inner.delete_prefix(&self.namespace).await?;
        if self.inner.capabilities().delete_blob {
            for reference in written {
                self.inner.delete_blob(&reference).await?;
            }
        }
        Ok(removed)
    }

    fn inner_key(&self, key: &RowKey) -> Result<RowKey> {
        let task = format!("{}{}", self.rows, key.task_type());
        if task.len() > MAX_TASK_TYPE_LEN {
            return Err(Error::InvalidInput {
                what: "task type".into(),
                reason: format!(
                    "too long for run {:?}: at most {} bytes fit beside the run namespace",
                    self.run_id,
                    MAX_TASK_TYPE_LEN - self.rows.len()
                ),
            });
        }
        RowKey::from_parts(&task, key.fingerprint())
    }

    fn outer_key(&self, inner: &RowKey) -> Option<RowKey> {
        let task = inner.task_type().strip_prefix(&self.rows)?;
        RowKey::from_parts(task, inner.fingerprint()).ok()
    }

    // The marker namespace is a validated run id (no control characters, at most 200 bytes) inside a
    // fixed pattern, and the fingerprint a SHA-256: the key is valid by construction.
    #[allow(clippy::expect_used)]
    fn marker_key(&self, reference: &str) -> RowKey {
        RowKey::from_parts(&self.markers, &sha256_hex(reference.as_bytes()))
            .expect("a marker key is valid by construction")
    }

    /// Whether `reference` is a blob this run wrote (and has not deleted).
    async fn owns(&self, reference: &str) -> Result<bool> {
        let Some(marker) = self.inner.get_row(&self.marker_key(reference)).await? else {
            return Ok(false);
        };
        Ok(CacheRef::from_value(&marker.output).is_some_and(|r| r.reference == reference))
    }

    /// Refs with a marker in this run's namespace.
    async fn owned_refs(&self) -> Result<HashSet<String>> {
        Ok(self
            .inner
            .scan_rows()
            .await?
            .rows
            .into_iter()
            .filter(|r| r.key.task_type() == self.markers)
            .flat_map(|r| r.refs)
            .collect())
    }

    /// Drop the markers of the refs in `output` (after the row that held them was deleted).
    /// Drop the markers of the blobs the deleted row `inner` owned (the backing store's cascade deleted
    /// those blobs); refs it only cited keep their markers, since their owners still hold them.
    async fn forget_refs(&self, inner: &RowKey, output: &Value) -> Result<()> {
        let refs = refs_in(output);
        for r in owned_refs(inner, refs.iter().map(|r| r.reference.as_str())) {
            self.inner.delete_row(&self.marker_key(&r)).await?;
        }
        Ok(())
    }
}

impl RunPrivate {
    /// The run's rows of a backing-store scan, under the keys the run sees. A row that cannot be
    /// decoded cannot be attributed to a run: unreadable rows are reported and removed on the backing
    /// store.
    fn run_rows(&self, scan: RowScan) -> RowScan {
        let rows = scan
            .rows
            .into_iter()
            .filter_map(|r| {
                Some(RowEntry {
                    key: self.outer_key(&r.key)?,
                    ..r
                })
            })
            .collect();
        RowScan {
            rows,
            unreadable: Vec::new(),
            listing_only: scan.listing_only,
        }
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl OutputCache for RunPrivate {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn owns_ref(&self, key: &RowKey, reference: &str) -> bool {
        self.inner_key(key)
            .is_ok_and(|inner| self.inner.owns_ref(&inner, reference))
    }

    fn blob_tag(&self, key: &RowKey) -> String {
        // The run's blobs are written under the inner key (`write_blob`), so they carry its tag.
        match self.inner_key(key) {
            Ok(inner) => self.inner.blob_tag(&inner),
            Err(_) => crate::wire::key_tag(key),
        }
    }

    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        self.inner.save_row(&self.inner_key(key)?, output).await
    }

    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        self.inner.get_row(&self.inner_key(key)?).await
    }

    async fn delete_row(&self, key: &RowKey) -> Result<bool> {
        let inner = self.inner_key(key)?;
        let output = self.inner.get_row(&inner).await?.map(|r| r.output);
        let existed = self.inner.delete_row(&inner).await?;
        if let Some(output) = output {
            self.forget_refs(&inner, &output).await?;
        }
        Ok(existed)
    }

    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        // One by one: each row's blob markers are dropped with it.
        let mut deleted = 0;
        for key in keys {
            if self.delete_row(key).await? {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    async fn delete_rows_listed(&self, rows: &[RowVersion]) -> Result<Vec<RowKey>> {
        // One by one: each row's blob markers are dropped with it, and only if it was deleted.
        let mut deleted = Vec::new();
        for listed in rows {
            let inner = self.inner_key(&listed.key)?;
            let output = match self.inner.get_row(&inner).await {
                Ok(row) => row.map(|r| r.output),
                Err(Error::CorruptRow { .. }) => None,
                Err(e) => return Err(e),
            };
            let version = RowVersion {
                key: inner.clone(),
                ..listed.clone()
            };
            if self.inner.delete_rows_listed(&[version]).await?.is_empty() {
                continue;
            }
            if let Some(output) = output {
                self.forget_refs(&inner, &output).await?;
            }
            deleted.push(listed.key.clone());
        }
        Ok(deleted)
    }

    async fn delete_prefix(&self, task_type_prefix: &str) -> Result<u64> {
        self.inner
            .delete_prefix(&format!("{}{task_type_prefix}", self.rows))
            .await
    }

    async fn scan_rows(&self) -> Result<RowScan> {
        Ok(self.run_rows(self.inner.scan_rows().await?))
    }

    fn shallow_row_pages(&self) -> BoxStream<'_, Result<RowScan>> {
        self.inner
            .shallow_row_pages()
            .map_ok(|page| self.run_rows(page))
            .boxed()
    }

    fn row_ref_pages(&self) -> BoxStream<'_, Result<RowScan>> {
        self.inner
            .row_ref_pages()
            .map_ok(|page| self.run_rows(page))
            .boxed()
    }

    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        let _ = id;
        Ok(false)
    }

    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        // Published blobs: only the run's. Temps cannot be attributed to a run, and a stale one is
        // garbage whoever left it: they are listed (and removed past the grace) through any run.
        let owned = self.owned_refs().await?;
        Ok(self
            .inner
            .list_blobs()
            .await?
            .into_iter()
            .filter(|b| b.state == crate::store::BlobState::Temp || owned.contains(&b.id))
            .collect())
    }

    fn blob_pages(&self) -> BoxStream<'_, Result<Vec<BlobEntry>>> {
        // The run's refs first (a listing of the run's rows), then the inner store's pages filtered.
        futures::stream::once(self.owned_refs())
            .map_ok(move |owned| {
                self.inner.blob_pages().map_ok(move |page| {
                    page.into_iter()
                        .filter(|b| {
                            b.state == crate::store::BlobState::Temp || owned.contains(&b.id)
                        })
                        .collect()
                })
            })
            .try_flatten()
            .boxed()
    }

    async fn remove_temp(&self, id: &str) -> Result<bool> {
        self.inner.remove_temp(id).await
    }

    async fn reclaim_space(&self) -> Result<()> {
        self.inner.reclaim_space().await
    }

    async fn storage_bytes(&self) -> Result<Option<u64>> {
        self.inner.storage_bytes().await
    }

    async fn touch_rows(&self, keys: &[RowKey], at: SystemTime) -> Result<()> {
        let inner: Vec<RowKey> = keys
            .iter()
            .map(|k| self.inner_key(k))
            .collect::<Result<_>>()?;
        self.inner.touch_rows(&inner, at).await
    }

    async fn write_blob(&self, meta: &BlobMeta, data: ByteStream) -> Result<CacheRef> {
        let meta = BlobMeta {
            task_type: format!("{}{}", self.rows, meta.task_type),
            ..meta.clone()
        };
        let written = self.inner.write_blob(&meta, data).await?;
        let marker = CacheRef::new(written.reference.clone()).to_value();
        if let Err(e) = self
            .inner
            .save_row(&self.marker_key(&written.reference), &marker)
            .await
        {
            let _ = self.inner.delete_blob(&written.reference).await;
            return Err(e);
        }
        Ok(written)
    }

    async fn stat_blob(&self, reference: &str) -> Result<Option<BlobStat>> {
        if !self.owns(reference).await? {
            return Ok(None);
        }
        self.inner.stat_blob(reference).await
    }

    async fn read_blob(&self, reference: &str) -> Result<Option<Bytes>> {
        if !self.owns(reference).await? {
            return Ok(None);
        }
        self.inner.read_blob(reference).await
    }

    async fn open_blob(
        &self,
        reference: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        if !self.owns(reference).await? {
            return Ok(None);
        }
        self.inner.open_blob(reference, range).await
    }

    async fn delete_blob(&self, reference: &str) -> Result<()> {
        if !self.owns(reference).await? {
            return Ok(());
        }
        self.inner.delete_blob(reference).await?;
        self.inner.delete_row(&self.marker_key(reference)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_prefix_free_for_tricky_ids() {
        let ids = [
            "session1",
            "session1-",
            "s",
            "s/",
            "a:b",
            "a/b",
            "1:a",
            "ünï",
            "🐎",
            "r/1",
            "x".repeat(200).as_str(),
        ]
        .map(str::to_owned);
        for a in &ids {
            for b in &ids {
                if a != b {
                    assert!(
                        !run_namespace(a).starts_with(&run_namespace(b)),
                        "{a:?} vs {b:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_run_ids_are_refused() {
        let inner: Arc<dyn OutputCache> = Arc::new(crate::backends::memory::MemoryCache::new());
        for bad in ["", "a\nb", &"x".repeat(201)] {
            assert!(
                matches!(
                    RunPrivate::new(inner.clone(), bad),
                    Err(Error::InvalidInput { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
