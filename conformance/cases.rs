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
    StreamWrite,
    RefRead,
    StreamRefRead,
    RefDelete,
    RangeRead,
    AccessTracking,
}

const BLOB_CAPS: &[Cap] = &[
    Cap::StreamWrite,
    Cap::RefRead,
    Cap::StreamRefRead,
    Cap::RefDelete,
];
const ALL_CAPS: &[Cap] = &[
    Cap::StreamWrite,
    Cap::RefRead,
    Cap::StreamRefRead,
    Cap::RefDelete,
    Cap::RangeRead,
    Cap::AccessTracking,
];

impl Cap {
    /// The [`crate::Capabilities`] field this is.
    fn flag(self) -> &'static str {
        match self {
            Cap::StreamWrite => "stream_write",
            Cap::RefRead => "ref_read",
            Cap::StreamRefRead => "stream_ref_read",
            Cap::RefDelete => "ref_delete",
            Cap::RangeRead => "range_read",
            Cap::AccessTracking => "access_tracking",
        }
    }
}

fn has(cache: &Backend, cap: Cap) -> bool {
    let caps = cache.capabilities();
    match cap {
        Cap::StreamWrite => caps.stream_write,
        Cap::RefRead => caps.ref_read,
        Cap::StreamRefRead => caps.stream_ref_read,
        Cap::RefDelete => caps.ref_delete,
        Cap::RangeRead => caps.range_read,
        Cap::AccessTracking => caps.access_tracking,
    }
}

