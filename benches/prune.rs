//! Janitor scale: seed N rows (one in ten holding a blob) on fs and SQLite, then time a stats inventory
//! and a prune that removes everything, at N = 10 000 and N = 100 000, to show the cost per entry stays
//! flat (linear growth). Seeding is not timed and runs with durability off.
//!
//! Run: `cargo bench --bench prune` (`OUTCACHE_PRUNE_SIZES=10000,100000` to choose sizes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use outcache::janitor::{PruneOptions, inventory, prune};
use outcache::{BlobMeta, OutputCache, RowKey};
use serde_json::json;

async fn seed(backend: &Arc<dyn OutputCache>, n: usize) {
    let tasks: Vec<_> = (0..4)
        .map(|part| {
            let backend = backend.clone();
            tokio::spawn(async move {
                for i in (part..n).step_by(4) {
                    let key =
                        RowKey::new(&format!("bench/task{}", i % 7), &json!({ "i": i })).unwrap();
                    let output = if i % 10 == 0 {
                        let data =
                            futures::stream::iter([Ok(bytes::Bytes::from(vec![i as u8; 2048]))])
                                .boxed();
                        backend
                            .write_blob(&BlobMeta::for_key(&key), data)
                            .await
                            .unwrap()
                            .to_value()
                    } else {
                        json!({ "i": i, "text": "a small output" })
                    };
                    backend.save_row(&key, &output).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

async fn measure(name: &str, open: impl Fn(&std::path::Path) -> Arc<dyn OutputCache>, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    seed(&backend, n).await;
    let started = Instant::now();
    let inv = inventory(backend.as_ref(), 5).await.unwrap();
    let listed = started.elapsed();
    assert_eq!(inv.rows as usize, n);
    let mut options = PruneOptions::new();
    options.older_than = Some(Duration::ZERO);
    let started = Instant::now();
    let report = prune(backend.as_ref(), &options, |_| {}).await.unwrap();
    let pruned = started.elapsed();
    let entries = report.rows_removed + report.blobs_removed;
    println!(
        "{name:<7} {n:>7} rows: stats {:>8.0} rows/s ({:>6.2} s)   prune {:>8.0} entries/s ({:>6.2} s, {} rows + {} blobs)",
        n as f64 / listed.as_secs_f64(),
        listed.as_secs_f64(),
        entries as f64 / pruned.as_secs_f64(),
        pruned.as_secs_f64(),
        report.rows_removed,
        report.blobs_removed
    );
}

fn main() {
    let sizes: Vec<usize> = std::env::var("OUTCACHE_PRUNE_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for &n in &sizes {
            measure(
                "fs",
                |p| {
                    Arc::new(
                        outcache::backends::fs::FsCache::open(
                            p,
                            outcache::backends::fs::FsOptions::default().durable(false),
                        )
                        .unwrap(),
                    )
                },
                n,
            )
            .await;
            measure(
                "sqlite",
                |p| {
                    Arc::new(
                        outcache::backends::sqlite::SqliteCache::open(
                            p.join("c.db"),
                            outcache::backends::sqlite::SqliteOptions::default().durable(false),
                        )
                        .unwrap(),
                    )
                },
                n,
            )
            .await;
        }
    });
}
