//! fs backend streaming write (durable, SHA-256 on) against the raw baseline measured in the same run:
//! std::fs writes the same bytes to a temp file, fsyncs it, renames it into place and fsyncs the
//! directory. Prints the outcache/raw throughput ratio per size at the end (target ≥ 0.9).
//!
//! Run: `cargo bench --bench fs_write` (set `OUTCACHE_BENCH_DIR` to measure another disk).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use futures::StreamExt;
use outcache::backends::fs::{FsCache, FsOptions};
use outcache::{BlobMeta, OutputCache};
use sha2::{Digest, Sha256};

const CHUNK: usize = 1 << 20;
const SIZES_MIB: [usize; 2] = [64, 256];

type Samples = Arc<Mutex<BTreeMap<(usize, &'static str), Vec<Duration>>>>;

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

        for (name, label, hash) in [
            ("raw_write_fsync_rename", "raw", false),
            ("raw_sha256_write_fsync_rename", "raw+sha", true),
        ] {
            let s = samples.clone();
            group.bench_with_input(BenchmarkId::new(name, mib), &data, |b, data| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        raw_durable_write(&raw_dir, data, hash);
                        let took = start.elapsed();
                        total += took;
                        s.lock()
                            .unwrap()
                            .entry((mib, label))
                            .or_default()
                            .push(took);
                        fs::remove_file(raw_dir.join("raw.bin")).unwrap();
                    }
                    total
                })
            });
        }

        let s = samples.clone();
        group.bench_with_input(
            BenchmarkId::new("outcache_write_blob", mib),
            &data,
            |b, data| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let stream =
                            futures::stream::iter(data.clone().into_iter().map(Ok)).boxed();
                        let start = Instant::now();
                        let r = rt
                            .block_on(cache.write_blob(&BlobMeta::default(), stream))
                            .unwrap();
                        let took = start.elapsed();
                        total += took;
                        s.lock()
                            .unwrap()
                            .entry((mib, "outcache"))
                            .or_default()
                            .push(took);
                        rt.block_on(cache.delete_blob(&r.reference)).unwrap();
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let samples: Samples = Arc::default();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &samples);
    c.final_summary();
    let mut samples = samples.lock().unwrap();
    println!(
        "\nmedian MB/s   raw    raw+sha256   outcache   outcache/raw (target >= 0.90)   outcache/raw+sha256"
    );
    for mib in SIZES_MIB {
        let mut take = |label| {
            samples
                .remove(&(mib, label))
                .map(|mut v: Vec<Duration>| median(&mut v))
        };
        let (Some(raw), Some(raw_sha), Some(ours)) =
            (take("raw"), take("raw+sha"), take("outcache"))
        else {
            continue;
        };
        let rate = |d: Duration| (mib * CHUNK) as f64 / 1e6 / d.as_secs_f64();
        println!(
            "{mib:>4} MiB  {:>9.0}  {:>11.0}  {:>9.0}   {:>27.2}   {:>19.2}",
            rate(raw),
            rate(raw_sha),
            rate(ours),
            raw.as_secs_f64() / ours.as_secs_f64(),
            raw_sha.as_secs_f64() / ours.as_secs_f64()
        );
    }
}
