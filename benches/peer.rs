//! The fs backend against raw filesystem baselines and against the peer, cacache 13 (zkat's cacache-rs),
//! all in the same run, at 1 KiB, 1 MiB and 64 MiB:
//!
//! - blob write, durable: `write_blob` vs write + fsync + rename + dir fsync;
//! - blob write, not durable: `write_blob` on a `durable=false` cache vs `cacache::write_sync` (which never
//!   fsyncs) — the matching durability;
//! - blob read, verified: `Cache::open_stream` (SHA-256 checked) vs raw read + SHA-256, and vs
//!   `cacache::read_sync` (which verifies too);
//! - blob read, unverified: `open_blob` vs raw read into a reused buffer;
//! - small rows (1 KiB JSON), durable put and get: `save_row` / `get_row` vs an atomic file write
//!   (temp, fsync, rename, dir fsync) / `fs::read` + JSON parse.
//!
//! Run: `cargo bench --bench peer`. Prints ratio tables at the end.

#[path = "common.rs"]
mod common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::Samples;
use criterion::Criterion;
use futures::StreamExt;
use outcache::backends::fs::{FsCache, FsOptions};
use outcache::{BlobMeta, Cache, CacheRef, OutputCache, RowKey};
use serde_json::json;
use sha2::{Digest, Sha256};

const SIZES: [(usize, &str); 3] = [(1 << 10, "1KiB"), (1 << 20, "1MiB"), (64 << 20, "64MiB")];

fn payload(size: usize) -> Vec<Bytes> {
    let data: Vec<u8> = (0..size).map(|i| (i * 131 % 251) as u8).collect();
    let data = Bytes::from(data);
    (0..size)
        .step_by(1 << 20)
        .map(|i| data.slice(i..(i + (1 << 20)).min(size)))
        .collect()
}

fn raw_write(dir: &Path, chunks: &[Bytes], durable: bool) {
    let (tmp, dest) = (dir.join("raw.tmp"), dir.join("raw.bin"));
    let mut f = File::create(&tmp).unwrap();
    for c in chunks {
        f.write_all(c).unwrap();
    }
    if durable {
        f.sync_all().unwrap();
    }
    drop(f);
    fs::rename(&tmp, &dest).unwrap();
    if durable {
        File::open(dir).unwrap().sync_all().unwrap();
    }
}

fn raw_read(path: &Path, buf: &mut [u8], hash: bool) -> usize {
    let mut f = File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut total = 0;
    loop {
        let n = f.read(buf).unwrap();
        if n == 0 {
            break;
        }
        if hash {
            hasher.update(&buf[..n]);
        }
        total += n;
    }
    std::hint::black_box(hasher.finalize());
    total
}

