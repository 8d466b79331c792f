//! Failing producers at random offsets, on every backend (250 trials each, over 1000 in all): the write
//! fails with the producer's error as its cause, nothing is published, no temp is left behind, and
//! every earlier blob is still whole.
#![cfg(feature = "conformance")]

use futures::StreamExt;
use outcache::conformance::{Fixture, fixtures};
use outcache::{BlobMeta, BlobState, Error};

const TRIALS: usize = 250;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn failing_streams(fixture: Fixture, seed: u64) {
    let cache = fixture.cache();
    let keeper = cache
        .write_blob(
            &BlobMeta::default(),
            futures::stream::iter([Ok(bytes::Bytes::from(vec![7u8; 100_000]))]).boxed(),
        )
        .await
        .unwrap();
    let mut rng = seed | 1;
    for trial in 0..TRIALS {
        let chunk = 1 + (xorshift(&mut rng) % 200_000) as usize;
        let fail_at = (xorshift(&mut rng) % 6_000_000) as usize;
        let chunks = fail_at.div_ceil(chunk);
        let stream = futures::stream::iter((0..chunks).map(move |i| {
            Ok(bytes::Bytes::from(vec![
                i as u8;
                chunk.min(fail_at - i * chunk)
            ]))
        }))
        .chain(futures::stream::once(async move {
            Err(Error::stream(format!("producer broke at byte {fail_at}")))
        }))
        .boxed();
        match cache.write_blob(&BlobMeta::default(), stream).await {
            Err(e @ Error::Stream { .. }) => {
                assert!(
                    e.to_string()
                        .contains(&format!("producer broke at byte {fail_at}")),
                    "{cache}: lost the cause: {e}"
                )
            }
            other => panic!("{cache}, trial {trial}: expected the producer's error, got {other:?}"),
        }
        let entries = cache.list_blobs().await.unwrap();
        let published = entries
            .iter()
            .filter(|e| e.state == BlobState::Published)
            .count();
        let temps = entries
            .iter()
            .filter(|e| e.state == BlobState::Temp)
            .count();
        assert_eq!(
            (published, temps),
            (1, 0),
            "{cache}, trial {trial} (fail at {fail_at}, chunks of {chunk}): {entries:?}"
        );
    }
    assert_eq!(
        cache
            .read_blob(&keeper.reference)
            .await
            .unwrap()
            .map(|b| b.len()),
        Some(100_000)
    );
}

fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {s}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_streams_memory() {
    failing_streams(fixtures::memory(), seed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_streams_fs() {
    failing_streams(fixtures::fs_temp(), seed()).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_streams_sqlite() {
    failing_streams(fixtures::sqlite_temp(), seed()).await;
}

#[cfg(feature = "object-store")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_streams_object_store() {
    use std::sync::Arc;
    let store = outcache::backends::object::ObjectCache::new(
        Arc::new(object_store::memory::InMemory::new()),
        object_store::path::Path::from("faults"),
        "memory",
    );
    failing_streams(Fixture::new(Arc::new(store)), seed()).await;
}
