//! Data-safety cases: invariants 11–15 of DESIGN §7 (and of `ARCHITECTURE.md`). Each is a way the cache
//! could serve a wrong output, delete what it does not own, or report an unreadable blob as written,
//! found by trying the cache as an adversary would; every backend and wrapper must hold against it.

use super::*;
use crate::janitor::{PruneOptions, prune};

/// A producer that sends `first`, then waits until `go` fires (or is dropped), then sends `rest` and ends.
fn gated_stream(first: Bytes, rest: Bytes, go: tokio::sync::oneshot::Receiver<()>) -> ByteStream {
    stream_of(first, 65_536)
        .chain(
            futures::stream::once(async move {
                let _ = go.await;
                Ok(Bytes::new())
            })
            .filter(|c: &crate::Result<Bytes>| {
                let keep = c.as_ref().map_or(true, |b| !b.is_empty());
                async move { keep }
            }),
        )
        .chain(stream_of(rest, 65_536))
        .boxed()
}

/// Invariant 11: two inputs that differ as values never share a row, even where IEEE doubles cannot tell
/// them apart (64-bit ids above 2^53); the same value spelled two ways (`1.0`, `1`) still does.
pub async fn distinct_big_integers_are_distinct_rows(cache: Backend) -> CaseResult {
    let engine = engine(&cache, 1024);
    let task = "conformance/bigint";
    let two53: u64 = 1 << 53;
    engine
        .put(task, &json!({"user_id": two53 + 1}), &json!("p993"))
        .await?;
    let hit = engine.get(task, &json!({"user_id": two53})).await?;
    ensure!(
        hit.is_none(),
        "2^53 hit the row stored for 2^53 + 1: {hit:?}"
    );
    engine
        .put(task, &json!({"seed": u64::MAX}), &json!("max"))
        .await?;
    let hit = engine.get(task, &json!({"seed": u64::MAX - 1})).await?;
    ensure!(hit.is_none(), "u64::MAX - 1 hit u64::MAX's row: {hit:?}");
    let same = engine.get(task, &json!({"seed": u64::MAX})).await?;
    ensure!(same == Some(json!("max")), "u64::MAX missed its own row");
    engine.put(task, &json!({"n": 1}), &json!("one")).await?;
    let spelled = engine.get(task, &json!({"n": 1.0})).await?;
    ensure!(spelled == Some(json!("one")), "1.0 missed the row of 1");
    Ok(())
}

/// The prune options of a janitor run that targets rows only.
fn prune_rows(older_than: Option<Duration>, max_size: Option<u64>, prefix: &str) -> PruneOptions {
    let mut options = PruneOptions::new();
    options.older_than = older_than;
    options.max_size = max_size;
    options.prefix = Some(prefix.to_owned());
    options
}

