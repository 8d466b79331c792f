//! The engine applications use: [`Cache`] over any `Arc<dyn OutputCache>`. It turns inputs into keys,
//! decides inline versus blob for binary outputs, cleans up a blob whose row failed to commit, hydrates
//! small refs on reads and verifies blob bytes against the SHA-256 recorded at write time.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use serde_json::Value;

use crate::blob::BlobDigest;
use crate::error::{Error, Result};
use crate::store::{BlobMeta, ByteStream, OutputCache};
use crate::wire::{CacheRef, InlineBinary, RowKey, refs_in};

/// Default reference threshold: binary outputs below this size are kept inline in the row.
pub const DEFAULT_REFERENCE_THRESHOLD: u64 = 64 * 1024;
/// Default inline limit: the most a backend without blob streaming will hold inline in one row.
pub const DEFAULT_INLINE_LIMIT: u64 = 16 * 1024 * 1024;
/// How many refs [`Cache::resolve`] reads at once.
const RESOLVE_CONCURRENCY: usize = 8;

/// Engine settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CacheOptions {
    /// Binary outputs smaller than this go inline; refs smaller than this are hydrated by [`Cache::get`].
    /// 0 keeps every binary output as a ref.
    pub reference_threshold: u64,
    /// Largest binary output kept inline when the backend cannot stream blobs; above it,
    /// [`Error::TooLarge`].
    pub inline_limit: u64,
    /// Check every blob read against the ref's `size` and `sha256` (default true).
    pub verify_reads: bool,
    /// Bytes a [`Cache::writer`] lets a producer push ahead of the backend before `push` waits
    /// (default 8 MiB).
    pub high_water_mark: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            reference_threshold: DEFAULT_REFERENCE_THRESHOLD,
            inline_limit: DEFAULT_INLINE_LIMIT,
            verify_reads: true,
            high_water_mark: crate::writer::DEFAULT_HIGH_WATER_MARK,
        }
    }
}

impl CacheOptions {
    /// Set [`CacheOptions::reference_threshold`].
    pub fn reference_threshold(mut self, bytes: u64) -> Self {
        self.reference_threshold = bytes;
        self
    }
    /// Set [`CacheOptions::inline_limit`].
    pub fn inline_limit(mut self, bytes: u64) -> Self {
        self.inline_limit = bytes;
        self
    }
    /// Set [`CacheOptions::high_water_mark`].
    pub fn high_water_mark(mut self, bytes: usize) -> Self {
        self.high_water_mark = bytes;
        self
    }
    /// Set [`CacheOptions::verify_reads`].
    pub fn verify_reads(mut self, verify: bool) -> Self {
        self.verify_reads = verify;
        self
    }
}

/// Media type and port of a streamed binary output.
#[derive(Clone, Debug, Default)]
pub struct BlobOptions {
    /// Media type recorded with the bytes.
    pub mime: Option<String>,
    /// Output port the bytes belong to.
    pub port: Option<String>,
}

/// Reads are recorded for the backend's access times in batches of this many keys.
const ACCESS_BATCH: usize = 256;

/// The cache engine. Cheap to clone (clones share the pending access log).
#[derive(Clone, Debug)]
pub struct Cache {
    backend: Arc<dyn OutputCache>,
    options: CacheOptions,
    /// Keys read since the last flush (see [`Cache::flush_access`]).
    reads: Arc<std::sync::Mutex<HashSet<RowKey>>>,
}

impl Cache {
    /// An engine over `backend` with default options.
    pub fn new(backend: Arc<dyn OutputCache>) -> Self {
        Self::with_options(backend, CacheOptions::default())
    }

    /// An engine over `backend` with `options`.
    pub fn with_options(backend: Arc<dyn OutputCache>, options: CacheOptions) -> Self {
        Cache {
            backend,
            options,
            reads: Arc::default(),
        }
    }

    /// Open the backend named by `url` (see [`crate::config::open_backend`]) with default options.
    pub fn open(url: &str) -> Result<Self> {
        Ok(Self::new(crate::config::open_backend(url)?))
    }

    /// Open the cache an effective [`crate::config::Config`] describes, with its options.
    pub fn from_config(config: &crate::config::Config) -> Result<Self> {
        Ok(Self::with_options(
            config.location()?.open()?,
            config.options.clone(),
        ))
    }

    /// The backend underneath.
    pub fn backend(&self) -> &Arc<dyn OutputCache> {
        &self.backend
    }

    /// The engine's options.
    pub fn options(&self) -> &CacheOptions {
        &self.options
    }

    /// Store `output` for `task_type` run on `inputs`.
    pub async fn put(&self, task_type: &str, inputs: &Value, output: &Value) -> Result<()> {
        self.backend
            .save_row(&RowKey::new(task_type, inputs)?, output)
            .await
    }

