//! The memory of the orphan sweep, `stats`, `index-refs`, an age prune and a size budget does not grow with the cache (issue "S3 at
//! scale": paginated end to end). A counting allocator records the peak heap a command adds; the same
//! command over a cache four times larger must not need much more. The tests take turns (one allocator
//! counts for all). The store is object_store's local filesystem, so the objects live on disk, not in
//! the process's heap, and it lists page by page as S3 does.
#![cfg(feature = "object-store")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use object_store::local::LocalFileSystem;
use object_store::path::Path;
use outcache::backends::object::ObjectCache;
use outcache::janitor::{PruneOptions, prune};
use outcache::{BlobMeta, OutputCache, RowKey};
use serde_json::json;

use futures::StreamExt;

/// The system allocator, counting the bytes live now and the most live since the last reset.
struct Peak;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call goes straight to `System`; the counters only observe.
unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Peak = Peak;

/// A cache on local disk with `rows` rows that each hold a blob, and as many orphan blobs.
async fn seeded(dir: std::path::PathBuf, rows: usize) -> ObjectCache {
    let local = LocalFileSystem::new_with_prefix(dir).unwrap();
    let cache = ObjectCache::new(Arc::new(local), Path::from("cache"), "local");
    cache.index_refs().await.unwrap();
    futures::future::try_join_all((0..rows).map(|i| {
        let cache = &cache;
        async move {
            let key = RowKey::new("app/build", &json!({ "i": i })).unwrap();
            let blob = |tag: &str| {
                let bytes = bytes::Bytes::from(format!("{tag} {i}"));
                futures::stream::once(async move { Ok(bytes) }).boxed()
            };
            let kept = cache
                .write_blob(&BlobMeta::for_key(&key), blob("kept"))
                .await?;
            cache
                .save_row(&key, &json!({ "artifact": kept.to_value() }))
                .await?;
            let orphan_key = RowKey::new("app/gone", &json!({ "i": i })).unwrap();
            cache
                .write_blob(&BlobMeta::for_key(&orphan_key), blob("orphan"))
                .await?;
            Ok::<_, outcache::Error>(())
        }
    }))
    .await
    .unwrap();
    cache
}

/// The heap the sweep adds at its peak, and what it removed.
async fn sweep_peak(cache: &ObjectCache) -> (usize, u64) {
    let mut options = PruneOptions::new();
    options.orphans = true;
    options.grace = Duration::ZERO;
    // Small runs, so that the larger cache spills many of them (the default spills at 200 000 lines).
    options.spill_lines = 200;
    let (peak, report) = peak_of(prune(cache, &options, |_| {})).await;
    (peak, report.unwrap().blobs_removed)
}

/// What `work` returns, and the most heap it held above what was live when it started.
async fn peak_of<T>(work: impl std::future::Future<Output = T>) -> (usize, T) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = work.await;
    (PEAK.load(Ordering::Relaxed) - base, out)
}

/// `peaks` (the peak heap of `what` over a cache, then over one four times larger) are about the same:
/// holding a listing would take about four times the memory, pages take the same whatever the count.
fn assert_flat(what: &str, peaks: &[usize], small: &str, large: &str) {
    assert!(
        (peaks[1] as f64) < 1.5 * peaks[0] as f64,
        "{what}: the peak heap grew with the cache: {} B for {small}, {} B for {large}",
        peaks[0],
        peaks[1]
    );
}

/// A cache seeded with `rows` and one seeded with four times as many, each in a temp dir of its own
/// (returned too: the caches live on disk there).
async fn pair<Seeded>(
    seed: impl Fn(std::path::PathBuf, usize) -> Seeded,
    rows: usize,
) -> (ObjectCache, ObjectCache, [tempfile::TempDir; 2])
where
    Seeded: std::future::Future<Output = ObjectCache>,
{
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let small = seed(dirs[0].path().to_owned(), rows).await;
    let large = seed(dirs[1].path().to_owned(), 4 * rows).await;
    (small, large, dirs)
}