/// Invariant 12: a row's delete cascades only to the blobs it owns (wrote). A row citing another row's
/// blob (a pass-through output) never takes it along — not by `delete_row`, `delete_rows`,
/// `delete_rows_listed`, `delete_prefix`, nor by the janitor's age or size prunes, whose reports count
/// only what they removed — while the owner's delete still cascades.
pub async fn borrowed_refs_survive_the_borrowers_delete(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (owner, blob) = row_with_blob(&cache, "conformance/producer", 1).await?;
    let bundle = |i: u64| key("conformance/bundle", i);
    let cite = json!({"parts": [blob.to_value()], "note": "passes the producer's output through"});
    let still_there = |what: &str| {
        let (cache, reference, what) = (cache.clone(), blob.reference.clone(), what.to_owned());
        async move {
            ensure!(
                cache.read_blob(&reference).await?.is_some(),
                "{what} deleted a blob the borrowing row does not own"
            );
            Ok::<(), Failure>(())
        }
    };

    cache.save_row(&bundle(1)?, &cite).await?;
    ensure!(cache.delete_row(&bundle(1)?).await?, "delete_row: no row");
    still_there("delete_row").await?;

    cache.save_row(&bundle(2)?, &cite).await?;
    ensure!(cache.delete_rows(&[bundle(2)?]).await? == 1, "delete_rows");
    still_there("delete_rows").await?;

    cache.save_row(&bundle(3)?, &cite).await?;
    let listed = cache
        .list_rows()
        .await?
        .into_iter()
        .find(|r| r.key == bundle(3).unwrap_or_else(|_| unreachable!()))
        .ok_or_else(|| Failure("list_rows misses a saved row".into()))?;
    let version = listed.listed_version();
    ensure!(
        cache.delete_rows_listed(&[version]).await?.len() == 1,
        "delete_rows_listed did not delete an unchanged row"
    );
    still_there("delete_rows_listed").await?;

    cache.save_row(&bundle(4)?, &cite).await?;
    ensure!(
        cache.delete_prefix("conformance/bundle").await? == 1,
        "delete_prefix"
    );
    still_there("delete_prefix").await?;

    cache.save_row(&bundle(5)?, &cite).await?;
    let report = prune(
        cache.as_ref(),
        &prune_rows(Some(Duration::ZERO), None, "conformance/bundle"),
        |_| {},
    )
    .await?;
    ensure!(
        report.rows_removed == 1 && report.blobs_removed == 0,
        "age prune of the borrower reported {report:?}"
    );
    still_there("an age prune").await?;

    cache.save_row(&bundle(6)?, &cite).await?;
    let report = prune(
        cache.as_ref(),
        &prune_rows(None, Some(0), "conformance/bundle"),
        |_| {},
    )
    .await?;
    ensure!(
        report.rows_removed == 1 && report.blobs_removed == 0,
        "size prune of the borrower reported {report:?}"
    );
    still_there("a size prune").await?;

    // The owner's delete still cascades, and the janitor counts the blob it removes.
    let report = prune(
        cache.as_ref(),
        &prune_rows(Some(Duration::ZERO), None, "conformance/producer"),
        |_| {},
    )
    .await?;
    ensure!(
        report.rows_removed == 1 && report.blobs_removed == 1,
        "age prune of the owner reported {report:?}"
    );
    ensure!(
        cache.get_row(&owner).await?.is_none() && cache.read_blob(&blob.reference).await?.is_none(),
        "the owner's delete did not cascade to its blob"
    );
    Ok(())
}

/// Invariant 13: a hit whose referenced blob is gone is a miss (the task runs again), for large refs
/// (checked by a stat) and small ones (hydrated) alike; a row whose refs all resolve is still a hit.
pub async fn hit_with_a_missing_blob_is_a_miss(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let engine = engine(&cache, 1024);
    let inputs = json!({"n": 13});
    let stored = engine
        .put_stream(
            "conformance/dangling",
            &inputs,
            stream_of(pattern(200_000, 13), 8192),
            BlobOptions::default(),
        )
        .await?;
    let r = CacheRef::from_value(&stored).ok_or_else(|| {
        Failure(format!(
            "200 kB above a 1 KiB threshold stayed inline: {stored}"
        ))
    })?;
    ensure!(
        engine.get("conformance/dangling", &inputs).await? == Some(stored.clone()),
        "a hit with a resolvable ref did not come back as stored"
    );
    // A borrower citing it, large and hydrated (threshold above its size) alike.
    engine
        .put("conformance/borrower", &inputs, &json!({"parts": [stored]}))
        .await?;
    cache.delete_blob(&r.reference).await?;
    ensure!(
        engine.get("conformance/dangling", &inputs).await?.is_none(),
        "a hit whose blob is gone was served"
    );
    ensure!(
        engine.get("conformance/borrower", &inputs).await?.is_none(),
        "a borrower whose cited blob is gone was served"
    );
    let hydrating = self::engine(&cache, 1 << 30);
    ensure!(
        hydrating
            .get("conformance/borrower", &inputs)
            .await?
            .is_none(),
        "a small dangling ref (hydrated on read) was served"
    );
    Ok(())
}

