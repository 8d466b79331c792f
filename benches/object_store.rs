//! Object-store backend against raw object_store on the same local S3-compatible server, in the same run:
//! a 256 MiB streaming put (raw: `WriteMultipart` with the same part size and parts in flight) and a
//! streaming get (raw: `get().into_stream()`), both consuming/producing 1 MiB chunks.
//!
//! Needs a server: `eval "$(scripts/s3-server.sh start)"; cargo bench --bench object_store`.

#[path = "common.rs"]
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Samples;
use criterion::{Criterion, Throughput};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use outcache::backends::object::{PART_SIZE, PARTS_IN_FLIGHT, cloud};
use outcache::{BlobMeta, OutputCache};

const MIB: usize = 256;

fn main() {
    let Ok(url) = std::env::var("OUTCACHE_S3_URL") else {
        // `cargo bench` runs every bench; this one needs a server, so say how and step aside.
        eprintln!(
            "object_store bench skipped: OUTCACHE_S3_URL is not set (eval \"$(scripts/s3-server.sh start)\")"
        );
        return;
    };
    let location = outcache::config::Location::parse(&url).unwrap();
    let outcache::config::Location::Cloud {
        bucket, options, ..
    } = location
    else {
        panic!("not s3")
    };
    let cache = cloud::open(cloud::Cloud::S3, &bucket, "bench", &options.0).unwrap();
    let store = cache.store().clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let base = Bytes::from(
        (0..2 << 20)
            .map(|i: u32| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let chunks: Vec<Bytes> = (0..MIB)
        .map(|i| base.slice(i * 4099 % (1 << 20)..i * 4099 % (1 << 20) + (1 << 20)))
        .collect();
    let samples = Samples::default();
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("s3_256MiB");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Bytes((MIB << 20) as u64));

    let raw_path = Path::from("bench/raw.bin");
    group.bench_function("raw_multipart_put", |b| {
        b.iter(|| {
            samples.time("put", "raw", || {
                rt.block_on(async {
                    let upload = store.put_multipart(&raw_path).await.unwrap();
                    let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                    for c in &chunks {
                        w.wait_for_capacity(PARTS_IN_FLIGHT).await.unwrap();
                        w.put(c.clone());
                    }
                    w.finish().await.unwrap();
                })
            })
        })
    });
    let mut last_ref = String::new();
    group.bench_function("outcache_write_blob", |b| {
        b.iter(|| {
            let stream = futures::stream::iter(chunks.clone().into_iter().map(Ok)).boxed();
            let (_, r) = samples.time("put", "outcache", || {
                rt.block_on(cache.write_blob(&BlobMeta::default(), stream))
                    .unwrap()
            });
            if !last_ref.is_empty() {
                rt.block_on(cache.delete_blob(&last_ref)).unwrap();
            }
            last_ref = r.reference;
        })
    });
    group.bench_function("raw_get", |b| {
        b.iter(|| {
            samples.time("get", "raw", || {
                rt.block_on(async {
                    let mut s = store.get(&raw_path).await.unwrap().into_stream();
                    let mut n = 0;
                    while let Some(c) = s.next().await {
                        n += c.unwrap().len();
                    }
                    assert_eq!(n, MIB << 20);
                })
            })
        })
    });
    group.bench_function("outcache_open_blob", |b| {
        b.iter(|| {
            samples.time("get", "outcache", || {
                rt.block_on(async {
                    let mut s = cache.open_blob(&last_ref, None).await.unwrap().unwrap();
                    let mut n = 0;
                    while let Some(c) = s.next().await {
                        n += c.unwrap().len();
                    }
                    assert_eq!(n, MIB << 20);
                })
            })
        })
    });
    group.finish();
    c.final_summary();
    rt.block_on(async {
        let _ = cache.delete_blob(&last_ref).await;
        let _ = store.delete(&raw_path).await;
    });
    let mb = |_: &str| (MIB as f64 * 1.048576, "MB");
    samples.print_ratio(
        "S3 256 MiB (target ratio >= 0.90)",
        &["put", "get"],
        "raw",
        "outcache",
        mb,
    );
}
