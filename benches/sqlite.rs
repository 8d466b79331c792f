//! SQLite backend against raw rusqlite with the same pragmas (WAL, synchronous=FULL, busy_timeout) and the
//! same table and indexes (the `created_at` index is part of the design: age prunes must not scan), in the
//! same run: a durable small-row put (one row per transaction) and a point get by key. Also streaming blob
//! writes of 256 MiB into SQLite beside the fs backend.
//!
//! Also 16 concurrent durable puts (tasks on one runtime) on SQLite (group commit) and on fs, against
//! 16 raw threads each writing one file atomically and durably.
//!
//! Run: `cargo bench --bench sqlite`.

#[path = "common.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::Samples;
use criterion::{BenchmarkId, Criterion, Throughput};
use futures::StreamExt;
use outcache::backends::fs::{FsCache, FsOptions};
use outcache::backends::sqlite::{SqliteCache, SqliteOptions};
use outcache::{BlobMeta, OutputCache, RowKey};
use rusqlite::{Connection, params};
use serde_json::json;

fn raw_connection(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let _: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    c.pragma_update(None, "synchronous", "FULL").unwrap();
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS rows (task_type TEXT NOT NULL, fingerprint TEXT NOT NULL, output TEXT NOT NULL,
         refs TEXT NOT NULL, size INTEGER NOT NULL, created_at INTEGER NOT NULL, last_access INTEGER NOT NULL,
         PRIMARY KEY (task_type, fingerprint));
         CREATE INDEX IF NOT EXISTS rows_created_at ON rows (created_at);",
    )
    .unwrap();
    c
}

/// Write `text` to `dir/<n>.json` as a durable cache would: a temp file, fsync, rename, directory fsync.
fn raw_atomic_write(dir: &std::path::Path, n: usize, text: &str) {
    use std::io::Write;
    let (tmp, dest) = (dir.join(format!("{n}.tmp")), dir.join(format!("{n}.json")));
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, &dest).unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

fn rows(c: &mut Criterion, samples: &Samples) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_connection(&dir.path().join("raw.db"));
    let cache = Arc::new(
        SqliteCache::open(dir.path().join("outcache.db"), SqliteOptions::default()).unwrap(),
    );
    let output = json!({"summary": "x".repeat(900), "n": 1});
    let text = output.to_string();
    let keys: Vec<RowKey> = (0..1000)
        .map(|i| RowKey::new("bench/row", &json!({ "i": i })).unwrap())
        .collect();

    let mut group = c.benchmark_group("sqlite_rows");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let mut n = 0usize;
    group.bench_function("raw_rusqlite_put_1KiB", |b| {
        b.iter(|| {
            n += 1;
            let k = &keys[n % keys.len()];
            samples.time("put", "raw", || {
                raw.execute(
                    "INSERT INTO rows VALUES (?1, ?2, ?3, '[]', ?4, ?5, ?5) ON CONFLICT (task_type, fingerprint)
                     DO UPDATE SET output = excluded.output, refs = excluded.refs, size = excluded.size,
                     created_at = excluded.created_at, last_access = excluded.last_access",
                    params![k.task_type(), k.fingerprint(), text, text.len() as i64, n as i64],
                )
                .unwrap()
            });
        })
    });
    group.bench_function("outcache_put_1KiB", |b| {
        b.iter(|| {
            n += 1;
            let k = &keys[n % keys.len()];
            samples.time("put", "outcache", || {
                rt.block_on(cache.save_row(k, &output)).unwrap()
            });
        })
    });
    // 16 writers at once (tasks on one runtime): group commit puts them in one transaction, one fsync.
    let writers = 16;
    group.bench_function("outcache_put_1KiB_16_writers", |b| {
        b.iter(|| {
            n += writers;
            let base = n;
            samples.time("put x16", "outcache", || {
                rt.block_on(futures::future::join_all((0..writers).map(|w| {
                    let (cache, output) = (cache.clone(), &output);
                    let k = keys[(base + w) % keys.len()].clone();
                    async move { cache.save_row(&k, output).await.unwrap() }
                })))
            });
        })
    });
    // The same 16 writers on the fs backend, and the raw baseline both are held to: 16 threads each
    // writing one file atomically and durably (write, fsync, rename, directory fsync).
    let fs = Arc::new(FsCache::open(dir.path().join("fs-rows"), FsOptions::default()).unwrap());
    group.bench_function("outcache_fs_put_1KiB_16_writers", |b| {
        b.iter(|| {
            n += writers;
            let base = n;
            samples.time("put x16", "outcache fs", || {
                rt.block_on(futures::future::join_all((0..writers).map(|w| {
                    let (fs, output) = (fs.clone(), &output);
                    let k = keys[(base + w) % keys.len()].clone();
                    async move { fs.save_row(&k, output).await.unwrap() }
                })))
            });
        })
    });
    let raw_dir = dir.path().join("raw-files");
    std::fs::create_dir_all(&raw_dir).unwrap();
    // 16 threads started once (not per round: a thread's start would count against raw), each
    // writing the file it is handed.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let workers: Vec<std::sync::mpsc::Sender<usize>> = (0..writers)
        .map(|_| {
            let (tx, rx) = std::sync::mpsc::channel::<usize>();
            let (dir, text, done) = (raw_dir.clone(), text.clone(), done_tx.clone());
            std::thread::spawn(move || {
                for n in rx {
                    raw_atomic_write(&dir, n, &text);
                    done.send(()).unwrap();
                }
            });
            tx
        })
        .collect();
    group.bench_function("raw_fs_put_1KiB_16_threads", |b| {
        b.iter(|| {
            n += writers;
            let base = n;
            samples.time("put x16", "raw fs threads", || {
                for (w, worker) in workers.iter().enumerate() {
                    worker.send((base + w) % 1000).unwrap();
                }
                for _ in 0..writers {
                    done_rx.recv().unwrap();
                }
            });
        })
    });
    drop(workers);
    group.bench_function("raw_rusqlite_get", |b| {
        b.iter(|| {
            n += 1;
            let k = &keys[n % keys.len()];
            samples.time("get", "raw", || {
                let text: String = raw
                    .query_row(
                        "SELECT output FROM rows WHERE task_type = ?1 AND fingerprint = ?2",
                        params![k.task_type(), k.fingerprint()],
                        |r| r.get(0),
                    )
                    .unwrap();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                v
            });
        })
    });
    group.bench_function("outcache_get", |b| {
        b.iter(|| {
            n += 1;
            let k = &keys[n % keys.len()];
            samples.time("get", "outcache", || {
                rt.block_on(cache.get_row(k)).unwrap().unwrap()
            });
        })
    });
    group.finish();
}