/// One test at a time: the counters are the whole process's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "current_thread")]
async fn the_orphan_sweep_needs_no_more_memory_for_a_cache_four_times_larger() {
    let _turn = SERIAL.lock().await;
    let (small, large, _dirs) = pair(seeded, 1_500).await;
    let (small_peak, small_removed) = sweep_peak(&small).await;
    let (large_peak, large_removed) = sweep_peak(&large).await;
    // Every orphan found, no kept blob taken.
    assert_eq!((small_removed, large_removed), (1_500, 6_000));
    for (cache, rows) in [(&small, 1_500), (&large, 6_000)] {
        let blobs = cache.list_blobs().await.unwrap();
        assert_eq!(blobs.len(), rows);
        for b in blobs {
            let bytes = cache.read_blob(&b.id).await.unwrap().unwrap();
            assert!(bytes.starts_with(b"kept "), "{} survived the sweep", b.id);
        }
    }
    // Holding the listings would take about four times the memory here; pages and spilled runs take
    // the same whatever the count.
    assert!(
        (large_peak as f64) < 1.5 * small_peak as f64,
        "the sweep's peak heap grew with the cache: {small_peak} B for 1 500 rows, {large_peak} B \
         for 6 000"
    );
}

/// `stats` holds neither listing whole: which blobs each task type's rows own is found by joining
/// sorted runs (small ones here, so the larger cache spills many), and the bytes still add up.
#[tokio::test(flavor = "current_thread")]
async fn stats_needs_no_more_memory_for_four_times_the_rows_and_blobs() {
    let _turn = SERIAL.lock().await;
    let (small, large, _dirs) = pair(seeded, 1_500).await;
    let mut peaks = Vec::new();
    for (cache, rows) in [(&small, 1_500u64), (&large, 6_000)] {
        let (peak, inv) = peak_of(outcache::janitor::inventory_spilling(cache, 5, 200)).await;
        let inv = inv.unwrap();
        peaks.push(peak);
        assert_eq!((inv.rows, inv.blobs), (rows, 2 * rows));
        assert!(
            !inv.rows_read,
            "an object store lists rows for stats, never reads them"
        );
        // The rows own the kept blobs; the orphans are nobody's.
        let kept: u64 = (0..rows).map(|i| format!("kept {i}").len() as u64).sum();
        assert_eq!(inv.top_task_types.len(), 1, "{:?}", inv.top_task_types);
        let top = &inv.top_task_types[0];
        assert_eq!(
            (top.task_type.as_str(), top.rows, top.bytes),
            ("app/build", rows, inv.row_bytes + kept)
        );
    }
    assert_flat(
        "stats",
        &peaks,
        "1 500 rows and 3 000 blobs",
        "four times as many",
    );
}

#[tokio::test(flavor = "current_thread")]
async fn index_refs_needs_no_more_memory_for_four_times_the_rows() {
    let _turn = SERIAL.lock().await;
    let (small, large, _dirs) = pair(seeded, 1_500).await;
    let mut peaks = Vec::new();
    for (cache, rows) in [(&small, 1_500), (&large, 6_000)] {
        // Every row read again and marked again (it is idempotent), a page at a time.
        let (peak, report) = peak_of(cache.index_refs()).await;
        let report = report.unwrap();
        assert_eq!(
            (report.rows, report.marked, report.unreadable),
            (rows, rows, 0)
        );
        peaks.push(peak);
    }
    assert_flat("index-refs", &peaks, "1 500 rows", "6 000");
}

/// An age prune holds the rows it removes and their blobs, not the listings: the blobs go into small
/// sorted runs here (the larger cache spills many), and only those of the rows it removes come back.
#[tokio::test(flavor = "current_thread")]
async fn an_age_prune_holds_only_the_rows_it_removes() {
    let _turn = SERIAL.lock().await;
    let (small, large, _dirs) = pair(seeded, 1_500).await;
    let mut peaks = Vec::new();
    for cache in [&small, &large] {
        // Nothing is an hour old: the listings stream past and nothing is kept.
        let mut options = PruneOptions::new();
        options.older_than = Some(Duration::from_secs(3600));
        options.spill_lines = 200;
        let (peak, report) = peak_of(prune(cache, &options, |_| {})).await;
        assert_eq!(report.unwrap().rows_removed, 0);
        peaks.push(peak);
    }
    assert_flat(
        "an age prune that removes nothing",
        &peaks,
        "1 500 rows and 3 000 blobs",
        "four times as many",
    );
    // And it still removes what is old, past a zero age: every row and the blob each owns, counted
    // (the orphans are no row's: only --orphans takes them).
    let mut options = PruneOptions::new();
    options.older_than = Some(Duration::ZERO);
    options.spill_lines = 200;
    let row_bytes = outcache::janitor::inventory(&large, 1)
        .await
        .unwrap()
        .row_bytes;
    let report = prune(&large, &options, |_| {}).await.unwrap();
    let kept: u64 = (0..6_000).map(|i| format!("kept {i}").len() as u64).sum();
    assert_eq!(
        (
            report.rows_removed,
            report.blobs_removed,
            report.by_age.bytes
        ),
        (6_000, 6_000, row_bytes + kept)
    );
    assert_eq!(
        large.list_blobs().await.unwrap().len(),
        6_000,
        "the orphans stay"
    );
}

