//! Tools the cases share: deterministic byte patterns, streams that fail, stall or count the bytes they
//! have handed out, and [`FailingRows`], a fault-injecting wrapper over the real backend under test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::store::{BlobEntry, BlobMeta, ByteRange, ByteStream, Capabilities, OutputCache, Row};
use crate::wire::{CacheRef, RowKey};

/// `len` pseudo-random bytes from `seed` (xorshift; distinct seeds give distinct contents).
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

/// `data` as a stream of `chunk`-byte pieces (zero-copy).
pub fn stream_of(data: Bytes, chunk: usize) -> ByteStream {
    let chunk = chunk.max(1);
    let pieces: Vec<Result<Bytes>> = (0..data.len())
        .step_by(chunk)
        .map(|i| Ok(data.slice(i..(i + chunk).min(data.len()))))
        .collect();
    futures::stream::iter(pieces).boxed()
}

/// The first `fail_at` bytes of `data` in `chunk`-byte pieces, then the producer's error.
pub fn failing_stream(data: Bytes, chunk: usize, fail_at: usize) -> ByteStream {
    stream_of(data.slice(..fail_at.min(data.len())), chunk)
        .chain(futures::stream::once(async {
            Err(Error::stream("injected producer failure"))
        }))
        .boxed()
}

/// `data` in pieces, then a stream that never ends (a producer that stalls mid-write).
pub fn stalling_stream(data: Bytes, chunk: usize) -> ByteStream {
    stream_of(data, chunk)
        .chain(futures::stream::pending())
        .boxed()
}

/// Counts the bytes of chunks that a stream handed out and that are still alive somewhere.
#[derive(Clone, Debug, Default)]
pub struct LiveBytes {
    live: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
}

struct Counted {
    bytes: Bytes,
    live: Arc<AtomicU64>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.live
            .fetch_sub(self.bytes.len() as u64, Ordering::SeqCst);
    }
}

impl LiveBytes {
    /// Highest number of handed-out bytes alive at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// A stream of `count` chunks of `chunk_len` bytes each (cycling through one pattern, offset per
    /// chunk so the content is not periodic), every chunk counted while alive. Also returns the SHA-256 the
    /// whole stream will have.
    pub fn stream(&self, count: usize, chunk_len: usize) -> (ByteStream, String) {
        let base = pattern(chunk_len * 2, 7);
        let mut digest = crate::blob::BlobDigest::new();
        for i in 0..count {
            let off = (i * 7919) % chunk_len;
            digest.update(&base[off..off + chunk_len]);
        }
        let this = self.clone();
        let stream = futures::stream::iter(0..count)
            .map(move |i| {
                let off = (i * 7919) % chunk_len;
                let bytes = base.slice(off..off + chunk_len);
                let now =
                    this.live.fetch_add(chunk_len as u64, Ordering::SeqCst) + chunk_len as u64;
                this.peak.fetch_max(now, Ordering::SeqCst);
                Ok(Bytes::from_owner(Counted {
                    bytes,
                    live: this.live.clone(),
                }))
            })
            .boxed();
        (stream, digest.sha256_hex())
    }
}

/// A wrapper over a real backend whose `save_row` fails while armed: the fault behind the in-band orphan
/// cleanup cases. Every other method goes straight to the inner backend.
#[derive(Debug)]
pub struct FailingRows {
    inner: Arc<dyn OutputCache>,
    fail_saves: AtomicBool,
}

impl FailingRows {
    /// Wrap `inner`; saves fail while `fail_saves` is true.
    pub fn new(inner: Arc<dyn OutputCache>, fail_saves: bool) -> Self {
        FailingRows {
            inner,
            fail_saves: AtomicBool::new(fail_saves),
        }
    }
}

impl std::fmt::Display for FailingRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "failing-rows({})", self.inner)
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl OutputCache for FailingRows {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        if self.fail_saves.load(Ordering::SeqCst) {
            return Err(Error::Backend {
                backend: self.to_string(),
                context: format!("save row {key}"),
                source: "injected row commit failure".into(),
            });
        }
        self.inner.save_row(key, output).await
    }
    fn owns_ref(&self, key: &RowKey, reference: &str) -> bool {
        self.inner.owns_ref(key, reference)
    }
    fn blob_tag(&self, key: &RowKey) -> String {
        self.inner.blob_tag(key)
    }
    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        self.inner.get_row(key).await
    }
    async fn delete_row(&self, key: &RowKey) -> Result<bool> {
        self.inner.delete_row(key).await
    }
    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        self.inner.delete_rows(keys).await
    }
    async fn delete_rows_listed(&self, rows: &[crate::store::RowVersion]) -> Result<Vec<RowKey>> {
        self.inner.delete_rows_listed(rows).await
    }
    async fn delete_prefix(&self, task_type_prefix: &str) -> Result<u64> {
        self.inner.delete_prefix(task_type_prefix).await
    }
    async fn scan_rows(&self) -> Result<crate::store::RowScan> {
        self.inner.scan_rows().await
    }
    fn shallow_row_pages(&self) -> futures::stream::BoxStream<'_, Result<crate::store::RowScan>> {
        self.inner.shallow_row_pages()
    }
    fn row_ref_pages(&self) -> futures::stream::BoxStream<'_, Result<crate::store::RowScan>> {
        self.inner.row_ref_pages()
    }
    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        self.inner.remove_corrupt(id).await
    }
    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        self.inner.list_blobs().await
    }
    fn blob_pages(&self) -> futures::stream::BoxStream<'_, Result<Vec<BlobEntry>>> {
        self.inner.blob_pages()
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
        self.inner.touch_rows(keys, at).await
    }
    async fn write_blob(&self, meta: &BlobMeta, data: ByteStream) -> Result<CacheRef> {
        self.inner.write_blob(meta, data).await
    }
    async fn stat_blob(&self, reference: &str) -> Result<Option<crate::store::BlobStat>> {
        self.inner.stat_blob(reference).await
    }
    async fn read_blob(&self, reference: &str) -> Result<Option<Bytes>> {
        self.inner.read_blob(reference).await
    }
    async fn open_blob(
        &self,
        reference: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        self.inner.open_blob(reference, range).await
    }
    async fn delete_blob(&self, reference: &str) -> Result<()> {
        self.inner.delete_blob(reference).await
    }
}
