//! Rows: round trip, misses, last writer wins, key distinctness (invariant 1).

use super::*;

/// Invariant 1: a saved row reads back equal.
pub async fn row_round_trip(cache: Backend) -> CaseResult {
    let k = key("conformance/row", 1)?;
    let output = json!({"answer": 42, "text": "hello"});
    cache.save_row(&k, &output).await?;
    let row = cache.get_row(&k).await?;
    ensure!(
        row.as_ref().map(|r| &r.output) == Some(&output),
        "got {row:?}"
    );
    Ok(())
}

/// Invariant 1: a miss is `Ok(None)`, before and after other rows exist.
pub async fn row_miss_is_none(cache: Backend) -> CaseResult {
    let missing = key("conformance/row", 404)?;
    ensure!(
        cache.get_row(&missing).await?.is_none(),
        "miss on an empty cache was not None"
    );
    cache
        .save_row(&key("conformance/row", 1)?, &json!(1))
        .await?;
    cache
        .save_row(&key("conformance/other", 404)?, &json!(2))
        .await?;
    ensure!(
        cache.get_row(&missing).await?.is_none(),
        "miss beside other rows was not None"
    );
    Ok(())
}

/// Invariant 1: overwriting a key keeps only the last write.
pub async fn row_overwrite_last_writer_wins(cache: Backend) -> CaseResult {
    let k = key("conformance/row", 1)?;
    for v in 0..5 {
        cache.save_row(&k, &json!({ "v": v })).await?;
    }
    let row = cache.get_row(&k).await?.map(|r| r.output);
    ensure!(row == Some(json!({"v": 4})), "got {row:?}");
    let copies = cache
        .list_rows()
        .await?
        .into_iter()
        .filter(|r| r.key == k)
        .count();
    ensure!(copies == 1, "listing shows {copies} rows for one key");
    Ok(())
}

/// Deleting a row removes it and nothing else; deleting again reports that nothing was there.
pub async fn row_delete_removes_only_that_row(cache: Backend) -> CaseResult {
    let (a, b) = (key("conformance/row", 1)?, key("conformance/row", 2)?);
    cache.save_row(&a, &json!("a")).await?;
    cache.save_row(&b, &json!("b")).await?;
    ensure!(
        cache.delete_row(&a).await?,
        "delete_row of an existing row returned false"
    );
    ensure!(
        cache.get_row(&a).await?.is_none(),
        "deleted row still readable"
    );
    ensure!(
        cache.get_row(&b).await?.is_some(),
        "deleting a removed another row"
    );
    ensure!(
        !cache.delete_row(&a).await?,
        "second delete_row returned true"
    );
    Ok(())
}

pub(super) fn tricky_task_types() -> Vec<String> {
    let mut types: Vec<String> = [
        "build",
        "build-",
        "build_",
        "session1",
        "session1-",
        "a/b",
        "a_b",
        "a%2Fb",
        "a.b",
        "..",
        ".",
        "a b",
        "ünïcödé/タスク",
        "UPPER",
        "upper",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    types.push("x".repeat(300));
    types.push(format!("{}y", "x".repeat(299)));
    types
}

/// Task types that sanitise alike, differ only in case, or are very long never share rows; neither do
/// different inputs of one task type.
pub async fn row_keys_are_distinct(cache: Backend) -> CaseResult {
    let inputs = json!({"same": "inputs"});
    let types = tricky_task_types();
    for t in &types {
        cache
            .save_row(&RowKey::new(t, &inputs)?, &json!({ "task": t }))
            .await?;
    }
    for t in &types {
        let got = cache
            .get_row(&RowKey::new(t, &inputs)?)
            .await?
            .map(|r| r.output);
        ensure!(
            got == Some(json!({ "task": t })),
            "task type {t:?} read back {got:?}"
        );
    }
    let (one, two) = (
        RowKey::new("t", &json!({"a": 1}))?,
        RowKey::new("t", &json!({"a": 2}))?,
    );
    cache.save_row(&one, &json!(1)).await?;
    cache.save_row(&two, &json!(2)).await?;
    let got = cache.get_row(&one).await?.map(|r| r.output);
    ensure!(got == Some(json!(1)), "inputs {{a:1}} read back {got:?}");
    Ok(())
}

/// Arbitrary JSON (unicode, big numbers, envelopes, refs, unbranded `$ref`) survives storage unchanged.
pub async fn row_output_json_is_preserved(cache: Backend) -> CaseResult {
    let output = json!({
        "unicode": "žluťoučký kůň 🐎 \u{0000} \"quoted\" \\ back",
        "numbers": [0, -1, 1.5, 1e300, u64::MAX, i64::MIN],
        "nested": {"deep": [[[{"x": null, "y": true, "z": false}]]]},
        "envelope": InlineBinary::encode(b"\x00\x01binary\xff", Some("application/octet-stream")),
        "ref": {"kind": "task-graph/CacheRef", "$ref": "fsfolder://blobs/x.bin", "size": 3, "future": {"a": 1}},
        "schema": {"$ref": "#/definitions/x"},
        "empty": {}, "list": [],
    });
    let k = key("conformance/json", 1)?;
    cache.save_row(&k, &output).await?;
    let got = cache.get_row(&k).await?.map(|r| r.output);
    ensure!(
        got.as_ref() == Some(&output),
        "stored {output}\nread back {got:?}"
    );
    Ok(())
}

/// A row's `created_at` is the time it was committed (within a minute, for servers with skewed clocks).
pub async fn row_created_at_is_recent(cache: Backend) -> CaseResult {
    let k = key("conformance/row", 1)?;
    let before = SystemTime::now() - Duration::from_secs(60);
    cache.save_row(&k, &json!(1)).await?;
    let after = SystemTime::now() + Duration::from_secs(60);
    let row = cache
        .get_row(&k)
        .await?
        .ok_or(Failure("row missing".into()))?;
    ensure!(
        row.created_at > before && row.created_at < after,
        "created_at {:?} is not near now",
        row.created_at
    );
    Ok(())
}
