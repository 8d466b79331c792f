//! fs backend streaming write (durable, SHA-256 on) against the raw baseline measured in the same run:
//! std::fs writes the same bytes to a temp file, fsyncs it, renames it into place and fsyncs the
//! directory. Prints the outcache/raw throughput ratio per size at the end (target ≥ 0.9).
//!
//! Run: `cargo bench --bench fs_write` (set `OUTCACHE_BENCH_DIR` to measure another disk).

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[path = "common.rs"]
mod common;

use bytes::Bytes;
use common::Samples;
use criterion::{BenchmarkId, Criterion, Throughput};
use futures::StreamExt;
use outcache::backends::fs::{FsCache, FsOptions};
use outcache::{BlobMeta, OutputCache};
use sha2::{Digest, Sha256};

const CHUNK: usize = 1 << 20;
const SIZES_MIB: [usize; 2] = [64, 256];

fn chunks(mib: usize) -> Vec<Bytes> {
    let base: Vec<u8> = (0..CHUNK * 2).map(|i| (i * 131 % 251) as u8).collect();
    let base = Bytes::from(base);
    (0..mib)
        .map(|i| base.slice((i * 4099) % CHUNK..(i * 4099) % CHUNK + CHUNK))
        .collect()
}

/// The raw baseline; with `hash`, SHA-256 of each chunk is computed in the same thread before it is
/// written (what a straightforward integrity-checking writer does).
fn raw_durable_write(dir: &Path, data: &[Bytes], hash: bool) {
    let tmp = dir.join("raw.tmp");
    let dest = dir.join("raw.bin");
    let mut f = File::create(&tmp).unwrap();
    let mut hasher = Sha256::new();
    for c in data {
        if hash {
            hasher.update(c);
        }
        f.write_all(c).unwrap();
    }
    std::hint::black_box(hasher.finalize());
    f.sync_all().unwrap();
    drop(f);
    fs::rename(&tmp, &dest).unwrap();
    File::open(dir).unwrap().sync_all().unwrap();
}

fn bench(c: &mut Criterion, samples: &Samples) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let base = std::env::var_os("OUTCACHE_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    let raw_dir = dir.path().join("raw");
    fs::create_dir_all(&raw_dir).unwrap();
    let cache = Arc::new(FsCache::open(dir.path().join("cache"), FsOptions::default()).unwrap());

    let mut group = c.benchmark_group("fs_streaming_write");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(2));
    for mib in SIZES_MIB {
        let data = chunks(mib);
        group.throughput(Throughput::Bytes((mib * CHUNK) as u64));

        let case = format!("{mib}MiB");
        for (name, label, hash) in [
            ("raw_write_fsync_rename", "raw", false),
            ("raw_sha256_write_fsync_rename", "raw+sha256", true),
        ] {
            group.bench_with_input(BenchmarkId::new(name, mib), &data, |b, data| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += samples
                            .time(&case, label, || raw_durable_write(&raw_dir, data, hash))
                            .0;
                        fs::remove_file(raw_dir.join("raw.bin")).unwrap();
                    }
                    total
                })
            });
        }

        group.bench_with_input(
            BenchmarkId::new("outcache_write_blob", mib),
            &data,
            |b, data| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let stream =
                            futures::stream::iter(data.clone().into_iter().map(Ok)).boxed();
                        let (took, r) = samples.time(&case, "outcache", || {
                            rt.block_on(cache.write_blob(&BlobMeta::default(), stream))
                                .unwrap()
                        });
                        total += took;
                        rt.block_on(cache.delete_blob(&r.reference)).unwrap();
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

fn main() {
    let samples = Samples::default();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &samples);
    c.final_summary();
    let cases: Vec<String> = SIZES_MIB.iter().map(|m| format!("{m}MiB")).collect();
    let cases: Vec<&str> = cases.iter().map(String::as_str).collect();
    let mb = |case: &str| {
        (
            case.trim_end_matches("MiB").parse::<f64>().unwrap() * 1.048576,
            "MB",
        )
    };
    samples.print_ratio(
        "fs streaming write (target ratio >= 0.90)",
        &cases,
        "raw",
        "outcache",
        mb,
    );
    samples.print_ratio("fs streaming write", &cases, "raw+sha256", "outcache", mb);
}
