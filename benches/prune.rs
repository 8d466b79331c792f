//! Janitor scale: seed N rows (one in ten holding a blob) on fs and SQLite, then time a stats inventory
//! and a prune that removes everything, at N = 10 000 and N = 100 000, to show the cost per entry stays
//! flat (linear growth). Seeding is not timed and runs with durability off.
//!
//! With a server (`eval "$(scripts/s3-server.sh start)"`), also S3 at 10 000 rows
//! (`OUTCACHE_PRUNE_S3_ROWS`), each command against its raw baseline in the same run and with the
//! requests it made counted: `stats` against one paginated LIST of the same rows, and an age prune that
//! removes the older half against LIST + bulk DELETE of the same half of an identical raw prefix.
//!
//! Run: `cargo bench --bench prune` (`OUTCACHE_PRUNE_SIZES=10000,100000` to choose sizes).

#[cfg(feature = "s3")]
#[path = "../tests/common/counting_store.rs"]
#[allow(dead_code)]
mod counting_store;

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
        #[cfg(feature = "s3")]
        if let Ok(url) = std::env::var("OUTCACHE_S3_URL") {
            let n = std::env::var("OUTCACHE_PRUNE_S3_ROWS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(10_000);
            s3_at_scale(&url, n).await;
        } else {
            eprintln!("S3 part skipped: OUTCACHE_S3_URL is not set (eval \"$(scripts/s3-server.sh start)\")");
        }
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

#[cfg(feature = "s3")]
/// Seed `keys` into `cache` (one in ten holding a 2 KiB blob), 32 writes in flight.
async fn seed_keys(cache: &Arc<dyn OutputCache>, keys: Vec<(usize, RowKey)>) {
    futures::stream::iter(keys)
        .for_each_concurrent(32, |(i, key)| {
            let cache = cache.clone();
            async move {
                let output = if i % 10 == 0 {
                    let data = futures::stream::iter([Ok(bytes::Bytes::from(vec![i as u8; 2048]))])
                        .boxed();
                    let r = cache
                        .write_blob(&BlobMeta::for_key(&key), data)
                        .await
                        .unwrap();
                    json!({ "i": i, "blob": r.to_value() })
                } else {
                    json!({ "i": i, "text": "a small output" })
                };
                cache.save_row(&key, &output).await.unwrap();
            }
        })
        .await;
}

#[cfg(feature = "s3")]
/// The same objects written raw: a row object per key and a blob object per tenth key.
async fn seed_raw(store: &Arc<dyn object_store::ObjectStore>, root: &str, n: usize, from: usize) {
    use object_store::ObjectStoreExt;
    futures::stream::iter(from..from + n)
        .for_each_concurrent(32, |i| {
            let store = store.clone();
            async move {
                let row = object_store::path::Path::from(format!("{root}/rows/t/{i:064x}.json"));
                store.put(&row, vec![b'x'; 120].into()).await.unwrap();
                if i % 10 == 0 {
                    let blob = object_store::path::Path::from(format!("{root}/blobs/b{i:032x}"));
                    store.put(&blob, vec![i as u8; 2048].into()).await.unwrap();
                }
            }
        })
        .await;
}

#[cfg(feature = "s3")]
async fn s3_at_scale(url: &str, n: usize) {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let location = outcache::config::Location::parse(url).unwrap();
    let outcache::config::Location::Cloud {
        bucket, options, ..
    } = location
    else {
        panic!("OUTCACHE_S3_URL is not an s3:// URL")
    };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let raw_store = outcache::backends::object::cloud::open(
        outcache::backends::object::cloud::Cloud::S3,
        &bucket,
        "unused",
        &options.0,
    )
    .unwrap()
    .store()
    .clone();
    let counting = counting_store::CountingStore::new(raw_store.clone());
    let requests = counting.requests.clone();
    let prefix = object_store::path::Path::from(format!("bench-prune-{run}/cache"));
    let cache: Arc<dyn OutputCache> = Arc::new(
        outcache::backends::object::ObjectCache::new(Arc::new(counting), prefix, "s3-bench")
            .with_sorted_listing(true),
    );
    let raw_root = format!("bench-prune-{run}/raw");
    let keys: Vec<(usize, RowKey)> = (0..n)
        .map(|i| (i, RowKey::new("bench/s3", &json!({ "i": i })).unwrap()))
        .collect();
    let (older, newer) = keys.split_at(n / 2);

    // Seed the older halves, then (more than a second later: S3 times are whole seconds) the newer.
    let seeding = Instant::now();
    seed_keys(&cache, older.to_vec()).await;
    seed_raw(&raw_store, &raw_root, n / 2, 0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cutoff = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    seed_keys(&cache, newer.to_vec()).await;
    seed_raw(&raw_store, &raw_root, n - n / 2, n / 2).await;
    // A prune removes rows older than hours in practice: let the older half settle past the seconds
    // within which the janitor reads a row instead of trusting names (the object backend's margin).
    let settled = Duration::from_secs(11).saturating_sub(cutoff.elapsed().unwrap_or_default());
    tokio::time::sleep(settled).await;
    eprintln!(
        "s3: seeded {n} rows twice in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );

    // Raw: one paginated LIST of the same objects (rows and blobs).
    let raw_root_path = object_store::path::Path::from(raw_root.as_str());
    let started = Instant::now();
    let listed: Vec<object_store::ObjectMeta> = raw_store
        .list(Some(&raw_root_path))
        .try_collect()
        .await
        .unwrap();
    let raw_list = started.elapsed();
    assert_eq!(listed.len(), n + n.div_ceil(10));

    requests.take();
    let started = Instant::now();
    let inv = inventory(cache.as_ref(), 5).await.unwrap();
    let stats = started.elapsed();
    let stats_requests = requests.take();
    assert_eq!(inv.rows as usize, n);

    // Raw: LIST the rows and blobs, bulk-DELETE the older half of both.
    let started = Instant::now();
    let all: Vec<object_store::ObjectMeta> = raw_store
        .list(Some(&raw_root_path))
        .try_collect()
        .await
        .unwrap();
    let doomed: Vec<_> = all
        .into_iter()
        .filter(|m| std::time::SystemTime::from(m.last_modified) < cutoff)
        .map(|m| Ok(m.location))
        .collect();
    let removed_raw = doomed.len();
    let deleted: Vec<_> = raw_store
        .delete_stream(futures::stream::iter(doomed).boxed())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(deleted.len(), removed_raw);
    let raw_prune = started.elapsed();

    let mut options = PruneOptions::new();
    options.older_than = Some(cutoff.elapsed().unwrap());
    let started = Instant::now();
    let report = prune(cache.as_ref(), &options, |_| {}).await.unwrap();
    let pruned = started.elapsed();
    let prune_requests = requests.take();
    assert_eq!(report.rows_removed as usize, n / 2, "{report:?}");

    println!(
        "s3      {n:>7} rows: stats {:>6.2} s vs raw LIST {:>6.2} s = {:.2}x  ({} GET, {} HEAD, {} LIST calls)",
        stats.as_secs_f64(),
        raw_list.as_secs_f64(),
        stats.as_secs_f64() / raw_list.as_secs_f64(),
        stats_requests.gets,
        stats_requests.heads,
        stats_requests.lists,
    );
    println!(
        "s3      {n:>7} rows: prune half {:>6.2} s vs raw LIST+DELETE {:>6.2} s = {:.2}x  ({} rows + {} blobs; {} GET, {} HEAD, {} LIST calls, {} objects in {} bulk deletes)",
        pruned.as_secs_f64(),
        raw_prune.as_secs_f64(),
        pruned.as_secs_f64() / raw_prune.as_secs_f64(),
        report.rows_removed,
        report.blobs_removed,
        prune_requests.gets,
        prune_requests.heads,
        prune_requests.lists,
        prune_requests.deleted,
        prune_requests.delete_calls,
    );

    // The orphan sweep reads every row (refs live only in rows): its cost per row, for the record.
    let mut sweep = PruneOptions::new();
    sweep.orphans = true;
    sweep.grace = Duration::ZERO;
    let started = Instant::now();
    prune(cache.as_ref(), &sweep, |_| {}).await.unwrap();
    let swept = started.elapsed();
    let sweep_requests = requests.take();
    println!(
        "s3      {:>7} rows: orphan sweep {:>6.2} s  ({} GET, {} LIST calls)",
        n - n / 2,
        swept.as_secs_f64(),
        sweep_requests.gets,
        sweep_requests.lists,
    );
    // With the refs index (`outcache index-refs`): the sweep reads only the rows that hold refs.
    let indexed = outcache::backends::object::ObjectCache::new(
        Arc::new(counting_store::CountingStore {
            inner: raw_store.clone(),
            requests: requests.clone(),
        }),
        object_store::path::Path::from(format!("bench-prune-{run}/cache")),
        "s3-bench",
    )
    .with_sorted_listing(true);
    indexed.index_refs().await.unwrap();
    requests.take();
    let started = Instant::now();
    prune(&indexed, &sweep, |_| {}).await.unwrap();
    let swept = started.elapsed();
    let sweep_requests = requests.take();
    println!(
        "s3      {:>7} rows: orphan sweep with refs index {:>6.2} s  ({} GET, {} LIST calls; \
         the pruned half's stale markers removed on the way)",
        n - n / 2,
        swept.as_secs_f64(),
        sweep_requests.gets,
        sweep_requests.lists,
    );
    // The next sweep, as every later one runs: only the marked rows read.
    let started = Instant::now();
    prune(&indexed, &sweep, |_| {}).await.unwrap();
    let swept = started.elapsed();
    let sweep_requests = requests.take();
    println!(
        "s3      {:>7} rows: the next orphan sweep with refs index {:>6.2} s  ({} GET, {} LIST calls)",
        n - n / 2,
        swept.as_secs_f64(),
        sweep_requests.gets,
        sweep_requests.lists,
    );

    // Leave the bucket as it was.
    let mut everything = PruneOptions::new();
    everything.older_than = Some(Duration::ZERO);
    prune(cache.as_ref(), &everything, |_| {}).await.unwrap();
    let rest: Vec<_> = raw_store
        .list(Some(&object_store::path::Path::from(format!(
            "bench-prune-{run}"
        ))))
        .map_ok(|m| m.location)
        .collect()
        .await;
    let _ = raw_store
        .delete_stream(futures::stream::iter(rest).boxed())
        .collect::<Vec<_>>()
        .await;
}
