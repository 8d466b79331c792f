//! What the janitor costs an object store, counted request by request (a counting `ObjectStore` over
//! object_store's in-memory store): `stats` and age, size and prefix prunes read no row object; deletes
//! go out in bulk; only the orphan sweep reads rows. The same counts on a real S3-compatible server are
//! in `cargo bench --bench prune`. Also what the by-name cascade of such listed-only deletes leaves alone.
#![cfg(feature = "object-store")]

#[path = "common/counting_store.rs"]
mod counting_store;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use counting_store::{CountingStore, Counts};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use outcache::backends::object::ObjectCache;
use outcache::janitor::{PruneOptions, inventory, prune};
use outcache::{BlobMeta, OutputCache, OutputCacheExt, RowKey};
use serde_json::json;

/// `n` rows of the task type `task`, one in ten holding a 2 KiB blob it owns; returns the keys.
async fn seed(cache: &ObjectCache, task: &str, from: usize, n: usize) -> Vec<RowKey> {
    let mut keys = Vec::new();
    for i in from..from + n {
        let key = RowKey::new(task, &json!({ "i": i })).unwrap();
        let output = if i % 10 == 0 {
            let data = futures::stream::iter([Ok(bytes::Bytes::from(vec![i as u8; 2048]))]).boxed();
            let r = cache
                .write_blob(&BlobMeta::for_key(&key), data)
                .await
                .unwrap();
            json!({ "i": i, "blob": r.to_value() })
        } else {
            json!({ "i": i, "text": "a small output" })
        };
        cache.save_row(&key, &output).await.unwrap();
        keys.push(key);
    }
    keys
}

fn counted() -> (ObjectCache, Arc<counting_store::Requests>) {
    let store = CountingStore::new(Arc::new(InMemory::new()));
    let requests = store.requests.clone();
    let cache =
        ObjectCache::new(Arc::new(store), Path::from("cache"), "counted").with_sorted_listing(true);
    (cache, requests)
}

#[tokio::test]
async fn stats_reads_no_row_object() {
    let (cache, requests) = counted();
    seed(&cache, "app/build", 0, 300).await;
    requests.take();
    let inv = inventory(&cache, 5).await.unwrap();
    let counts = requests.take();
    assert_eq!((inv.rows, inv.blobs), (300, 30));
    assert!(
        !inv.rows_read,
        "the object store's stats should list, not read"
    );
    assert_eq!(
        (counts.gets, counts.heads),
        (0, 0),
        "stats read objects: {counts:?}"
    );
    assert_eq!(
        counts.lists, 2,
        "one listing of rows, one of blobs: {counts:?}"
    );
    // The per-task bytes count the blobs each row owns, found by name.
    let top = &inv.top_task_types[0];
    assert_eq!((top.task_type.as_str(), top.rows), ("app/build", 300));
    assert_eq!(top.bytes, inv.row_bytes + inv.blob_bytes);
}

#[tokio::test]
async fn an_age_prune_lists_and_deletes_in_bulk_without_reading_rows() {
    let (cache, requests) = counted();
    let old = seed(&cache, "app/build", 0, 200).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let cutoff = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let new = seed(&cache, "app/build", 200, 200).await;
    requests.take();

    let mut options = PruneOptions::new();
    options.older_than = Some(cutoff.elapsed().unwrap());
    let report = prune(&cache, &options, |_| {}).await.unwrap();
    let counts = requests.take();

    assert_eq!((report.rows_removed, report.blobs_removed), (200, 20));
    assert_eq!(report.rows_kept_rewritten, 0);
    assert_eq!(
        (counts.gets, counts.heads),
        (0, 0),
        "the prune read objects: {counts:?}"
    );
    // The plan's two listings, then one re-listing of the batch's key range; no blob listing for the
    // cascade: the janitor hands each row's blobs from its own listing.
    assert_eq!(counts.lists, 3, "{counts:?}");
    // 200 rows and their 20 blobs (refs-index markers are left for the orphan sweep to clean).
    assert_eq!(counts.deleted, 200 + 20, "{counts:?}");
    assert!(
        counts.delete_calls <= 2,
        "rows and blobs go in one bulk delete each: {counts:?}"
    );

    // What it removed is gone, with the blobs it owned; the rest is intact.
    for key in &old {
        assert!(
            cache.get_row(key).await.unwrap().is_none(),
            "{key} survived"
        );
    }
    assert_eq!(cache.list_blobs().await.unwrap().len(), 20);
    for key in &new {
        let row = cache
            .get_row(key)
            .await
            .unwrap()
            .expect("a newer row was removed");
        if let Some(r) = outcache::CacheRef::from_value(&row.output["blob"]) {
            assert!(cache.read_blob(&r.reference).await.unwrap().is_some());
        }
    }
}