/// Invariant 14: a write reports success only if its blob reads back whole. A producer stalls while the
/// janitor sweeps with a grace shorter than the stall; then it finishes. Either the write fails and
/// nothing is published, or the blob reads back whole — never success with an unreadable blob.
pub async fn stalled_write_swept_never_reports_an_unreadable_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (first, rest) = (pattern(600_000, 141), pattern(300_000, 142));
    let (go, wait) = tokio::sync::oneshot::channel();
    let writer = {
        let cache = cache.clone();
        let stream = gated_stream(first.clone(), rest.clone(), wait);
        tokio::spawn(async move { cache.write_blob(&meta("conformance/stall"), stream).await })
    };
    // Let the first part land, then sweep with no grace at all, as a careless operator might.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sweep_orphans(cache.as_ref(), Duration::ZERO, false).await?;
    let _ = go.send(());
    let result = writer
        .await
        .map_err(|e| Failure(format!("the writer panicked: {e}")))?;
    let mut whole = first.to_vec();
    whole.extend_from_slice(&rest);
    let whole = Bytes::from(whole);
    match result {
        Ok(r) => check_blob(&cache, &r, &whole).await,
        Err(_) => {
            let left = published(&cache).await?;
            ensure!(left.is_empty(), "the write failed but published {left:?}");
            no_temps_soon(&cache).await
        }
    }
}

/// Invariant 15: the janitor deletes a row only if it is still the one it listed: a row rewritten after
/// the listing survives `delete_rows_listed`, with the blob it now owns.
pub async fn janitor_keeps_rows_rewritten_after_its_listing(cache: Backend) -> CaseResult {
    let k = key("conformance/rewritten", 1)?;
    cache.save_row(&k, &json!("old")).await?;
    let listed = cache
        .list_rows()
        .await?
        .into_iter()
        .find(|r| r.key == k)
        .ok_or_else(|| Failure("list_rows misses a saved row".into()))?;
    // Commit times have millisecond resolution on some backends: make the rewrite a later one.
    tokio::time::sleep(Duration::from_millis(20)).await;
    cache.save_row(&k, &json!("new")).await?;
    let deleted = cache.delete_rows_listed(&[listed.listed_version()]).await?;
    ensure!(
        deleted.is_empty(),
        "a row rewritten after the listing was deleted as the listed one"
    );
    let row = cache.get_row(&k).await?;
    ensure!(
        row.as_ref().map(|r| &r.output) == Some(&json!("new")),
        "the rewritten row is gone or changed: {row:?}"
    );
    let fresh = cache
        .list_rows()
        .await?
        .into_iter()
        .find(|r| r.key == k)
        .ok_or_else(|| Failure("list_rows misses the rewritten row".into()))?;
    let deleted = cache.delete_rows_listed(&[fresh.listed_version()]).await?;
    ensure!(
        deleted == [k.clone()],
        "the current version was not deleted: {deleted:?}"
    );
    ensure!(cache.get_row(&k).await?.is_none(), "the row survived");
    Ok(())
}

/// Invariant 15: an orphan gets its grace from the moment it became one, not from when it was written:
/// a blob orphaned by an overwrite stays readable for the grace period (a reader may hold the old row).
pub async fn orphan_grace_counts_from_when_it_became_one(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let grace = Duration::from_millis(600);
    let (k, old) = row_with_blob(&cache, "conformance/overwrite", 1).await?;
    // The blob is now older than the grace period, but still referenced.
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    cache.save_row(&k, &json!("no blob any more")).await?;
    let first = sweep_orphans(cache.as_ref(), grace, false).await?;
    ensure!(
        first.blobs.is_empty() && cache.read_blob(&old.reference).await?.is_some(),
        "a blob orphaned a moment ago was swept: its grace counted from its write"
    );
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    let second = sweep_orphans(cache.as_ref(), grace, false).await?;
    let swept: Vec<&str> = second.blobs.iter().map(|b| b.id.as_str()).collect();
    ensure!(
        swept == [old.reference.as_str()],
        "after its grace the orphan was not swept (swept {swept:?})"
    );
    ensure!(
        cache.read_blob(&old.reference).await?.is_none(),
        "the swept orphan still reads"
    );
    Ok(())
}

/// Invariant 7 (temps are visible): a write in flight that has taken in bytes is listed as a temp while
/// it stalls — so `stats` sees it and a janitor can clean up after a crash — and once it is dropped,
/// no temp is left in the listing.
pub async fn in_flight_write_is_listed_as_a_temp(cache: Backend) -> CaseResult {
    gate!(cache, &[Cap::WriteBlob]);
    let writer = spawn_stalled_writer(&cache, "conformance/inflight-temp", 600_000, 71);
    let mut listed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if temps(&cache).await? > 0 {
            listed = true;
            break;
        }
    }
    writer.abort();
    let _ = writer.await;
    ensure!(
        listed,
        "a write in flight (600 kB taken in, then stalled) was never listed as a temp"
    );
    no_temps_soon(&cache).await
}