    /// The output stored for `task_type` run on `inputs`, with refs smaller than the reference threshold
    /// hydrated into inline envelopes. `None` on a miss. A small ref whose blob is gone stays a ref.
    pub async fn get(&self, task_type: &str, inputs: &Value) -> Result<Option<Value>> {
        let key = RowKey::new(task_type, inputs)?;
        let Some(row) = self.backend.get_row(&key).await? else {
            return Ok(None);
        };
        self.record_read(key).await?;
        let threshold = self.options.reference_threshold;
        if !self.backend.capabilities().ref_read {
            return Ok(Some(row.output));
        }
        let small = |r: &CacheRef| r.size.is_some_and(|s| s < threshold);
        self.hydrate(row.output, small, false).await.map(Some)
    }

    /// Note a hit for the backend's access times; every [`ACCESS_BATCH`] distinct keys are written in one
    /// batched `touch_rows`, so reads cost no write each.
    async fn record_read(&self, key: RowKey) -> Result<()> {
        if !self.backend.capabilities().access_tracking {
            return Ok(());
        }
        let full = {
            let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
            reads.insert(key);
            reads.len() >= ACCESS_BATCH
        };
        if full {
            self.flush_access().await?;
        }
        Ok(())
    }

    /// Write the access times of the rows read since the last flush (the engine does this every 256
    /// reads; call it before a short-lived process exits, as the CLI does).
    pub async fn flush_access(&self) -> Result<()> {
        let keys: Vec<RowKey> = {
            let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
            reads.drain().collect()
        };
        if keys.is_empty() || !self.backend.capabilities().access_tracking {
            return Ok(());
        }
        self.backend
            .touch_rows(&keys, std::time::SystemTime::now())
            .await
    }

    /// Delete the row for `task_type` run on `inputs` and its blobs. Returns whether it existed.
    pub async fn delete(&self, task_type: &str, inputs: &Value) -> Result<bool> {
        self.backend
            .delete_row(&RowKey::new(task_type, inputs)?)
            .await
    }

    /// Stream a binary output for `task_type` run on `inputs` and store the row. Below the reference
    /// threshold, or when the backend cannot stream blobs (up to the inline limit), the bytes go inline as
    /// an envelope; otherwise into a blob, and the row holds its CacheRef. Returns the stored output.
    ///
    /// If the row fails to commit after the blob was written, the blob is deleted again and the row's
    /// error returned.
    pub async fn put_stream(
        &self,
        task_type: &str,
        inputs: &Value,
        mut data: ByteStream,
        blob: BlobOptions,
    ) -> Result<Value> {
        let key = RowKey::new(task_type, inputs)?;
        let threshold = self.options.reference_threshold;
        let can_stream = self.backend.capabilities().stream_write;
        // Without streaming, everything must fit inline; with it, only outputs below the threshold do.
        let inline_cap = if can_stream {
            threshold.saturating_sub(1)
        } else {
            self.options.inline_limit
        };

        let mut head: Vec<Bytes> = Vec::new();
        let mut head_len: u64 = 0;
        let mut ended = false;
        while head_len <= inline_cap {
            match data.next().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(as_stream_error)?;
                    head_len += chunk.len() as u64;
                    head.push(chunk);
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended && (head_len < threshold || !can_stream) {
            let mut bytes = BytesMut::with_capacity(head_len as usize);
            head.iter().for_each(|c| bytes.extend_from_slice(c));
            let output = InlineBinary::encode(&bytes, blob.mime.as_deref());
            self.backend.save_row(&key, &output).await?;
            return Ok(output);
        }
        if !can_stream {
            return Err(Error::TooLarge {
                task_type: task_type.to_owned(),
                limit: self.options.inline_limit,
                backend: self.backend.to_string(),
            });
        }

        let rest = futures::stream::iter(head.into_iter().map(Ok)).chain(data);
        let meta = BlobMeta {
            mime: blob.mime,
            port: blob.port,
            ..BlobMeta::for_key(&key)
        };
        let cache_ref = self.backend.write_blob(&meta, rest.boxed()).await?;
        let output = cache_ref.to_value();
        if let Err(commit_error) = self.backend.save_row(&key, &output).await {
            // In-band orphan cleanup: the blob is ours alone (its name is unique to this write).
            let _ = self.backend.delete_blob(&cache_ref.reference).await;
            return Err(commit_error);
        }
        Ok(output)
    }

    /// Stream the blob behind `cache_ref`, or `None` if it does not resolve. With verification on, a
    /// blob that is longer or shorter than its recorded `size`, or whose SHA-256 differs from the recorded
    /// one, ends the stream with [`Error::Integrity`]: a consumer must treat the stream's error as failure
    /// of the whole read.
    pub async fn open_stream(&self, cache_ref: &CacheRef) -> Result<Option<ByteStream>> {
        let Some(stream) = self.backend.open_blob(&cache_ref.reference).await? else {
            return Ok(None);
        };
        Ok(Some(if self.options.verify_reads {
            Verifying::new(stream, cache_ref).boxed()
        } else {
            stream
        }))
    }

    /// A stream over `range` of the blob behind `cache_ref`, or `None` if it does not resolve. Not verified:
    /// the recorded SHA-256 covers the whole blob, so only whole reads ([`Cache::open_stream`],
    /// [`Cache::read`]) can check it.
    pub async fn open_range(
        &self,
        cache_ref: &CacheRef,
        range: crate::store::ByteRange,
    ) -> Result<Option<ByteStream>> {
        self.backend
            .open_blob_range(&cache_ref.reference, range)
            .await
    }

    /// The whole blob behind `cache_ref`, verified (never returns bytes that fail the check).
    pub async fn read(&self, cache_ref: &CacheRef) -> Result<Option<Bytes>> {
        let Some(bytes) = self.backend.read_blob(&cache_ref.reference).await? else {
            return Ok(None);
        };
        if self.options.verify_reads {
            let mut digest = BlobDigest::new();
            digest.update(&bytes);
            check_digest(cache_ref, digest)?;
        }
        Ok(Some(bytes))
    }

    /// `value` with every branded ref replaced by an inline envelope of its bytes. Unbranded `$ref`s are
    /// left alone; a ref that does not resolve is an [`Error::DanglingRef`].
    pub async fn resolve(&self, value: &Value) -> Result<Value> {
        self.hydrate(value.clone(), |_| true, true).await
    }

    /// Replace the refs in `value` that `pick` selects by envelopes of their bytes, reading up to
    /// [`RESOLVE_CONCURRENCY`] blobs at once. A ref that does not resolve is an error if `strict`, else
    /// left as it is.
    async fn hydrate(
        &self,
        value: Value,
        pick: impl Fn(&CacheRef) -> bool,
        strict: bool,
    ) -> Result<Value> {
        let mut seen = HashSet::new();
        let wanted: Vec<CacheRef> = refs_in(&value)
            .into_iter()
            .filter(|r| pick(r) && seen.insert(r.reference.clone()))
            .collect();
        if wanted.is_empty() {
            return Ok(value);
        }
        let fetched: HashMap<String, Value> = futures::stream::iter(wanted)
            .map(|r| async move {
                match self.read(&r).await? {
                    Some(bytes) => Ok(Some((
                        r.reference.clone(),
                        InlineBinary::encode(&bytes, r.mime.as_deref()),
                    ))),
                    None if strict => Err(Error::DanglingRef {
                        reference: r.reference.clone(),
                    }),
                    None => Ok(None),
                }
            })
            .buffer_unordered(RESOLVE_CONCURRENCY)
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
        Ok(replace_refs(value, &fetched))
    }
}

fn replace_refs(value: Value, fetched: &HashMap<String, Value>) -> Value {
    if let Some(r) = CacheRef::from_value(&value) {
        return fetched.get(&r.reference).cloned().unwrap_or(value);
    }
    match value {
        Value::Array(items) => items
            .into_iter()
            .map(|v| replace_refs(v, fetched))
            .collect(),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, replace_refs(v, fetched)))
                .collect(),
        ),
        other => other,
    }
}