fn blobs(c: &mut Criterion, samples: &Samples) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        Arc::new(SqliteCache::open(dir.path().join("blobs.db"), SqliteOptions::default()).unwrap());
    let fs = Arc::new(FsCache::open(dir.path().join("fs"), FsOptions::default()).unwrap());
    let base = Bytes::from(
        (0..2 << 20)
            .map(|i: u32| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let mib = 256;
    let chunks: Vec<Bytes> = (0..mib)
        .map(|i| base.slice(i * 4099 % (1 << 20)..i * 4099 % (1 << 20) + (1 << 20)))
        .collect();

    let mut group = c.benchmark_group("blob_write_256MiB");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Bytes((mib << 20) as u64));
    let backends: [(&'static str, Arc<dyn OutputCache>); 2] = [("fs", fs), ("sqlite", sqlite)];
    for (name, backend) in backends {
        group.bench_with_input(BenchmarkId::new(name, mib), &chunks, |b, chunks| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let stream = futures::stream::iter(chunks.clone().into_iter().map(Ok)).boxed();
                    let (took, r) = samples.time("256MiB", name, || {
                        rt.block_on(backend.write_blob(&BlobMeta::default(), stream))
                            .unwrap()
                    });
                    total += took;
                    rt.block_on(backend.delete_blob(&r.reference)).unwrap();
                }
                total
            })
        });
    }
    group.finish();
}

fn main() {
    let samples = Samples::default();
    let mut c = Criterion::default().configure_from_args();
    rows(&mut c, &samples);
    blobs(&mut c, &samples);
    c.final_summary();
    samples.print_ratio(
        "SQLite rows (target ratio >= 0.90)",
        &["put", "get"],
        "raw",
        "outcache",
        |_| (1.0, "ops"),
    );
    if let (Some(one), Some(sixteen)) = (
        samples.median("put", "outcache"),
        samples.median("put x16", "outcache"),
    ) {
        let (r1, r16) = (1.0 / one.as_secs_f64(), 16.0 / sixteen.as_secs_f64());
        println!(
            "\nSQLite durable puts, 16 concurrent writers vs 1 (target >= 4.0): {r16:.0} vs {r1:.0} rows/s, ratio {:.2}",
            r16 / r1
        );
    }
    samples.print_ratio(
        "16 concurrent durable puts: fs (16 tasks) vs raw fs (16 threads) (target >= 0.90)",
        &["put x16"],
        "raw fs threads",
        "outcache fs",
        |_| (16.0, "rows"),
    );
    samples.print_ratio(
        "16 concurrent durable puts: SQLite (16 tasks) vs raw fs (16 threads) (target >= 1.50)",
        &["put x16"],
        "raw fs threads",
        "outcache",
        |_| (16.0, "rows"),
    );
    samples.print_ratio("Blob write", &["256MiB"], "fs", "sqlite", |_| {
        (256.0 * 1.048576, "MB")
    });
}
