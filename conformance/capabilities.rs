//! Truthful capabilities, access tracking, the inventory (invariant 9).

use super::*;

/// Invariant 9: every claimed capability works and every unclaimed one returns `Unsupported`.
pub async fn capabilities_are_truthful(cache: Backend) -> CaseResult {
    for cap in ALL_CAPS {
        let result = call(&cache, *cap).await;
        match (has(&cache, *cap), result) {
            (true, Ok(())) | (false, Err(Error::Unsupported { .. })) => {}
            (claimed, other) => {
                return Err(Failure(format!(
                    "{cap:?} claimed={claimed} but the call returned {other:?}"
                )));
            }
        }
    }
    Ok(())
}

/// `touch_rows` moves a row's access time forward (never back) and touches nothing else; unknown keys
/// are ignored. Backends without access tracking report `None` and refuse the call.
pub async fn touch_rows_moves_last_access(cache: Backend) -> CaseResult {
    gate!(cache, &[Cap::TouchRows]);
    let (a, b) = (key("conformance/lru", 1)?, key("conformance/lru", 2)?);
    cache.save_row(&a, &json!("a")).await?;
    cache.save_row(&b, &json!("b")).await?;
    let access = |cache: Backend, k: RowKey| async move {
        let rows = cache.list_rows().await?;
        Ok::<_, Failure>(
            rows.into_iter()
                .find(|r| r.key == k)
                .and_then(|r| r.last_access),
        )
    };
    let before_b = access(cache.clone(), b.clone()).await?;
    ensure!(
        before_b.is_some(),
        "a tracking backend must report last_access for a row never read (its commit time), got None"
    );
    let later = SystemTime::now() + Duration::from_secs(3600);
    let ghost = key("conformance/lru", 404)?;
    cache.touch_rows(&[a.clone(), ghost.clone()], later).await?;
    let after_a = access(cache.clone(), a.clone()).await?;
    ensure!(
        after_a.is_some_and(|t| t + Duration::from_secs(1) >= later),
        "touched row shows {after_a:?}"
    );
    ensure!(
        access(cache.clone(), b.clone()).await? == before_b,
        "an untouched row's access time moved"
    );
    ensure!(
        cache.get_row(&ghost).await?.is_none(),
        "touching an unknown key created a row"
    );
    cache
        .touch_rows(std::slice::from_ref(&a), SystemTime::now())
        .await?;
    let again = access(cache.clone(), a).await?;
    ensure!(
        again.is_some_and(|t| t + Duration::from_secs(1) >= later),
        "access time moved back: {again:?}"
    );
    Ok(())
}

/// The inventory (`outcache stats`, from the listings) counts rows and blobs and their bytes.
pub async fn stats_count_rows_and_blobs(cache: Backend) -> CaseResult {
    let stats = || async { crate::janitor::inventory(cache.as_ref(), 0).await };
    let empty = stats().await?;
    ensure!(
        empty.rows == 0 && empty.blobs == 0,
        "a fresh cache has {empty:?}"
    );
    cache
        .save_row(&key("conformance/stats", 1)?, &json!("one"))
        .await?;
    cache
        .save_row(&key("conformance/stats", 2)?, &json!("two"))
        .await?;
    let mut expected_blobs = 0;
    if has(&cache, Cap::WriteBlob) {
        write(&cache, &pattern(12_345, 1), 1000).await?;
        expected_blobs = 1;
    }
    let stats = stats().await?;
    ensure!(stats.rows == 2 && stats.row_bytes > 0, "rows: {stats:?}");
    ensure!(stats.blobs == expected_blobs, "blobs: {stats:?}");
    ensure!(
        stats.blob_bytes == 12_345 * expected_blobs,
        "blob bytes: {stats:?}"
    );
    Ok(())
}