fn as_stream_error(e: Error) -> Error {
    match e {
        e @ Error::Stream { .. } => e,
        other => Error::stream(other),
    }
}

fn check_digest(cache_ref: &CacheRef, digest: BlobDigest) -> Result<()> {
    let integrity = |expected: String, actual: String| Error::Integrity {
        reference: cache_ref.reference.clone(),
        expected,
        actual,
    };
    if let Some(size) = cache_ref.size {
        if digest.size() != size {
            return Err(integrity(
                format!("size:{size}"),
                format!("size:{}", digest.size()),
            ));
        }
    }
    if let Some(expected) = &cache_ref.sha256 {
        let actual = digest.sha256_hex();
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(integrity(
                format!("sha256:{expected}"),
                format!("sha256:{actual}"),
            ));
        }
    }
    Ok(())
}

/// A blob stream that hashes as it goes and ends with [`Error::Integrity`] if the bytes do not match the
/// ref (an overlong blob fails as soon as it passes the recorded size).
struct Verifying {
    inner: ByteStream,
    cache_ref: CacheRef,
    digest: Option<BlobDigest>,
}

impl Verifying {
    fn new(inner: ByteStream, cache_ref: &CacheRef) -> Self {
        Verifying {
            inner,
            cache_ref: cache_ref.clone(),
            digest: Some(BlobDigest::new()),
        }
    }
}

impl Stream for Verifying {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(digest) = this.digest.as_mut() else {
            return Poll::Ready(None);
        };
        match this.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                digest.update(&chunk);
                if let Some(size) = this.cache_ref.size {
                    if digest.size() > size {
                        let digest = this.digest.take().expect("checked above");
                        return Poll::Ready(Some(
                            check_digest(&this.cache_ref, digest).map(|_| chunk),
                        ));
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.digest = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                let digest = this.digest.take().expect("checked above");
                Poll::Ready(check_digest(&this.cache_ref, digest).err().map(Err))
            }
        }
    }
}