/// A size budget over more candidates than it may hold lists the rows again, and joins their claims
/// with the blobs in spilled runs: deciding what goes holds neither listing, only the rows it evicts
/// and their blobs; carrying it out hands each deleted row's blobs to the backend, which then lists
/// no blobs of its own to find them by name.
#[tokio::test(flavor = "current_thread")]
async fn a_size_budget_past_its_bound_holds_neither_listing_for_four_times_the_rows_and_blobs() {
    let _turn = SERIAL.lock().await;
    let (small, large, _dirs) = pair(seeded, 1_500).await;
    let mut peaks = Vec::new();
    let mut options = PruneOptions::new();
    options.spill_lines = 200;
    for cache in [&small, &large] {
        // A budget ten rows (each with its blob) short: the least recently used ten go.
        let before = outcache::janitor::inventory(cache, 1).await.unwrap();
        let total = before.row_bytes + before.blob_bytes;
        let per_row = (before.row_bytes + before.blob_bytes / 2) / before.rows;
        options.max_size = Some(total - 10 * per_row + 1);
        let (peak, report) = peak_of(prune(cache, &options, |_| {})).await;
        let report = report.unwrap();
        let (rows, blobs) = (report.rows_removed, report.blobs_removed);
        assert!((10..=11).contains(&rows), "{rows} rows evicted");
        assert_eq!(blobs, rows, "each evicted row takes its own blob, counted");
        peaks.push(peak);
        // The blobs counted are the blobs gone, and the cache is now within the budget.
        let after = outcache::janitor::inventory(cache, 1).await.unwrap();
        assert_eq!(
            (before.rows - after.rows, before.blobs - after.blobs),
            (rows, blobs)
        );
        assert!(after.row_bytes + after.blob_bytes <= options.max_size.unwrap());
    }
    assert_flat(
        "a size budget",
        &peaks,
        "1 500 rows and 3 000 blobs",
        "four times as many",
    );
}

/// A file or object named like a row but larger than any row (planted in a shared cache, or a disk
/// fault): a hit on it, a deep scan and `prune --corrupt` read only its head, report it as garbled
/// with its size, and remove it, on fs and on an object store. They used to read it whole.
#[tokio::test(flavor = "current_thread")]
async fn a_row_larger_than_any_row_is_never_read_whole() {
    let _turn = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let fs_root = dir.path().join("fs");
    let objects = dir.path().join("objects");
    std::fs::create_dir_all(&objects).unwrap();
    let key = RowKey::from_parts("t", &"a".repeat(64)).unwrap();
    let fs_cache = outcache::backends::fs::FsCache::open(&fs_root, Default::default()).unwrap();
    let local = LocalFileSystem::new_with_prefix(&objects).unwrap();
    let object_cache = ObjectCache::new(Arc::new(local), Path::from("cache"), "local");
    let huge = 1_500_000_000; // sparse: no disk used
    for file in [
        fs_root.join(format!("rows/t/{}.json", key.fingerprint())),
        objects.join(format!("cache/rows/t/{}.json", key.fingerprint())),
    ] {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(huge).unwrap();
    }
    let caches: [&dyn OutputCache; 2] = [&fs_cache, &object_cache];
    for cache in caches {
        let (peak, got) = peak_of(cache.get_row(&key)).await;
        match got {
            Err(e @ outcache::Error::CorruptRow { .. }) => {
                assert!(e.to_string().contains("larger than any row"), "{e}")
            }
            other => panic!("{cache}: a giant row file was read as {other:?}"),
        }
        let (scan_peak, scan) = peak_of(cache.scan_rows()).await;
        let scan = scan.unwrap();
        assert_eq!(scan.unreadable.len(), 1, "{cache}: {:?}", scan.unreadable);
        assert_eq!(scan.unreadable[0].size, huge, "{cache}");
        let mut options = PruneOptions::new();
        options.corrupt = true;
        let (prune_peak, report) = peak_of(prune(cache, &options, |_| {})).await;
        assert_eq!(report.unwrap().rows_removed, 1, "{cache}");
        for (what, peak) in [("get", peak), ("scan", scan_peak), ("prune", prune_peak)] {
            assert!(peak < 16 << 20, "{cache}: {what} held {peak} B");
        }
    }
}
