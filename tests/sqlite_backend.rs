#![cfg(feature = "sqlite")]
//! What only the SQLite backend can show: what sits in the database file, refusing files that are not
//! ours, chunks without a manifest as janitor temps, a blob deleted mid-read, and several processes on
//! one file.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::outcache;
use futures::StreamExt;
use outcache::backends::sqlite::{CHUNK_SIZE, SqliteCache, SqliteOptions};
use outcache::janitor::sweep_orphans;
use outcache::{BlobOptions, BlobState, Cache, CacheRef, Error, InlineBinary, OutputCache};
use serde_json::{Value, json};

fn open(path: &Path) -> Arc<SqliteCache> {
    Arc::new(SqliteCache::open(path, SqliteOptions::default()).unwrap())
}

fn stream(data: Vec<u8>) -> outcache::ByteStream {
    futures::stream::iter([Ok(bytes::Bytes::from(data))]).boxed()
}

#[tokio::test]
async fn small_binary_outputs_sit_in_the_row_as_base64_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let cache = Cache::new(open(&db));
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 256) as u8).collect();
    let blob = BlobOptions {
        mime: Some("image/x-icon".into()),
        port: None,
    };
    cache
        .put_stream(
            "icons/render",
            &json!({"s": 16}),
            stream(data.clone()),
            blob,
        )
        .await
        .unwrap();

    let raw = rusqlite::Connection::open(&db).unwrap();
    let text: String = raw
        .query_row("SELECT output FROM rows", [], |r| r.get(0))
        .unwrap();
    let stored: Value = serde_json::from_str(&text).unwrap();
    let inline = InlineBinary::decode(&stored)
        .unwrap()
        .expect("the row holds an envelope");
    assert_eq!(
        inline.bytes, data,
        "bytes written inline come back byte-identical"
    );
    assert_eq!(inline.mime.as_deref(), Some("image/x-icon"));
    let blobs: i64 = raw
        .query_row("SELECT count(*) FROM blobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(blobs, 0);

    let got = cache
        .get("icons/render", &json!({"s": 16}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(InlineBinary::decode(&got).unwrap().unwrap().bytes, data);
}

#[test]
fn files_that_are_not_ours_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.db");
    let junk = vec![0x42u8; 8192];
    std::fs::write(&garbage, &junk).unwrap();
    let foreign = dir.path().join("foreign.db");
    {
        let c = rusqlite::Connection::open(&foreign).unwrap();
        c.execute_batch("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER); INSERT INTO accounts VALUES (1, 100);").unwrap();
    }
    let foreign_bytes = std::fs::read(&foreign).unwrap();
    let newer = dir.path().join("newer.db");
    {
        drop(SqliteCache::open(&newer, SqliteOptions::default()).unwrap());
        let c = rusqlite::Connection::open(&newer).unwrap();
        c.execute_batch("PRAGMA user_version = 99;").unwrap();
    }
    for (path, mentions) in [
        (&garbage, "not a database"),
        (&foreign, "another application"),
        (&newer, "newer"),
    ] {
        match SqliteCache::open(path, SqliteOptions::default()) {
            Err(e @ Error::NotACache { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&*path.display().to_string()) && msg.contains(mentions),
                    "{msg}"
                );
            }
            other => panic!("{}: expected NotACache, got {other:?}", path.display()),
        }
    }
    assert_eq!(std::fs::read(&garbage).unwrap(), junk);
    assert_eq!(std::fs::read(&foreign).unwrap(), foreign_bytes);
    match SqliteCache::open(dir.path(), SqliteOptions::default()) {
        Err(Error::NotACache { reason, .. }) => assert!(reason.contains("directory")),
        other => panic!("a directory: {other:?}"),
    }
    // A FIFO (as a device such as /dev/null would be) is refused before SQLite opens it: no hang, and
    // no journal left beside it, where `sqlite:///dev/null` had left `/dev/null-journal`.
    let fifo = dir.path().join("fifo.db");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a FIFO in our temp dir.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    match SqliteCache::open(&fifo, SqliteOptions::default()) {
        Err(Error::NotACache { reason, .. }) => assert!(reason.contains("FIFO"), "{reason}"),
        other => panic!("a FIFO: {other:?}"),
    }
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("fifo.db-"))
        .collect();
    assert!(beside.is_empty(), "left beside the FIFO: {beside:?}");
}

