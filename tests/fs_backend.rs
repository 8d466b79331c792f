//! What only the filesystem backend can show: files on disk. Stale temps are listed and swept after the
//! grace period, traversal refs never reach outside the root, garbled rows and damaged blobs give typed
//! errors instead of wrong data, and an unusable root is refused with its path.

#![cfg(feature = "fs")]

use std::fs;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use outcache::OutputCacheExt as _;
use outcache::backends::fs::{FsCache, FsOptions};
use outcache::janitor::{find_orphans, sweep_orphans};
use outcache::{BlobOptions, BlobState, Cache, CacheRef, Error, OutputCache, RowKey};
use serde_json::json;

fn open(dir: &std::path::Path) -> Arc<FsCache> {
    Arc::new(FsCache::open(dir, FsOptions::default()).unwrap())
}

fn bytes_stream(data: Vec<u8>) -> outcache::ByteStream {
    futures::stream::iter([Ok(bytes::Bytes::from(data))]).boxed()
}

async fn put_blob(cache: &Cache, len: usize) -> (CacheRef, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    (put_bytes(cache, json!({"len": len}), &data).await, data)
}

/// Store `data` as the output of task `fs/test` with `inputs`; its ref.
async fn put_bytes(cache: &Cache, inputs: serde_json::Value, data: &[u8]) -> CacheRef {
    let stored = cache
        .put_stream(
            "fs/test",
            &inputs,
            bytes_stream(data.to_vec()),
            BlobOptions::default(),
        )
        .await
        .unwrap();
    CacheRef::from_value(&stored).expect("above the threshold")
}

fn blob_file(root: &std::path::Path, r: &CacheRef) -> std::path::PathBuf {
    root.join("blobs")
        .join(r.reference.strip_prefix("fsfolder://blobs/").unwrap())
}

#[tokio::test]
async fn stale_temps_are_listed_and_swept_only_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path());
    let stale = dir
        .path()
        .join("tmp/blob-000000000000000000000000deadbeef.tmp");
    let fresh = dir
        .path()
        .join("tmp/blob-00000000000000000000000000f1f1f1.tmp");
    fs::write(&stale, b"left by a crashed writer").unwrap();
    fs::write(&fresh, b"being written now").unwrap();
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();

    let listed = cache.list_blobs().await.unwrap();
    let temps: Vec<&str> = listed
        .iter()
        .filter(|e| e.state == BlobState::Temp)
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(temps.len(), 2, "{listed:?}");

    let found = find_orphans(cache.as_ref(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(found.temps.len(), 1);
    assert_eq!(
        found.temps[0].id,
        "blob-000000000000000000000000deadbeef.tmp"
    );
    sweep_orphans(cache.as_ref(), Duration::from_secs(3600), false)
        .await
        .unwrap();
    assert!(!stale.exists(), "the stale temp survived");
    assert!(fresh.exists(), "an in-flight temp was removed");
}

#[tokio::test]
async fn traversal_refs_never_reach_outside_the_root() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("cache");
    let cache = open(&root);
    let secret = parent.path().join("secret.bin");
    fs::write(&secret, b"not the cache's").unwrap();
    fs::write(root.join("tmp/inside.bin"), b"temp, not a blob").unwrap();
    let attempts = [
        "fsfolder://blobs/../../secret.bin",
        "fsfolder://blobs/../tmp/inside.bin",
        "fsfolder://blobs/..%2F..%2Fsecret.bin",
        "fsfolder://blobs/..\\..\\secret.bin",
    ];
    let abs = format!("fsfolder://blobs/{}", secret.display());
    for r in attempts.iter().copied().chain([abs.as_str()]) {
        assert_eq!(cache.read_blob(r).await.unwrap(), None, "{r}");
        assert!(cache.open_blob(r, None).await.unwrap().is_none(), "{r}");
        cache.delete_blob(r).await.unwrap();
    }
    assert_eq!(fs::read(&secret).unwrap(), b"not the cache's");
    assert!(root.join("tmp/inside.bin").exists());
    assert!(!cache.remove_temp("../../secret.bin").await.unwrap());
    assert!(secret.exists());
}

