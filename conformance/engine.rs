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

/// A task type in a run-private tier's namespace (`run/<length>:<run id>/…`) is refused by the engine
/// before the backend sees it: a row planted there from outside would read as that run's own, and the
/// run's `clear_run` would take it. Task types that only begin like one (`run/lint`) are ordinary.
pub async fn engine_refuses_task_types_in_a_run_namespace(cache: Backend) -> CaseResult {
    let engine = Cache::new(cache.clone());
    let inputs = json!({"planted": true});
    let planted = format!(
        "{}r/conformance",
        crate::backends::run_private::run_namespace("victim")
    );
    let rows_before = cache.list_rows().await?.len();
    let put = engine.put(&planted, &inputs, &json!(1)).await;
    ensure!(
        matches!(put, Err(Error::InvalidInput { .. })),
        "put to {planted:?} gave {put:?}"
    );
    let streamed = engine
        .put_stream(
            &planted,
            &inputs,
            stream_of(pattern(100_000, 9), 10_000),
            BlobOptions::default(),
        )
        .await;
    ensure!(
        matches!(streamed, Err(Error::InvalidInput { .. })),
        "put_stream to {planted:?} gave {streamed:?}"
    );
    let got = engine.get(&planted, &inputs).await;
    ensure!(
        matches!(got, Err(Error::InvalidInput { .. })),
        "get of {planted:?} gave {got:?}"
    );
    ensure!(
        cache.list_rows().await?.len() == rows_before,
        "a refused task type stored a row"
    );
    ensure!(
        published(&cache).await?.is_empty() && temps(&cache).await? == 0,
        "a refused task type left a blob or a temp"
    );
    engine.put("run/lint", &inputs, &json!(2)).await?;
    let ordinary = engine.get("run/lint", &inputs).await?;
    ensure!(
        ordinary == Some(json!(2)),
        "run/lint read back {ordinary:?}"
    );
    Ok(())
}

/// Arrays and objects nested `levels` deep, alternately, around a number; built by hand, without
/// `json!`, which would serialize the value again at every level.
fn nested(levels: usize) -> Value {
    let mut v = json!(1);
    for i in 0..levels {
        v = if i % 2 == 0 {
            Value::Array(vec![json!(i), v])
        } else {
            Value::Object([(format!("k{i}"), v)].into_iter().collect())
        };
    }
    v
}

/// An output nested as deep as the engine accepts ([`crate::wire::MAX_OUTPUT_DEPTH`]) reads back whole
/// from the backend, whatever record the backend wraps it in; one level deeper is refused before the
/// backend sees it. Before the limit, such a `put` reported success and the row then read as corrupt
/// (and, unreadable, stopped the janitor's orphan sweep).
pub async fn engine_outputs_nest_to_the_limit_and_read_back(cache: Backend) -> CaseResult {
    let engine = Cache::new(cache.clone());
    let deepest = nested(crate::wire::MAX_OUTPUT_DEPTH);
    engine
        .put("conformance/deep", &json!("deepest"), &deepest)
        .await?;
    let got = engine.get("conformance/deep", &json!("deepest")).await?;
    ensure!(
        got.as_ref() == Some(&deepest),
        "an output {} levels deep did not read back whole",
        crate::wire::MAX_OUTPUT_DEPTH
    );
    let scan = cache.scan_rows().await?;
    ensure!(
        scan.unreadable.is_empty(),
        "the janitor's scan finds the deep row unreadable: {:?}",
        scan.unreadable
    );
    let rows = cache.list_rows().await?.len();
    let deeper = engine
        .put(
            "conformance/deep",
            &json!("deeper"),
            &nested(crate::wire::MAX_OUTPUT_DEPTH + 1),
        )
        .await;
    ensure!(
        matches!(deeper, Err(Error::InvalidInput { .. })),
        "an output past the limit gave {deeper:?}"
    );
    ensure!(
        cache.list_rows().await?.len() == rows,
        "a refused output stored a row"
    );
    Ok(())
}
