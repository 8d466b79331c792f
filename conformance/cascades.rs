//! Cascades: row deletes take the blobs the rows own, prefix and age selection spare the rest (invariant 6).

use super::*;

/// A row with a blob written for it (so the row owns the blob: see [`crate::wire::ref_owned_by`]).
pub(super) async fn row_with_blob(
    cache: &Backend,
    task: &str,
    i: u64,
) -> Result<(RowKey, CacheRef), Failure> {
    let k = key(task, i)?;
    let r = cache
        .write_blob(&BlobMeta::for_key(&k), stream_of(pattern(3000, i), 1000))
        .await?;
    cache
        .save_row(&k, &json!({"image": r.to_value(), "note": "with a blob"}))
        .await?;
    Ok((k, r))
}

/// Deleting a row deletes the blobs it references.
pub async fn delete_row_cascades_to_blobs(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (k, r) = row_with_blob(&cache, "conformance/cascade", 1).await?;
    let (k2, r2) = row_with_blob(&cache, "conformance/cascade", 2).await?;
    ensure!(cache.delete_row(&k).await?, "delete_row returned false");
    ensure!(
        cache.read_blob(&r.reference).await?.is_none(),
        "the deleted row's blob survived"
    );
    ensure!(
        cache.read_blob(&r2.reference).await?.is_some(),
        "another row's blob was deleted"
    );
    ensure!(
        cache.get_row(&k2).await?.is_some(),
        "another row was deleted"
    );
    Ok(())
}

/// `delete_rows` removes each named row with its blobs, counts only rows that existed, and spares the
/// rest.
pub async fn delete_rows_removes_each_with_blobs(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (ka, ra) = row_with_blob(&cache, "conformance/batch", 1).await?;
    let (kb, rb) = row_with_blob(&cache, "conformance/batch", 2).await?;
    let (kc, rc) = row_with_blob(&cache, "conformance/batch", 3).await?;
    let missing = key("conformance/batch", 404)?;
    let n = cache
        .delete_rows(&[ka.clone(), missing, kb.clone()])
        .await?;
    ensure!(n == 2, "delete_rows reported {n} rows, expected 2");
    for (k, r) in [(&ka, &ra), (&kb, &rb)] {
        ensure!(cache.get_row(k).await?.is_none(), "row {k} survived");
        ensure!(
            cache.read_blob(&r.reference).await?.is_none(),
            "blob {} survived",
            r.reference
        );
    }
    ensure!(
        cache.get_row(&kc).await?.is_some(),
        "an unnamed row was deleted"
    );
    ensure!(
        cache.read_blob(&rc.reference).await?.is_some(),
        "an unnamed row's blob was deleted"
    );
    ensure!(
        cache.delete_rows(&[]).await? == 0,
        "an empty batch deleted something"
    );
    Ok(())
}

/// Invariant 6: a prefix delete removes the matching rows with their blobs and spares the rest.
pub async fn delete_prefix_cascades_to_blobs(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (_, a) = row_with_blob(&cache, "img/resize", 1).await?;
    let (_, b) = row_with_blob(&cache, "img/crop", 2).await?;
    let (kc, c) = row_with_blob(&cache, "txt/summary", 3).await?;
    let n = cache.delete_prefix("img/").await?;
    ensure!(n == 2, "delete_prefix(img/) removed {n} rows, expected 2");
    for r in [&a, &b] {
        ensure!(
            cache.read_blob(&r.reference).await?.is_none(),
            "blob {} survived",
            r.reference
        );
    }
    ensure!(
        cache.get_row(&kc).await?.is_some(),
        "a row outside the prefix was deleted"
    );
    ensure!(
        cache.read_blob(&c.reference).await?.is_some(),
        "a blob outside the prefix was deleted"
    );
    Ok(())
}

/// Invariant 6: prefixes are plain string prefixes of the task type (no sanitising merges, no
/// directory semantics), and `""` matches everything.
pub async fn delete_prefix_respects_boundaries(cache: Backend) -> CaseResult {
    let types = [
        "build",
        "build-x",
        "buildx",
        "build/y",
        "session1",
        "session1-",
        "other",
    ];
    for t in types {
        cache.save_row(&key(t, 1)?, &json!(t)).await?;
    }
    let remaining = |cache: Backend| async move {
        let mut names: Vec<String> = cache
            .list_rows()
            .await?
            .into_iter()
            .map(|r| r.key.task_type().to_owned())
            .collect();
        names.sort();
        Ok::<_, Failure>(names)
    };
    ensure!(
        cache.delete_prefix("build-").await? == 1,
        "build- matched other than build-x"
    );
    ensure!(
        cache.delete_prefix("session1-").await? == 1,
        "session1- matched other than session1-"
    );
    let left = remaining(cache.clone()).await?;
    ensure!(
        left == ["build", "build/y", "buildx", "other", "session1"],
        "left after two prefix deletes: {left:?}"
    );
    ensure!(
        cache.delete_prefix("build").await? == 3,
        "build did not match its three"
    );
    ensure!(
        cache.delete_prefix("").await? == 2,
        "\"\" did not match the last two"
    );
    let left = remaining(cache.clone()).await?;
    ensure!(left.is_empty(), "left after deleting everything: {left:?}");
    Ok(())
}