/// Invariant 15: a janitor deleting a row spares the blob of a newer write of the same key still in
/// flight (published, its row not yet committed): the delete takes only what the listed row owns and
/// references, so the newer write commits a row whose blob is there.
pub async fn janitor_spares_the_blob_of_a_newer_write_in_flight(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (k, old) = row_with_blob(&cache, "conformance/inflight-rewrite", 1).await?;
    // The newer write: its blob is published, its row not yet saved.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let newer = cache
        .write_blob(&BlobMeta::for_key(&k), stream_of(pattern(3000, 2), 1000))
        .await?;
    let mut options = PruneOptions::new();
    options.older_than = Some(Duration::ZERO);
    options.prefix = Some("conformance/inflight-rewrite".into());
    let report = prune(cache.as_ref(), &options, |_| {}).await?;
    ensure!(
        report.rows_removed == 1,
        "the age prune did not remove the listed row: {report:?}"
    );
    ensure!(
        cache.read_blob(&old.reference).await?.is_none(),
        "the listed row's own blob survived its delete"
    );
    ensure!(
        cache.stat_blob(&newer.reference).await?.is_some(),
        "the janitor deleted the blob of a newer write of the same key still in flight"
    );
    cache
        .save_row(&k, &json!({ "out": newer.to_value() }))
        .await?;
    let row = cache.get_row(&k).await?;
    ensure!(row.is_some(), "the newer write's row is missing");
    Ok(())
}

/// `rows` rows of `task`, each with a blob, then key 0 written again: its first blob an orphan.
async fn rows_and_an_overwrite(cache: &Backend, task: &str, rows: u64) -> Result<(), Failure> {
    for i in 0..rows {
        super::cascades::row_with_blob(cache, task, i).await?;
    }
    super::cascades::row_with_blob(cache, task, 0).await?;
    Ok(())
}

/// A prune of every row by age, with the orphan sweep at no grace.
fn prune_everything() -> PruneOptions {
    let mut options = PruneOptions::new();
    options.older_than = Some(Duration::ZERO);
    options.orphans = true;
    options.grace = Duration::ZERO;
    options
}

/// Fails listing the published blobs left, if any.
async fn no_blob_left(cache: &Backend, after: &str) -> CaseResult {
    let blobs: Vec<_> = cache
        .list_blobs()
        .await?
        .into_iter()
        .filter(|b| b.state == crate::store::BlobState::Published)
        .collect();
    ensure!(blobs.is_empty(), "left after {after}: {blobs:?}");
    Ok(())
}

/// Invariant 15: two janitors at once (two hosts' cron lines, a server's schedule beside an operator's
/// prune) both finish without an error though each deletes rows and blobs from under the other, and
/// between them remove every row past the cutoff with its blob and the orphan an overwrite left, with
/// no row left pointing at a missing blob.
pub async fn two_janitors_at_once_both_finish_and_leave_nothing_behind(
    cache: Backend,
) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let task = "conformance/twice";
    rows_and_an_overwrite(&cache, task, 6).await?;
    let options = prune_everything();
    let (a, b) = tokio::join!(
        prune(cache.as_ref(), &options, |_| {}),
        prune(cache.as_ref(), &options, |_| {})
    );
    for (which, report) in [("first", a), ("second", b)] {
        report.map_err(|e| Failure(format!("the {which} of two janitors failed: {e}")))?;
    }
    let rows = cache.list_rows().await?;
    ensure!(
        rows.iter().all(|r| r.key.task_type() != task),
        "rows past the cutoff survived two janitors: {rows:?}"
    );
    no_blob_left(&cache, "two janitors that removed every row").await
}