/// Call the method behind `cap` with harmless arguments.
async fn call(cache: &Backend, cap: Cap) -> crate::Result<()> {
    match cap {
        Cap::StreamWrite => {
            let r = cache
                .write_blob(
                    &meta("conformance/caps"),
                    stream_of(Bytes::from_static(b"x"), 1),
                )
                .await?;
            if cache.capabilities().ref_delete {
                cache.delete_blob(&r.reference).await?;
            }
            Ok(())
        }
        Cap::RefRead => cache.read_blob("none://blobs/none").await.map(|_| ()),
        Cap::StreamRefRead => cache.open_blob("none://blobs/none").await.map(|_| ()),
        Cap::RefDelete => cache.delete_blob("none://blobs/none").await,
        Cap::RangeRead => cache
            .open_blob_range("none://blobs/none", ByteRange::Offset(0))
            .await
            .map(|_| ()),
        Cap::AccessTracking => {
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
        super::note_waiver(cap.flag());
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
    match cache.open_blob(reference).await? {
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
        if super::stored_now().as_ref() == Some(before) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = super::stored_now().unwrap_or_default();
    let left: Vec<&String> = now.iter().filter(|n| !before.contains(n)).collect();
    Err(Failure(format!(
        "a failed or dropped write left {left:?} in storage (not in the backend's listing)"
    )))
}

fn engine(cache: &Backend, threshold: u64) -> Cache {
    Cache::with_options(
        cache.clone(),
        CacheOptions::default().reference_threshold(threshold),
    )
}

// ---------------------------------------------------------------------------------------------- rows

/// Invariant 1: a saved row reads back equal.
pub async fn row_round_trip(cache: Backend) -> CaseResult {
    let k = key("conformance/row", 1)?;
    let output = json!({"answer": 42, "text": "hello"});
    cache.save_row(&k, &output).await?;
    let row = cache.get_row(&k).await?;
    ensure!(
        row.as_ref().map(|r| &r.output) == Some(&output),
        "got {row:?}"
    );
    Ok(())
}

/// Invariant 1: a miss is `Ok(None)`, before and after other rows exist.
pub async fn row_miss_is_none(cache: Backend) -> CaseResult {
    let missing = key("conformance/row", 404)?;
    ensure!(
        cache.get_row(&missing).await?.is_none(),
        "miss on an empty cache was not None"
    );
    cache
        .save_row(&key("conformance/row", 1)?, &json!(1))
        .await?;
    cache
        .save_row(&key("conformance/other", 404)?, &json!(2))
        .await?;
    ensure!(
        cache.get_row(&missing).await?.is_none(),
        "miss beside other rows was not None"
    );
    Ok(())
}

/// Invariant 1: overwriting a key keeps only the last write.
pub async fn row_overwrite_last_writer_wins(cache: Backend) -> CaseResult {
    let k = key("conformance/row", 1)?;
    for v in 0..5 {
        cache.save_row(&k, &json!({ "v": v })).await?;
    }
    let row = cache.get_row(&k).await?.map(|r| r.output);
    ensure!(row == Some(json!({"v": 4})), "got {row:?}");
    let copies = cache
        .list_rows()
        .await?
        .into_iter()
        .filter(|r| r.key == k)
        .count();
    ensure!(copies == 1, "listing shows {copies} rows for one key");
    Ok(())
}

/// Deleting a row removes it and nothing else; deleting again reports that nothing was there.
pub async fn row_delete_removes_only_that_row(cache: Backend) -> CaseResult {
    let (a, b) = (key("conformance/row", 1)?, key("conformance/row", 2)?);
    cache.save_row(&a, &json!("a")).await?;
    cache.save_row(&b, &json!("b")).await?;
    ensure!(
        cache.delete_row(&a).await?,
        "delete_row of an existing row returned false"
    );
    ensure!(
        cache.get_row(&a).await?.is_none(),
        "deleted row still readable"
    );
    ensure!(
        cache.get_row(&b).await?.is_some(),
        "deleting a removed another row"
    );
    ensure!(
        !cache.delete_row(&a).await?,
        "second delete_row returned true"
    );
    Ok(())
}

fn tricky_task_types() -> Vec<String> {
    let mut types: Vec<String> = [
        "build",
        "build-",
        "build_",
        "session1",
        "session1-",
        "a/b",
        "a_b",
        "a%2Fb",
        "a.b",
        "..",
        ".",
        "a b",
        "ünïcödé/タスク",
        "UPPER",
        "upper",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    types.push("x".repeat(300));
    types.push(format!("{}y", "x".repeat(299)));
    types
}

/// Task types that sanitise alike, differ only in case, or are very long never share rows; neither do
/// different inputs of one task type.
pub async fn row_keys_are_distinct(cache: Backend) -> CaseResult {
    let inputs = json!({"same": "inputs"});
    let types = tricky_task_types();
    for t in &types {
        cache
            .save_row(&RowKey::new(t, &inputs)?, &json!({ "task": t }))
            .await?;
    }
    for t in &types {
        let got = cache
            .get_row(&RowKey::new(t, &inputs)?)
            .await?
            .map(|r| r.output);
        ensure!(
            got == Some(json!({ "task": t })),
            "task type {t:?} read back {got:?}"
        );
    }
    let (one, two) = (
        RowKey::new("t", &json!({"a": 1}))?,
        RowKey::new("t", &json!({"a": 2}))?,
    );
    cache.save_row(&one, &json!(1)).await?;
    cache.save_row(&two, &json!(2)).await?;
    let got = cache.get_row(&one).await?.map(|r| r.output);
    ensure!(got == Some(json!(1)), "inputs {{a:1}} read back {got:?}");
    Ok(())
}

/// Arbitrary JSON (unicode, big numbers, envelopes, refs, unbranded `$ref`) survives storage unchanged.
pub async fn row_output_json_is_preserved(cache: Backend) -> CaseResult {
    let output = json!({
        "unicode": "žluťoučký kůň 🐎 \u{0000} \"quoted\" \\ back",
        "numbers": [0, -1, 1.5, 1e300, u64::MAX, i64::MIN],
        "nested": {"deep": [[[{"x": null, "y": true, "z": false}]]]},
        "envelope": InlineBinary::encode(b"\x00\x01binary\xff", Some("application/octet-stream")),
        "ref": {"kind": "task-graph/CacheRef", "$ref": "fsfolder://blobs/x.bin", "size": 3, "future": {"a": 1}},
        "schema": {"$ref": "#/definitions/x"},
        "empty": {}, "list": [],
    });
    let k = key("conformance/json", 1)?;
    cache.save_row(&k, &output).await?;
    let got = cache.get_row(&k).await?.map(|r| r.output);
    ensure!(
        got.as_ref() == Some(&output),
        "stored {output}\nread back {got:?}"
    );
    Ok(())
}

/// A row's `created_at` is the time it was committed (within a minute, for servers with skewed clocks).
pub async fn row_created_at_is_recent(cache: Backend) -> CaseResult {
    let k = key("conformance/row", 1)?;
    let before = SystemTime::now() - Duration::from_secs(60);
    cache.save_row(&k, &json!(1)).await?;
    let after = SystemTime::now() + Duration::from_secs(60);
    let row = cache
        .get_row(&k)
        .await?
        .ok_or(Failure("row missing".into()))?;
    ensure!(
        row.created_at > before && row.created_at < after,
        "created_at {:?} is not near now",
        row.created_at
    );
    Ok(())
}

// ----------------------------------------------------------------------------------------- streaming

/// Invariant 2: an empty blob is a real blob of size 0.
pub async fn stream_empty_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = Bytes::new();
    let r = write(&cache, &data, 1).await?;
    ensure!(r.size == Some(0), "size {:?}", r.size);
    ensure!(
        r.sha256.as_deref() == Some(sha256_hex(b"").as_str()),
        "sha256 {:?}",
        r.sha256
    );
    check_blob(&cache, &r, &data).await
}

/// Invariant 2: a one-byte blob.
pub async fn stream_one_byte(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = Bytes::from_static(b"\x2a");
    let r = write(&cache, &data, 1).await?;
    ensure!(r.size == Some(1), "size {:?}", r.size);
    check_blob(&cache, &r, &data).await
}

/// Invariant 2: many odd-sized chunks reassemble exactly.
pub async fn stream_multi_chunk(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(3 * 1024 * 1024 + 7, 11);
    let r = write(&cache, &data, 65_537).await?;
    ensure!(r.size == Some(data.len() as u64), "size {:?}", r.size);
    ensure!(
        r.sha256.as_deref() == Some(sha256_hex(&data).as_str()),
        "sha256 mismatch"
    );
    check_blob(&cache, &r, &data).await
}

/// Invariant 2: a 65 MiB blob streams through without the backend holding on to the producer's chunks
/// (at most 24 MiB of them alive at once), and reads back with the right digest.
pub async fn stream_large_blob_bounded_memory(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    const CHUNK: usize = 1 << 20;
    const COUNT: usize = 65;
    let live = LiveBytes::default();
    let (stream, expected_sha) = live.stream(COUNT, CHUNK);
    let r = cache.write_blob(&meta("conformance/large"), stream).await?;
    let size = (COUNT * CHUNK) as u64;
    ensure!(r.size == Some(size), "size {:?}, expected {size}", r.size);
    ensure!(
        r.sha256.as_deref() == Some(expected_sha.as_str()),
        "sha256 {:?}",
        r.sha256
    );
    ensure!(
        live.peak() <= 24 << 20,
        "{} MiB of the producer's chunks were alive at once",
        live.peak() >> 20
    );
    let mut stream = cache
        .open_blob(&r.reference)
        .await?
        .ok_or(Failure("blob missing".into()))?;
    let (mut hasher, mut read) = (Sha256::new(), 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        read += chunk.len() as u64;
        hasher.update(&chunk);
    }
    drop(stream);
    ensure!(read == size, "read back {read} bytes");
    ensure!(
        crate::wire::hex(&hasher.finalize()) == expected_sha,
        "read back other bytes"
    );
    cache.delete_blob(&r.reference).await?;
    Ok(())
}

/// Invariant 2: the ref records size, mime, port and the SHA-256, and survives a JSON round trip.
pub async fn stream_records_size_mime_port_sha256(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(100_000, 3);
    let m = BlobMeta {
        port: Some("thumbnail".into()),
        mime: Some("image/png".into()),
        ..meta("conformance/meta")
    };
    let r = cache.write_blob(&m, stream_of(data.clone(), 4096)).await?;
    ensure!(r.size == Some(100_000), "size {:?}", r.size);
    ensure!(r.mime.as_deref() == Some("image/png"), "mime {:?}", r.mime);
    ensure!(r.port.as_deref() == Some("thumbnail"), "port {:?}", r.port);
    ensure!(
        r.sha256.as_deref() == Some(sha256_hex(&data).as_str()),
        "sha256 {:?}",
        r.sha256
    );
    let wire = r.to_value();
    ensure!(
        CacheRef::is_ref(&wire),
        "to_value is not a branded ref: {wire}"
    );
    ensure!(
        CacheRef::from_value(&wire).as_ref() == Some(&r),
        "ref changed in a JSON round trip"
    );
    check_blob(&cache, &r, &data).await
}

/// Streaming reads yield chunks of at most 1 MiB.
pub async fn stream_read_chunks_are_bounded(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(5 * MAX_READ_CHUNK / 2, 5);
    let r = write(&cache, &data, 3 * MAX_READ_CHUNK).await?;
    let mut stream = cache
        .open_blob(&r.reference)
        .await?
        .ok_or(Failure("blob missing".into()))?;
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        ensure!(
            chunk.len() <= MAX_READ_CHUNK,
            "a chunk of {} bytes",
            chunk.len()
        );
        got.extend_from_slice(&chunk);
    }
    ensure!(got == data, "streamed bytes differ");
    Ok(())
}

/// Every write gets its own name, even with identical metadata and content.
pub async fn stream_names_are_unique(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (a, b) = (pattern(1000, 1), pattern(1000, 2));
    let ra = write(&cache, &a, 100).await?;
    let rb = write(&cache, &b, 100).await?;
    let rc = write(&cache, &a, 100).await?;
    ensure!(
        ra.reference != rb.reference && ra.reference != rc.reference,
        "names repeat: {ra:?} {rb:?} {rc:?}"
    );
    check_blob(&cache, &ra, &a).await?;
    check_blob(&cache, &rb, &b).await?;
    check_blob(&cache, &rc, &a).await
}

// ------------------------------------------------------------------------------------ atomic publish

/// Invariant 3: a stream that fails (at the start, after a byte, mid-way, late) publishes nothing,
/// leaves no temp, and the error names its cause.
pub async fn failed_stream_publishes_nothing(cache: Backend) -> CaseResult {
    gate!(cache, &[Cap::StreamWrite]);
    let before = super::stored_now();
    let data = pattern(3 << 20, 9);
    for fail_at in [0, 1, 100_000, 3 << 20] {
        let result = cache
            .write_blob(
                &meta("conformance/fail"),
                failing_stream(data.clone(), 65_536, fail_at),
            )
            .await;
        match result {
            Err(e @ Error::Stream { .. }) => ensure!(
                e.to_string().contains("injected producer failure"),
                "the error lost its cause: {e}"
            ),
            other => {
                return Err(Failure(format!(
                    "failing at {fail_at}: expected a Stream error, got {other:?}"
                )));
            }
        }
        let blobs = published(&cache).await?;
        ensure!(blobs.is_empty(), "failing at {fail_at} published {blobs:?}");
        no_temps_soon(&cache).await?;
        nothing_stored_soon(&before).await?;
    }
    Ok(())
}

/// Invariant 3: dropping the write future mid-stream publishes nothing and leaves no temp.
pub async fn dropped_write_publishes_nothing(cache: Backend) -> CaseResult {
    gate!(cache, &[Cap::StreamWrite]);
    let before = super::stored_now();
    let m = meta("conformance/drop");
    let write = cache.write_blob(&m, stalling_stream(pattern(2 << 20, 4), 256 * 1024));
    let result = tokio::time::timeout(Duration::from_millis(300), write).await;
    ensure!(result.is_err(), "a stalled stream finished: {result:?}");
    let blobs = published(&cache).await?;
    ensure!(blobs.is_empty(), "a dropped write published {blobs:?}");
    no_temps_soon(&cache).await?;
    nothing_stored_soon(&before).await
}

/// Invariant 3: while a write is in flight, no published blob is visible.
pub async fn in_flight_write_is_not_published(cache: Backend) -> CaseResult {
    gate!(cache, &[Cap::StreamWrite]);
    let writer = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .write_blob(
                    &meta("conformance/inflight"),
                    stalling_stream(pattern(1 << 20, 8), 65_536),
                )
                .await
        })
    };
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let blobs = published(&cache).await?;
        ensure!(
            blobs.is_empty(),
            "a partial write is visible as published: {blobs:?}"
        );
    }
    writer.abort();
    let _ = writer.await;
    ensure!(
        published(&cache).await?.is_empty(),
        "an aborted write was published"
    );
    no_temps_soon(&cache).await
}

