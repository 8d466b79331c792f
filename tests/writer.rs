//! The push-style writer: backpressure by a byte high-water mark, and a waiting producer is always
//! released — by abort, by the backend's failure, or by finishing.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Sink, SinkMode};
use outcache::{BlobOptions, Cache, CacheOptions, CacheRef, Error, OutputCache};
use serde_json::json;

const MARK: usize = 256 * 1024;
const CHUNK: usize = 64 * 1024;

fn engine(backend: Arc<dyn OutputCache>) -> Cache {
    // Threshold 0: every output streams into a blob, so the sink sees every chunk.
    Cache::with_options(
        backend,
        CacheOptions::default()
            .reference_threshold(0)
            .high_water_mark(MARK),
    )
}

#[tokio::test]
async fn a_fast_producer_into_a_slow_backend_never_buffers_more_than_the_mark_plus_a_chunk() {
    let backend: Arc<dyn OutputCache> =
        Arc::new(Sink::new(SinkMode::Slow(Duration::from_millis(2))));
    let cache = engine(backend);
    let mut writer = cache.writer("slow/sink", &json!({}), BlobOptions::default());
    let mut expected = Vec::new();
    let mut peak = 0;
    for i in 0..64u8 {
        let chunk = Bytes::from(vec![i; CHUNK]);
        expected.extend_from_slice(&chunk);
        writer.push(chunk).await.unwrap();
        peak = peak.max(writer.buffered());
    }
    assert!(
        peak <= MARK + CHUNK,
        "buffered {peak} bytes with a mark of {MARK}"
    );
    assert!(
        peak >= MARK / 2,
        "the producer never got ahead ({peak} bytes): the test proves nothing"
    );
    let stored = writer.finish().await.unwrap();
    let r = CacheRef::from_value(&stored).unwrap();
    assert_eq!(cache.read(&r).await.unwrap().unwrap(), expected);
}

#[tokio::test]
async fn abort_while_parked_returns_promptly_and_publishes_nothing() {
    let backend: Arc<dyn OutputCache> = Arc::new(Sink::new(SinkMode::Stall));
    let cache = engine(backend.clone());
    let mut writer = cache.writer("stalled/sink", &json!({}), BlobOptions::default());
    // The engine takes the first chunk (to decide inline or blob), then the stalled sink takes nothing.
    for _ in 0..MARK / CHUNK + 1 {
        writer.push(Bytes::from(vec![1; CHUNK])).await.unwrap();
    }
    let waiting = tokio::time::timeout(
        Duration::from_millis(100),
        writer.push(Bytes::from(vec![2; CHUNK])),
    )
    .await;
    assert!(
        waiting.is_err(),
        "the producer was not parked at the mark: {waiting:?}"
    );
    let handle = writer.abort_handle();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        handle.abort();
    });
    let started = Instant::now();
    let parked = writer.push(Bytes::from(vec![2; CHUNK])).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "abort took {:?}",
        started.elapsed()
    );
    assert!(matches!(parked, Err(Error::Stream { .. })), "{parked:?}");
    assert!(
        writer.push(Bytes::from_static(b"x")).await.is_err(),
        "pushes after abort must fail"
    );
    assert!(writer.finish().await.is_err());
    assert!(backend.list_blobs().await.unwrap().is_empty());
    assert!(
        cache
            .get("stalled/sink", &json!({}))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_sink_failure_before_the_first_read_wakes_the_producer_with_the_error() {
    let backend: Arc<dyn OutputCache> = Arc::new(Sink::new(SinkMode::FailFast));
    let cache = engine(backend);
    let mut writer = cache.writer("failing/sink", &json!({}), BlobOptions::default());
    let started = Instant::now();
    let mut result = Ok(());
    for _ in 0..(4 * MARK / CHUNK) {
        result = writer.push(Bytes::from(vec![3; CHUNK])).await;
        if result.is_err() {
            break;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the producer hung for {:?}",
        started.elapsed()
    );
    match result {
        Err(e) => assert!(e.to_string().contains("injected sink failure"), "{e}"),
        Ok(()) => panic!("pushing 4x the mark into a failed sink never failed"),
    }
}

#[tokio::test]
async fn dropping_a_writer_publishes_nothing() {
    let backend: Arc<dyn OutputCache> = Arc::new(outcache::backends::memory::MemoryCache::new());
    let cache = engine(backend.clone());
    let mut writer = cache.writer("dropped", &json!({}), BlobOptions::default());
    writer.push(Bytes::from(vec![1; CHUNK])).await.unwrap();
    drop(writer);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(backend.list_blobs().await.unwrap().is_empty());
    assert!(cache.get("dropped", &json!({})).await.unwrap().is_none());
}

#[tokio::test]
async fn small_pushed_outputs_go_inline() {
    let backend: Arc<dyn OutputCache> = Arc::new(outcache::backends::memory::MemoryCache::new());
    let cache = Cache::new(backend);
    let mut writer = cache.writer(
        "small",
        &json!({}),
        BlobOptions {
            mime: Some("text/plain".into()),
            port: None,
        },
    );
    writer.push(Bytes::from_static(b"hello ")).await.unwrap();
    writer.push(Bytes::from_static(b"world")).await.unwrap();
    let stored = writer.finish().await.unwrap();
    let inline = outcache::InlineBinary::decode(&stored).unwrap().unwrap();
    assert_eq!(&inline.bytes[..], b"hello world");
}