/// Invariant 15: a prune by age with the orphan sweep, over a key written twice, removes every row,
/// the blob each row refers to, and the blob the overwrite orphaned, and counts each once: the rows'
/// blobs with the rows, the orphan as an orphan. Where rows are only listed, the janitor had counted the
/// orphan as its row's (it carries the row's key tag) and kept it from the sweep, while the row's delete
/// (reading the row, as it does for rows committed seconds ago) took only the blob it refers to: the
/// orphan was reported removed and left behind.
pub async fn an_age_prune_with_the_sweep_takes_an_overwritten_blob_once(
    cache: Backend,
) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    rows_and_an_overwrite(&cache, "conformance/overwritten", 3).await?;
    let report = prune(cache.as_ref(), &prune_everything(), |_| {}).await?;
    ensure!(
        (
            report.by_age.rows,
            report.by_age.blobs,
            report.orphans.blobs
        ) == (3, 3, 1),
        "expected 3 rows with their 3 blobs by age and 1 orphan: {report:?}"
    );
    no_blob_left(&cache, "the prune").await
}

/// Invariant 16: the janitor removes only what the backend wrote. A cache is often pointed at a
/// directory or a bucket prefix that holds more than the cache (a project, a home directory, a bucket
/// shared with other data): entries of someone else's planted beside the backend's own, named like its
/// rows, blobs and temps but not as it names them, survive every janitor operation (the inventory, a
/// size eviction with the sweeps of garbled rows, orphans and temps, an age prune, a prefix delete), and
/// do not stop the janitor from removing the backend's own. Waived without a fixture that plants them
/// ([`crate::conformance::Fixture::with_neighbours`]).
pub async fn janitor_leaves_what_it_did_not_write(cache: Backend) -> CaseResult {
    let Some(neighbours) = crate::conformance::neighbours_now() else {
        crate::conformance::note_waiver("neighbours");
        return Ok(());
    };
    let blobs = BLOB_CAPS.iter().all(|c| has(&cache, *c));
    let task = "conformance/neighbours";
    // The backend's own entries first, so every place it keeps them exists when the neighbours move in.
    let own = |round: u64| {
        let cache = cache.clone();
        async move {
            cache
                .save_row(&key(task, 100 + round)?, &json!({"plain": round}))
                .await?;
            if blobs {
                super::cascades::row_with_blob(&cache, task, round).await?;
                write(&cache, &pattern(4000, round), 1000).await?;
            }
            Ok::<(), Failure>(())
        }
    };
    own(0).await?;
    let planted = neighbours
        .plant()
        .await
        .map_err(|e| Failure(format!("the fixture could not plant its neighbours: {e}")))?;
    let checked = async {
        ensure!(!planted.is_empty(), "the fixture planted no neighbours");
        crate::janitor::inventory(cache.as_ref(), 5).await?;
        let mut evict = PruneOptions::new();
        evict.max_size = Some(0);
        evict.corrupt = true;
        evict.orphans = blobs;
        evict.grace = Duration::ZERO;
        let evicted = prune(cache.as_ref(), &evict, |_| {}).await?;
        ensure!(
            cache.list_rows().await?.is_empty(),
            "a size budget of 0 left the backend's own rows beside the neighbours"
        );
        ensure!(
            evicted.size_after == Some(0),
            "a size budget of 0 reported {:?} bytes left: the neighbours were counted",
            evicted.size_after
        );
        no_blob_left(&cache, "a size eviction with the orphan sweep, beside the neighbours").await?;
        own(1).await?;
        let mut by_age = prune_everything();
        by_age.orphans = blobs;
        prune(cache.as_ref(), &by_age, |_| {}).await?;
        ensure!(
            cache.list_rows().await?.is_empty(),
            "an age prune left the backend's own rows beside the neighbours"
        );
        no_blob_left(&cache, "an age prune with the orphan sweep, beside the neighbours").await?;
        own(2).await?;
        cache.delete_prefix("").await?;
        if blobs {
            sweep_orphans(cache.as_ref(), Duration::ZERO, false).await?;
        }
        let missing = neighbours
            .missing(&planted)
            .await
            .map_err(|e| Failure(format!("the fixture could not check its neighbours: {e}")))?;
        ensure!(
            missing.is_empty(),
            "the janitor removed or changed {} of {} entries the backend did not write: {missing:?}",
            missing.len(),
            planted.len()
        );
        Ok(())
    }
    .await;
    neighbours.clear(&planted).await;
    checked
}
