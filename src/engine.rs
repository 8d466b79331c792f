//! The engine applications use: [`Cache`] over any `Arc<dyn OutputCache>`. It turns inputs into keys,
//! decides inline versus blob for binary outputs, cleans up a blob whose row failed to commit, hydrates
//! small refs on reads and verifies blob bytes against the SHA-256 recorded at write time.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use serde_json::Value;

use crate::blob::BlobDigest;
use crate::error::{Error, Result};
use crate::metrics::{Counters, Metrics};
pub use crate::options::{CacheOptions, DEFAULT_INLINE_LIMIT, DEFAULT_REFERENCE_THRESHOLD};
use crate::store::{BlobMeta, ByteStream, OutputCache};
use crate::wire::{CacheRef, InlineBinary, RowKey, refs_in};

/// How many refs [`Cache::resolve`] reads at once.
const RESOLVE_CONCURRENCY: usize = 8;

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
    /// What this engine (and its clones) did.
    counters: Arc<Counters>,
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
            counters: Arc::default(),
        }
    }

    /// What this engine and its clones have done since it was created: hits, misses, puts, bytes in and
    /// out, verification failures.
    pub fn metrics(&self) -> Metrics {
        self.counters.snapshot()
    }

    /// Open the backend named by `url` (see [`crate::backends::open_url`]) with default options.
    pub fn open(url: &str) -> Result<Self> {
        Ok(Self::new(crate::backends::open_url(url)?))
    }

    /// Open the cache an effective [`crate::config::Config`] describes, with its options.
    pub fn from_config(config: &crate::config::Config) -> Result<Self> {
        Ok(Self::with_options(
            crate::backends::open(&config.location()?)?,
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

    /// Store `output` for `task_type` run on `inputs`. An output nested deeper than
    /// [`crate::wire::MAX_OUTPUT_DEPTH`] levels is refused: no backend could read it back.
    pub async fn put(&self, task_type: &str, inputs: &Value, output: &Value) -> Result<()> {
        let key = callers_key(task_type, inputs)?;
        crate::wire::check_output_depth(output)?;
        let started = Instant::now();
        let result = self.backend.save_row(&key, output).await;
        self.committed(&key, "put", 0, started, &result);
        result
    }

    /// Count and trace a row commit (`bytes`: binary bytes the row carries or references).
    fn committed<T>(
        &self,
        key: &RowKey,
        op: &str,
        bytes: u64,
        started: Instant,
        result: &Result<T>,
    ) {
        if result.is_ok() {
            Counters::add(&self.counters.puts, 1);
            Counters::add(&self.counters.bytes_in, bytes);
        }
        tracing::debug!(
            target: "outcache::engine",
            op,
            task_type = key.task_type(),
            fingerprint = &key.fingerprint()[..12],
            bytes,
            outcome = if result.is_ok() { "ok" } else { "error" },
            micros = started.elapsed().as_micros() as u64,
        );
    }

    /// The output stored for `task_type` run on `inputs`, with refs smaller than the reference threshold
    /// hydrated into inline envelopes. `None` on a miss — and a hit whose row references a blob that no
    /// longer resolves is a miss too (DESIGN §7 invariant 13: the task runs again; nothing dangling is
    /// served). The check is a stat per distinct ref (none for rows without refs); a backend that cannot
    /// read refs at all serves the row as stored.
    pub async fn get(&self, task_type: &str, inputs: &Value) -> Result<Option<Value>> {
        let key = callers_key(task_type, inputs)?;
        let started = Instant::now();
        let outcome = self.lookup(&key).await;
        let (label, counter) = match &outcome {
            Ok(Lookup::Hit(_)) => ("hit", Some(&self.counters.hits)),
            Ok(Lookup::Miss) => ("miss", Some(&self.counters.misses)),
            Ok(Lookup::Dangling) => {
                Counters::add(&self.counters.dangling_misses, 1);
                ("dangling-ref miss", Some(&self.counters.misses))
            }
            Err(_) => ("error", None),
        };
        if let Some(counter) = counter {
            Counters::add(counter, 1);
        }
        tracing::debug!(
            target: "outcache::engine",
            op = "get",
            task_type,
            fingerprint = &key.fingerprint()[..12],
            outcome = label,
            micros = started.elapsed().as_micros() as u64,
        );
        match outcome? {
            Lookup::Hit(output) => {
                self.record_read(key).await?;
                Ok(Some(output))
            }
            Lookup::Miss | Lookup::Dangling => Ok(None),
        }
    }

    async fn lookup(&self, key: &RowKey) -> Result<Lookup> {
        let Some(row) = self.backend.get_row(key).await? else {
            return Ok(Lookup::Miss);
        };
        let caps = self.backend.capabilities();
        if !caps.open_blob {
            return Ok(Lookup::Hit(row.output));
        }
        let threshold = self.options.reference_threshold;
        let small = |r: &CacheRef| r.size.is_some_and(|s| s < threshold) && caps.open_blob;
        Ok(
            match self.hydrate(row.output, small, Dangling::Miss).await? {
                Some(output) => Lookup::Hit(output),
                None => Lookup::Dangling,
            },
        )
    }

    /// Note a hit for the backend's access times; every [`ACCESS_BATCH`] distinct keys are written in one
    /// batched `touch_rows`, so reads cost no write each.
    async fn record_read(&self, key: RowKey) -> Result<()> {
        if !self.backend.capabilities().touch_rows {
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
        if keys.is_empty() || !self.backend.capabilities().touch_rows {
            return Ok(());
        }
        self.backend
            .touch_rows(&keys, std::time::SystemTime::now())
            .await
    }

    /// Delete the row for `task_type` run on `inputs` and its blobs. Returns whether it existed.
    pub async fn delete(&self, task_type: &str, inputs: &Value) -> Result<bool> {
        self.backend
            .delete_row(&callers_key(task_type, inputs)?)
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
        let key = callers_key(task_type, inputs)?;
        let started = Instant::now();
        let threshold = self.options.reference_threshold;
        let can_stream = self.backend.capabilities().write_blob;
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
            let result = self.backend.save_row(&key, &output).await;
            self.committed(&key, "put_stream inline", head_len, started, &result);
            result?;
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
        let result = self.backend.save_row(&key, &output).await;
        self.committed(
            &key,
            "put_stream blob",
            cache_ref.size.unwrap_or(0),
            started,
            &result,
        );
        if let Err(commit_error) = result {
            // In-band orphan cleanup: the blob is ours alone (its name is unique to this write).
            let _ = self.backend.delete_blob(&cache_ref.reference).await;
            return Err(commit_error);
        }
        Ok(output)
    }

    /// What the backend knows of the blob behind `cache_ref` (stat, manifest, HEAD), merged into the ref:
    /// a `size` or `sha256` the ref lacks (a bare ref string) is filled in from the store, so it can be
    /// verified. `None` if the blob does not resolve; [`Error::Integrity`] at once, before a byte is read,
    /// if the stored size differs from the one the ref records.
    pub async fn stat(&self, cache_ref: &CacheRef) -> Result<Option<CacheRef>> {
        let Some(stat) = self.backend.stat_blob(&cache_ref.reference).await? else {
            return Ok(None);
        };
        let mut full = cache_ref.clone();
        match full.size {
            Some(claimed) if claimed != stat.size => {
                Counters::add(&self.counters.verification_failures, 1);
                return Err(Error::Integrity {
                    reference: cache_ref.reference.clone(),
                    expected: format!("size:{claimed}"),
                    actual: format!("size:{}", stat.size),
                });
            }
            Some(_) => {}
            None => full.size = Some(stat.size),
        }
        if full.sha256.is_none() {
            full.sha256 = stat.sha256;
        }
        Ok(Some(full))
    }

    /// Stream the blob behind `cache_ref`, or `None` if it does not resolve. With verification on (the
    /// default), the stored size is checked first ([`Cache::stat`]; a bare ref gets its size and, where
    /// the store records it, its SHA-256 from there), and a blob whose bytes run past the size or whose
    /// SHA-256 differs ends the stream with [`Error::Integrity`] — as soon as it passes the size, so a
    /// read never runs more than one chunk past it. A consumer must treat the stream's error as failure
    /// of the whole read.
    pub async fn open_stream(&self, cache_ref: &CacheRef) -> Result<Option<ByteStream>> {
        if !self.options.verify_reads {
            return self.backend.open_blob(&cache_ref.reference, None).await;
        }
        let Some(full) = self.stat(cache_ref).await? else {
            return Ok(None);
        };
        let Some(stream) = self.backend.open_blob(&cache_ref.reference, None).await? else {
            return Ok(None);
        };
        Ok(Some(
            Verifying::new(stream, &full, self.counters.clone()).boxed(),
        ))
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
            .open_blob(&cache_ref.reference, Some(range))
            .await
    }

    /// The whole blob behind `cache_ref`, verified as [`Cache::open_stream`] verifies (never returns
    /// bytes that fail the check, and never holds more than the stored size plus one chunk in memory).
    pub async fn read(&self, cache_ref: &CacheRef) -> Result<Option<Bytes>> {
        let bytes = if self.options.verify_reads {
            let Some(full) = self.stat(cache_ref).await? else {
                return Ok(None);
            };
            let Some(bytes) = self.backend.read_blob(&cache_ref.reference).await? else {
                return Ok(None);
            };
            let mut digest = BlobDigest::new();
            digest.update(&bytes);
            if let Err(e) = check_digest(&full, digest) {
                Counters::add(&self.counters.verification_failures, 1);
                tracing::warn!(target: "outcache::engine", reference = %cache_ref.reference, "{e}");
                return Err(e);
            }
            bytes
        } else {
            match self.backend.read_blob(&cache_ref.reference).await? {
                Some(bytes) => bytes,
                None => return Ok(None),
            }
        };
        Counters::add(&self.counters.bytes_out, bytes.len() as u64);
        Ok(Some(bytes))
    }

    /// `value` with every branded ref replaced by an inline envelope of its bytes. Unbranded `$ref`s are
    /// left alone; a ref that does not resolve is an [`Error::DanglingRef`].
    pub async fn resolve(&self, value: &Value) -> Result<Value> {
        Ok(self
            .hydrate(value.clone(), |_| true, Dangling::Error)
            .await?
            .unwrap_or_else(|| unreachable!("Dangling::Error never misses")))
    }

    /// Check every distinct ref in `value` still resolves, and replace those `pick` selects by envelopes
    /// of their bytes, up to [`RESOLVE_CONCURRENCY`] at once. A ref that does not resolve makes the whole
    /// value a miss (`Ok(None)`) or an [`Error::DanglingRef`], as `dangling` says.
    async fn hydrate(
        &self,
        value: Value,
        pick: impl Fn(&CacheRef) -> bool,
        dangling: Dangling,
    ) -> Result<Option<Value>> {
        let mut seen = HashSet::new();
        let refs: Vec<CacheRef> = refs_in(&value)
            .into_iter()
            .filter(|r| seen.insert(r.reference.clone()))
            .collect();
        if refs.is_empty() {
            return Ok(Some(value));
        }
        let checked: Vec<Option<Option<(String, Value)>>> = futures::stream::iter(refs)
            .map(|r| {
                let hydrate = pick(&r);
                async move {
                    let found = if hydrate {
                        self.read(&r).await?.map(|bytes| {
                            Some((
                                r.reference.clone(),
                                InlineBinary::encode(&bytes, r.mime.as_deref()),
                            ))
                        })
                    } else {
                        // A stored size other than the ref's means the blob is not the one the
                        // row was written with: like a missing one, it cannot serve this hit.
                        self.backend
                            .stat_blob(&r.reference)
                            .await?
                            .filter(|stat| r.size.is_none_or(|size| size == stat.size))
                            .map(|_| None)
                    };
                    match (found, dangling) {
                        (Some(hydrated), _) => Ok(Some(hydrated)),
                        (None, Dangling::Miss) => Ok(None),
                        (None, Dangling::Error) => Err(Error::DanglingRef {
                            reference: r.reference.clone(),
                        }),
                    }
                }
            })
            .buffer_unordered(RESOLVE_CONCURRENCY)
            .try_collect()
            .await?;
        let mut fetched: HashMap<String, Value> = HashMap::new();
        for found in checked {
            match found {
                None => return Ok(None), // a dangling ref: the whole hit is a miss
                Some(Some((reference, envelope))) => {
                    fetched.insert(reference, envelope);
                }
                Some(None) => {}
            }
        }
        Ok(Some(replace_refs(value, &fetched)))
    }
}

/// What a `get` found.
enum Lookup {
    Hit(Value),
    Miss,
    /// The row exists but references a blob that no longer resolves.
    Dangling,
}

/// What [`Cache::hydrate`] makes of a ref that does not resolve.
#[derive(Clone, Copy, Debug)]
enum Dangling {
    /// The value is a miss (a hit whose blob is gone).
    Miss,
    /// An [`Error::DanglingRef`] (resolving a value the caller holds).
    Error,
}

/// The key of a caller's task. Task types in a run's namespace (`run/<len>:…`) are refused: only a
/// run-private tier writes there, and a row planted from outside would read as the run's own and go
/// with the run's `clear_run`.
fn callers_key(task_type: &str, inputs: &Value) -> Result<RowKey> {
    if crate::backends::run_private::in_run_namespace(task_type) {
        return Err(Error::InvalidInput {
            what: "task type".into(),
            reason: format!(
                "{:?} is in a run-private tier's namespace (run/<length>:<run id>/…); \
                 use --run-id (or RunPrivate) to reach a run's rows",
                task_type.chars().take(80).collect::<String>()
            ),
        });
    }
    RowKey::new(task_type, inputs)
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
    counters: Arc<Counters>,
}

impl Verifying {
    fn new(inner: ByteStream, cache_ref: &CacheRef, counters: Arc<Counters>) -> Self {
        Verifying {
            inner,
            cache_ref: cache_ref.clone(),
            digest: Some(BlobDigest::new()),
            counters,
        }
    }

    /// The verdict on the whole stream, counted and traced when it fails.
    fn verdict(&self, digest: BlobDigest) -> Result<()> {
        let verdict = check_digest(&self.cache_ref, digest);
        if let Err(e) = &verdict {
            Counters::add(&self.counters.verification_failures, 1);
            tracing::warn!(target: "outcache::engine", reference = %self.cache_ref.reference, "{e}");
        }
        verdict
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
                Counters::add(&this.counters.bytes_out, chunk.len() as u64);
                if this.cache_ref.size.is_some_and(|size| digest.size() > size) {
                    if let Some(digest) = this.digest.take() {
                        return Poll::Ready(Some(this.verdict(digest).map(|()| chunk)));
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.digest = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => match this.digest.take() {
                Some(digest) => Poll::Ready(this.verdict(digest).err().map(Err)),
                None => Poll::Ready(None),
            },
        }
    }
}