#[tokio::test]
async fn chunks_without_a_manifest_are_temps_the_janitor_removes_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let cache = open(&db);
    {
        // What a writer killed mid-stream leaves: chunk rows and no manifest.
        let raw = rusqlite::Connection::open(&db).unwrap();
        let old = 1_000i64; // 1970: long past any grace period
        raw.execute(
            "INSERT INTO chunks VALUES ('deadwriter', 0, x'00ff', ?1)",
            [old],
        )
        .unwrap();
        raw.execute(
            "INSERT INTO chunks VALUES ('deadwriter', 1, x'01', ?1)",
            [old],
        )
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        raw.execute(
            "INSERT INTO chunks VALUES ('inflight', 0, x'02', ?1)",
            [now],
        )
        .unwrap();
    }
    let temps: Vec<_> = cache
        .list_blobs()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.state == BlobState::Temp)
        .collect();
    assert_eq!(temps.len(), 2, "{temps:?}");
    let dead = temps.iter().find(|t| t.id == "deadwriter").unwrap();
    assert_eq!(dead.size, 3);
    assert_eq!(
        outcache::janitor::inventory(cache.as_ref(), 0)
            .await
            .unwrap()
            .temps,
        2
    );

    let sweep = sweep_orphans(cache.as_ref(), Duration::from_secs(3600), false)
        .await
        .unwrap();
    assert_eq!(sweep.temps.len(), 1);
    let left: Vec<String> = cache
        .list_blobs()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, ["inflight"]);
}

/// The chunks left in the database, whoever's.
async fn temps(cache: &SqliteCache) -> Vec<String> {
    cache
        .list_blobs()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.state == BlobState::Temp)
        .map(|e| e.id)
        .collect()
}

/// Deleted while this process streams it, a blob reads to the end (its chunks wait for the stream,
/// even against a janitor sweeping temps with no grace), and its chunks go once the stream is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_deleted_mid_read_reads_to_the_end_and_then_goes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(&dir.path().join("c.db"));
    let data: Vec<u8> = (0..CHUNK_SIZE * 3 + 5).map(|i| (i % 251) as u8).collect();
    let r = cache
        .write_blob(&Default::default(), stream(data.clone()))
        .await
        .unwrap();
    let mut s = cache.open_blob(&r.reference, None).await.unwrap().unwrap();
    let mut got = s.next().await.unwrap().unwrap().to_vec();
    cache.delete_blob(&r.reference).await.unwrap();
    assert!(cache.open_blob(&r.reference, None).await.unwrap().is_none());
    let swept = sweep_orphans(cache.as_ref(), Duration::ZERO, false)
        .await
        .unwrap();
    assert!(
        swept.temps.is_empty(),
        "reported as swept: {:?}",
        swept.temps
    );
    assert_eq!(
        temps(&cache).await.len(),
        1,
        "the janitor swept chunks being read"
    );
    while let Some(chunk) = s.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert!(got == data, "read {} of {} bytes", got.len(), data.len());
    assert_eq!(
        temps(&cache).await.len(),
        1,
        "the chunks wait for the stream"
    );
    drop(s);
    for _ in 0..200 {
        if temps(&cache).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the chunks outlived the last stream: {:?}",
        temps(&cache).await
    );
}

