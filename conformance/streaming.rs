//! Streaming writes and reads: sizes, chunking, recorded metadata, unique names (invariant 2).

use super::*;

/// Invariant 2: an empty blob is a real blob of size 0.
pub async fn stream_empty_blob(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = Bytes::new();
    let r = write(&cache, &data, 1).await?;
    ensure!(r.size == Some(0), "size {:?}", r.size);
    ensure!(
        r.sha256.as_deref() == Some(sha256_hex(b"").as_str()),
        "sha256 {:?}",
        r.sha256
    );
    check_blob(&cache, &r, &data).await
}

/// Invariant 2: a one-byte blob.
pub async fn stream_one_byte(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = Bytes::from_static(b"\x2a");
    let r = write(&cache, &data, 1).await?;
    ensure!(r.size == Some(1), "size {:?}", r.size);
    check_blob(&cache, &r, &data).await
}

/// Invariant 2: many odd-sized chunks reassemble exactly.
pub async fn stream_multi_chunk(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(3 * 1024 * 1024 + 7, 11);
    let r = write(&cache, &data, 65_537).await?;
    ensure!(r.size == Some(data.len() as u64), "size {:?}", r.size);
    ensure!(
        r.sha256.as_deref() == Some(sha256_hex(&data).as_str()),
        "sha256 mismatch"
    );
    check_blob(&cache, &r, &data).await
}

/// Invariant 2: a 65 MiB blob streams through without the backend holding on to the producer's chunks
/// (at most 24 MiB of them alive at once), and reads back with the right digest.
pub async fn stream_large_blob_bounded_memory(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    const CHUNK: usize = 1 << 20;
    const COUNT: usize = 65;
    let live = LiveBytes::default();
    let (stream, expected_sha) = live.stream(COUNT, CHUNK);
    let r = cache.write_blob(&meta("conformance/large"), stream).await?;
    let size = (COUNT * CHUNK) as u64;
    ensure!(r.size == Some(size), "size {:?}, expected {size}", r.size);
    ensure!(
        r.sha256.as_deref() == Some(expected_sha.as_str()),
        "sha256 {:?}",
        r.sha256
    );
    ensure!(
        live.peak() <= 24 << 20,
        "{} MiB of the producer's chunks were alive at once",
        live.peak() >> 20
    );
    let mut stream = cache
        .open_blob(&r.reference, None)
        .await?
        .ok_or(Failure("blob missing".into()))?;
    let (mut hasher, mut read) = (Sha256::new(), 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        read += chunk.len() as u64;
        hasher.update(&chunk);
    }
    drop(stream);
    ensure!(read == size, "read back {read} bytes");
    ensure!(
        crate::wire::hex(&hasher.finalize()) == expected_sha,
        "read back other bytes"
    );
    cache.delete_blob(&r.reference).await?;
    Ok(())
}

/// Invariant 2: the ref records size, mime, port and the SHA-256, and survives a JSON round trip.
pub async fn stream_records_size_mime_port_sha256(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(100_000, 3);
    let m = BlobMeta {
        port: Some("thumbnail".into()),
        mime: Some("image/png".into()),
        ..meta("conformance/meta")
    };
    let r = cache.write_blob(&m, stream_of(data.clone(), 4096)).await?;
    ensure!(r.size == Some(100_000), "size {:?}", r.size);
    ensure!(r.mime.as_deref() == Some("image/png"), "mime {:?}", r.mime);
    ensure!(r.port.as_deref() == Some("thumbnail"), "port {:?}", r.port);
    ensure!(
        r.sha256.as_deref() == Some(sha256_hex(&data).as_str()),
        "sha256 {:?}",
        r.sha256
    );
    let wire = r.to_value();
    ensure!(
        CacheRef::is_ref(&wire),
        "to_value is not a branded ref: {wire}"
    );
    ensure!(
        CacheRef::from_value(&wire).as_ref() == Some(&r),
        "ref changed in a JSON round trip"
    );
    check_blob(&cache, &r, &data).await
}

/// Streaming reads yield chunks of at most 1 MiB.
pub async fn stream_read_chunks_are_bounded(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let data = pattern(5 * MAX_READ_CHUNK / 2, 5);
    let r = write(&cache, &data, 3 * MAX_READ_CHUNK).await?;
    let mut stream = cache
        .open_blob(&r.reference, None)
        .await?
        .ok_or(Failure("blob missing".into()))?;
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        ensure!(
            chunk.len() <= MAX_READ_CHUNK,
            "a chunk of {} bytes",
            chunk.len()
        );
        got.extend_from_slice(&chunk);
    }
    ensure!(got == data, "streamed bytes differ");
    Ok(())
}

/// Every write gets its own name, even with identical metadata and content.
pub async fn stream_names_are_unique(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let (a, b) = (pattern(1000, 1), pattern(1000, 2));
    let ra = write(&cache, &a, 100).await?;
    let rb = write(&cache, &b, 100).await?;
    let rc = write(&cache, &a, 100).await?;
    ensure!(
        ra.reference != rb.reference && ra.reference != rc.reference,
        "names repeat: {ra:?} {rb:?} {rc:?}"
    );
    check_blob(&cache, &ra, &a).await?;
    check_blob(&cache, &rb, &b).await?;
    check_blob(&cache, &rc, &a).await
}
