//! Ref safety: unknown, foreign, malformed and traversal refs never resolve or delete; delete by ref is idempotent (invariants 4 and 5).

use super::*;

/// A well-formed ref for this backend that was never written.
pub(super) fn mutate_last_hex_digit(reference: &str) -> Option<String> {
    let pos = reference.rfind(|c: char| c.is_ascii_hexdigit())?;
    let c = reference.as_bytes()[pos];
    let replacement = if c == b'0' { '1' } else { '0' };
    let mut out = reference.to_owned();
    out.replace_range(pos..pos + 1, &replacement.to_string());
    Some(out)
}

/// Invariant 4: a well-formed but unknown ref reads as `None` and deleting it touches nothing.
pub async fn unknown_ref_is_none(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(1000, 1);
    let r = write(&cache, &data, 100).await?;
    let unknown = mutate_last_hex_digit(&r.reference)
        .ok_or(Failure(format!("cannot mutate {}", r.reference)))?;
    ensure!(
        cache.read_blob(&unknown).await?.is_none(),
        "{unknown} resolved"
    );
    ensure!(
        cache.open_blob(&unknown, None).await?.is_none(),
        "{unknown} opened"
    );
    cache.delete_blob(&unknown).await?;
    check_blob(&cache, &r, &data).await
}

/// Invariant 4: refs in other backends' forms never resolve.
pub async fn foreign_refs_never_resolve(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(1000, 1);
    let r = write(&cache, &data, 100).await?;
    let rest = r
        .reference
        .split_once("://")
        .map(|(_, rest)| rest.to_owned())
        .unwrap_or_default();
    let mut foreign: Vec<String> = [
        "other", "s3", "sqlite", "memory", "fsfolder", "file", "http",
    ]
    .iter()
    .map(|scheme| format!("{scheme}://{rest}"))
    .filter(|f| *f != r.reference)
    .collect();
    foreign.extend([
        "fsfolder://blobs/never-written_0000.bin".to_owned(),
        "memory://blobs/00000000000000000000000000000000".to_owned(),
        "s3://bucket/blobs/x".to_owned(),
        "sqlite://blobs/1".to_owned(),
    ]);
    for f in &foreign {
        ensure!(
            cache.read_blob(f).await?.is_none(),
            "foreign ref {f:?} resolved"
        );
        ensure!(
            cache.open_blob(f, None).await?.is_none(),
            "foreign ref {f:?} opened"
        );
    }
    check_blob(&cache, &r, &data).await
}

