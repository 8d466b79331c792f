//! The janitor against real backends: a dry run reports exactly what the real prune then removes, fresh
//! entries and in-flight temps survive, stats agree with the report, a size budget evicts the least
//! recently read first, and pruning alongside writers never leaves a row pointing at a missing blob.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use outcache::OutputCacheExt as _;
use outcache::config::Location;
use outcache::janitor::{Inventory, PruneOptions, PruneReport, inventory, prune};
use outcache::{BlobOptions, Cache, CacheOptions, OutputCache};
use serde_json::{Value, json};

fn bytes(n: usize, seed: u8) -> outcache::ByteStream {
    futures::stream::iter([Ok(bytes::Bytes::from(vec![seed; n]))]).boxed()
}

fn cli(url: &str, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_outcache"))
        .arg("--url")
        .arg(url)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Old rows (some with blobs), old orphans and an old temp; then, after the age cutoff, fresh rows, a
/// fresh orphan and a fresh temp.
async fn seed(cache: &Cache, old_temp: impl FnOnce(), fresh_temp: impl FnOnce()) {
    for i in 0..4u8 {
        cache
            .put("old/rows", &json!({ "i": i }), &json!({ "i": i }))
            .await
            .unwrap();
        cache
            .put_stream(
                "old/blobs",
                &json!({ "i": i }),
                bytes(5000 + i as usize, i),
                BlobOptions::default(),
            )
            .await
            .unwrap();
    }
    for i in 0..2u8 {
        cache
            .backend()
            .write_blob(&Default::default(), bytes(3000, 100 + i))
            .await
            .unwrap();
    }
    // An orphan's grace counts from when the janitor first saw it unreferenced: a first sweep sees the
    // old orphans now (and removes nothing: everything is younger than the grace).
    let first =
        outcache::janitor::sweep_orphans(cache.backend().as_ref(), Duration::from_secs(2), false)
            .await
            .unwrap();
    assert!(
        first.blobs.is_empty() && first.temps.is_empty(),
        "{first:?}"
    );
    old_temp();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    cache
        .put("new/rows", &json!({}), &json!("fresh"))
        .await
        .unwrap();
    cache
        .put_stream(
            "new/blobs",
            &json!({}),
            bytes(300_000, 9),
            BlobOptions::default(),
        )
        .await
        .unwrap();
    cache
        .backend()
        .write_blob(&Default::default(), bytes(3000, 200))
        .await
        .unwrap();
    fresh_temp();
}

async fn check_dry_run_matches_prune(url: &str, expect_temps: u64) {
    let args = [
        "prune",
        "--older-than",
        "2s",
        "--orphans",
        "--grace",
        "2s",
        "--force",
        "--json",
    ];
    let before: Inventory = serde_json::from_value(cli(url, &["stats", "--json"])).unwrap();
    let mut dry_args = args.to_vec();
    dry_args.push("--dry-run");
    let dry: PruneReport = serde_json::from_value(cli(url, &dry_args)).unwrap();
    let real: PruneReport = serde_json::from_value(cli(url, &args)).unwrap();
    let after: Inventory = serde_json::from_value(cli(url, &["stats", "--json"])).unwrap();

    assert!(dry.dry_run && !real.dry_run);
    assert_eq!(
        PruneReport {
            dry_run: false,
            ..dry.clone()
        },
        real,
        "{url}: the dry run differs from the prune"
    );
    assert_eq!(
        (real.by_age.rows, real.by_age.blobs),
        (8, 4),
        "{url}: {real:?}"
    );
    assert_eq!(
        (real.orphans.blobs, real.orphans.temps),
        (2, expect_temps),
        "{url}: {real:?}"
    );
    assert_eq!(before.rows - real.rows_removed, after.rows, "{url}: rows");
    assert_eq!(
        before.blobs - real.blobs_removed,
        after.blobs,
        "{url}: blobs"
    );
    assert_eq!(
        before.temps - real.temps_removed,
        after.temps,
        "{url}: temps"
    );
    assert_eq!(
        before.row_bytes + before.blob_bytes + before.temp_bytes - real.bytes_reclaimed,
        after.row_bytes + after.blob_bytes + after.temp_bytes,
        "{url}: bytes"
    );
    assert_eq!(
        (after.rows, after.blobs),
        (2, 2),
        "{url}: fresh rows, their blob and the fresh orphan survive"
    );
    assert_eq!(
        after.temps,
        expect_temps.min(1),
        "{url}: the in-flight temp survives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_dry_run_reports_exactly_what_prune_removes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}", dir.path().display());
    let cache = Cache::with_options(
        outcache::backends::open(&Location::parse(&url).unwrap()).unwrap(),
        CacheOptions::default().reference_threshold(1024),
    );
    let tmp = dir.path().join("tmp");
    let old = tmp.join("blob-00000000000000000000000000c0ffee.tmp");
    seed(
        &cache,
        || {
            std::fs::write(&old, vec![0u8; 1234]).unwrap();
            let f = std::fs::File::options().write(true).open(&old).unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(3600))
                .unwrap();
        },
        || {
            std::fs::write(
                tmp.join("blob-00000000000000000000000000f1f1f1.tmp"),
                b"in flight",
            )
            .unwrap()
        },
    )
    .await;
    check_dry_run_matches_prune(&url, 1).await;
    assert!(
        tmp.join("blob-00000000000000000000000000f1f1f1.tmp")
            .exists()
    );
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dry_run_reports_exactly_what_prune_removes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let url = format!("sqlite://{}", db.display());
    let cache = Cache::with_options(
        outcache::backends::open(&Location::parse(&url).unwrap()).unwrap(),
        CacheOptions::default().reference_threshold(1024),
    );
    let insert_chunk = |id: &str, at: i64| {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute(
            "INSERT INTO chunks VALUES (?1, 0, x'00', ?2)",
            rusqlite::params![id, at],
        )
        .unwrap();
    };
    let now_ms = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    seed(
        &cache,
        || insert_chunk("crashed", 1000),
        || insert_chunk("inflight", now_ms()),
    )
    .await;
    check_dry_run_matches_prune(&url, 1).await;
}