fn main() {
    let samples = Samples::default();
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let raw_dir = dir.path().join("raw");
    fs::create_dir_all(&raw_dir).unwrap();
    let durable: Arc<dyn OutputCache> =
        Arc::new(FsCache::open(dir.path().join("durable"), FsOptions::default()).unwrap());
    let scratch: Arc<dyn OutputCache> = Arc::new(
        FsCache::open(
            dir.path().join("scratch"),
            FsOptions::default().durable(false),
        )
        .unwrap(),
    );
    let engine = Cache::new(durable.clone());
    let cacache_dir = dir.path().join("cacache");
    let mut buf = vec![0u8; 1 << 20];

    let mut group = c.benchmark_group("peer");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for (size, label) in SIZES {
        let chunks = payload(size);
        let stream = || futures::stream::iter(chunks.clone().into_iter().map(Ok)).boxed();
        let s = &samples;

        group.bench_function(format!("write_durable_raw/{label}"), |b| {
            b.iter(|| {
                s.time(&format!("write {label}"), "raw", || {
                    raw_write(&raw_dir, &chunks, true)
                })
            })
        });
        group.bench_function(format!("write_durable_outcache/{label}"), |b| {
            b.iter(|| {
                let (_, r) = s.time(&format!("write {label}"), "outcache", || {
                    rt.block_on(durable.write_blob(&BlobMeta::default(), stream()))
                        .unwrap()
                });
                rt.block_on(durable.delete_blob(&r.reference)).unwrap();
            })
        });
        group.bench_function(format!("write_scratch_cacache/{label}"), |b| {
            let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            b.iter(|| {
                s.time(&format!("scratch write {label}"), "cacache", || {
                    cacache::write_sync(&cacache_dir, "k", &whole).unwrap()
                })
            })
        });
        group.bench_function(format!("write_scratch_outcache/{label}"), |b| {
            b.iter(|| {
                let (_, r) = s.time(&format!("scratch write {label}"), "outcache", || {
                    rt.block_on(scratch.write_blob(&BlobMeta::default(), stream()))
                        .unwrap()
                });
                rt.block_on(scratch.delete_blob(&r.reference)).unwrap();
            })
        });

        // Reads: one blob of each kind, read repeatedly (page cache warm, as a cache hit is).
        raw_write(&raw_dir, &chunks, false);
        let raw_path = raw_dir.join("raw.bin");
        let r: CacheRef = rt
            .block_on(durable.write_blob(&BlobMeta::default(), stream()))
            .unwrap();
        let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        cacache::write_sync(&cacache_dir, "read", &whole).unwrap();
        let consume = |stream: outcache::ByteStream| async move {
            let mut s = stream;
            let mut n = 0;
            while let Some(c) = s.next().await {
                n += c.unwrap().len();
            }
            n
        };
        group.bench_function(format!("read_verified_raw_sha/{label}"), |b| {
            b.iter(|| {
                s.time(&format!("verified read {label}"), "raw+sha256", || {
                    raw_read(&raw_path, &mut buf, true)
                })
            })
        });
        group.bench_function(format!("read_verified_outcache/{label}"), |b| {
            b.iter(|| {
                s.time(&format!("verified read {label}"), "outcache", || {
                    rt.block_on(async {
                        consume(engine.open_stream(&r).await.unwrap().unwrap()).await
                    })
                })
            })
        });
        group.bench_function(format!("read_verified_cacache/{label}"), |b| {
            b.iter(|| {
                s.time(&format!("verified read {label}"), "cacache", || {
                    cacache::read_sync(&cacache_dir, "read").unwrap().len()
                })
            })
        });
        group.bench_function(format!("read_raw/{label}"), |b| {
            b.iter(|| {
                s.time(&format!("unverified read {label}"), "raw", || {
                    raw_read(&raw_path, &mut buf, false)
                })
            })
        });
        group.bench_function(format!("read_unverified_outcache/{label}"), |b| {
            b.iter(|| {
                s.time(&format!("unverified read {label}"), "outcache", || {
                    rt.block_on(async {
                        consume(
                            durable
                                .open_blob(&r.reference, None)
                                .await
                                .unwrap()
                                .unwrap(),
                        )
                        .await
                    })
                })
            })
        });
    }

    // Small rows, durable.
    let output = json!({ "summary": "x".repeat(900), "n": 1 });
    let text = serde_json::to_vec(&output).unwrap();
    let keys: Vec<RowKey> = (0..100)
        .map(|i| RowKey::new("bench/row", &json!({ "i": i })).unwrap())
        .collect();
    let mut n = 0usize;
    let s = &samples;
    // Interleaved, taking turns at going first: a durable write's cost swings between writes seconds
    // apart on this disk (MEASURED.md), so contenders timed in separate phases compare two disks.
    group.bench_function("row_put_raw_and_outcache_interleaved", |b| {
        b.iter(|| {
            n += 1;
            let raw = || {
                s.time("row put", "raw", || {
                    raw_write(&raw_dir, &[Bytes::from(text.clone())], true)
                })
            };
            let ours = || {
                s.time("row put", "outcache", || {
                    rt.block_on(durable.save_row(&keys[n % 100], &output))
                        .unwrap()
                })
            };
            if n % 2 == 0 {
                raw();
                ours();
            } else {
                ours();
                raw();
            }
        })
    });
    for k in &keys {
        rt.block_on(durable.save_row(k, &output)).unwrap();
    }
    group.bench_function("row_get_raw_read_parse", |b| {
        b.iter(|| {
            s.time("row get", "raw", || {
                let v: serde_json::Value =
                    serde_json::from_slice(&fs::read(raw_dir.join("raw.bin")).unwrap()).unwrap();
                v
            })
        })
    });
    group.bench_function("row_get_outcache", |b| {
        b.iter(|| {
            n += 1;
            s.time("row get", "outcache", || {
                rt.block_on(durable.get_row(&keys[n % 100]))
                    .unwrap()
                    .unwrap()
            })
        })
    });
    // The data-safety checks on the hot path: a hit whose row holds a ref stats the blob (a dangling ref
    // is a miss), and a bare ref's verified read takes its size and SHA-256 from a stat first.
    let engine = Cache::new(durable.clone());
    let plain = json!({ "i": "plain" });
    rt.block_on(engine.put("bench/hit", &plain, &output))
        .unwrap();
    let with_ref = json!({ "i": "with a ref" });
    let stored = rt
        .block_on(engine.put_stream(
            "bench/hit",
            &with_ref,
            futures::stream::iter(payload(100 << 10).into_iter().map(Ok)).boxed(),
            Default::default(),
        ))
        .unwrap();
    let full = CacheRef::from_value(&stored).expect("100 KiB is above the threshold");
    let bare = CacheRef::new(full.reference.clone());
    // The same 1 KiB row as a raw file and in cacache, read and parsed: the hit's two baselines.
    std::fs::write(raw_dir.join("hit.json"), &text).unwrap();
    cacache::write_sync(&cacache_dir, "hit", &text).unwrap();
    group.bench_function("hit_raw_read_parse", |b| {
        b.iter(|| {
            s.time("hit", "raw read + parse", || {
                let v: serde_json::Value =
                    serde_json::from_slice(&fs::read(raw_dir.join("hit.json")).unwrap()).unwrap();
                v
            })
        })
    });
    group.bench_function("hit_cacache_read_parse", |b| {
        b.iter(|| {
            s.time("hit", "cacache read_sync + parse", || {
                let v: serde_json::Value =
                    serde_json::from_slice(&cacache::read_sync(&cacache_dir, "hit").unwrap())
                        .unwrap();
                v
            })
        })
    });
    group.bench_function("hit_no_refs", |b| {
        b.iter(|| {
            s.time("hit", "row only", || {
                rt.block_on(engine.get("bench/hit", &plain))
                    .unwrap()
                    .unwrap()
            })
        })
    });
    // The same hit on the SQLite backend (a point read on the calling thread).
    let sqlite = Cache::new(Arc::new(
        outcache::backends::sqlite::SqliteCache::open(
            dir.path().join("hit.db"),
            Default::default(),
        )
        .unwrap(),
    ));
    rt.block_on(sqlite.put("bench/hit", &plain, &output))
        .unwrap();
    group.bench_function("hit_sqlite", |b| {
        b.iter(|| {
            s.time("hit", "SQLite row only", || {
                rt.block_on(sqlite.get("bench/hit", &plain))
                    .unwrap()
                    .unwrap()
            })
        })
    });
    group.bench_function("hit_one_ref_checked", |b| {
        b.iter(|| {
            s.time("hit", "row + ref stat", || {
                rt.block_on(engine.get("bench/hit", &with_ref))
                    .unwrap()
                    .unwrap()
            })
        })
    });
    group.bench_function("verified_read_full_ref", |b| {
        b.iter(|| {
            s.time("verified 100KiB", "full ref", || {
                rt.block_on(engine.read(&full)).unwrap().unwrap()
            })
        })
    });
    group.bench_function("verified_read_bare_ref", |b| {
        b.iter(|| {
            s.time("verified 100KiB", "bare ref", || {
                rt.block_on(engine.read(&bare)).unwrap().unwrap()
            })
        })
    });
    group.finish();
    c.final_summary();

    let mb = |case: &str| {
        let label = case.rsplit(' ').next().unwrap();
        let size = SIZES
            .iter()
            .find(|(_, l)| *l == label)
            .map_or(0, |(s, _)| *s);
        (size as f64 / 1e6, "MB")
    };
    let cases = |prefix: &str| {
        SIZES
            .iter()
            .map(|(_, l)| format!("{prefix} {l}"))
            .collect::<Vec<_>>()
    };
    let show = |title: &str, prefix: &str, base: &'static str, contender: &'static str| {
        let cs = cases(prefix);
        let refs: Vec<&str> = cs.iter().map(String::as_str).collect();
        samples.print_ratio(title, &refs, base, contender, mb);
    };
    show(
        "durable blob write (target >= 0.90)",
        "write",
        "raw",
        "outcache",
    );
    show(
        "scratch blob write vs the peer (target >= 1.00)",
        "scratch write",
        "cacache",
        "outcache",
    );
    show(
        "verified read (target >= 0.75 of raw read; the fair baseline hashes too)",
        "verified read",
        "raw+sha256",
        "outcache",
    );
    show(
        "verified read vs the peer (target >= 1.00)",
        "verified read",
        "cacache",
        "outcache",
    );
    show(
        "unverified read (target >= 0.95)",
        "unverified read",
        "raw",
        "outcache",
    );
    samples.print_ratio(
        "1 KiB hit, Cache::get vs cacache (target >= 1.5)",
        &["hit"],
        "cacache read_sync + parse",
        "row only",
        |_| (1.0, "ops"),
    );
    samples.print_ratio(
        "1 KiB hit on SQLite, Cache::get vs cacache (target >= 1.5)",
        &["hit"],
        "cacache read_sync + parse",
        "SQLite row only",
        |_| (1.0, "ops"),
    );
    samples.print_ratio(
        "1 KiB hit, Cache::get vs a raw read (target >= 0.5)",
        &["hit"],
        "raw read + parse",
        "row only",
        |_| (1.0, "ops"),
    );
    samples.print_ratio(
        "a hit whose row holds a ref: the existence check's cost",
        &["hit"],
        "row only",
        "row + ref stat",
        |_| (1.0, "ops"),
    );
    samples.print_ratio(
        "a bare ref read verified from its name's digest, against a full CacheRef",
        &["verified 100KiB"],
        "full ref",
        "bare ref",
        |_| (0.1024, "MB"),
    );
    samples.print_ratio(
        "small rows, durable (target >= 0.90)",
        &["row put", "row get"],
        "raw",
        "outcache",
        |_| (1.0, "ops"),
    );
}