#[tokio::test]
async fn a_prefix_scoped_size_prune_reads_no_row_object() {
    let (cache, requests) = counted();
    seed(&cache, "app/build", 0, 100).await;
    seed(&cache, "app/test", 100, 100).await;
    requests.take();
    let mut options = PruneOptions::new();
    options.max_size = Some(0);
    options.prefix = Some("app/test".into());
    let report = prune(&cache, &options, |_| {}).await.unwrap();
    let counts = requests.take();
    assert_eq!((report.rows_removed, report.blobs_removed), (100, 10));
    assert_eq!((counts.gets, counts.heads), (0, 0), "{counts:?}");
    let left = cache.list_rows().await.unwrap();
    assert!(left.len() == 100 && left.iter().all(|r| r.key.task_type() == "app/build"));
}

#[tokio::test]
async fn a_row_rewritten_after_the_listing_is_kept_with_its_new_blob() {
    // The janitor's listing names a version (the ETag); a rewrite in the same instant (same
    // second on S3) is a new version, so the batch keeps it, and the new blob it owns survives.
    let (cache, _) = counted();
    let keys = seed(&cache, "app/build", 0, 10).await;
    let pages: Vec<outcache::RowScan> = cache.shallow_row_pages().try_collect().await.unwrap();
    assert_eq!(pages.len(), 1, "ten rows make one page");
    let listed = &pages[0];
    assert!(listed.listing_only);
    let target = &keys[0]; // i = 0 holds a blob
    let data = futures::stream::iter([Ok(bytes::Bytes::from_static(b"new"))]).boxed();
    let fresh = cache
        .write_blob(&BlobMeta::for_key(target), data)
        .await
        .unwrap();
    cache
        .save_row(target, &json!({ "blob": fresh.to_value() }))
        .await
        .unwrap();
    let versions: Vec<_> = listed.rows.iter().map(|r| r.listed_version()).collect();
    let deleted = cache.delete_rows_listed(&versions).await.unwrap();
    assert_eq!(deleted.len(), 9, "only the unchanged rows go");
    assert!(!deleted.contains(target));
    assert!(cache.get_row(target).await.unwrap().is_some());
    assert!(cache.read_blob(&fresh.reference).await.unwrap().is_some());
}

fn sweep() -> PruneOptions {
    let mut options = PruneOptions::new();
    options.orphans = true;
    options.grace = Duration::ZERO;
    options
}

#[tokio::test]
async fn without_a_refs_index_the_orphan_sweep_reads_every_row() {
    let (cache, requests) = counted();
    seed(&cache, "app/build", 0, 50).await;
    requests.take();
    prune(&cache, &sweep(), |_| {}).await.unwrap();
    let Counts { gets, .. } = requests.take();
    // Every row, plus `layout.json` (absent) and the janitor's own ledger (read, then deleted as empty,
    // which reads it again): refs are only in the rows.
    assert_eq!(gets, 50 + 3, "{gets} GETs for 50 rows");
}