// ------------------------------------------------------------------------------------------ ranges

async fn read_range(
    cache: &Backend,
    r: &CacheRef,
    range: ByteRange,
) -> Result<Option<Bytes>, Failure> {
    let Some(mut stream) = cache.open_blob_range(&r.reference, range.clone()).await? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        ensure!(
            chunk.len() <= MAX_READ_CHUNK,
            "{range}: a chunk of {} bytes",
            chunk.len()
        );
        out.extend_from_slice(&chunk);
    }
    Ok(Some(out.into()))
}

/// Ranges at the start, across chunk boundaries in the middle, at the end, clamped past the end, by
/// offset and by suffix read exactly those bytes.
pub async fn range_reads_start_middle_end(cache: Backend) -> CaseResult {
    gate!(cache, &[Cap::StreamWrite, Cap::RangeRead]);
    let data = pattern(3 * MAX_READ_CHUNK + 123, 21);
    let r = write(&cache, &data, 100_000).await?;
    let n = data.len() as u64;
    let cases: Vec<(ByteRange, std::ops::Range<u64>)> = vec![
        (ByteRange::Bounded(0..10), 0..10),
        (ByteRange::Bounded(1000..300_000), 1000..300_000),
        (ByteRange::Bounded(262_143..262_145), 262_143..262_145),
        (
            ByteRange::Bounded(MAX_READ_CHUNK as u64 - 7..2 * MAX_READ_CHUNK as u64 + 9),
            MAX_READ_CHUNK as u64 - 7..2 * MAX_READ_CHUNK as u64 + 9,
        ),
        (ByteRange::Bounded(n - 5..n), n - 5..n),
        (ByteRange::Bounded(n - 5..n + 100), n - 5..n),
        (ByteRange::Offset(n - 1000), n - 1000..n),
        (ByteRange::Offset(0), 0..n),
        (ByteRange::Suffix(777), n - 777..n),
        (ByteRange::Suffix(n + 10), 0..n),
    ];
    for (range, span) in cases {
        let got = read_range(&cache, &r, range.clone()).await?;
        let want = data.slice(span.start as usize..span.end as usize);
        ensure!(
            got.as_ref() == Some(&want),
            "{range}: got {:?} bytes, expected {}",
            got.map(|g| g.len()),
            want.len()
        );
    }
    Ok(())
}

