//! `outcache bench`: the core measurements (row put and get, blob write, verified and unverified blob
//! read) against any backend, so an operator can measure their own disk or S3 endpoint. Medians of a few
//! runs; absolute numbers, since a remote store has no raw baseline here (the criterion benches under
//! `benches/` compare against raw baselines in the same run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;

use crate::engine::{Cache, CacheOptions};
use crate::error::Result;
use crate::store::{BlobMeta, OutputCache};
use crate::wire::RowKey;

/// What to measure.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BenchOptions {
    /// Rows to put and then get.
    pub rows: usize,
    /// Bytes of each blob written and read.
    pub blob_size: usize,
    /// Blob writes and reads to take the median of.
    pub blob_runs: usize,
    /// Concurrent writers for the concurrent-put measurement.
    pub writers: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            rows: 200,
            blob_size: 64 << 20,
            blob_runs: 3,
            writers: 16,
        }
    }
}

/// Throughputs measured (medians).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BenchReport {
    /// The backend measured.
    pub backend: String,
    /// Small (1 KiB) row puts per second, one at a time.
    pub row_put_per_s: f64,
    /// Row gets per second, one at a time.
    pub row_get_per_s: f64,
    /// Hits per second through the engine (`Cache::get`: fingerprint, read, existence checks).
    #[serde(default)]
    pub hits_per_s: f64,
    /// Rows per second put by `writers` concurrent writers.
    #[serde(default)]
    pub row_put_concurrent_per_s: f64,
    /// The concurrent writers.
    #[serde(default)]
    pub writers: usize,
    /// Blob size measured, in bytes.
    pub blob_bytes: u64,
    /// Streaming blob write, MB/s.
    pub blob_write_mb_s: f64,
    /// Streaming blob read with SHA-256 verification, MB/s.
    pub blob_read_verified_mb_s: f64,
    /// Streaming blob read without verification, MB/s.
    pub blob_read_mb_s: f64,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Measure `backend` (whose contents should be disposable: everything written is deleted again).
pub async fn run(backend: Arc<dyn OutputCache>, options: &BenchOptions) -> Result<BenchReport> {
    let cache = Cache::with_options(
        backend.clone(),
        CacheOptions::default().reference_threshold(0),
    );
    let mut report = BenchReport {
        backend: backend.to_string(),
        blob_bytes: options.blob_size as u64,
        ..BenchReport::default()
    };

    let output = json!({ "summary": "x".repeat(1000) });
    let keys: Vec<RowKey> = (0..options.rows.max(1))
        .map(|i| RowKey::new("outcache/bench", &json!({ "i": i })))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    for key in &keys {
        backend.save_row(key, &output).await?;
    }
    report.row_put_per_s = keys.len() as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for key in &keys {
        backend.get_row(key).await?;
    }
    report.row_get_per_s = keys.len() as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for i in 0..keys.len() {
        cache.get("outcache/bench", &json!({ "i": i })).await?;
    }
    report.hits_per_s = keys.len() as f64 / started.elapsed().as_secs_f64();

    // The same rows again, put by concurrent writers (a backend that batches commits shows it here).
    let writers = options.writers.max(1);
    report.writers = writers;
    let started = Instant::now();
    let results = futures::future::join_all((0..writers).map(|w| {
        let (backend, output, keys) = (backend.clone(), &output, &keys);
        async move {
            for key in keys.iter().skip(w).step_by(writers) {
                backend.save_row(key, output).await?;
            }
            Ok::<(), crate::Error>(())
        }
    }))
    .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    report.row_put_concurrent_per_s = keys.len() as f64 / started.elapsed().as_secs_f64();
    backend.delete_prefix("outcache/bench").await?;

    if backend.capabilities().write_blob {
        let chunk = Bytes::from(
            (0..1 << 20)
                .map(|i: u32| (i % 251) as u8)
                .collect::<Vec<u8>>(),
        );
        let (mut writes, mut verified, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..options.blob_runs.max(1) {
            let size = options.blob_size;
            let pieces: Vec<Result<Bytes>> = (0..size)
                .step_by(1 << 20)
                .map(|i| Ok(chunk.slice(..(size - i).min(1 << 20))))
                .collect();
            let started = Instant::now();
            let r = backend
                .write_blob(&BlobMeta::default(), futures::stream::iter(pieces).boxed())
                .await?;
            writes.push(started.elapsed());
            let started = Instant::now();
            if let Some(stream) = cache.open_stream(&r).await? {
                crate::blob::drain(stream).await?;
            }
            verified.push(started.elapsed());
            let started = Instant::now();
            if let Some(stream) = backend.open_blob(&r.reference, None).await? {
                crate::blob::drain(stream).await?;
            }
            plain.push(started.elapsed());
            backend.delete_blob(&r.reference).await?;
        }
        let mb = options.blob_size as f64 / 1e6;
        report.blob_write_mb_s = mb / median(writes).as_secs_f64();
        report.blob_read_verified_mb_s = mb / median(verified).as_secs_f64();
        report.blob_read_mb_s = mb / median(plain).as_secs_f64();
    }
    Ok(report)
}
