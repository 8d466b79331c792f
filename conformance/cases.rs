//! The cases, one `pub async fn` each, named for the invariant it proves. Each takes a fresh backend and
//! returns `Err(Failure)` with what went wrong instead of panicking, so a runner can report and go on.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::support::{FailingRows, LiveBytes, failing_stream, pattern, stalling_stream, stream_of};
use super::{CaseResult, Failure};
use crate::engine::{BlobOptions, Cache, CacheOptions};
use crate::error::Error;
use crate::janitor::{find_orphans, sweep_orphans};
use crate::store::{
    BlobMeta, BlobState, ByteRange, ByteStream, MAX_READ_CHUNK, OutputCache, OutputCacheExt,
};
use crate::wire::{CacheRef, InlineBinary, RowKey, sha256_hex};

type Backend = Arc<dyn OutputCache>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(Failure(format!($($fmt)+)));
        }
    };
}

/// A capability a case relies on.
#[derive(Clone, Copy, Debug)]
enum Cap {
    WriteBlob,
    OpenBlob,
    DeleteBlob,
    TouchRows,
}

const BLOB_CAPS: &[Cap] = &[Cap::WriteBlob, Cap::OpenBlob, Cap::DeleteBlob];
const ALL_CAPS: &[Cap] = &[
    Cap::WriteBlob,
    Cap::OpenBlob,
    Cap::DeleteBlob,
    Cap::TouchRows,
];

impl Cap {
    /// The [`crate::Capabilities`] field this is.
    fn flag(self) -> &'static str {
        match self {
            Cap::WriteBlob => "write_blob",
            Cap::OpenBlob => "open_blob",
            Cap::DeleteBlob => "delete_blob",
            Cap::TouchRows => "touch_rows",
        }
    }
}

fn has(cache: &Backend, cap: Cap) -> bool {
    let caps = cache.capabilities();
    match cap {
        Cap::WriteBlob => caps.write_blob,
        Cap::OpenBlob => caps.open_blob,
        Cap::DeleteBlob => caps.delete_blob,
        Cap::TouchRows => caps.touch_rows,
    }
}

/// Call the method behind `cap` with harmless arguments.
async fn call(cache: &Backend, cap: Cap) -> crate::Result<()> {
    match cap {
        Cap::WriteBlob => {
            let r = cache
                .write_blob(
                    &meta("conformance/caps"),
                    stream_of(Bytes::from_static(b"x"), 1),
                )
                .await?;
            if cache.capabilities().delete_blob {
                cache.delete_blob(&r.reference).await?;
            }
            Ok(())
        }
        Cap::OpenBlob => cache.open_blob("none://blobs/none", None).await.map(|_| ()),
        Cap::DeleteBlob => cache.delete_blob("none://blobs/none").await,
        Cap::TouchRows => {
            let nobody = RowKey::new("conformance/caps", &json!("no such row"))?;
            cache.touch_rows(&[nobody], SystemTime::now()).await
        }
    }
}

/// `None` if the backend has every capability in `needs` (run the case); otherwise the result of
/// checking that each missing one is refused with `Unsupported` (the case's verdict).
async fn gate(cache: &Backend, needs: &[Cap]) -> Option<CaseResult> {
    let missing: Vec<Cap> = needs.iter().copied().filter(|c| !has(cache, *c)).collect();
    if missing.is_empty() {
        return None;
    }
    for &cap in &missing {
        match call(cache, cap).await {
            Err(Error::Unsupported { .. }) => {}
            other => {
                return Some(Err(Failure(format!(
                    "{cap:?} is not claimed, so it must return Unsupported, but returned {other:?}"
                ))));
            }
        }
    }
    // Waived, not passed: the runner reports what the case would need.
    for cap in missing {
        crate::conformance::note_waiver(cap.flag());
    }
    Some(Ok(()))
}

macro_rules! gate {
    ($cache:expr, $needs:expr) => {
        if let Some(verdict) = gate(&$cache, $needs).await {
            return verdict;
        }
    };
}

fn key(task: &str, i: u64) -> Result<RowKey, Failure> {
    Ok(RowKey::new(
        task,
        &json!({ "i": i, "case": "conformance" }),
    )?)
}

fn meta(task: &str) -> BlobMeta {
    BlobMeta {
        task_type: task.into(),
        fingerprint: "0".repeat(64),
        port: None,
        mime: None,
    }
}

async fn write(cache: &Backend, data: &Bytes, chunk: usize) -> Result<CacheRef, Failure> {
    Ok(cache
        .write_blob(&meta("conformance/blob"), stream_of(data.clone(), chunk))
        .await?)
}

