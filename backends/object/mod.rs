//! The object-store backend: any [`object_store::ObjectStore`] — S3-compatible stores first (AWS, MinIO,
//! Ceph, R2 … via `s3://bucket/prefix`, feature `s3`), and for free object_store's in-memory and local
//! stores (and GCS / Azure behind their features). This is how a cache scales out: many hosts share
//! one bucket.
//!
//! Layout under the prefix, the same as the fs backend's (see [`crate::layout`]):
//! ```text
//! <prefix>/rows/<task-type segment>/<fingerprint>.json   row records (small JSON objects, one PUT each)
//! <prefix>/blobs/<name>                                  blobs; ref "object://blobs/<name>"
//! ```
//! Blobs are written with multipart upload in 5 MiB parts, at most 3 in flight (memory stays near 20 MiB
//! whatever the size); blobs that end within the first part go up in one PUT. An object is visible only
//! once complete, so readers never see a partial blob. On any failure, or if the write future is dropped,
//! the upload is aborted. Uploads abandoned by a crashed process are invisible to listing (object_store
//! cannot list multipart uploads): give the bucket an `AbortIncompleteMultipartUpload` lifecycle rule.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde_json::Value;

mod listing;

pub use listing::{IndexReport, REFS_INDEX_VERSION};

use crate::blob::{BlobDigest, cascade_delete};
use crate::error::{Error, Result};
use crate::layout::{
    blob_name, corrupt_kind, decode_row_of_size, encode_row, encode_task_segment, segment_may_match,
};
use crate::store::{
    BlobEntry, BlobMeta, BlobStat, BlobState, ByteRange, ByteStream, Capabilities, CorruptKind,
    OutputCache, Row, RowScan, RowVersion,
};
use crate::wire::{CacheRef, RowKey, parse_ref_name};

/// Prefix of every ref this backend hands out.
pub const REF_PREFIX: &str = "object://blobs/";
/// Prefix of the temp ids of this process's writes in flight.
const INFLIGHT_PREFIX: &str = "inflight/";
/// Multipart part size (the S3 minimum).
pub const PART_SIZE: usize = 5 << 20;
/// Parts uploading at once.
pub const PARTS_IN_FLIGHT: usize = 3;
/// Concurrent GETs when reading many rows (listings, deletes by prefix or age).
const FETCH_CONCURRENCY: usize = 16;

/// A cache in an object store under a prefix.
#[derive(Clone, Debug)]
pub struct ObjectCache {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// What Display shows: the store URL without options, so no secret ever appears.
    label: String,
    /// This process's writes in flight, listed as temps (the store cannot list multipart uploads).
    inflight: crate::blob::InFlight,
    /// Whether the store lists keys in lexicographic order (S3, in-memory), so a range re-listing can
    /// stop at the end of its range.
    sorted_listing: bool,
    /// The last blob listing, reused by the by-name cascade of successive delete batches.
    blob_listing: Arc<listing::BlobListing>,
}

