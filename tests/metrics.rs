//! The engine's counters (`Cache::metrics`) count what happened: hits, misses, the misses a dangling ref
//! caused, puts, bytes in and out, verification failures; clones share them.

use std::sync::Arc;

use futures::StreamExt;
use outcache::backends::memory::MemoryCache;
use outcache::{BlobOptions, Cache, CacheOptions, CacheRef, Metrics, OutputCache};
use serde_json::json;

fn bytes(n: usize) -> outcache::ByteStream {
    futures::stream::iter([Ok(bytes::Bytes::from(vec![7u8; n]))]).boxed()
}

#[tokio::test]
async fn counters_count_what_happened() {
    let backend: Arc<dyn OutputCache> = Arc::new(MemoryCache::new());
    let cache = Cache::with_options(
        backend.clone(),
        CacheOptions::default().reference_threshold(1024),
    );
    cache.put("t", &json!(1), &json!("one")).await.unwrap();
    assert!(cache.get("t", &json!(1)).await.unwrap().is_some());
    assert!(cache.get("t", &json!(2)).await.unwrap().is_none());
    let small = cache
        .put_stream("b", &json!(0), bytes(100), BlobOptions::default())
        .await
        .unwrap();
    assert!(
        CacheRef::from_value(&small).is_none(),
        "100 bytes go inline"
    );
    let stored = cache
        .put_stream("b", &json!(1), bytes(5000), BlobOptions::default())
        .await
        .unwrap();
    let r = CacheRef::from_value(&stored).unwrap();
    assert_eq!(cache.read(&r).await.unwrap().unwrap().len(), 5000);
    let mut lying = r.clone();
    lying.sha256 = Some("0".repeat(64));
    assert!(cache.read(&lying).await.is_err());
    backend.delete_blob(&r.reference).await.unwrap();
    assert!(cache.clone().get("b", &json!(1)).await.unwrap().is_none());
    assert_eq!(
        cache.metrics(),
        Metrics {
            hits: 1,
            misses: 2,
            dangling_misses: 1,
            puts: 3,
            bytes_in: 5100,
            bytes_out: 5000,
            verification_failures: 1,
        }
    );
}