/// Readers and deleters racing over the same blobs: every stream that opens reads its blob whole (a
/// blob deleted first is a clean miss at open), and once all are done no chunk is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_racing_deletes_read_whole_blobs_and_leave_no_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(&dir.path().join("c.db"));
    let blob = |i: usize| -> Vec<u8> {
        (0..CHUNK_SIZE * 2 + 1000 * i)
            .map(|n| (n * 7 + i) as u8)
            .collect()
    };
    let mut refs = Vec::new();
    for i in 0..24 {
        let r = cache
            .write_blob(&Default::default(), stream(blob(i)))
            .await
            .unwrap();
        refs.push(r.reference);
    }
    let refs = Arc::new(refs);
    let readers: Vec<_> = (0..16)
        .map(|t| {
            let (cache, refs) = (cache.clone(), refs.clone());
            tokio::spawn(async move {
                let (mut whole, mut missed) = (0, 0);
                for n in 0..24 {
                    let i = (t * 5 + n * 7) % refs.len();
                    let Some(mut s) = cache.open_blob(&refs[i], None).await.unwrap() else {
                        missed += 1;
                        continue;
                    };
                    let mut got = Vec::new();
                    while let Some(chunk) = s.next().await {
                        got.extend_from_slice(&chunk.expect("a stream broke off"));
                        tokio::task::yield_now().await;
                    }
                    assert!(got == blob(i), "blob {i}: {} bytes", got.len());
                    whole += 1;
                }
                (whole, missed)
            })
        })
        .collect();
    let deleter = {
        let (cache, refs) = (cache.clone(), refs.clone());
        tokio::spawn(async move {
            for r in refs.iter().rev() {
                cache.delete_blob(r).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let (mut whole, mut missed) = (0, 0);
    for r in readers {
        let (w, m) = r.await.unwrap();
        whole += w;
        missed += m;
    }
    deleter.await.unwrap();
    assert!(
        whole > 0 && missed > 0,
        "no race: {whole} whole, {missed} missed"
    );
    for _ in 0..200 {
        if temps(&cache).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("chunks left behind: {:?}", temps(&cache).await);
}

/// Another process (here: another open of the same file) that deletes a blob this one is streaming
/// cannot see the stream: the stream then ends with an error naming that, never with short data
/// that looks whole.
#[tokio::test]
async fn a_blob_another_process_deletes_mid_read_ends_the_stream_with_an_error_not_short_data() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(&dir.path().join("c.db"));
    let other = open(&dir.path().join("c.db"));
    let data = vec![9u8; CHUNK_SIZE * 3];
    let r = cache
        .write_blob(&Default::default(), stream(data))
        .await
        .unwrap();
    let mut s = cache.open_blob(&r.reference, None).await.unwrap().unwrap();
    assert_eq!(s.next().await.unwrap().unwrap().len(), CHUNK_SIZE);
    other.delete_blob(&r.reference).await.unwrap();
    match s.next().await {
        Some(Err(Error::Backend { source, .. })) => {
            assert!(
                source
                    .to_string()
                    .contains("another process deleted the blob"),
                "{source}"
            )
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn cli_put_blob_is_inline_when_small_and_a_verified_ref_when_large() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/c.db", dir.path().display());
    let small = outcache(
        &url,
        &["put-blob", "t", "--inputs", "{\"n\":1}"],
        Some(&[1u8; 1024]),
    );
    assert!(
        small.status.success(),
        "{}",
        String::from_utf8_lossy(&small.stderr)
    );
    let small: Value = serde_json::from_slice(&small.stdout).unwrap();
    assert_eq!(small["__binaryPortWire"], 1);

    let big: Vec<u8> = (0..10 << 20).map(|i: u32| (i % 241) as u8).collect();
    let out = outcache(
        &url,
        &["put-blob", "t", "--inputs", "{\"n\":2}"],
        Some(&big),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = CacheRef::from_value(&stored).expect("10 MiB becomes a ref");
    assert!(
        r.reference.starts_with("sqlite://blobs/"),
        "{}",
        r.reference
    );
    let cat = outcache(&url, &["cat", &stored.to_string()], None);
    assert!(cat.status.success());
    assert!(cat.stdout == big, "cat returned other bytes");
}

#[tokio::test]
async fn garbage_written_into_the_database_gives_typed_errors_never_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let (r, key) = {
        let cache = Cache::new(open(&db));
        let stored = cache
            .put_stream(
                "t",
                &json!({"n": 1}),
                stream(data.clone()),
                BlobOptions::default(),
            )
            .await
            .unwrap();
        cache
            .put("rows", &json!({"n": 2}), &json!({"kept": "value"}))
            .await
            .unwrap();
        (
            CacheRef::from_value(&stored).unwrap(),
            outcache::RowKey::new("rows", &json!({"n": 2})).unwrap(),
        )
    };
    // Checkpoint the WAL into the file, then scribble over the middle of it.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    let mut bytes = std::fs::read(&db).unwrap();
    let len = bytes.len();
    for (i, b) in bytes[len / 3..len / 3 + 65_536].iter_mut().enumerate() {
        *b = (i * 7 + 13) as u8;
    }
    std::fs::write(&db, &bytes).unwrap();

    match SqliteCache::open(&db, SqliteOptions::default()) {
        Err(e) => assert!(
            matches!(e, Error::NotACache { .. } | Error::Backend { .. }),
            "{e:?}"
        ),
        Ok(backend) => {
            let cache = Cache::new(Arc::new(backend));
            // A miss or a typed error is fine; bytes or a row that differ from what was written are not.
            if let Ok(Some(got)) = cache.read(&r).await {
                assert_eq!(got, data, "wrong bytes returned as good");
            }
            if let Ok(Some(row)) = cache.backend().get_row(&key).await {
                assert_eq!(row.output, json!({"kept": "value"}));
            }
        }
    }
    assert!(db.exists(), "the damaged database must not be deleted");
}

/// A manifest whose size is absurd (9e18 bytes, garbage on disk) is an integrity failure, never an
/// allocation that aborts the process: by full ref, by bare ref, and through a hit that hydrates it.
#[test]
fn an_absurd_manifest_size_is_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let u = format!("sqlite://{}", db.display());
    let run = |args: &[&str], stdin: Option<&[u8]>| common::outcache(&u, args, stdin);
    let put = run(
        &["put-blob", "t", "--inputs", "{}"],
        Some(&vec![9u8; 200_000]),
    );
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let full = String::from_utf8_lossy(&put.stdout).trim().to_owned();
    let r: serde_json::Value = serde_json::from_str(&full).unwrap();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("UPDATE blobs SET size = 9000000000000000000", [])
        .unwrap();
    for reference in [full.as_str(), r["$ref"].as_str().unwrap()] {
        let cat = run(&["cat", reference], None);
        let err = String::from_utf8_lossy(&cat.stderr);
        assert_eq!(cat.status.code(), Some(3), "{err}");
        assert!(!err.contains("memory allocation"), "{err}");
    }
    // The hit's ref names a blob whose stored size is not its own: a miss, so the task runs again.
    let get = run(&["get", "t", "--inputs", "{}"], None);
    assert_eq!(
        get.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
}

/// SQLite gives disk space back: after a prune that frees half the logical bytes, the database file (with
/// its log) shrinks to within 10% of the logical size plus one checkpoint's worth; a failed write's pages
/// go back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_gives_disk_space_back() {
    use outcache::janitor::{PruneOptions, inventory, prune};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let backend: Arc<dyn OutputCache> = open(&db);
    let cache = Cache::new(backend.clone());
    for (task, seed) in [("keep", 1u8), ("drop", 2u8)] {
        for i in 0..8u8 {
            cache
                .put_stream(
                    task,
                    &json!({ "i": i }),
                    stream(vec![seed ^ i; 2 << 20]),
                    BlobOptions::default(),
                )
                .await
                .unwrap();
        }
    }
    let before = inventory(backend.as_ref(), 0).await.unwrap();
    let mut options = PruneOptions::new();
    options.older_than = Some(Duration::ZERO);
    options.prefix = Some("drop".into());
    let report = prune(backend.as_ref(), &options, |_| {}).await.unwrap();
    assert_eq!(report.blobs_removed, 8);
    let after = inventory(backend.as_ref(), 0).await.unwrap();
    let logical = after.row_bytes + after.blob_bytes;
    assert!(
        logical * 2 <= before.row_bytes + before.blob_bytes + (1 << 20),
        "{before:?} {after:?}"
    );
    let on_disk = after.storage_bytes.expect("SQLite knows its file size");
    let checkpoint = 4 << 20; // SQLite's default autocheckpoint: 1000 pages of 4 KiB
    assert!(
        on_disk as f64 <= logical as f64 * 1.1 + checkpoint as f64,
        "{on_disk} bytes on disk for {logical} logical"
    );

    // A failed 8 MiB write leaves no pages behind either.
    let failing = futures::stream::iter(vec![Ok(bytes::Bytes::from(vec![7u8; 8 << 20]))])
        .chain(futures::stream::once(async {
            Err(Error::stream("producer died"))
        }))
        .boxed();
    assert!(
        cache
            .put_stream("fail", &json!({}), failing, BlobOptions::default())
            .await
            .is_err()
    );
    backend.reclaim_space().await.unwrap();
    let after_fail = backend.storage_bytes().await.unwrap().unwrap();
    assert!(
        after_fail as f64 <= logical as f64 * 1.1 + checkpoint as f64,
        "a failed write left {after_fail} bytes on disk for {logical} logical"
    );
}

/// The group commit under pressure: writers keep queueing rows while a commit is in flight, and
/// finish at random moments relative to the committer's last look at the queue. Every caller must hear
/// "written" for a row that is really there; none may be abandoned or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_answers_every_writer_and_loses_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(
        SqliteCache::open(
            dir.path().join("c.db"),
            SqliteOptions::default().durable(false),
        )
        .unwrap(),
    );
    let (writers, each) = (64, 100);
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let cache = cache.clone();
            tokio::spawn(async move {
                for i in 0..each {
                    let key = outcache::RowKey::new("group/commit", &json!([w, i])).unwrap();
                    cache.save_row(&key, &json!({ "w": w, "i": i })).await?;
                    if (w + i) % 3 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let rows = cache.scan_rows().await.unwrap().rows;
    assert_eq!(rows.len(), writers * each);
    for w in [0, writers / 2, writers - 1] {
        let key = outcache::RowKey::new("group/commit", &json!([w, each - 1])).unwrap();
        let row = cache.get_row(&key).await.unwrap().expect("committed row");
        assert_eq!(row.output, json!({ "w": w, "i": each - 1 }));
    }
}

/// The database file deleted (an operator clearing the cache) or replaced under an open cache: writes
/// fail naming the path instead of going on into a file nobody will see again; the cache opened anew
/// writes to the file that is there now.
#[tokio::test]
async fn a_database_removed_or_replaced_under_an_open_cache_refuses_writes_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let cache = Cache::new(open(&db));
    cache.put("t", &json!(1), &json!("before")).await.unwrap();
    let sidecars = |db: &Path| {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
    };
    sidecars(&db);
    let refused = cache.put("t", &json!(2), &json!("lost")).await;
    let says_why = |r: Option<&Error>| {
        r.is_some_and(|e| {
            e.to_string().contains("removed or replaced")
                && e.to_string().contains(&db.display().to_string())
        })
    };
    assert!(
        says_why(refused.as_ref().err()),
        "a row into a deleted database: {refused:?}"
    );
    let blob = cache
        .put_stream(
            "t",
            &json!(3),
            stream(vec![1; 100_000]),
            BlobOptions::default(),
        )
        .await;
    assert!(
        says_why(blob.as_ref().err()),
        "a blob into a deleted database: {blob:?}"
    );
    // Reads look the path up once a second: within one, the old file still answers.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let read = cache.get("t", &json!(1)).await;
    assert!(
        says_why(read.as_ref().err()),
        "a read from a deleted database: {read:?}"
    );

    // Replaced: another cache made a new file there; the old handle still refuses, the new one writes.
    let fresh = Cache::new(open(&db));
    fresh.put("t", &json!(4), &json!("new")).await.unwrap();
    assert!(cache.put("t", &json!(5), &json!("lost")).await.is_err());
    // The old handle never mixes in the new file's rows (a reader connection opened now would).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mixed = cache.get("t", &json!(4)).await;
    assert!(says_why(mixed.as_ref().err()), "{mixed:?}");
    let reopened = Cache::new(open(&db));
    assert_eq!(
        reopened.get("t", &json!(4)).await.unwrap(),
        Some(json!("new"))
    );
    assert_eq!(reopened.get("t", &json!(2)).await.unwrap(), None);
}

/// A process done with the cache leaves one file: the database. The last connection to close
/// checkpoints the WAL and removes the -wal and -shm files, but only a read-write connection can; when a
/// read-only one closed last (after a hit, which reads through one), a CLI `get` left both behind, with
/// its access-time update only in the WAL, missing from a copy of the database file alone.
#[test]
fn a_finished_process_leaves_only_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let url = format!("sqlite://{}", db.display());
    let files = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    for args in [
        &["put", "t", "--inputs", "{}", "--output", "[1]"][..],
        &["get", "t", "--inputs", "{}"],
        &["get", "t", "--inputs", "{\"miss\":1}"],
        &["stats"],
        &["prune", "--older-than", "1d"],
    ] {
        let out = outcache(&url, args, None);
        assert!(
            out.status.code().is_some_and(|c| c <= 1),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(files(), ["c.db"], "after {args:?}");
    }
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(&db, copy.join("c.db")).unwrap();
    let out = outcache(
        &format!("sqlite://{}/c.db", copy.display()),
        &["get", "t", "--inputs", "{}"],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[1]");
}

/// A database in a directory the process cannot write (a read-only mount, another user's directory)
/// cannot be opened at all, since SQLite creates its -wal and -shm files beside it; the error says that,
/// not only SQLite's "unable to open database file". Run as an unprivileged user (through `setpriv` when
/// the tests run as root, who could write anyway).
#[cfg(unix)]
#[test]
fn a_database_in_a_directory_it_cannot_write_is_refused_with_the_reason() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("outcache");
    std::fs::copy(env!("CARGO_BIN_EXE_outcache"), &bin).unwrap();
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    let db = locked.join("c.db");
    let url = format!("sqlite://{}", db.display());
    let out = outcache(
        &url,
        &["put", "t", "--inputs", "{}", "--output", "[1]"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another application's database (rollback journal: readable without writing beside it) in the
    // same directory is still refused as not ours, not blamed on the directory.
    let foreign = locked.join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE accounts (id INTEGER PRIMARY KEY);")
        .unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o644)).unwrap();

    // SAFETY: geteuid takes nothing and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let get = |url: &str| {
        let mut cmd = if root {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&bin);
            c
        } else {
            std::process::Command::new(&bin)
        };
        cmd.args(["--url", url, "get", "t", "--inputs", "{}"])
            .env_remove("OUTCACHE_URL")
            .env_remove("OUTCACHE_CONFIG")
            .output()
            .expect("run outcache (setpriv, from util-linux, when root)")
    };
    let out = get(&url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write") && err.contains("-wal and -shm"),
        "{err}"
    );
    let out = get(&format!("sqlite://{}", foreign.display()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another application"), "{err}");
    assert_eq!(
        std::fs::read_dir(&locked).unwrap().count(),
        2,
        "nothing was created beside the databases"
    );
}