#[tokio::test]
async fn with_a_refs_index_the_orphan_sweep_reads_only_the_rows_holding_refs() {
    let (cache, requests) = counted();
    // Rows from before the index (an older version wrote no markers): indexing reads them all once.
    seed(&cache, "app/build", 0, 50).await;
    let report = cache.index_refs().await.unwrap();
    assert_eq!((report.rows, report.marked), (50, 5));
    // Rows written afterwards are marked by the writer.
    seed(&cache, "app/build", 50, 50).await;
    requests.take();
    requests.take_listed();
    let swept = prune(&cache, &sweep(), |_| {}).await.unwrap();
    let Counts { gets, .. } = requests.take();
    // The markers and the blobs are listed; the rows, however many, are not.
    let mut listed = requests.take_listed();
    listed.sort();
    assert_eq!(listed, ["cache/blobs", "cache/refs"]);
    assert_eq!(
        gets,
        10 + 3,
        "the 10 rows holding refs, layout.json and the ledger's two"
    );
    assert_eq!(swept.blobs_removed, 0, "a referenced blob was swept");

    // A marked row rewritten without refs: its blob becomes an orphan (swept here at once, the grace
    // being zero), and its marker is dropped, so later sweeps read one row fewer.
    let key = RowKey::new("app/build", &json!({ "i": 0 })).unwrap();
    cache.save_row(&key, &json!("no refs now")).await.unwrap();
    let swept = prune(&cache, &sweep(), |_| {}).await.unwrap();
    assert_eq!(swept.blobs_removed, 1, "{swept:?}");
    requests.take();
    prune(&cache, &sweep(), |_| {}).await.unwrap();
    assert_eq!(requests.take().gets, 9 + 3);
    // A marked row deleted by key takes its marker with it: the next sweep reads no stale marker.
    // (The janitor's batched deletes leave markers; the sweep after them reads each once and removes it.)
    let marked = RowKey::new("app/build", &json!({ "i": 10 })).unwrap();
    assert!(cache.delete_row(&marked).await.unwrap());
    requests.take();
    prune(&cache, &sweep(), |_| {}).await.unwrap();
    assert_eq!(requests.take().gets, 8 + 3);
    // An age prune of everything leaves the 8 markers; the next sweep reads each marker's row (a 404),
    // removes the marker and reads the row once more (a writer that put it back meanwhile keeps its
    // marker), and the one after reads none. The sweep lists markers, never the rows themselves.
    let mut everything = PruneOptions::new();
    everything.older_than = Some(Duration::ZERO);
    prune(&cache, &everything, |_| {}).await.unwrap();
    requests.take();
    prune(&cache, &sweep(), |_| {}).await.unwrap();
    assert_eq!(requests.take().gets, 2 * 8 + 3);
    prune(&cache, &sweep(), |_| {}).await.unwrap();
    assert_eq!(requests.take().gets, 3);
    // Every remaining row's blob is intact.
    for row in cache.list_rows().await.unwrap() {
        for r in &row.refs {
            assert!(cache.read_blob(r).await.unwrap().is_some(), "{r} was swept");
        }
    }
}

#[tokio::test]
async fn a_refs_index_of_a_newer_version_stops_the_sweep() {
    let store = Arc::new(InMemory::new());
    let cache = ObjectCache::new(store.clone(), Path::from("cache"), "newer");
    seed(&cache, "app/build", 0, 10).await;
    store
        .put(
            &Path::from("cache/layout.json"),
            br#"{"refs_index": 99}"#.to_vec().into(),
        )
        .await
        .unwrap();
    let err = prune(&cache, &sweep(), |_| {}).await.unwrap_err();
    assert!(err.to_string().contains("newer outcache"), "{err}");
    assert_eq!(cache.list_blobs().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_copy_of_a_blob_kept_deeper_survives_the_by_name_cascade() {
    // A row the janitor only listed (no blob listing handed along) cascades by name: every blob whose
    // name carries its key tag. Someone's copy at `blobs/backup/<the blob's name>` carries it too, but
    // it is not this cache's blob (its ref would name `blobs/<name>`), so it must stay.
    let store = Arc::new(InMemory::new());
    let cache = ObjectCache::new(store.clone(), Path::from("cache"), "copies");
    let key = RowKey::new("app/build", &json!({ "i": 1 })).unwrap();
    let data = futures::stream::iter([Ok(bytes::Bytes::from(vec![7u8; 4096]))]).boxed();
    let blob = cache
        .write_blob(&BlobMeta::for_key(&key), data)
        .await
        .unwrap();
    let name = blob.reference.rsplit('/').next().unwrap().to_owned();
    let copy = Path::from(format!("cache/blobs/backup/{name}"));
    store
        .put(&copy, object_store::PutPayload::from_static(b"a copy"))
        .await
        .unwrap();
    cache
        .save_row(&key, &json!({ "blob": blob.to_value() }))
        .await
        .unwrap();

    let pages: Vec<outcache::RowScan> = cache.shallow_row_pages().try_collect().await.unwrap();
    let versions: Vec<_> = pages[0].rows.iter().map(|r| r.listed_version()).collect();
    assert!(versions.iter().all(|v| v.owned_blobs.is_none()), "by name");
    let deleted = cache.delete_rows_listed(&versions).await.unwrap();

    assert_eq!(deleted, [key]);
    assert!(
        cache.read_blob(&blob.reference).await.unwrap().is_none(),
        "the row's own blob goes with it"
    );
    let kept = store.get(&copy).await.expect("the copy is kept");
    assert_eq!(kept.bytes().await.unwrap(), "a copy");
}