/// Empty ranges read nothing; ranges past the end are a clear `InvalidRange`; unknown refs are `None`.
pub async fn range_read_empty_and_past_the_end(cache: Backend) -> CaseResult {
    gate!(cache, &[Cap::StreamWrite, Cap::RangeRead]);
    let data = pattern(10_000, 22);
    let r = write(&cache, &data, 1000).await?;
    let n = data.len() as u64;
    for empty in [
        ByteRange::Bounded(5..5),
        ByteRange::Offset(n),
        ByteRange::Suffix(0),
    ] {
        let got = read_range(&cache, &r, empty.clone()).await?;
        ensure!(
            got.as_ref().is_some_and(|g| g.is_empty()),
            "{empty}: got {got:?}"
        );
    }
    for bad in [
        ByteRange::Bounded(n + 1..n + 2),
        ByteRange::Offset(n + 1),
        #[allow(clippy::reversed_empty_ranges)] // deliberately backwards
        ByteRange::Bounded(10..5),
    ] {
        match cache.open_blob_range(&r.reference, bad.clone()).await {
            Err(Error::InvalidRange {
                ref reference,
                size,
                ..
            }) if *reference == r.reference && size == n => {}
            Err(e) => return Err(Failure(format!("{bad}: expected InvalidRange, got {e}"))),
            Ok(s) => {
                return Err(Failure(format!(
                    "{bad}: expected InvalidRange, got a stream: {}",
                    s.is_some()
                )));
            }
        }
    }
    let unknown = mutate_last_hex_digit(&r.reference).unwrap_or_default();
    ensure!(
        cache
            .open_blob_range(&unknown, ByteRange::Offset(0))
            .await?
            .is_none(),
        "unknown ref resolved"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------ ref safety

/// A well-formed ref for this backend that was never written.
fn mutate_last_hex_digit(reference: &str) -> Option<String> {
    let pos = reference.rfind(|c: char| c.is_ascii_hexdigit())?;
    let c = reference.as_bytes()[pos];
    let replacement = if c == b'0' { '1' } else { '0' };
    let mut out = reference.to_owned();
    out.replace_range(pos..pos + 1, &replacement.to_string());
    Some(out)
}

/// Invariant 4: a well-formed but unknown ref reads as `None` and deleting it touches nothing.
pub async fn unknown_ref_is_none(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(1000, 1);
    let r = write(&cache, &data, 100).await?;
    let unknown = mutate_last_hex_digit(&r.reference)
        .ok_or(Failure(format!("cannot mutate {}", r.reference)))?;
    ensure!(
        cache.read_blob(&unknown).await?.is_none(),
        "{unknown} resolved"
    );
    ensure!(
        cache.open_blob(&unknown).await?.is_none(),
        "{unknown} opened"
    );
    cache.delete_blob(&unknown).await?;
    check_blob(&cache, &r, &data).await
}

/// Invariant 4: refs in other backends' forms never resolve.
pub async fn foreign_refs_never_resolve(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(1000, 1);
    let r = write(&cache, &data, 100).await?;
    let rest = r
        .reference
        .split_once("://")
        .map(|(_, rest)| rest.to_owned())
        .unwrap_or_default();
    let mut foreign: Vec<String> = [
        "other", "s3", "sqlite", "memory", "fsfolder", "file", "http",
    ]
    .iter()
    .map(|scheme| format!("{scheme}://{rest}"))
    .filter(|f| *f != r.reference)
    .collect();
    foreign.extend([
        "fsfolder://blobs/never-written_0000.bin".to_owned(),
        "memory://blobs/00000000000000000000000000000000".to_owned(),
        "s3://bucket/blobs/x".to_owned(),
        "sqlite://blobs/1".to_owned(),
    ]);
    for f in &foreign {
        ensure!(
            cache.read_blob(f).await?.is_none(),
            "foreign ref {f:?} resolved"
        );
        ensure!(
            cache.open_blob(f).await?.is_none(),
            "foreign ref {f:?} opened"
        );
    }
    check_blob(&cache, &r, &data).await
}

fn malformed_refs(real: &str) -> Vec<String> {
    let mut refs: Vec<String> = [
        "",
        "/etc/passwd",
        "../../etc/passwd",
        "fsfolder://blobs/../../etc/passwd",
        "fsfolder://blobs/..\\..\\etc\\passwd.bin",
        "fsfolder://blobs/a/b.bin",
        "fsfolder://blobs/.bin",
        "fsfolder://blobs/...bin",
        "fsfolder:///etc/passwd",
        "fsfolder://blobs//etc/passwd.bin",
        "fsfolder://blobs/x.bin\0",
        "memory://blobs/../x",
        "file:///etc/passwd",
        "sqlite://blobs/1 OR 1=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (scheme, rest) = real.split_once("://").unwrap_or(("", real));
    let last_slash = real.rfind('/').map_or(0, |i| i + 1);
    let (dir, name) = real.split_at(last_slash);
    refs.extend([
        format!("{real}/../x"),
        format!("{real}\0"),
        format!("{real}/"),
        format!(" {real}"),
        format!("{real} "),
        real.to_uppercase(),
        format!("{dir}../{name}"),
        format!("{dir}./{name}"),
        format!("{dir}sub/{name}"),
        format!("{dir}..%2F{name}"),
        format!("{dir}\\{name}"),
        format!("{scheme}:///{rest}"),
        format!("{scheme}:/{rest}"),
        format!("{scheme}://{rest}?x=1"),
        format!("{scheme}://{}", "a".repeat(5000)),
        rest.to_owned(),
    ]);
    refs.retain(|r| r != real);
    refs
}

/// Invariant 4: traversal attempts and garbage never resolve.
pub async fn malformed_refs_never_resolve(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(1000, 1);
    let r = write(&cache, &data, 100).await?;
    for bad in malformed_refs(&r.reference) {
        ensure!(
            cache.read_blob(&bad).await?.is_none(),
            "malformed ref {bad:?} resolved"
        );
        ensure!(
            cache.open_blob(&bad).await?.is_none(),
            "malformed ref {bad:?} opened"
        );
    }
    Ok(())
}

/// Invariant 4: deleting a malformed ref succeeds quietly and deletes nothing.
pub async fn malformed_refs_never_delete(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(1000, 1);
    let r = write(&cache, &data, 100).await?;
    let before = published(&cache).await?.len();
    for bad in malformed_refs(&r.reference) {
        cache.delete_blob(&bad).await?;
    }
    let after = published(&cache).await?.len();
    ensure!(
        before == after,
        "{before} blobs before, {after} after deleting malformed refs"
    );
    check_blob(&cache, &r, &data).await
}

/// Invariant 5: deleting a ref twice is fine; afterwards it reads as `None`.
pub async fn ref_delete_is_idempotent(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let r = write(&cache, &pattern(5000, 1), 1000).await?;
    cache.delete_blob(&r.reference).await?;
    cache.delete_blob(&r.reference).await?;
    ensure!(
        cache.read_blob(&r.reference).await?.is_none(),
        "deleted blob still reads"
    );
    ensure!(
        cache.open_blob(&r.reference).await?.is_none(),
        "deleted blob still opens"
    );
    Ok(())
}

/// Invariant 5: deleting one blob leaves its neighbours alone.
pub async fn ref_delete_touches_only_its_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let datas: Vec<Bytes> = (0..3).map(|i| pattern(2000, i)).collect();
    let mut refs = Vec::new();
    for d in &datas {
        refs.push(write(&cache, d, 500).await?);
    }
    cache.delete_blob(&refs[1].reference).await?;
    check_blob(&cache, &refs[0], &datas[0]).await?;
    check_blob(&cache, &refs[2], &datas[2]).await?;
    ensure!(
        cache.read_blob(&refs[1].reference).await?.is_none(),
        "deleted blob still reads"
    );
    Ok(())
}

/// A read stream dropped half-way releases the blob: it can be read again, then deleted.
pub async fn dropped_read_stream_releases_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(3 * MAX_READ_CHUNK, 2);
    let r = write(&cache, &data, MAX_READ_CHUNK).await?;
    let mut stream = cache
        .open_blob(&r.reference)
        .await?
        .ok_or(Failure("blob missing".into()))?;
    let first = stream.next().await.transpose()?;
    ensure!(first.is_some_and(|c| !c.is_empty()), "first chunk empty");
    drop(stream);
    check_blob(&cache, &r, &data).await?;
    cache.delete_blob(&r.reference).await?;
    ensure!(
        cache.read_blob(&r.reference).await?.is_none(),
        "blob survived delete after a dropped read"
    );
    Ok(())
}

// -------------------------------------------------------------------------------------------- cascades

/// A row with a blob written for it (so the row owns the blob: see [`crate::wire::ref_owned_by`]).
async fn row_with_blob(cache: &Backend, task: &str, i: u64) -> Result<(RowKey, CacheRef), Failure> {
    let k = key(task, i)?;
    let r = cache
        .write_blob(&BlobMeta::for_key(&k), stream_of(pattern(3000, i), 1000))
        .await?;
    cache
        .save_row(&k, &json!({"image": r.to_value(), "note": "with a blob"}))
        .await?;
    Ok((k, r))
}

/// Deleting a row deletes the blobs it references.
pub async fn delete_row_cascades_to_blobs(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (k, r) = row_with_blob(&cache, "conformance/cascade", 1).await?;
    let (k2, r2) = row_with_blob(&cache, "conformance/cascade", 2).await?;
    ensure!(cache.delete_row(&k).await?, "delete_row returned false");
    ensure!(
        cache.read_blob(&r.reference).await?.is_none(),
        "the deleted row's blob survived"
    );
    ensure!(
        cache.read_blob(&r2.reference).await?.is_some(),
        "another row's blob was deleted"
    );
    ensure!(
        cache.get_row(&k2).await?.is_some(),
        "another row was deleted"
    );
    Ok(())
}

/// `delete_rows` removes each named row with its blobs, counts only rows that existed, and spares the
/// rest.
pub async fn delete_rows_removes_each_with_blobs(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (ka, ra) = row_with_blob(&cache, "conformance/batch", 1).await?;
    let (kb, rb) = row_with_blob(&cache, "conformance/batch", 2).await?;
    let (kc, rc) = row_with_blob(&cache, "conformance/batch", 3).await?;
    let missing = key("conformance/batch", 404)?;
    let n = cache
        .delete_rows(&[ka.clone(), missing, kb.clone()])
        .await?;
    ensure!(n == 2, "delete_rows reported {n} rows, expected 2");
    for (k, r) in [(&ka, &ra), (&kb, &rb)] {
        ensure!(cache.get_row(k).await?.is_none(), "row {k} survived");
        ensure!(
            cache.read_blob(&r.reference).await?.is_none(),
            "blob {} survived",
            r.reference
        );
    }
    ensure!(
        cache.get_row(&kc).await?.is_some(),
        "an unnamed row was deleted"
    );
    ensure!(
        cache.read_blob(&rc.reference).await?.is_some(),
        "an unnamed row's blob was deleted"
    );
    ensure!(
        cache.delete_rows(&[]).await? == 0,
        "an empty batch deleted something"
    );
    Ok(())
}

/// Invariant 6: a prefix delete removes the matching rows with their blobs and spares the rest.
pub async fn delete_prefix_cascades_to_blobs(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (_, a) = row_with_blob(&cache, "img/resize", 1).await?;
    let (_, b) = row_with_blob(&cache, "img/crop", 2).await?;
    let (kc, c) = row_with_blob(&cache, "txt/summary", 3).await?;
    let n = cache.delete_prefix("img/").await?;
    ensure!(n == 2, "delete_prefix(img/) removed {n} rows, expected 2");
    for r in [&a, &b] {
        ensure!(
            cache.read_blob(&r.reference).await?.is_none(),
            "blob {} survived",
            r.reference
        );
    }
    ensure!(
        cache.get_row(&kc).await?.is_some(),
        "a row outside the prefix was deleted"
    );
    ensure!(
        cache.read_blob(&c.reference).await?.is_some(),
        "a blob outside the prefix was deleted"
    );
    Ok(())
}

/// Invariant 6: prefixes are plain string prefixes of the task type (no sanitising merges, no
/// directory semantics), and `""` matches everything.
pub async fn delete_prefix_respects_boundaries(cache: Backend) -> CaseResult {
    let types = [
        "build",
        "build-x",
        "buildx",
        "build/y",
        "session1",
        "session1-",
        "other",
    ];
    for t in types {
        cache.save_row(&key(t, 1)?, &json!(t)).await?;
    }
    let remaining = |cache: Backend| async move {
        let mut names: Vec<String> = cache
            .list_rows()
            .await?
            .into_iter()
            .map(|r| r.key.task_type().to_owned())
            .collect();
        names.sort();
        Ok::<_, Failure>(names)
    };
    ensure!(
        cache.delete_prefix("build-").await? == 1,
        "build- matched other than build-x"
    );
    ensure!(
        cache.delete_prefix("session1-").await? == 1,
        "session1- matched other than session1-"
    );
    let left = remaining(cache.clone()).await?;
    ensure!(
        left == ["build", "build/y", "buildx", "other", "session1"],
        "left after two prefix deletes: {left:?}"
    );
    ensure!(
        cache.delete_prefix("build").await? == 3,
        "build did not match its three"
    );
    ensure!(
        cache.delete_prefix("").await? == 2,
        "\"\" did not match the last two"
    );
    let left = remaining(cache.clone()).await?;
    ensure!(left.is_empty(), "left after deleting everything: {left:?}");
    Ok(())
}

/// Invariant 6: an age prune (the janitor's `older_than`, planned from `list_rows` and carried out with
/// `delete_rows_listed`) removes old rows with their blobs and spares newer ones.
pub async fn age_prune_cascades_and_spares_newer(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (old_key, old_ref) = row_with_blob(&cache, "conformance/age", 1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = SystemTime::now();
    let (new_key, new_ref) = row_with_blob(&cache, "conformance/age", 2).await?;
    let mut options = crate::janitor::PruneOptions::new();
    // Older than the moment just before the new row, measured now.
    options.older_than = Some(started.elapsed().unwrap_or_default() + Duration::from_millis(150));
    let report = crate::janitor::prune(cache.as_ref(), &options, |_| {}).await?;
    let n = report.rows_removed;
    ensure!(
        n == 1,
        "the age prune removed {n} rows, expected 1 ({report:?})"
    );
    ensure!(
        cache.get_row(&old_key).await?.is_none(),
        "the old row survived"
    );
    ensure!(
        cache.read_blob(&old_ref.reference).await?.is_none(),
        "the old row's blob survived"
    );
    ensure!(
        cache.get_row(&new_key).await?.is_some(),
        "the new row was removed"
    );
    ensure!(
        cache.read_blob(&new_ref.reference).await?.is_some(),
        "the new row's blob was removed"
    );
    Ok(())
}

// ----------------------------------------------------------------------------------------- orphans

/// Invariant 7: when the row commit fails after the blob was written, the engine deletes the blob and
/// returns the commit error; nothing is left, no temp either.
pub async fn row_commit_failure_removes_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let failing: Backend = Arc::new(FailingRows::new(cache.clone(), true));
    let engine = engine(&failing, 1024);
    let result = engine
        .put_stream(
            "conformance/orphan",
            &json!({"n": 1}),
            stream_of(pattern(200_000, 1), 8192),
            BlobOptions::default(),
        )
        .await;
    match result {
        Err(Error::Backend { ref context, .. }) if context.contains("save row") => {}
        other => {
            return Err(Failure(format!(
                "expected the injected commit error, got {other:?}"
            )));
        }
    }
    let blobs = published(&cache).await?;
    ensure!(
        blobs.is_empty(),
        "the orphaned blob is still there: {blobs:?}"
    );
    no_temps_soon(&cache).await?;
    ensure!(
        engine
            .get("conformance/orphan", &json!({"n": 1}))
            .await?
            .is_none(),
        "a row exists after its commit failed"
    );
    Ok(())
}

/// Invariant 7: the janitor-facing listing shows a blob no row references as an orphan (with a zero
/// grace period), not a referenced one, and a fresh orphan is spared by a long grace period.
pub async fn janitor_sees_unreferenced_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (_, kept) = row_with_blob(&cache, "conformance/janitor", 1).await?;
    let orphan = write(&cache, &pattern(4000, 2), 1000).await?;
    let listed = published(&cache).await?;
    ensure!(
        listed.contains(&kept.reference) && listed.contains(&orphan.reference),
        "listing {listed:?} misses a blob"
    );
    let sweep = find_orphans(cache.as_ref(), Duration::ZERO).await?;
    let found: Vec<&str> = sweep.blobs.iter().map(|b| b.id.as_str()).collect();
    ensure!(
        found == [orphan.reference.as_str()],
        "orphans found: {found:?}"
    );
    let sweep = find_orphans(cache.as_ref(), Duration::from_secs(3600)).await?;
    ensure!(
        sweep.blobs.is_empty(),
        "a fresh blob was not spared by the grace period: {:?}",
        sweep.blobs
    );
    Ok(())
}

