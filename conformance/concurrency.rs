//! Concurrent writers and readers (invariant 8).

use super::*;

const WRITERS: u64 = 16;
const WRITES_EACH: u64 = 3;

/// Readers that loop over `keys` until told to stop, checking every hit: a ref must read back verified,
/// an envelope must decode. Returns how many hits they checked.
pub(super) fn spawn_readers(
    engine: &Cache,
    keys: Vec<(String, Value)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Result<u64, Failure>>> {
    (0..4)
        .map(|_| {
            let (engine, keys, stop) = (engine.clone(), keys.clone(), stop.clone());
            tokio::spawn(async move {
                let mut hits = 0;
                loop {
                    // One last full pass after the writers are done, so every reader checks real rows.
                    let last_pass = stop.load(std::sync::atomic::Ordering::SeqCst);
                    for (task, inputs) in &keys {
                        let Some(value) = engine.get(task, inputs).await? else {
                            continue;
                        };
                        hits += 1;
                        if let Some(r) = CacheRef::from_value(&value) {
                            let bytes = engine.read(&r).await?;
                            ensure!(
                                bytes.is_some(),
                                "a committed row's ref {} does not resolve",
                                r.reference
                            );
                        } else {
                            ensure!(
                                InlineBinary::decode(&value)?.is_some(),
                                "a torn or foreign row: {value}"
                            );
                        }
                    }
                    if last_pass {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Ok(hits)
            })
        })
        .collect()
}

pub(super) async fn join_all<T>(
    handles: Vec<tokio::task::JoinHandle<Result<T, Failure>>>,
) -> Result<Vec<T>, Failure> {
    let mut out = Vec::new();
    for h in handles {
        out.push(
            h.await
                .map_err(|e| Failure(format!("task panicked: {e}")))??,
        );
    }
    Ok(out)
}

/// Writers whose `task`/`inputs` come from `key_of(writer)`; writer `w` goes through `backend_of(w)`.
/// Returns, per successful write, the key, the stored output and the bytes.
pub(super) async fn run_writers(
    cache: &Backend,
    key_of: impl Fn(u64) -> (String, Value),
    backend_of: impl Fn(u64) -> Backend,
) -> Result<Vec<(String, Value, Value, Bytes)>, Failure> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keys: Vec<(String, Value)> = {
        let mut seen = HashSet::new();
        (0..WRITERS)
            .map(&key_of)
            .filter(|k| seen.insert(k.clone()))
            .collect()
    };
    let readers = spawn_readers(&engine(cache, 1024), keys, stop.clone());
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (task, inputs) = key_of(w);
            let engine = engine(&backend_of(w), 1024);
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0..WRITES_EACH {
                    let data = pattern(64 * 1024 + (w * 977 + i * 131) as usize, w * 100 + i);
                    let result = engine
                        .put_stream(
                            &task,
                            &inputs,
                            stream_of(data.clone(), 16 * 1024),
                            BlobOptions::default(),
                        )
                        .await;
                    match result {
                        Ok(output) => done.push((task.clone(), inputs.clone(), output, data)),
                        Err(Error::Backend { ref context, .. }) if context.contains("save row") => {
                        }
                        Err(e) => return Err(Failure::from(e)),
                    }
                }
                Ok(done)
            })
        })
        .collect();
    let written = join_all(writers).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let hits = join_all(readers).await?;
    let written: Vec<_> = written?.into_iter().flatten().collect();
    ensure!(hits.iter().sum::<u64>() > 0, "readers never saw a row");
    Ok(written)
}

/// Every written output reads back as its bytes (refs verified).
pub(super) async fn check_written(
    cache: &Backend,
    written: &[(String, Value, Value, Bytes)],
) -> CaseResult {
    let engine = engine(cache, 1024);
    for (_, _, output, data) in written {
        let bytes = match CacheRef::from_value(output) {
            Some(r) => engine.read(&r).await?,
            None => InlineBinary::decode(output)?.map(|b| b.bytes),
        };
        ensure!(
            bytes.as_ref() == Some(data),
            "output {output} does not read back its bytes"
        );
    }
    Ok(())
}

/// Invariant 8: 16 writers on one key with readers running: no error, no torn read, every committed ref
/// stays readable, and the row ends as one writer's complete output.
pub async fn concurrent_writers_same_key(cache: Backend) -> CaseResult {
    let written = run_writers(
        &cache,
        |_| ("conformance/race".into(), json!({"key": "same"})),
        |_| cache.clone(),
    )
    .await?;
    ensure!(
        written.len() as u64 == WRITERS * WRITES_EACH,
        "only {} writes succeeded",
        written.len()
    );
    check_written(&cache, &written).await?;
    let last = cache
        .get_row(&RowKey::new("conformance/race", &json!({"key": "same"}))?)
        .await?;
    let last = last.ok_or(Failure("no row after the race".into()))?.output;
    ensure!(
        written.iter().any(|(_, _, o, _)| *o == last),
        "the final row is no writer's output: {last}"
    );
    Ok(())
}

/// Invariant 8: 16 writers on 16 keys with readers running: each key ends with its writer's last output.
pub async fn concurrent_writers_different_keys(cache: Backend) -> CaseResult {
    let written = run_writers(
        &cache,
        |w| ("conformance/race".into(), json!({ "key": w })),
        |_| cache.clone(),
    )
    .await?;
    ensure!(
        written.len() as u64 == WRITERS * WRITES_EACH,
        "only {} writes succeeded",
        written.len()
    );
    check_written(&cache, &written).await?;
    let engine = engine(&cache, 1024);
    for w in 0..WRITERS {
        let inputs = json!({ "key": w });
        let last = written
            .iter()
            .rev()
            .find(|(_, i, _, _)| *i == inputs)
            .map(|(_, _, o, _)| o.clone());
        let row = cache
            .get_row(&RowKey::new("conformance/race", &inputs)?)
            .await?
            .map(|r| r.output);
        ensure!(
            row == last,
            "key {w} holds {row:?}, its writer last wrote {last:?}"
        );
        ensure!(
            engine.get("conformance/race", &inputs).await?.is_some(),
            "key {w} misses"
        );
    }
    Ok(())
}

/// Invariant 8: half the writers have their row commits fail (and clean up their blobs) while the other
/// half succeed on the same and on different keys: no successful writer's blob is ever deleted.
pub async fn concurrent_cleanup_spares_other_writers(cache: Backend) -> CaseResult {
    let failing: Backend = Arc::new(FailingRows::new(cache.clone(), true));
    let written = run_writers(
        &cache,
        |w| ("conformance/race".into(), json!({ "key": w % 4 })),
        |w| {
            if w % 2 == 0 {
                failing.clone()
            } else {
                cache.clone()
            }
        },
    )
    .await?;
    ensure!(
        written.len() as u64 == WRITERS / 2 * WRITES_EACH,
        "{} writes succeeded",
        written.len()
    );
    check_written(&cache, &written).await?;
    if has(&cache, Cap::WriteBlob) {
        let refs: HashSet<String> = written
            .iter()
            .filter_map(|(_, _, o, _)| CacheRef::from_value(o).map(|r| r.reference))
            .collect();
        let blobs: HashSet<String> = published(&cache).await?.into_iter().collect();
        ensure!(
            blobs == refs,
            "blobs left {} differ from successful refs {}",
            blobs.len(),
            refs.len()
        );
    }
    Ok(())
}