/// Invariant 6: an age prune (the janitor's `older_than`, planned from `list_rows` and carried out with
/// `delete_rows_listed`) removes old rows with their blobs and spares newer ones.
pub async fn age_prune_cascades_and_spares_newer(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (old_key, old_ref) = row_with_blob(&cache, "conformance/age", 1).await?;
    // More than a second apart, and a cutoff more than a second before the new row: object stores
    // list commit times in whole seconds (truncated), so a row may list up to a second early.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = SystemTime::now();
    let (new_key, new_ref) = row_with_blob(&cache, "conformance/age", 2).await?;
    let mut options = crate::janitor::PruneOptions::new();
    // Older than a moment 1.1 s before the new row, measured now.
    options.older_than = Some(started.elapsed().unwrap_or_default() + Duration::from_millis(1100));
    let report = crate::janitor::prune(cache.as_ref(), &options, |_| {}).await?;
    let n = report.rows_removed;
    ensure!(
        n == 1,
        "the age prune removed {n} rows, expected 1 ({report:?})"
    );
    ensure!(
        cache.get_row(&old_key).await?.is_none(),
        "the old row survived"
    );
    ensure!(
        cache.read_blob(&old_ref.reference).await?.is_none(),
        "the old row's blob survived"
    );
    ensure!(
        cache.get_row(&new_key).await?.is_some(),
        "the new row was removed"
    );
    ensure!(
        cache.read_blob(&new_ref.reference).await?.is_some(),
        "the new row's blob was removed"
    );
    Ok(())
}

/// Invariant 6: a delete by listed version takes only the blobs its row owns, whatever blobs the caller
/// hands it ([`crate::RowVersion::owned_blobs`], which a backend may use instead of listing its own):
/// another row's blob and a traversal named there stay, and ids from a listing that began before the
/// row committed are not taken as all of its blobs.
pub async fn a_delete_takes_only_its_rows_blobs_whatever_it_is_handed(
    cache: Backend,
) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let mut rows = Vec::new();
    for i in 1..=4 {
        rows.push(row_with_blob(&cache, "conformance/handed", i).await?);
    }
    let [foreign, traversal, stale, other] =
        <[_; 4]>::try_from(rows).map_err(|_| Failure("four rows".into()))?;
    let listed = cache.list_rows().await?;
    let handed = |(key, _): &(RowKey, CacheRef), ids: Vec<String>, listing_began| {
        let listed = listed
            .iter()
            .find(|r| &r.key == key)
            .ok_or(Failure(format!("{key} is not listed")))?;
        Ok::<_, Failure>(crate::RowVersion {
            owned_blobs: Some(crate::ListedBlobs { ids, listing_began }),
            ..listed.listed_version()
        })
    };
    let later = SystemTime::now() + Duration::from_secs(3600);
    let outside = traversal.1.reference.replace("blobs/", "blobs/../");
    let versions = [
        handed(&foreign, vec![other.1.reference.clone()], later)?,
        handed(&traversal, vec![outside], later)?,
        handed(&stale, Vec::new(), SystemTime::UNIX_EPOCH)?,
    ];
    let deleted = cache.delete_rows_listed(&versions).await?;
    ensure!(
        deleted.len() == 3,
        "deleted {deleted:?}, expected three rows"
    );
    ensure!(
        cache.read_blob(&other.1.reference).await?.is_some(),
        "another row's blob, handed over as the deleted row's, was deleted"
    );
    ensure!(
        cache.get_row(&other.0).await?.is_some(),
        "the other row was deleted"
    );
    for (what, (_, r)) in [
        ("another row's", &foreign),
        ("a traversal as its", &traversal),
        ("stale", &stale),
    ] {
        ensure!(
            cache.read_blob(&r.reference).await?.is_none(),
            "a row handed {what} blobs left its own blob behind"
        );
    }
    Ok(())
}

/// Invariant 6 with invariant 5: a read stream opened before its row is deleted (the cascade takes
/// the blob, as a prune does) still yields the whole blob; new reads miss.
pub async fn read_stream_outlives_its_rows_delete(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let k = key("conformance/streamed", 1)?;
    let data = pattern(5 * MAX_READ_CHUNK / 2, 8);
    let r = cache
        .write_blob(
            &BlobMeta::for_key(&k),
            stream_of(data.clone(), MAX_READ_CHUNK),
        )
        .await?;
    cache.save_row(&k, &r.to_value()).await?;
    let mut stream = cache
        .open_blob(&r.reference, None)
        .await?
        .ok_or(Failure("blob missing".into()))?;
    let mut got = Vec::with_capacity(data.len());
    if let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk?);
    }
    ensure!(
        cache.delete_rows(std::slice::from_ref(&k)).await? == 1,
        "the row was not deleted"
    );
    ensure!(
        cache.open_blob(&r.reference, None).await?.is_none(),
        "the deleted row's blob still opens for a new reader"
    );
    finish_reading(stream, got, &data, "its row's delete").await
}