impl std::fmt::Display for ObjectCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "object({})", self.label)
    }
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl ObjectCache {
    /// A cache in `store` under `prefix`. `label` names it in messages (never put secrets in it).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path, label: impl Into<String>) -> Self {
        ObjectCache {
            store,
            prefix,
            label: label.into(),
            inflight: Default::default(),
            sorted_listing: false,
            blob_listing: Default::default(),
        }
    }

    /// Declare that the store lists keys in lexicographic order, as S3 and object_store's in-memory
    /// store do (a local directory does not): the janitor's re-listings then stop at the end of their
    /// range instead of reading to the end of the listing.
    pub fn with_sorted_listing(mut self, sorted: bool) -> Self {
        self.sorted_listing = sorted;
        self
    }

    /// The underlying store (for tools that need the raw object_store API).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The key prefix everything of this cache lives under.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    fn err(&self, context: impl Into<String>) -> impl FnOnce(object_store::Error) -> Error {
        let (backend, context) = (self.to_string(), context.into());
        // object_store's messages quote request URLs: whatever credentials a URL carried (userinfo,
        // signed query parameters) never reach our output.
        move |e| Error::Backend {
            backend,
            context,
            source: crate::config::scrub_urls(&e.to_string()).into(),
        }
    }

    fn rows_root(&self) -> Path {
        self.prefix.clone().join("rows")
    }

    fn blobs_root(&self) -> Path {
        self.prefix.clone().join("blobs")
    }

    fn refs_root(&self) -> Path {
        self.prefix.clone().join("refs")
    }

    fn layout_path(&self) -> Path {
        self.prefix.clone().join("layout.json")
    }

    /// The refs-index marker of the row `key`: `refs/<segment>/<fingerprint>`.
    fn marker_path(&self, key: &RowKey) -> Path {
        self.refs_root()
            .join(encode_task_segment(key.task_type()).as_str())
            .join(key.fingerprint())
    }

    fn row_path(&self, key: &RowKey) -> Path {
        self.rows_root()
            .join(encode_task_segment(key.task_type()).as_str())
            .join(format!("{}.json", key.fingerprint()).as_str())
    }

    fn blob_path(&self, reference: &str) -> Option<Path> {
        Some(self.blobs_root().join(blob_ref_name(reference)?))
    }

    /// The bytes at `path`, or `None` if there is no such object.
    async fn fetch(&self, path: &Path) -> Result<Option<Bytes>> {
        match self.store.get(path).await {
            Ok(got) => got
                .bytes()
                .await
                .map(Some)
                .map_err(self.err(format!("read {path}"))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.err(format!("read {path}"))(e)),
        }
    }

    /// A row object's bytes and size; of one larger than any row ([`crate::layout::MAX_ROW_BYTES`])
    /// only its head, which cannot decode: such an object is garbled, and never read whole into
    /// memory (the rest of its body is not fetched).
    async fn fetch_record(&self, path: &Path) -> Result<Option<(Bytes, u64)>> {
        let fetched = self.fetch_record_with_meta(path).await?;
        Ok(fetched.map(|(bytes, meta)| (bytes, meta.size)))
    }

    /// [`Self::fetch_record`] with the object's metadata (its version) as the GET saw it.
    async fn fetch_record_with_meta(
        &self,
        path: &Path,
    ) -> Result<Option<(Bytes, object_store::ObjectMeta)>> {
        let got = match self.store.get(path).await {
            Ok(got) => got,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(self.err(format!("read {path}"))(e)),
        };
        let meta = got.meta.clone();
        if meta.size <= crate::layout::MAX_ROW_BYTES {
            let bytes = got
                .bytes()
                .await
                .map_err(self.err(format!("read {path}")))?;
            return Ok(Some((bytes, meta)));
        }
        let mut head = bytes::BytesMut::new();
        let mut body = got.into_stream();
        while head.len() < crate::layout::OVERSIZED_ROW_HEAD {
            match body.next().await {
                Some(chunk) => {
                    head.extend_from_slice(&chunk.map_err(self.err(format!("read {path}")))?)
                }
                None => break,
            }
        }
        head.truncate(crate::layout::OVERSIZED_ROW_HEAD);
        Ok(Some((head.freeze(), meta)))
    }

    async fn delete_path(&self, path: &Path) -> Result<()> {
        match self.store.delete(path).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.err(format!("delete {path}"))(e)),
        }
    }

    /// A GET's body as a blob stream with this backend's errors, in chunks of at most 1 MiB.
    fn body_stream(&self, got: object_store::GetResult, path: &Path) -> ByteStream {
        let (backend, context) = (self.to_string(), format!("read {path}"));
        let stream = got.into_stream().map(move |chunk| {
            chunk.map_err(|e| Error::Backend {
                backend: backend.clone(),
                context: context.clone(),
                source: Box::new(e),
            })
        });
        rechunk(stream.boxed())
    }

    /// Delete the rows among `candidates` for which `pick` holds, then their blobs.
    async fn remove_rows(
        &self,
        candidates: Vec<object_store::ObjectMeta>,
        pick: impl Fn(&crate::layout::RowRecord) -> bool,
    ) -> Result<u64> {
        let mut removed = 0;
        for (meta, record) in self.fetch_rows(candidates).await?.0 {
            if pick(&record) {
                if !crate::wire::refs_in(&record.output).is_empty() {
                    self.delete_path(&self.marker_path(&record.key)).await?;
                }
                self.delete_path(&meta.location).await?;
                cascade_delete(self, &record.key, &record.output).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Aborts a multipart upload that did not finish (error, failed stream, dropped future).
/// Runs `request`, the one that makes a blob visible (its single PUT, or its multipart upload's
/// completion), on a task of its own, and deletes the blob again if the writer is gone by the time it
/// is published: a write dropped while that request is in flight would otherwise leave a published
/// blob nobody was told of (and a request already sent cannot be unsent). The writer and the task each
/// set their own flag before they look at the other's, so whichever comes second sees the first.
async fn publish<T: Send + 'static>(
    store: Arc<dyn ObjectStore>,
    path: Path,
    request: impl std::future::Future<Output = object_store::Result<T>> + Send + 'static,
) -> object_store::Result<T> {
    let flags = Arc::new(PublishFlags::default());
    let mut writer = UndoIfGone {
        flags: flags.clone(),
        store: store.clone(),
        path: path.clone(),
        armed: true,
    };
    let task = tokio::spawn(async move {
        let result = request.await;
        if result.is_ok() {
            flags.published.store(true, Ordering::SeqCst);
            if flags.writer_gone.load(Ordering::SeqCst) {
                let _ = store.delete(&path).await;
            }
        }
        result
    });
    let result = task.await.unwrap_or_else(|e| {
        Err(object_store::Error::Generic {
            store: "outcache",
            source: Box::new(e),
        })
    });
    writer.armed = false;
    result
}

#[derive(Default)]
struct PublishFlags {
    published: AtomicBool,
    writer_gone: AtomicBool,
}

/// The writer's side of [`publish`]: dropped before the result reached it, it deletes the blob if
/// the request already published it (else the request's task does, when it has).
struct UndoIfGone {
    flags: Arc<PublishFlags>,
    store: Arc<dyn ObjectStore>,
    path: Path,
    armed: bool,
}

impl Drop for UndoIfGone {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.flags.writer_gone.store(true, Ordering::SeqCst);
        if self.flags.published.load(Ordering::SeqCst) {
            let (store, path) = (self.store.clone(), self.path.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = store.delete(&path).await;
                });
            }
        }
    }
}

