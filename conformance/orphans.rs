//! Orphans: in-band cleanup of a failed commit, the janitor's view of unreferenced blobs (invariant 7).

use super::*;

/// Invariant 7: when the row commit fails after the blob was written, the engine deletes the blob and
/// returns the commit error; nothing is left, no temp either.
pub async fn row_commit_failure_removes_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let failing: Backend = Arc::new(FailingRows::new(cache.clone(), true));
    let engine = engine(&failing, 1024);
    let result = engine
        .put_stream(
            "conformance/orphan",
            &json!({"n": 1}),
            stream_of(pattern(200_000, 1), 8192),
            BlobOptions::default(),
        )
        .await;
    match result {
        Err(Error::Backend { ref context, .. }) if context.contains("save row") => {}
        other => {
            return Err(Failure(format!(
                "expected the injected commit error, got {other:?}"
            )));
        }
    }
    let blobs = published(&cache).await?;
    ensure!(
        blobs.is_empty(),
        "the orphaned blob is still there: {blobs:?}"
    );
    no_temps_soon(&cache).await?;
    ensure!(
        engine
            .get("conformance/orphan", &json!({"n": 1}))
            .await?
            .is_none(),
        "a row exists after its commit failed"
    );
    Ok(())
}

/// Invariant 7: the janitor-facing listing shows a blob no row references as an orphan (with a zero
/// grace period), not a referenced one, and a fresh orphan is spared by a long grace period.
pub async fn janitor_sees_unreferenced_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (_, kept) = row_with_blob(&cache, "conformance/janitor", 1).await?;
    let orphan = write(&cache, &pattern(4000, 2), 1000).await?;
    let listed = published(&cache).await?;
    ensure!(
        listed.contains(&kept.reference) && listed.contains(&orphan.reference),
        "listing {listed:?} misses a blob"
    );
    let sweep = find_orphans(cache.as_ref(), Duration::ZERO).await?;
    let found: Vec<&str> = sweep.blobs.iter().map(|b| b.id.as_str()).collect();
    ensure!(
        found == [orphan.reference.as_str()],
        "orphans found: {found:?}"
    );
    let sweep = find_orphans(cache.as_ref(), Duration::from_secs(3600)).await?;
    ensure!(
        sweep.blobs.is_empty(),
        "a fresh blob was not spared by the grace period: {:?}",
        sweep.blobs
    );
    Ok(())
}

/// Invariant 7: a dry-run sweep removes nothing; a real one removes the orphan and keeps referenced blobs.
pub async fn janitor_sweep_keeps_referenced_blobs(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (k, kept) = row_with_blob(&cache, "conformance/janitor", 1).await?;
    let orphan = write(&cache, &pattern(4000, 2), 1000).await?;
    let dry = sweep_orphans(cache.as_ref(), Duration::ZERO, true).await?;
    ensure!(
        dry.blobs.len() == 1 && dry.dry_run,
        "dry run found {:?}",
        dry.blobs
    );
    ensure!(
        cache.read_blob(&orphan.reference).await?.is_some(),
        "a dry run deleted the orphan"
    );
    let real = sweep_orphans(cache.as_ref(), Duration::ZERO, false).await?;
    ensure!(real.blobs.len() == 1, "sweep removed {:?}", real.blobs);
    ensure!(
        cache.read_blob(&orphan.reference).await?.is_none(),
        "the orphan survived the sweep"
    );
    ensure!(
        cache.read_blob(&kept.reference).await?.is_some(),
        "the sweep removed a referenced blob"
    );
    ensure!(
        cache.get_row(&k).await?.is_some(),
        "the sweep removed a row"
    );
    Ok(())
}