#[tokio::test]
async fn a_garbled_row_is_a_typed_error_and_is_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path());
    let key = RowKey::new("fs/rows", &json!({"n": 1})).unwrap();
    cache.save_row(&key, &json!({"ok": true})).await.unwrap();
    let row_file = fs::read_dir(dir.path().join("rows/fs.2Frows"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::write(&row_file, b"{\"v\":1,\"task_type\":\"fs/ro").unwrap();
    match cache.get_row(&key).await {
        Err(Error::CorruptRow {
            task_type,
            fingerprint,
            ..
        }) => {
            assert_eq!(
                (task_type.as_str(), fingerprint.as_str()),
                ("fs/rows", key.fingerprint())
            );
        }
        other => panic!("expected CorruptRow, got {other:?}"),
    }
    assert!(
        row_file.exists(),
        "a corrupt row must not be deleted on read"
    );
    assert!(
        cache.list_rows().await.unwrap().is_empty(),
        "a garbled row is not listed as a row"
    );
    let corrupt = cache.list_corrupt().await.unwrap();
    assert_eq!(corrupt.len(), 1, "{corrupt:?}");
    assert!(
        corrupt[0].id.starts_with("rows/fs.2Frows/") && corrupt[0].reason.contains("JSON"),
        "{corrupt:?}"
    );

    // Ids that leave the rows directory do nothing; a row rewritten since the listing is kept.
    for bad in [
        "../outside.json",
        "rows/../../x.json",
        "/etc/passwd",
        "rows/a/b/c.json",
        "tmp/x.json",
    ] {
        assert!(!cache.remove_corrupt(bad).await.unwrap(), "{bad}");
    }
    cache.save_row(&key, &json!({"ok": "again"})).await.unwrap();
    assert!(
        !cache.remove_corrupt(&corrupt[0].id).await.unwrap(),
        "a repaired row was removed"
    );
    std::fs::write(&row_file, b"garbage again").unwrap();
    assert!(cache.remove_corrupt(&corrupt[0].id).await.unwrap());
    assert!(!row_file.exists());
}

#[tokio::test]
async fn a_flipped_byte_or_a_truncated_blob_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(open(dir.path()));
    let (r, data) = put_blob(&cache, 300_000).await;
    let path = blob_file(dir.path(), &r);

    let mut damaged = data.clone();
    damaged[150_000] ^= 0x01;
    fs::write(&path, &damaged).unwrap();
    assert!(matches!(cache.read(&r).await, Err(Error::Integrity { .. })));
    let mut stream = cache.open_stream(&r).await.unwrap().unwrap();
    let mut last = None;
    while let Some(item) = stream.next().await {
        last = Some(item);
    }
    assert!(
        matches!(last, Some(Err(Error::Integrity { .. }))),
        "the stream must end in an error"
    );

    fs::write(&path, &data[..1000]).unwrap();
    match cache.read(&r).await {
        Err(Error::Integrity {
            expected, actual, ..
        }) => {
            assert_eq!(
                (expected.as_str(), actual.as_str()),
                ("size:300000", "size:1000")
            );
        }
        other => panic!("expected an Integrity error, got {other:?}"),
    }
    fs::write(&path, [&data[..], b"extra"].concat()).unwrap();
    assert!(matches!(cache.read(&r).await, Err(Error::Integrity { .. })));
}

#[tokio::test]
async fn writes_leave_no_temp_files_and_use_the_fs_ref_form() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(open(dir.path()));
    for n in 0..20 {
        cache
            .put("fs/many", &json!({"n": n}), &json!(n))
            .await
            .unwrap();
    }
    let (r, _) = put_blob(&cache, 100_000).await;
    assert!(
        r.reference.starts_with("fsfolder://blobs/fs_test_"),
        "{}",
        r.reference
    );
    assert!(r.reference.ends_with(".bin"));
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn an_unusable_root_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    match FsCache::open(file.join("cache"), FsOptions::default()) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("a-file"), "{e}"),
        other => panic!("expected an Io error, got {other:?}"),
    }
}

/// `fs://` and `fs:///` (an unset variable in `fs://$CACHE_DIR`) name the filesystem root, and so may a
/// link: refused, since the janitor sweeps the cache's `tmp/`, and `/tmp` is everybody's.
#[test]
fn the_filesystem_root_is_refused_as_a_cache_directory() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("root");
    std::os::unix::fs::symlink("/", &link).unwrap();
    for root in [
        std::path::PathBuf::from("/"),
        link,
        std::path::PathBuf::new(),
    ] {
        match FsCache::open(&root, FsOptions::default()) {
            Err(e @ Error::InvalidInput { .. }) => {
                assert!(e.to_string().contains("a directory of its own"), "{e}")
            }
            other => panic!("{} was opened as a cache: {other:?}", root.display()),
        }
    }
}