/// Invariant 7: a dry-run sweep removes nothing; a real one removes the orphan and keeps referenced blobs.
pub async fn janitor_sweep_keeps_referenced_blobs(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (k, kept) = row_with_blob(&cache, "conformance/janitor", 1).await?;
    let orphan = write(&cache, &pattern(4000, 2), 1000).await?;
    let dry = sweep_orphans(cache.as_ref(), Duration::ZERO, true).await?;
    ensure!(
        dry.blobs.len() == 1 && dry.dry_run,
        "dry run found {:?}",
        dry.blobs
    );
    ensure!(
        cache.read_blob(&orphan.reference).await?.is_some(),
        "a dry run deleted the orphan"
    );
    let real = sweep_orphans(cache.as_ref(), Duration::ZERO, false).await?;
    ensure!(real.blobs.len() == 1, "sweep removed {:?}", real.blobs);
    ensure!(
        cache.read_blob(&orphan.reference).await?.is_none(),
        "the orphan survived the sweep"
    );
    ensure!(
        cache.read_blob(&kept.reference).await?.is_some(),
        "the sweep removed a referenced blob"
    );
    ensure!(
        cache.get_row(&k).await?.is_some(),
        "the sweep removed a row"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------- concurrency

const WRITERS: u64 = 16;
const WRITES_EACH: u64 = 3;

/// Readers that loop over `keys` until told to stop, checking every hit: a ref must read back verified,
/// an envelope must decode. Returns how many hits they checked.
fn spawn_readers(
    engine: &Cache,
    keys: Vec<(String, Value)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Result<u64, Failure>>> {
    (0..4)
        .map(|_| {
            let (engine, keys, stop) = (engine.clone(), keys.clone(), stop.clone());
            tokio::spawn(async move {
                let mut hits = 0;
                loop {
                    // One last full pass after the writers are done, so every reader checks real rows.
                    let last_pass = stop.load(std::sync::atomic::Ordering::SeqCst);
                    for (task, inputs) in &keys {
                        let Some(value) = engine.get(task, inputs).await? else {
                            continue;
                        };
                        hits += 1;
                        if let Some(r) = CacheRef::from_value(&value) {
                            let bytes = engine.read(&r).await?;
                            ensure!(
                                bytes.is_some(),
                                "a committed row's ref {} does not resolve",
                                r.reference
                            );
                        } else {
                            ensure!(
                                InlineBinary::decode(&value)?.is_some(),
                                "a torn or foreign row: {value}"
                            );
                        }
                    }
                    if last_pass {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Ok(hits)
            })
        })
        .collect()
}

async fn join_all<T>(
    handles: Vec<tokio::task::JoinHandle<Result<T, Failure>>>,
) -> Result<Vec<T>, Failure> {
    let mut out = Vec::new();
    for h in handles {
        out.push(
            h.await
                .map_err(|e| Failure(format!("task panicked: {e}")))??,
        );
    }
    Ok(out)
}

/// Writers whose `task`/`inputs` come from `key_of(writer)`; writer `w` goes through `backend_of(w)`.
/// Returns, per successful write, the key, the stored output and the bytes.
async fn run_writers(
    cache: &Backend,
    key_of: impl Fn(u64) -> (String, Value),
    backend_of: impl Fn(u64) -> Backend,
) -> Result<Vec<(String, Value, Value, Bytes)>, Failure> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keys: Vec<(String, Value)> = {
        let mut seen = HashSet::new();
        (0..WRITERS)
            .map(&key_of)
            .filter(|k| seen.insert(k.clone()))
            .collect()
    };
    let readers = spawn_readers(&engine(cache, 1024), keys, stop.clone());
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (task, inputs) = key_of(w);
            let engine = engine(&backend_of(w), 1024);
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0..WRITES_EACH {
                    let data = pattern(64 * 1024 + (w * 977 + i * 131) as usize, w * 100 + i);
                    let result = engine
                        .put_stream(
                            &task,
                            &inputs,
                            stream_of(data.clone(), 16 * 1024),
                            BlobOptions::default(),
                        )
                        .await;
                    match result {
                        Ok(output) => done.push((task.clone(), inputs.clone(), output, data)),
                        Err(Error::Backend { ref context, .. }) if context.contains("save row") => {
                        }
                        Err(e) => return Err(Failure::from(e)),
                    }
                }
                Ok(done)
            })
        })
        .collect();
    let written = join_all(writers).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let hits = join_all(readers).await?;
    let written: Vec<_> = written?.into_iter().flatten().collect();
    ensure!(hits.iter().sum::<u64>() > 0, "readers never saw a row");
    Ok(written)
}