pub(super) fn malformed_refs(real: &str) -> Vec<String> {
    let mut refs: Vec<String> = [
        "",
        "/etc/passwd",
        "../../etc/passwd",
        "fsfolder://blobs/../../etc/passwd",
        "fsfolder://blobs/..\\..\\etc\\passwd.bin",
        "fsfolder://blobs/a/b.bin",
        "fsfolder://blobs/.bin",
        "fsfolder://blobs/...bin",
        "fsfolder:///etc/passwd",
        "fsfolder://blobs//etc/passwd.bin",
        "fsfolder://blobs/x.bin\0",
        "memory://blobs/../x",
        "file:///etc/passwd",
        "sqlite://blobs/1 OR 1=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (scheme, rest) = real.split_once("://").unwrap_or(("", real));
    let last_slash = real.rfind('/').map_or(0, |i| i + 1);
    let (dir, name) = real.split_at(last_slash);
    refs.extend([
        format!("{real}/../x"),
        format!("{real}\0"),
        format!("{real}/"),
        format!(" {real}"),
        format!("{real} "),
        real.to_uppercase(),
        format!("{dir}../{name}"),
        format!("{dir}./{name}"),
        format!("{dir}sub/{name}"),
        format!("{dir}..%2F{name}"),
        format!("{dir}\\{name}"),
        format!("{scheme}:///{rest}"),
        format!("{scheme}:/{rest}"),
        format!("{scheme}://{rest}?x=1"),
        format!("{scheme}://{}", "a".repeat(5000)),
        rest.to_owned(),
    ]);
    refs.retain(|r| r != real);
    refs
}

/// Invariant 4: traversal attempts and garbage never resolve.
pub async fn malformed_refs_never_resolve(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(1000, 1);
    let r = write(&cache, &data, 100).await?;
    for bad in malformed_refs(&r.reference) {
        ensure!(
            cache.read_blob(&bad).await?.is_none(),
            "malformed ref {bad:?} resolved"
        );
        ensure!(
            cache.open_blob(&bad, None).await?.is_none(),
            "malformed ref {bad:?} opened"
        );
    }
    Ok(())
}

/// Invariant 4: deleting a malformed ref succeeds quietly and deletes nothing.
pub async fn malformed_refs_never_delete(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(1000, 1);
    let r = write(&cache, &data, 100).await?;
    let before = published(&cache).await?.len();
    for bad in malformed_refs(&r.reference) {
        cache.delete_blob(&bad).await?;
    }
    let after = published(&cache).await?.len();
    ensure!(
        before == after,
        "{before} blobs before, {after} after deleting malformed refs"
    );
    check_blob(&cache, &r, &data).await
}

/// Invariant 5: deleting a ref twice is fine; afterwards it reads as `None`.
pub async fn delete_blob_is_idempotent(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let r = write(&cache, &pattern(5000, 1), 1000).await?;
    cache.delete_blob(&r.reference).await?;
    cache.delete_blob(&r.reference).await?;
    ensure!(
        cache.read_blob(&r.reference).await?.is_none(),
        "deleted blob still reads"
    );
    ensure!(
        cache.open_blob(&r.reference, None).await?.is_none(),
        "deleted blob still opens"
    );
    Ok(())
}

/// Invariant 5: deleting one blob leaves its neighbours alone.
pub async fn delete_blob_touches_only_its_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let datas: Vec<Bytes> = (0..3).map(|i| pattern(2000, i)).collect();
    let mut refs = Vec::new();
    for d in &datas {
        refs.push(write(&cache, d, 500).await?);
    }
    cache.delete_blob(&refs[1].reference).await?;
    check_blob(&cache, &refs[0], &datas[0]).await?;
    check_blob(&cache, &refs[2], &datas[2]).await?;
    ensure!(
        cache.read_blob(&refs[1].reference).await?.is_none(),
        "deleted blob still reads"
    );
    Ok(())
}

/// A read stream dropped half-way releases the blob: it can be read again, then deleted.
pub async fn dropped_read_stream_releases_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(3 * MAX_READ_CHUNK, 2);
    let r = write(&cache, &data, MAX_READ_CHUNK).await?;
    let mut stream = cache
        .open_blob(&r.reference, None)
        .await?
        .ok_or(Failure("blob missing".into()))?;
    let first = stream.next().await.transpose()?;
    ensure!(first.is_some_and(|c| !c.is_empty()), "first chunk empty");
    drop(stream);
    check_blob(&cache, &r, &data).await?;
    cache.delete_blob(&r.reference).await?;
    ensure!(
        cache.read_blob(&r.reference).await?.is_none(),
        "blob survived delete after a dropped read"
    );
    Ok(())
}

/// Invariant 5: a read stream opened before its blob is deleted still yields the whole blob (as an
/// open file does after an unlink, and an S3 GET after a DELETE), while new reads miss. A download
/// racing a client's DELETE, or an overwrite that removes the old blob, must not be cut off half-way.
pub async fn read_stream_outlives_the_blobs_deletion(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(3 * MAX_READ_CHUNK + 12_345, 4);
    let r = write(&cache, &data, MAX_READ_CHUNK).await?;
    for read_first in [false, true] {
        let r = if read_first {
            write(&cache, &data, MAX_READ_CHUNK).await?
        } else {
            r.clone()
        };
        let mut stream = cache
            .open_blob(&r.reference, None)
            .await?
            .ok_or(Failure("blob missing".into()))?;
        let mut got = Vec::with_capacity(data.len());
        if read_first {
            if let Some(chunk) = stream.next().await {
                got.extend_from_slice(&chunk?);
            }
        }
        cache.delete_blob(&r.reference).await?;
        ensure!(
            cache.open_blob(&r.reference, None).await?.is_none(),
            "the deleted blob still opens for a new reader"
        );
        let what = if read_first {
            "the delete (and read from)"
        } else {
            "the delete"
        };
        finish_reading(stream, got, &data, what).await?;
    }
    Ok(())
}