/// Reading a directory that is not a cache (a mistyped URL, a home directory) writes nothing into
/// it; a new or empty directory gets the layout at once, and the first write makes what it needs.
#[tokio::test]
async fn reading_a_directory_that_is_not_a_cache_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    fs::create_dir(&project).unwrap();
    fs::write(project.join("notes.txt"), b"mine").unwrap();
    let names = |d: &std::path::Path| {
        let mut names: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let cache = Cache::new(open(&project));
    assert_eq!(cache.get("t", &json!(1)).await.unwrap(), None);
    outcache::janitor::inventory(cache.backend().as_ref(), 5)
        .await
        .unwrap();
    assert_eq!(names(&project), ["notes.txt"]);

    cache.put("t", &json!(1), &json!("v")).await.unwrap();
    assert_eq!(cache.get("t", &json!(1)).await.unwrap(), Some(json!("v")));
    assert!(project.join("rows").is_dir());

    for fresh in [
        dir.path().join("new"),
        tempfile::tempdir_in(dir.path()).unwrap().keep(),
    ] {
        open(&fresh);
        assert_eq!(
            names(&fresh),
            ["blobs", "rows", "tmp"],
            "{}",
            fresh.display()
        );
    }
}

/// Blob reads reuse their read buffers once a chunk is dropped, and read one chunk ahead: chunks a
/// caller still holds must never be overwritten, whatever the interleaving of streams, and a stream
/// dropped with a read ahead in flight must leave the next reads intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_chunks_held_or_dropped_keep_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(open(dir.path()));
    // Contents that differ at every offset and from chunk to chunk, several chunks each.
    let pattern = |len: usize, seed: u8| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8) ^ ((i >> 20) as u8).wrapping_mul(97) ^ seed)
            .collect()
    };
    let (a_data, b_data) = (pattern((5 << 20) + 17, 0x11), pattern((3 << 20) + 5, 0xa5));
    let a = put_bytes(&cache, json!({ "seed": "a" }), &a_data).await;
    let b = put_bytes(&cache, json!({ "seed": "b" }), &b_data).await;
    for _ in 0..3 {
        // Two streams interleaved: every chunk of `a` held to the end, `b`'s dropped as they come.
        let mut sa = cache.open_stream(&a).await.unwrap().unwrap();
        let mut sb = cache.open_stream(&b).await.unwrap().unwrap();
        let (mut held, mut b_read) = (Vec::new(), Vec::new());
        loop {
            let (ca, cb) = (sa.next().await, sb.next().await);
            if ca.is_none() && cb.is_none() {
                break;
            }
            if let Some(c) = ca {
                held.push(c.unwrap());
            }
            if let Some(c) = cb {
                b_read.extend_from_slice(&c.unwrap());
            }
        }
        assert_eq!(held.concat(), a_data, "a chunk held was overwritten");
        assert_eq!(b_read, b_data);
        // A stream dropped after its first chunk, its read ahead still running.
        let mut early = cache.open_stream(&a).await.unwrap().unwrap();
        let first = early.next().await.unwrap().unwrap();
        drop(early);
        assert_eq!(&first[..], &a_data[..first.len()]);
    }
}

/// An operator empties the cache under a process that keeps it open, as a long-running `outcache serve`
/// does: the next writes make the directories again and succeed. A root removed whole stays removed
/// (writes fail naming it; a write still running for a caller that gave up must not bring back a
/// directory its owner deleted), and a link put in place of a directory is refused, never followed.
#[tokio::test]
async fn writes_after_the_cache_was_emptied_under_them_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let cache = Cache::new(open(&root));
    put_blob(&cache, 200_000).await;
    for entry in fs::read_dir(&root).unwrap() {
        fs::remove_dir_all(entry.unwrap().path()).unwrap();
    }
    let (r, data) = put_blob(&cache, 300_000).await;
    assert_eq!(cache.read(&r).await.unwrap().unwrap().as_ref(), data);
    let inputs = json!({ "wiped": true });
    cache.put("fs/row", &inputs, &json!(1)).await.unwrap();
    assert_eq!(cache.get("fs/row", &inputs).await.unwrap(), Some(json!(1)));

    // The root removed whole: an error naming the path, and nothing made again.
    fs::remove_dir_all(&root).unwrap();
    let refused = cache
        .put("fs/row", &json!({ "root": "gone" }), &json!(1))
        .await;
    match &refused {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("cache"), "{e}"),
        other => panic!("a removed root: {other:?}"),
    }
    assert!(!root.exists(), "a write brought back the removed root");
    fs::create_dir(&root).unwrap();

    // A link where the temp directory belongs: refused with its path, nothing written through it.
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join("tmp")).unwrap();
    let refused = cache
        .put_stream(
            "fs/test",
            &json!({ "through": "link" }),
            bytes_stream(vec![7; 200_000]),
            BlobOptions::default(),
        )
        .await;
    assert!(
        matches!(&refused, Err(Error::Io { .. })),
        "a link in place of tmp/: {refused:?}"
    );
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
}
