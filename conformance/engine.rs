//! The engine over the backend: inline versus blob, verified refs, resolve.

use super::*;

/// A binary output below the reference threshold is stored inline, byte-identical, with its mime.
pub async fn engine_small_output_goes_inline(cache: Backend) -> CaseResult {
    let engine = Cache::new(cache.clone());
    let data = pattern(1024, 5);
    let inputs = json!({"small": true});
    let blob = BlobOptions {
        mime: Some("text/plain".into()),
        port: None,
    };
    let stored = engine
        .put_stream(
            "conformance/engine",
            &inputs,
            stream_of(data.clone(), 100),
            blob,
        )
        .await?;
    let decoded =
        InlineBinary::decode(&stored)?.ok_or(Failure(format!("not an envelope: {stored}")))?;
    ensure!(
        decoded.bytes == data && decoded.mime.as_deref() == Some("text/plain"),
        "envelope differs"
    );
    let got = engine.get("conformance/engine", &inputs).await?;
    ensure!(got.as_ref() == Some(&stored), "get returned {got:?}");
    ensure!(
        published(&cache).await?.is_empty(),
        "a small output created a blob"
    );
    Ok(())
}

/// A large binary output becomes a verified CacheRef (or, on a backend without blob streaming, inline
/// up to the inline limit and a clear error above it); small refs are hydrated by `get`.
pub async fn engine_large_output_becomes_verified_ref(cache: Backend) -> CaseResult {
    let engine = Cache::new(cache.clone());
    let data = pattern(200_000, 6);
    let inputs = json!({"large": true});
    let stored = engine
        .put_stream(
            "conformance/engine",
            &inputs,
            stream_of(data.clone(), 8192),
            BlobOptions::default(),
        )
        .await?;
    if !has(&cache, Cap::WriteBlob) {
        let inline =
            InlineBinary::decode(&stored)?.ok_or(Failure(format!("not inline: {stored}")))?;
        ensure!(inline.bytes == data, "inline bytes differ");
        let tight =
            Cache::with_options(cache.clone(), CacheOptions::default().inline_limit(100_000));
        let err = tight
            .put_stream(
                "conformance/engine",
                &inputs,
                stream_of(data, 8192),
                BlobOptions::default(),
            )
            .await;
        ensure!(
            matches!(err, Err(Error::TooLarge { .. })),
            "over the inline limit: {err:?}"
        );
        return Ok(());
    }
    let r = CacheRef::from_value(&stored).ok_or(Failure(format!("not a ref: {stored}")))?;
    ensure!(
        r.size == Some(200_000) && r.sha256.as_deref() == Some(sha256_hex(&data).as_str()),
        "ref {r:?}"
    );
    let got = engine.get("conformance/engine", &inputs).await?;
    ensure!(
        got.as_ref() == Some(&stored),
        "get above the threshold returned {got:?}"
    );
    ensure!(
        engine.read(&r).await?.as_ref() == Some(&data),
        "read differs"
    );
    let streamed = engine
        .open_stream(&r)
        .await?
        .ok_or(Failure("open_stream missed".into()))?;
    ensure!(
        crate::blob::collect(streamed).await? == data,
        "open_stream differs"
    );
    let hydrating = Cache::with_options(
        cache.clone(),
        CacheOptions::default().reference_threshold(1 << 20),
    );
    let hydrated = hydrating
        .get("conformance/engine", &inputs)
        .await?
        .unwrap_or_default();
    let inline =
        InlineBinary::decode(&hydrated)?.ok_or(Failure(format!("not hydrated: {hydrated}")))?;
    ensure!(inline.bytes == data, "hydrated bytes differ");
    Ok(())
}

/// `resolve` hydrates branded refs anywhere in a value, leaves unbranded `$ref` alone and reports a
/// dangling ref instead of inventing bytes.
pub async fn engine_resolve_hydrates_branded_refs_only(cache: Backend) -> CaseResult {
    gate!(cache, BLOB_CAPS);
    let engine = Cache::new(cache.clone());
    let (a, b) = (pattern(70_000, 1), pattern(10, 2));
    let (ra, rb) = (write(&cache, &a, 7000).await?, write(&cache, &b, 3).await?);
    let schema = json!({"$ref": "#/definitions/image"});
    let value = json!({"a": ra.to_value(), "list": [1, rb.to_value()], "schema": schema});
    let resolved = engine.resolve(&value).await?;
    let decode = |v: &Value| InlineBinary::decode(v).ok().flatten().map(|i| i.bytes);
    ensure!(
        decode(&resolved["a"]) == Some(a),
        "a not hydrated: {}",
        resolved["a"]
    );
    ensure!(
        decode(&resolved["list"][1]) == Some(b),
        "list[1] not hydrated"
    );
    ensure!(
        resolved["schema"] == schema && resolved["list"][0] == 1,
        "plain data changed: {resolved}"
    );
    cache.delete_blob(&rb.reference).await?;
    let dangling = engine.resolve(&value).await;
    ensure!(
        matches!(dangling, Err(Error::DanglingRef { ref reference }) if *reference == rb.reference),
        "got {dangling:?}"
    );
    Ok(())
}