async fn read_streamed(cache: &Backend, reference: &str) -> Result<Option<Bytes>, Failure> {
    match cache.open_blob(reference, None).await? {
        Some(stream) => Ok(Some(crate::blob::collect(stream).await?)),
        None => Ok(None),
    }
}

/// The blob behind `r` must read back as exactly `data`, both whole and streamed.
async fn check_blob(cache: &Backend, r: &CacheRef, data: &Bytes) -> CaseResult {
    let whole = cache.read_blob(&r.reference).await?;
    ensure!(
        whole.as_ref() == Some(data),
        "read_blob({}) gave {:?} bytes, expected {}",
        r.reference,
        whole.map(|b| b.len()),
        data.len()
    );
    let streamed = read_streamed(cache, &r.reference).await?;
    ensure!(
        streamed.as_ref() == Some(data),
        "open_blob({}) gave {:?} bytes, expected {}",
        r.reference,
        streamed.map(|b| b.len()),
        data.len()
    );
    Ok(())
}

/// Reads the rest of `stream` onto `got` (a stream opened before `what` happened to its blob) and
/// checks it ends whole: equal to `data`, not cut off by an error nor short.
async fn finish_reading(
    mut stream: ByteStream,
    mut got: Vec<u8>,
    data: &Bytes,
    what: &str,
) -> CaseResult {
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => got.extend_from_slice(&chunk),
            Err(e) => {
                return Err(Failure(format!(
                    "a stream opened before {what} failed after {} of {} bytes: {e}",
                    got.len(),
                    data.len()
                )));
            }
        }
    }
    ensure!(
        got == data[..],
        "a stream opened before {what} gave {} bytes, not the blob's {}",
        got.len(),
        data.len()
    );
    Ok(())
}

async fn published(cache: &Backend) -> Result<Vec<String>, Failure> {
    Ok(cache
        .list_blobs()
        .await?
        .into_iter()
        .filter(|e| e.state == BlobState::Published)
        .map(|e| e.id)
        .collect())
}

async fn temps(cache: &Backend) -> Result<usize, Failure> {
    Ok(cache
        .list_blobs()
        .await?
        .into_iter()
        .filter(|e| e.state == BlobState::Temp)
        .count())
}

/// Wait (up to 5 s) for temps to vanish: some backends clean up a dropped write from a background task.
async fn no_temps_soon(cache: &Backend) -> CaseResult {
    for _ in 0..100 {
        if temps(cache).await? == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Failure(format!(
        "{} temp object(s) left behind",
        temps(cache).await?
    )))
}

/// Wait (up to 5 s) until the backend stores exactly what it stored `before` (by its fixture's storage
/// probe, if the fixture gave one): a failed or dropped write leaves nothing on the medium, listed or not.
async fn nothing_stored_soon(before: &Option<Vec<String>>) -> CaseResult {
    let Some(before) = before else {
        return Ok(());
    };
    for _ in 0..100 {
        if crate::conformance::stored_now().as_ref() == Some(before) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = crate::conformance::stored_now().unwrap_or_default();
    let left: Vec<&String> = now.iter().filter(|n| !before.contains(n)).collect();
    Err(Failure(format!(
        "a failed or dropped write left {left:?} in storage (not in the backend's listing)"
    )))
}

/// A write of `len` bytes whose producer then stalls forever, running on its own task (abort it to drop
/// the write).
fn spawn_stalled_writer(
    cache: &Backend,
    task: &'static str,
    len: usize,
    seed: u64,
) -> tokio::task::JoinHandle<crate::Result<CacheRef>> {
    let cache = cache.clone();
    tokio::spawn(async move {
        cache
            .write_blob(&meta(task), stalling_stream(pattern(len, seed), 65_536))
            .await
    })
}

fn engine(cache: &Backend, threshold: u64) -> Cache {
    Cache::with_options(
        cache.clone(),
        CacheOptions::default().reference_threshold(threshold),
    )
}

#[path = "rows.rs"]
mod rows;
pub use rows::*;
#[path = "streaming.rs"]
mod streaming;
pub use streaming::*;
#[path = "publish.rs"]
mod publish;
pub use publish::*;
#[path = "ranges.rs"]
mod ranges;
pub use ranges::*;
#[path = "refs.rs"]
mod refs;
pub use refs::*;
#[path = "cascades.rs"]
mod cascades;
pub use cascades::*;
#[path = "orphans.rs"]
mod orphans;
pub use orphans::*;
#[path = "concurrency.rs"]
mod concurrency;
pub use concurrency::*;
#[path = "capabilities.rs"]
mod capabilities;
pub use capabilities::*;
#[path = "engine.rs"]
mod engine;
pub use engine::*;

#[path = "safety.rs"]
mod safety;
pub use safety::*;