/// Every written output reads back as its bytes (refs verified).
async fn check_written(cache: &Backend, written: &[(String, Value, Value, Bytes)]) -> CaseResult {
    let engine = engine(cache, 1024);
    for (_, _, output, data) in written {
        let bytes = match CacheRef::from_value(output) {
            Some(r) => engine.read(&r).await?,
            None => InlineBinary::decode(output)?.map(|b| b.bytes),
        };
        ensure!(
            bytes.as_ref() == Some(data),
            "output {output} does not read back its bytes"
        );
    }
    Ok(())
}

/// Invariant 8: 16 writers on one key with readers running: no error, no torn read, every committed ref
/// stays readable, and the row ends as one writer's complete output.
pub async fn concurrent_writers_same_key(cache: Backend) -> CaseResult {
    let written = run_writers(
        &cache,
        |_| ("conformance/race".into(), json!({"key": "same"})),
        |_| cache.clone(),
    )
    .await?;
    ensure!(
        written.len() as u64 == WRITERS * WRITES_EACH,
        "only {} writes succeeded",
        written.len()
    );
    check_written(&cache, &written).await?;
    let last = cache
        .get_row(&RowKey::new("conformance/race", &json!({"key": "same"}))?)
        .await?;
    let last = last.ok_or(Failure("no row after the race".into()))?.output;
    ensure!(
        written.iter().any(|(_, _, o, _)| *o == last),
        "the final row is no writer's output: {last}"
    );
    Ok(())
}