struct AbortOnDrop(Option<WriteMultipart>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(upload) = self.0.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = upload.abort().await;
                });
            }
        }
    }
}

#[async_trait]
impl OutputCache for ObjectCache {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            touch_rows: false,
            ..Capabilities::ALL
        }
    }

    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        let bytes = encode_row(key, output, SystemTime::now())?;
        let path = self.row_path(key);
        // A row that holds refs is marked in the refs index before *and* after it is written: a
        // concurrent delete removes a marker before its row, so whatever interleaves, a row holding
        // refs never outlives its marker (see `listing.rs`).
        let holds_refs = !crate::wire::refs_in(output).is_empty();
        if holds_refs {
            self.mark_refs(key).await?;
        }
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(self.err(format!("save row {key}")))?;
        if holds_refs {
            self.mark_refs(key).await?;
        }
        Ok(())
    }

    fn row_ref_pages(&self) -> BoxStream<'_, Result<RowScan>> {
        self.ref_pages()
    }

    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        let Some((bytes, size)) = self.fetch_record(&self.row_path(key)).await? else {
            return Ok(None);
        };
        let record = decode_row_of_size(&bytes, size, key.task_type(), key.fingerprint())?;
        record.into_row_for(key, "object").map(Some)
    }

    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        let mut deleted = 0;
        for key in keys {
            let path = self.row_path(key);
            let Some((bytes, size)) = self.fetch_record(&path).await? else {
                continue;
            };
            self.unmark_then_delete(key, &bytes).await?;
            deleted += 1;
            if let Ok(record) = decode_row_of_size(&bytes, size, key.task_type(), key.fingerprint())
            {
                cascade_delete(self, key, &record.output).await?;
            }
        }
        Ok(deleted)
    }

    async fn delete_prefix(&self, task_type_prefix: &str) -> Result<u64> {
        let objects = self
            .row_objects(|t| segment_may_match(t, task_type_prefix))
            .await?;
        self.remove_rows(objects, |r| r.key.task_type().starts_with(task_type_prefix))
            .await
    }

    async fn delete_rows_listed(&self, rows: &[RowVersion]) -> Result<Vec<RowKey>> {
        self.delete_listed(rows).await
    }

    async fn scan_rows(&self) -> Result<RowScan> {
        self.deep_scan().await
    }

    fn shallow_row_pages(&self) -> BoxStream<'_, Result<RowScan>> {
        self.shallow_pages()
    }

    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        let Ok(path) = Path::parse(id) else {
            return Ok(false);
        };
        let root = self.rows_root();
        if !path.prefix_matches(&root)
            || !path.filename().is_some_and(crate::layout::is_row_file_name)
        {
            return Ok(false);
        }
        let Some((bytes, size)) = self.fetch_record(&path).await? else {
            return Ok(false);
        };
        if decode_row_of_size(&bytes, size, "?", "?").is_ok()
            || corrupt_kind(&bytes) != CorruptKind::Garbled
        {
            return Ok(false); // rewritten since it was listed, or a newer version's: keep it
        }
        self.delete_path(&path).await?;
        Ok(true)
    }

    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        let objects = self.list_blob_objects().await?;
        Ok(objects
            .iter()
            .map(|m| self.blob_entry(m))
            .chain(self.inflight.entries())
            .collect())
    }

    fn blob_pages(&self) -> BoxStream<'_, Result<Vec<BlobEntry>>> {
        let published = listing::paged(self.listed(self.blobs_root()))
            .map_ok(|metas| metas.iter().map(|m| self.blob_entry(m)).collect());
        let inflight = futures::stream::once(async move { Ok(self.inflight.entries()) });
        published.chain(inflight).boxed()
    }

    async fn remove_temp(&self, id: &str) -> Result<bool> {
        // The temps listed are this process's writes in flight: removing one only hides it (its future
        // aborts the upload if it fails). Uploads a crashed process left are not objects and cannot be
        // listed through object_store; the bucket's lifecycle rule removes them.
        Ok(self.inflight.forget(id))
    }

    async fn write_blob(&self, meta: &BlobMeta, mut data: ByteStream) -> Result<CacheRef> {
        let name = blob_name(meta);
        let path = self.blobs_root().join(name.as_str());
        let mut digest = BlobDigest::new();
        let inflight = self.inflight.start(&format!("{INFLIGHT_PREFIX}{name}"));

        // Gather the first part: a blob that ends within it goes up in one PUT. Bytes are copied into
        // our own buffers (here and by `WriteMultipart::write`), so no producer buffer is kept alive by
        // an upload in flight or by a store that keeps what it is given.
        let mut head = bytes::BytesMut::new();
        let mut ended = false;
        while head.len() < PART_SIZE {
            match data.next().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(as_stream_error)?;
                    digest.update(&chunk);
                    inflight.advance(chunk.len() as u64);
                    head.extend_from_slice(&chunk);
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            let (store, at) = (self.store.clone(), path.clone());
            let put = async move { store.put(&at, PutPayload::from(head.freeze())).await };
            publish(self.store.clone(), path, put)
                .await
                .map_err(self.err(format!("write blob {name}")))?;
            return Ok(digest.into_ref(format!("{REF_PREFIX}{name}"), meta));
        }

        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(self.err(format!("start upload of blob {name}")))?;
        let mut guard = AbortOnDrop(None);
        let writer = guard
            .0
            .insert(WriteMultipart::new_with_chunk_size(upload, PART_SIZE));
        writer.write(&head);
        drop(head);
        loop {
            writer
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(self.err(format!("upload blob {name}")))?;
            match data.next().await {
                Some(Ok(chunk)) => {
                    digest.update(&chunk);
                    inflight.advance(chunk.len() as u64);
                    writer.write(&chunk);
                }
                Some(Err(e)) => {
                    if let Some(upload) = guard.0.take() {
                        let _ = upload.abort().await;
                    }
                    return Err(as_stream_error(e));
                }
                None => break,
            }
        }
        let Some(upload) = guard.0.take() else {
            return Err(Error::stream("the upload was given up before it finished"));
        };
        publish(self.store.clone(), path, upload.finish())
            .await
            .map_err(self.err(format!("complete upload of blob {name}")))?;
        Ok(digest.into_ref(format!("{REF_PREFIX}{name}"), meta))
    }

    async fn stat_blob(&self, reference: &str) -> Result<Option<BlobStat>> {
        let Some(path) = self.blob_path(reference) else {
            return Ok(None);
        };
        match self.store.head(&path).await {
            Ok(meta) => Ok(Some(BlobStat {
                size: meta.size,
                sha256: None,
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.err(format!("stat {path}"))(e)),
        }
    }

    async fn read_blob(&self, reference: &str) -> Result<Option<Bytes>> {
        let Some(path) = self.blob_path(reference) else {
            return Ok(None);
        };
        self.fetch(&path).await
    }

    async fn open_blob(
        &self,
        reference: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        let Some(path) = self.blob_path(reference) else {
            return Ok(None);
        };
        let mut options = GetOptions::default();
        if let Some(range) = range {
            let size = match self.store.head(&path).await {
                Ok(meta) => meta.size,
                Err(e) if is_not_found(&e) => return Ok(None),
                Err(e) => return Err(self.err(format!("stat {path}"))(e)),
            };
            let span = range.resolve(reference, size)?;
            if span.start == span.end {
                return Ok(Some(futures::stream::empty().boxed()));
            }
            options.range = Some(GetRange::Bounded(span));
        }
        let got = match self.store.get_opts(&path, options).await {
            Ok(got) => got,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(self.err(format!("open {path}"))(e)),
        };
        Ok(Some(self.body_stream(got, &path)))
    }

    async fn delete_blob(&self, reference: &str) -> Result<()> {
        match self.blob_path(reference) {
            Some(path) => self.delete_path(&path).await,
            None => Ok(()),
        }
    }
}

impl ObjectCache {
    /// The ref of the object at `location` if it is one of this cache's blobs: named as the backend
    /// names blobs, directly under `blobs/` (a copy someone keeps in `blobs/backup/` has a blob's
    /// name, but the ref would name another object).
    fn blob_ref_at(&self, location: &Path) -> Option<String> {
        let id = format!("{REF_PREFIX}{}", location.filename()?);
        (self.blob_path(&id).as_ref() == Some(location)).then_some(id)
    }

    /// A listed object under `blobs/` as the janitor sees it: a published blob, or, named otherwise or
    /// nested deeper, someone else's (listed as foreign, never swept).
    fn blob_entry(&self, m: &object_store::ObjectMeta) -> BlobEntry {
        let (id, state) = match self.blob_ref_at(&m.location) {
            Some(id) => (id, BlobState::Published),
            None => (m.location.to_string(), BlobState::Foreign),
        };
        BlobEntry {
            id,
            state,
            size: m.size,
            modified: m.last_modified.into(),
        }
    }
}

/// The blob name a ref of this backend names: strict (one clean segment, see [`parse_ref_name`]) and
/// of the shape [`crate::layout::blob_name`] gives, so no ref reaches an object the cache did not write.
fn blob_ref_name(reference: &str) -> Option<&str> {
    parse_ref_name(reference, REF_PREFIX, "").filter(|name| crate::layout::is_blob_name(name))
}

fn as_stream_error(e: Error) -> Error {
    match e {
        e @ Error::Stream { .. } => e,
        other => Error::stream(other),
    }
}

/// Split chunks larger than the read bound (a store may hand out a whole small object at once).
fn rechunk(stream: ByteStream) -> ByteStream {
    stream
        .flat_map(|chunk| match chunk {
            Ok(bytes) if bytes.len() > crate::store::MAX_READ_CHUNK => crate::blob::chunked(bytes),
            other => futures::stream::iter(vec![other]).boxed(),
        })
        .boxed()
}

#[cfg(feature = "cloud")]
pub mod cloud;