#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_dry_run_reports_exactly_what_prune_removes() {
    let Some(base) = common::server_env("OUTCACHE_S3_URL") else {
        return;
    };
    let url = common::s3_child(&base, &format!("janitor-{}", uuid::Uuid::new_v4().simple()));
    let cache = Cache::with_options(
        outcache::backends::open(&Location::parse(&url).unwrap()).unwrap(),
        CacheOptions::default().reference_threshold(1024),
    );
    // Object stores have no temps (incomplete uploads are not objects).
    seed(&cache, || {}, || {}).await;
    check_dry_run_matches_prune(&url, 0).await;
    cache.backend().delete_prefix("").await.unwrap();
    outcache::janitor::sweep_orphans(cache.backend().as_ref(), Duration::ZERO, false)
        .await
        .unwrap();
}

async fn lru_evicts_least_recently_read_first(url: &str) {
    let cache = outcache::backends::open(&Location::parse(url).unwrap()).unwrap();
    let engine = Cache::with_options(
        cache.clone(),
        CacheOptions::default().reference_threshold(1024),
    );
    for i in 0..5u8 {
        engine
            .put_stream(
                "lru",
                &json!({ "i": i }),
                bytes(100_000, i),
                BlobOptions::default(),
            )
            .await
            .unwrap();
    }
    // Read 3, then 0, then 1 (each a separate CLI process that flushes its access time); 2 and 4 are
    // never read, so they go first, then 3, the least recently read.
    for i in [3, 0, 1] {
        tokio::time::sleep(Duration::from_millis(30)).await;
        cli(
            url,
            &["get", "lru", "--inputs", &json!({ "i": i }).to_string()],
        );
    }
    let report: PruneReport =
        serde_json::from_value(cli(url, &["prune", "--max-size", "260KB", "--json"])).unwrap();
    assert_eq!(report.by_size.rows, 3, "{url}: {report:?}");
    let left: Vec<u8> = {
        let mut v: Vec<u8> = cache
            .list_rows()
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (0..5u8)
                    .find(|i| outcache::RowKey::new("lru", &json!({ "i": i })).unwrap() == r.key)
                    .unwrap()
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(left, [0, 1], "{url}: the most recently read survive");
    let inv = inventory(cache.as_ref(), 1).await.unwrap();
    assert!(
        inv.row_bytes + inv.blob_bytes <= 260_000,
        "{url}: over budget: {inv:?}"
    );
    assert_eq!(
        report.size_after,
        Some(inv.row_bytes + inv.blob_bytes + inv.temp_bytes),
        "{url}: the size --json says is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_size_budget_evicts_least_recently_read_first() {
    let dir = tempfile::tempdir().unwrap();
    lru_evicts_least_recently_read_first(&format!("fs://{}", dir.path().display())).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_size_budget_evicts_least_recently_read_first() {
    let dir = tempfile::tempdir().unwrap();
    lru_evicts_least_recently_read_first(&format!("sqlite://{}/c.db", dir.path().display())).await;
}

async fn prune_alongside_writers(backend: Arc<dyn OutputCache>) {
    let engine = Cache::with_options(
        backend.clone(),
        CacheOptions::default().reference_threshold(1024),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4u8)
        .map(|w| {
            let (engine, stop) = (engine.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let inputs = json!({ "w": w, "k": n % 8 });
                    engine
                        .put_stream(
                            "race",
                            &inputs,
                            bytes(4096 + n as usize, w),
                            BlobOptions::default(),
                        )
                        .await
                        .unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut options = PruneOptions::new();
    options.orphans = true;
    options.grace = Duration::from_secs(2);
    options.max_size = Some(64 * 1024);
    for _ in 0..20 {
        prune(backend.as_ref(), &options, |_| {}).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    assert!(written > 20, "the writers barely ran ({written} writes)");
    for row in backend.list_rows().await.unwrap() {
        for r in &row.refs {
            assert!(
                backend.read_blob(r).await.unwrap().is_some(),
                "row {} points at a missing blob {r}",
                row.key
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pruning_alongside_writers_never_breaks_a_surviving_row_fs() {
    let dir = tempfile::tempdir().unwrap();
    prune_alongside_writers(
        outcache::backends::open_url(&format!("fs://{}", dir.path().display())).unwrap(),
    )
    .await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pruning_alongside_writers_never_breaks_a_surviving_row_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    prune_alongside_writers(
        outcache::backends::open_url(&format!("sqlite://{}/c.db", dir.path().display())).unwrap(),
    )
    .await;
}

/// A garbled row stops an orphan sweep (its blob cannot be told from an orphan) until `--corrupt` is
/// given; then the row and its now unreferenced blob go, and the dry run said so first.
async fn corrupt_rows_are_removed_only_when_asked(url: &str, garble: impl FnOnce()) {
    let cache = Cache::with_options(
        outcache::backends::open(&Location::parse(url).unwrap()).unwrap(),
        CacheOptions::default().reference_threshold(1024),
    );
    cache
        .put_stream("victim", &json!({}), bytes(5000, 1), BlobOptions::default())
        .await
        .unwrap();
    cache
        .put("healthy", &json!({}), &json!("fine"))
        .await
        .unwrap();
    garble();

    let out = Command::new(env!("CARGO_BIN_EXE_outcache"))
        .args([
            "--url",
            url,
            "prune",
            "--orphans",
            "--grace",
            "0s",
            "--force",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{url}: {err}");
    assert!(
        err.contains("cannot be decoded") && err.contains("--corrupt"),
        "{url}: {err}"
    );
    let inv: Inventory = serde_json::from_value(cli(url, &["stats", "--json"])).unwrap();
    assert_eq!(
        (inv.corrupt_rows, inv.rows, inv.blobs),
        (1, 1, 1),
        "{url}: nothing may be removed yet"
    );

    let dry: PruneReport = serde_json::from_value(cli(
        url,
        &[
            "prune",
            "--corrupt",
            "--orphans",
            "--grace",
            "0s",
            "--force",
            "--dry-run",
            "--json",
        ],
    ))
    .unwrap();
    let real: PruneReport = serde_json::from_value(cli(
        url,
        &[
            "prune",
            "--corrupt",
            "--orphans",
            "--grace",
            "0s",
            "--force",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(
        PruneReport {
            dry_run: false,
            ..dry
        },
        real,
        "{url}"
    );
    assert_eq!(
        (real.corrupt.rows, real.orphans.blobs),
        (1, 1),
        "{url}: {real:?}"
    );
    let inv: Inventory = serde_json::from_value(cli(url, &["stats", "--json"])).unwrap();
    assert_eq!((inv.corrupt_rows, inv.rows, inv.blobs), (0, 1, 0), "{url}");
    assert!(cache.get("healthy", &json!({})).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_corrupt_rows_are_removed_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}", dir.path().display());
    let rows = dir.path().join("rows/victim");
    corrupt_rows_are_removed_only_when_asked(&url, || {
        let file = std::fs::read_dir(&rows)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(file, b"{\"v\":1, \"garbled").unwrap();
    })
    .await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_corrupt_rows_are_removed_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let url = format!("sqlite://{}", db.display());
    corrupt_rows_are_removed_only_when_asked(&url, || {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute(
            "UPDATE rows SET output = '{not json', refs = 'nor this' WHERE task_type = 'victim'",
            [],
        )
        .unwrap();
    })
    .await;
}

/// Seed `cache` with the same rows every time: 240 rows over two task types, one in three with a blob,
/// sizes varied, and read times in 40 distinct instants (many rows share one), and one row read late.
async fn seed_for_lru(cache: &Cache) {
    // Reads in the future: a read only ever moves a row's access time forward.
    let base = SystemTime::now() + Duration::from_secs(86_400);
    for i in 0..240u32 {
        let task = if i % 4 == 0 { "keep/x" } else { "lru/y" };
        let inputs = json!({ "i": i });
        if i % 3 == 0 {
            let len = 2_000 + (i as usize * 997) % 30_000;
            cache
                .put_stream(task, &inputs, bytes(len, i as u8), BlobOptions::default())
                .await
                .unwrap();
        } else {
            let filler = "x".repeat((i as usize * 131) % 700);
            cache
                .put(task, &inputs, &json!({ "v": filler }))
                .await
                .unwrap();
        }
        let key = outcache::RowKey::new(task, &inputs).unwrap();
        let read_at = base + Duration::from_secs(u64::from((i * 7) % 40));
        cache.backend().touch_rows(&[key], read_at).await.unwrap();
    }
    // One row read a long time after the rest: the 40 instants above then share one slice of the
    // access-time span, so the slice the budget cuts through must be put in order.
    let inputs = json!({ "late": true });
    cache.put("lru/y", &inputs, &json!(1)).await.unwrap();
    let key = outcache::RowKey::new("lru/y", &inputs).unwrap();
    let late = base + Duration::from_secs(10_000_000);
    cache.backend().touch_rows(&[key], late).await.unwrap();
}

/// The keys of the rows left, sorted.
async fn row_keys(cache: &Cache) -> Vec<String> {
    let mut keys: Vec<String> = cache
        .backend()
        .list_rows()
        .await
        .unwrap()
        .into_iter()
        .map(|r| format!("{}/{}", r.key.task_type(), r.key.fingerprint()))
        .collect();
    keys.sort();
    keys
}

/// A size budget over more candidates than it may hold lists the rows again instead (a histogram of
/// access times, then a select pass): it must evict exactly the rows the in-memory order evicts, for
/// budgets that cut through groups of rows read at the same instant, with a prefix scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_budget_too_large_to_hold_evicts_the_same_rows() {
    for budget in [0u64, 150_000, 400_000, 900_000, 5_000_000] {
        let (held_dir, listed_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let open = |dir: &std::path::Path| {
            Cache::with_options(
                outcache::backends::open(
                    &Location::parse(&format!("fs://{}", dir.display())).unwrap(),
                )
                .unwrap(),
                CacheOptions::default().reference_threshold(1024),
            )
        };
        let (held, listed) = (open(held_dir.path()), open(listed_dir.path()));
        seed_for_lru(&held).await;
        seed_for_lru(&listed).await;
        let mut options = PruneOptions::new();
        options.max_size = Some(budget);
        options.prefix = Some("lru/".into());
        let in_memory = prune(held.backend().as_ref(), &options, |_| {})
            .await
            .unwrap();
        options.spill_lines = 10; // far fewer than the 181 candidates
        let streamed = prune(listed.backend().as_ref(), &options, |_| {})
            .await
            .unwrap();
        assert_eq!(
            (
                in_memory.by_size.rows,
                in_memory.by_size.blobs,
                in_memory.by_size.bytes
            ),
            (
                streamed.by_size.rows,
                streamed.by_size.blobs,
                streamed.by_size.bytes
            ),
            "budget {budget}: {in_memory:?} vs {streamed:?}"
        );
        assert_eq!(
            row_keys(&held).await,
            row_keys(&listed).await,
            "budget {budget}: different rows left"
        );
        for (cache, report) in [(&held, &in_memory), (&listed, &streamed)] {
            let inv = inventory(cache.backend().as_ref(), 1).await.unwrap();
            assert_eq!(
                report.size_after,
                Some(inv.row_bytes + inv.blob_bytes + inv.temp_bytes),
                "budget {budget}: the size the report says is left"
            );
        }
        if budget == 400_000 {
            assert!(
                in_memory.by_size.rows > 0 && in_memory.by_size.rows < 181,
                "the budget should cut through the candidates: {in_memory:?}"
            );
        }
    }
}

/// The same on an object store, whose rows are only listed: a row's blobs are joined in by the key tag
/// in their names, and the order is by commit time (it keeps no access time). Both caches get the same
/// rows in the same order, so the held and the listed plan must evict the same ones, counting the same
/// blobs and bytes.
#[cfg(feature = "object-store")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_budget_too_large_to_hold_evicts_the_same_rows_on_an_object_store() {
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use outcache::backends::object::ObjectCache;

    let open = || {
        let store = ObjectCache::new(Arc::new(InMemory::new()), Path::from("c"), "memory");
        Cache::with_options(
            Arc::new(store),
            CacheOptions::default().reference_threshold(1024),
        )
    };
    let (held, listed) = (open(), open());
    for i in 0..150u32 {
        for cache in [&held, &listed] {
            let inputs = json!({ "i": i });
            if i % 3 == 0 {
                let len = 2_000 + (i as usize * 997) % 30_000;
                cache
                    .put_stream(
                        "lru/y",
                        &inputs,
                        bytes(len, i as u8),
                        BlobOptions::default(),
                    )
                    .await
                    .unwrap();
            } else {
                let filler = "x".repeat((i as usize * 131) % 700);
                cache
                    .put("lru/y", &inputs, &json!({ "v": filler }))
                    .await
                    .unwrap();
            }
        }
    }
    let total = |inv: Inventory| inv.row_bytes + inv.blob_bytes;
    let all = total(inventory(held.backend().as_ref(), 1).await.unwrap());
    let mut left = all;
    for budget in [all * 9 / 10, all / 2, all / 5] {
        let mut options = PruneOptions::new();
        options.max_size = Some(budget);
        options.dry_run = true;
        let planned = prune(held.backend().as_ref(), &options, |_| {})
            .await
            .unwrap();
        options.dry_run = false;
        let in_memory = prune(held.backend().as_ref(), &options, |_| {})
            .await
            .unwrap();
        options.spill_lines = 10; // far fewer than the candidates
        let streamed = prune(listed.backend().as_ref(), &options, |_| {})
            .await
            .unwrap();
        assert!(
            in_memory.by_size.blobs > 0,
            "budget {budget}: {in_memory:?}"
        );
        assert_eq!(in_memory.by_size, streamed.by_size, "budget {budget}");
        assert_eq!(
            row_keys(&held).await,
            row_keys(&listed).await,
            "budget {budget}: different rows left"
        );
        let after = total(inventory(listed.backend().as_ref(), 1).await.unwrap());
        assert!(after <= budget, "budget {budget}: {after} bytes left");
        assert_eq!(streamed.size_after, Some(after), "budget {budget}");
        assert_eq!(in_memory.size_after, Some(after), "budget {budget}");
        assert_eq!(planned.size_after, Some(after), "budget {budget}: dry run");
        assert_eq!(
            left - after,
            streamed.by_size.bytes,
            "budget {budget}: bytes freed"
        );
        left = after;
    }
}

/// `stats` counts each task type's rows and the blobs they own, not the blobs they only cite nor
/// orphans, the same whether its sorted runs stay in memory or spill a line at a time.
async fn stats_attribute_owned_blobs(cache: Cache) {
    for i in 0..3u8 {
        cache
            .put_stream(
                "build/big",
                &json!({ "i": i }),
                bytes(200_000 + i as usize, i),
                BlobOptions::default(),
            )
            .await
            .unwrap();
    }
    // A row citing a build's blob owns none of it.
    let cited = cache
        .get("build/big", &json!({ "i": 0 }))
        .await
        .unwrap()
        .unwrap();
    cache
        .put("bundle/cites", &json!({}), &json!({ "from": cited }))
        .await
        .unwrap();
    // Overwritten: the old blob is an orphan until the sweep.
    cache
        .put_stream(
            "build/big",
            &json!({ "i": 2 }),
            bytes(300_000, 9),
            BlobOptions::default(),
        )
        .await
        .unwrap();
    let backend = cache.backend().as_ref();
    let held = inventory(backend, 10).await.unwrap();
    let spilled = outcache::janitor::inventory_spilling(backend, 10, 1)
        .await
        .unwrap();
    assert_eq!(held, spilled, "spilling changed what stats counts");
    let listed = cache.backend().list_blobs().await.unwrap();
    assert_eq!((held.rows, held.blobs), (4, 4), "{held:?} {listed:?}");
    let usage = |task: &str| {
        held.top_task_types
            .iter()
            .find(|t| t.task_type == task)
            .cloned()
            .unwrap_or_else(|| panic!("no {task} in {:?}", held.top_task_types))
    };
    let (big, cites) = (usage("build/big"), usage("bundle/cites"));
    assert_eq!(big.rows, 3);
    // Where rows were only listed (an object store), a row owns every blob carrying its key's tag
    // written before it, its overwritten one too: the row's delete takes them all.
    let orphan = if held.rows_read { 0 } else { 200_002 };
    assert_eq!(
        big.bytes + cites.bytes,
        held.row_bytes + 200_000 + 200_001 + 300_000 + orphan,
        "owned blobs counted once, the orphan only where the row's delete takes it: {held:?}"
    );
    assert!(
        cites.bytes < 1000,
        "the citing row was charged for the blob it cites: {cites:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_attribute_owned_blobs_on_fs_sqlite_and_an_object_store() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        format!("fs://{}/fs", dir.path().display()),
        format!("sqlite://{}/cache.db", dir.path().display()),
    ] {
        stats_attribute_owned_blobs(Cache::open(&url).unwrap()).await;
    }
    #[cfg(feature = "object-store")]
    {
        std::fs::create_dir_all(dir.path().join("objects")).unwrap();
        let local =
            object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("objects"))
                .unwrap();
        let objects = outcache::backends::object::ObjectCache::new(
            Arc::new(local),
            object_store::path::Path::from("cache"),
            "local",
        );
        stats_attribute_owned_blobs(Cache::new(Arc::new(objects))).await;
    }
}

/// The prune that sweeps everything it may: orphans and temps past 10 ms, garbled rows, rows older
/// than a second.
fn sweep_everything() -> PruneOptions {
    let mut options = PruneOptions::new();
    options.orphans = true;
    options.corrupt = true;
    options.older_than = Some(Duration::from_secs(1));
    options.grace = Duration::from_millis(10);
    options
}

/// [`sweep_everything`] twice, a grace period apart (an orphan blob goes on its second sighting):
/// the rows, blobs and temps the two removed.
async fn sweep_everything_twice(cache: &dyn OutputCache) -> (u64, u64, u64) {
    let first = prune(cache, &sweep_everything(), |_| {}).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = prune(cache, &sweep_everything(), |_| {}).await.unwrap();
    (
        first.rows_removed + second.rows_removed,
        first.blobs_removed + second.blobs_removed,
        first.temps_removed + second.temps_removed,
    )
}

/// A cache root may be a directory that holds more than the cache (a project or home directory, `/`
/// by mistake): the janitor removes its own stale temps, orphans and garbled rows there, and nobody
/// else's file, however old, garbled or cache-like it looks. It used to take every file in `tmp/`
/// for a temp, every `*.json` under `rows/` for a row and every `*.bin` in `blobs/` for a blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_removes_only_files_the_fs_cache_names_as_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let three_hours_ago = SystemTime::now() - Duration::from_secs(3 * 3600);
    let plant = |rel: &str, bytes: &[u8]| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(three_hours_ago)
            .unwrap();
        (path, bytes.to_vec())
    };
    let theirs = [
        plant("tmp/notes.txt", b"precious"),
        plant("tmp/blob-draft.tmp", b"named almost like a temp"),
        plant("rows/data/a.json", b"{\"x\": 1}"),
        plant("rows/data/README", b"docs"),
        plant("blobs/readme.txt", b"docs"),
        plant("blobs/firmware.bin", b"an image"),
    ];
    let (garbled_row, _) = plant(&format!("rows/data/{}.json", "a".repeat(64)), b"{not json");
    let (stale_temp, _) = plant(&format!("tmp/blob-{}.tmp", "b".repeat(32)), b"a crash's");
    let orphan = format!("blobs/t_0123456789abcdef_{}.bin", "c".repeat(32));
    let (orphan, _) = plant(&orphan, b"no row cites it");

    let cache = outcache::backends::fs::FsCache::open(root, Default::default()).unwrap();
    let before = inventory(&cache, 0).await.unwrap();
    assert_eq!(before.foreign_entries, 6, "{before:?}");
    let counted = (before.corrupt_rows, before.temps, before.blobs);
    assert_eq!(counted, (1, 1, 1), "{before:?}");

    let removed = sweep_everything_twice(&cache).await;
    assert_eq!(removed, (1, 1, 1), "rows, blobs, temps removed");
    assert!(!garbled_row.exists(), "the cache's garbled row survived");
    assert!(!stale_temp.exists(), "the cache's stale temp survived");
    assert!(!orphan.exists(), "the cache's orphan blob survived");
    for (path, bytes) in &theirs {
        assert_eq!(
            std::fs::read(path).ok().as_ref(),
            Some(bytes),
            "{} was removed or changed",
            path.display()
        );
    }
}

/// The same on an object store whose prefix (or whole bucket) holds other objects: only objects
/// named as rows (`rows/<segment>/<fingerprint>.json`) and blobs (`blobs/<…>_<uuid>`) are the
/// cache's to read, sweep or remove.
#[cfg(feature = "object-store")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_removes_only_objects_the_object_cache_names_as_its_own() {
    use object_store::path::Path;
    use object_store::{ObjectStore, ObjectStoreExt as _, memory::InMemory};
    use outcache::backends::object::ObjectCache;

    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let theirs = [
        "c/rows/data/a.json",
        "c/rows/data/README",
        &format!("c/rows/={}/notes.json", "e".repeat(64)),
        "c/blobs/readme.txt",
        "c/blobs/firmware.bin",
        "c/tmp/notes.txt",
    ];
    let garbled_row = format!("c/rows/data/{}.json", "a".repeat(64));
    let orphan = format!("c/blobs/t_0123456789abcdef_{}", "c".repeat(32));
    for name in theirs.iter().copied().chain([&*garbled_row, &*orphan]) {
        let bytes = b"{not a row, not a blob".to_vec();
        store.put(&Path::from(name), bytes.into()).await.unwrap();
    }

    let cache = ObjectCache::new(store.clone(), Path::from("c"), "memory");
    let before = inventory(&cache, 0).await.unwrap();
    assert_eq!(
        before.blobs, 1,
        "others' objects counted as blobs: {before:?}"
    );
    let (rows, blobs, _) = sweep_everything_twice(&cache).await;
    assert_eq!((rows, blobs), (1, 1), "rows, blobs removed");
    for name in [&garbled_row, &orphan] {
        let gone = store.head(&Path::from(name.as_str())).await.is_err();
        assert!(gone, "the cache's {name} survived");
    }
    for name in theirs {
        let kept = store.head(&Path::from(name)).await.is_ok();
        assert!(kept, "{name} was removed");
    }
}