/// Invariant 8: 16 writers on 16 keys with readers running: each key ends with its writer's last output.
pub async fn concurrent_writers_different_keys(cache: Backend) -> CaseResult {
    let written = run_writers(
        &cache,
        |w| ("conformance/race".into(), json!({ "key": w })),
        |_| cache.clone(),
    )
    .await?;
    ensure!(
        written.len() as u64 == WRITERS * WRITES_EACH,
        "only {} writes succeeded",
        written.len()
    );
    check_written(&cache, &written).await?;
    let engine = engine(&cache, 1024);
    for w in 0..WRITERS {
        let inputs = json!({ "key": w });
        let last = written
            .iter()
            .rev()
            .find(|(_, i, _, _)| *i == inputs)
            .map(|(_, _, o, _)| o.clone());
        let row = cache
            .get_row(&RowKey::new("conformance/race", &inputs)?)
            .await?
            .map(|r| r.output);
        ensure!(
            row == last,
            "key {w} holds {row:?}, its writer last wrote {last:?}"
        );
        ensure!(
            engine.get("conformance/race", &inputs).await?.is_some(),
            "key {w} misses"
        );
    }
    Ok(())
}

/// Invariant 8: half the writers have their row commits fail (and clean up their blobs) while the other
/// half succeed on the same and on different keys: no successful writer's blob is ever deleted.
pub async fn concurrent_cleanup_spares_other_writers(cache: Backend) -> CaseResult {
    let failing: Backend = Arc::new(FailingRows::new(cache.clone(), true));
    let written = run_writers(
        &cache,
        |w| ("conformance/race".into(), json!({ "key": w % 4 })),
        |w| {
            if w % 2 == 0 {
                failing.clone()
            } else {
                cache.clone()
            }
        },
    )
    .await?;
    ensure!(
        written.len() as u64 == WRITERS / 2 * WRITES_EACH,
        "{} writes succeeded",
        written.len()
    );
    check_written(&cache, &written).await?;
    if has(&cache, Cap::StreamWrite) {
        let refs: HashSet<String> = written
            .iter()
            .filter_map(|(_, _, o, _)| CacheRef::from_value(o).map(|r| r.reference))
            .collect();
        let blobs: HashSet<String> = published(&cache).await?.into_iter().collect();
        ensure!(
            blobs == refs,
            "blobs left {} differ from successful refs {}",
            blobs.len(),
            refs.len()
        );
    }
    Ok(())
}

// --------------------------------------------------------------------------------- capabilities, stats

/// Invariant 9: every claimed capability works and every unclaimed one returns `Unsupported`.
pub async fn capabilities_are_truthful(cache: Backend) -> CaseResult {
    for cap in ALL_CAPS {
        let result = call(&cache, *cap).await;
        match (has(&cache, *cap), result) {
            (true, Ok(())) | (false, Err(Error::Unsupported { .. })) => {}
            (claimed, other) => {
                return Err(Failure(format!(
                    "{cap:?} claimed={claimed} but the call returned {other:?}"
                )));
            }
        }
    }
    Ok(())
}

/// `touch_rows` moves a row's access time forward (never back) and touches nothing else; unknown keys
/// are ignored. Backends without access tracking report `None` and refuse the call.
pub async fn touch_rows_moves_last_access(cache: Backend) -> CaseResult {
    gate!(cache, &[Cap::AccessTracking]);
    let (a, b) = (key("conformance/lru", 1)?, key("conformance/lru", 2)?);
    cache.save_row(&a, &json!("a")).await?;
    cache.save_row(&b, &json!("b")).await?;
    let access = |cache: Backend, k: RowKey| async move {
        let rows = cache.list_rows().await?;
        Ok::<_, Failure>(
            rows.into_iter()
                .find(|r| r.key == k)
                .and_then(|r| r.last_access),
        )
    };
    let before_b = access(cache.clone(), b.clone()).await?;
    ensure!(
        before_b.is_some(),
        "a tracking backend must report last_access for a row never read (its commit time), got None"
    );
    let later = SystemTime::now() + Duration::from_secs(3600);
    let ghost = key("conformance/lru", 404)?;
    cache.touch_rows(&[a.clone(), ghost.clone()], later).await?;
    let after_a = access(cache.clone(), a.clone()).await?;
    ensure!(
        after_a.is_some_and(|t| t + Duration::from_secs(1) >= later),
        "touched row shows {after_a:?}"
    );
    ensure!(
        access(cache.clone(), b.clone()).await? == before_b,
        "an untouched row's access time moved"
    );
    ensure!(
        cache.get_row(&ghost).await?.is_none(),
        "touching an unknown key created a row"
    );
    cache
        .touch_rows(std::slice::from_ref(&a), SystemTime::now())
        .await?;
    let again = access(cache.clone(), a).await?;
    ensure!(
        again.is_some_and(|t| t + Duration::from_secs(1) >= later),
        "access time moved back: {again:?}"
    );
    Ok(())
}

/// The inventory (`outcache stats`, from the listings) counts rows and blobs and their bytes.
pub async fn stats_count_rows_and_blobs(cache: Backend) -> CaseResult {
    let stats = || async { crate::janitor::inventory(cache.as_ref(), 0).await };
    let empty = stats().await?;
    ensure!(
        empty.rows == 0 && empty.blobs == 0,
        "a fresh cache has {empty:?}"
    );
    cache
        .save_row(&key("conformance/stats", 1)?, &json!("one"))
        .await?;
    cache
        .save_row(&key("conformance/stats", 2)?, &json!("two"))
        .await?;
    let mut expected_blobs = 0;
    if has(&cache, Cap::StreamWrite) {
        write(&cache, &pattern(12_345, 1), 1000).await?;
        expected_blobs = 1;
    }
    let stats = stats().await?;
    ensure!(stats.rows == 2 && stats.row_bytes > 0, "rows: {stats:?}");
    ensure!(stats.blobs == expected_blobs, "blobs: {stats:?}");
    ensure!(
        stats.blob_bytes == 12_345 * expected_blobs,
        "blob bytes: {stats:?}"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------ engine

/// A binary output below the reference threshold is stored inline, byte-identical, with its mime.
pub async fn engine_small_output_goes_inline(cache: Backend) -> CaseResult {
    let engine = Cache::new(cache.clone());
    let data = pattern(1024, 5);
    let inputs = json!({"small": true});
    let blob = BlobOptions {
        mime: Some("text/plain".into()),
        port: None,
    };
    let stored = engine
        .put_stream(
            "conformance/engine",
            &inputs,
            stream_of(data.clone(), 100),
            blob,
        )
        .await?;
    let decoded =
        InlineBinary::decode(&stored)?.ok_or(Failure(format!("not an envelope: {stored}")))?;
    ensure!(
        decoded.bytes == data && decoded.mime.as_deref() == Some("text/plain"),
        "envelope differs"
    );
    let got = engine.get("conformance/engine", &inputs).await?;
    ensure!(got.as_ref() == Some(&stored), "get returned {got:?}");
    ensure!(
        published(&cache).await?.is_empty(),
        "a small output created a blob"
    );
    Ok(())
}

/// A large binary output becomes a verified CacheRef (or, on a backend without blob streaming, inline
/// up to the inline limit and a clear error above it); small refs are hydrated by `get`.
pub async fn engine_large_output_becomes_verified_ref(cache: Backend) -> CaseResult {
    let engine = Cache::new(cache.clone());
    let data = pattern(200_000, 6);
    let inputs = json!({"large": true});
    let stored = engine
        .put_stream(
            "conformance/engine",
            &inputs,
            stream_of(data.clone(), 8192),
            BlobOptions::default(),
        )
        .await?;
    if !has(&cache, Cap::StreamWrite) {
        let inline =
            InlineBinary::decode(&stored)?.ok_or(Failure(format!("not inline: {stored}")))?;
        ensure!(inline.bytes == data, "inline bytes differ");
        let tight =
            Cache::with_options(cache.clone(), CacheOptions::default().inline_limit(100_000));
        let err = tight
            .put_stream(
                "conformance/engine",
                &inputs,
                stream_of(data, 8192),
                BlobOptions::default(),
            )
            .await;
        ensure!(
            matches!(err, Err(Error::TooLarge { .. })),
            "over the inline limit: {err:?}"
        );
        return Ok(());
    }
    let r = CacheRef::from_value(&stored).ok_or(Failure(format!("not a ref: {stored}")))?;
    ensure!(
        r.size == Some(200_000) && r.sha256.as_deref() == Some(sha256_hex(&data).as_str()),
        "ref {r:?}"
    );
    let got = engine.get("conformance/engine", &inputs).await?;
    ensure!(
        got.as_ref() == Some(&stored),
        "get above the threshold returned {got:?}"
    );
    ensure!(
        engine.read(&r).await?.as_ref() == Some(&data),
        "read differs"
    );
    let streamed = engine
        .open_stream(&r)
        .await?
        .ok_or(Failure("open_stream missed".into()))?;
    ensure!(
        crate::blob::collect(streamed).await? == data,
        "open_stream differs"
    );
    let hydrating = Cache::with_options(
        cache.clone(),
        CacheOptions::default().reference_threshold(1 << 20),
    );
    let hydrated = hydrating
        .get("conformance/engine", &inputs)
        .await?
        .unwrap_or_default();
    let inline =
        InlineBinary::decode(&hydrated)?.ok_or(Failure(format!("not hydrated: {hydrated}")))?;
    ensure!(inline.bytes == data, "hydrated bytes differ");
    Ok(())
}

/// `resolve` hydrates branded refs anywhere in a value, leaves unbranded `$ref` alone and reports a
/// dangling ref instead of inventing bytes.
pub async fn engine_resolve_hydrates_branded_refs_only(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let engine = Cache::new(cache.clone());
    let (a, b) = (pattern(70_000, 1), pattern(10, 2));
    let (ra, rb) = (write(&cache, &a, 7000).await?, write(&cache, &b, 3).await?);
    let schema = json!({"$ref": "#/definitions/image"});
    let value = json!({"a": ra.to_value(), "list": [1, rb.to_value()], "schema": schema});
    let resolved = engine.resolve(&value).await?;
    let decode = |v: &Value| InlineBinary::decode(v).ok().flatten().map(|i| i.bytes);
    ensure!(
        decode(&resolved["a"]) == Some(a),
        "a not hydrated: {}",
        resolved["a"]
    );
    ensure!(
        decode(&resolved["list"][1]) == Some(b),
        "list[1] not hydrated"
    );
    ensure!(
        resolved["schema"] == schema && resolved["list"][0] == 1,
        "plain data changed: {resolved}"
    );
    cache.delete_blob(&rb.reference).await?;
    let dangling = engine.resolve(&value).await;
    ensure!(
        matches!(dangling, Err(Error::DanglingRef { ref reference }) if *reference == rb.reference),
        "got {dangling:?}"
    );
    Ok(())
}

#[path = "safety.rs"]
mod safety;
pub use safety::*;
