//! The data-safety reproductions, run as an operator or an attacker would: each test is a way the first
//! version served a wrong output, deleted what it did not own, touched files outside its root or reported
//! an unreadable blob as written. (The backend-independent ones are also conformance cases.)

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::outcache;
use serde_json::Value;

fn url(dir: &Path) -> String {
    format!("fs://{}", dir.display())
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn fails(o: &Output, code: i32, mentions: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(
        err.contains(mentions),
        "{err:?} should mention {mentions:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap()
}

/// `(rows_removed, blobs_removed)` of a prune's `--json` report.
fn removed(report: &Output) -> (Option<u64>, Option<u64>) {
    let r = json(report);
    (r["rows_removed"].as_u64(), r["blobs_removed"].as_u64())
}

/// 2^53 + 1 and 2^53 are different users; 2^64 + 1 cannot be held exactly and is refused by path.
#[test]
fn big_integer_inputs_never_share_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let inputs = r#"{"user_id":9007199254740993}"#;
    ok(&outcache(
        &u,
        &[
            "put",
            "user/profile",
            "--inputs",
            inputs,
            "--output",
            "\"p993\"",
        ],
        None,
    ));
    let other = outcache(
        &u,
        &[
            "get",
            "user/profile",
            "--inputs",
            r#"{"user_id":9007199254740992}"#,
        ],
        None,
    );
    assert_eq!(
        other.status.code(),
        Some(1),
        "2^53 must miss: {}",
        ok(&other)
    );
    assert_eq!(
        ok(&outcache(
            &u,
            &["get", "user/profile", "--inputs", inputs],
            None
        )),
        "\"p993\""
    );
    let huge = outcache(
        &u,
        &[
            "put",
            "user/profile",
            "--inputs",
            r#"{"ids":[18446744073709551617]}"#,
            "--output",
            "1",
        ],
        None,
    );
    fails(&huge, 2, "$.ids[0]");
}

/// A bundle row passing the producer's blob through does not take it along when pruned; the producer's
/// own prune does, and the report counts it.
#[test]
fn pruning_a_borrowing_row_keeps_the_blob_it_cites() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let reference = ok(&outcache(
        &u,
        &["put-blob", "producer", "--inputs", "{}"],
        Some(&vec![7u8; 100_000]),
    ));
    let bundle = format!(r#"{{"parts":[{reference}]}}"#);
    ok(&outcache(
        &u,
        &["put", "bundle", "--inputs", "{}", "--output", &bundle],
        None,
    ));
    assert_eq!(
        removed(&outcache(
            &u,
            &[
                "prune",
                "--older-than",
                "0s",
                "--prefix",
                "bundle",
                "--json",
            ],
            None,
        )),
        (Some(1), Some(0))
    );
    let producer = outcache(&u, &["get", "producer", "--inputs", "{}"], None);
    assert_eq!(
        json(&producer),
        serde_json::from_str::<Value>(&reference).unwrap()
    );
    ok(&outcache(&u, &["cat", &reference], None));

    // A run row citing the shared blob: the run's prune spares it and reports nothing removed but its row.
    let run = |args: &[&str]| {
        let mut all = vec!["--run-id", "run-42"];
        all.extend_from_slice(args);
        outcache(&u, &all, None)
    };
    ok(&run(&[
        "put", "resume", "--inputs", "{}", "--output", &bundle,
    ]));
    assert_eq!(
        removed(&run(&["prune", "--older-than", "0s", "--json"])),
        (Some(1), Some(0))
    );
    ok(&outcache(&u, &["cat", &reference], None));

    assert_eq!(
        removed(&outcache(
            &u,
            &[
                "prune",
                "--older-than",
                "0s",
                "--prefix",
                "producer",
                "--json",
            ],
            None,
        )),
        (Some(1), Some(1))
    );
    fails(
        &outcache(&u, &["cat", &reference], None),
        1,
        "does not resolve",
    );
}

/// A hit whose blob is gone is a miss at `get` time (exit 1), not a hit that fails at `cat`.
#[test]
fn a_hit_whose_blob_is_gone_misses() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    ok(&outcache(
        &u,
        &["put-blob", "producer", "--inputs", "{}"],
        Some(&vec![1u8; 100_000]),
    ));
    for entry in std::fs::read_dir(dir.path().join("blobs")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let get = outcache(&u, &["get", "producer", "--inputs", "{}"], None);
    assert_eq!(get.status.code(), Some(1));
    assert!(get.stdout.is_empty());
}

/// A blob with one flipped byte: `cat -o` leaves no file, stdout gets nothing (the blob is under the
/// buffer bound), a bare ref is verified too (its name records the SHA-256), exit 3 each time.
#[test]
fn no_wrong_byte_reaches_a_file_or_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let data: Vec<u8> = (0..5_242_880u32).map(|i| (i % 251) as u8).collect();
    let stored = ok(&outcache(
        &u,
        &["put-blob", "big", "--inputs", "{}"],
        Some(&data),
    ));
    let r: Value = serde_json::from_str(&stored).unwrap();
    let bare = r["$ref"].as_str().unwrap().to_owned();
    let good = outcache(&u, &["cat", &bare], None);
    assert!(
        good.status.success() && good.stdout == data,
        "a bare ref reads back whole"
    );

    let blob = std::fs::read_dir(dir.path().join("blobs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[4_000_000] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();

    for reference in [stored.as_str(), bare.as_str()] {
        let out = dir.path().join("out.bin");
        let to_file = outcache(&u, &["cat", reference, "-o", out.to_str().unwrap()], None);
        fails(&to_file, 3, "integrity");
        assert!(!out.exists(), "a file with wrong bytes was left");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".outcache-cat-")
            })
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
        let to_stdout = outcache(&u, &["cat", reference], None);
        fails(&to_stdout, 3, "integrity");
        assert!(
            to_stdout.stdout.is_empty(),
            "{} wrong bytes reached stdout",
            to_stdout.stdout.len()
        );
    }
    // Above the bound it streams, and still ends with exit 3.
    let streamed = outcache(&u, &["cat", &stored, "--max-buffer", "1MiB"], None);
    fails(&streamed, 3, "integrity");

    // And `cat -o` of a good blob writes the file whole.
    let good_ref = ok(&outcache(
        &u,
        &["put-blob", "good", "--inputs", "{}"],
        Some(&data),
    ));
    let out = dir.path().join("good.bin");
    ok(&outcache(
        &u,
        &["cat", &good_ref, "-o", out.to_str().unwrap()],
        None,
    ));
    assert!(std::fs::read(&out).unwrap() == data);
}

/// A ref that claims 10 bytes but points at a large blob fails on the stored size before any read.
#[test]
fn reads_are_bounded_by_the_claimed_size() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let stored = ok(&outcache(
        &u,
        &["put-blob", "big", "--inputs", "{}"],
        Some(&vec![3u8; 3 << 20]),
    ));
    let mut r: Value = serde_json::from_str(&stored).unwrap();
    r["size"] = 10.into();
    fails(&outcache(&u, &["cat", &r.to_string()], None), 3, "size:10");
}

/// `get` of a row whose small ref (hydrated inline) points at a 400 MiB blob fails on the stored size
/// without reading it: the child's peak RSS stays far below the blob.
#[cfg(target_os = "linux")]
#[test]
fn a_small_ref_to_a_huge_blob_is_not_read_into_memory() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    ok(&outcache(&u, &["stats"], None));
    let name = "huge_0123456789abcdef_00.bin";
    let file = std::fs::File::create(dir.path().join("blobs").join(name)).unwrap();
    file.set_len(400 << 20).unwrap(); // sparse: costs no disk
    let row = format!(
        r#"{{"image":{{"kind":"task-graph/CacheRef","$ref":"fsfolder://blobs/{name}","size":10}}}}"#
    );
    ok(&outcache(
        &u,
        &["put", "t", "--inputs", "{}", "--output", &row],
        None,
    ));
    let get = outcache(&u, &["get", "t", "--inputs", "{}"], None);
    fails(&get, 3, "size:10");
    // SAFETY: getrusage only writes into the struct it is given.
    let peak_kib = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage.ru_maxrss
    };
    assert!(peak_kib < 200 * 1024, "a child peaked at {peak_kib} KiB");
}

/// `..` in a cache URL is refused on the raw text, however it is spelled; nothing is created.
#[test]
fn dot_dot_in_cache_urls_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    for bad in [
        format!("fs://{d}/a/../b"),
        format!("fs://{d}/a/%2e%2e/b"),
        format!("fs://{d}/a/.%2E/b"),
        format!("sqlite://{d}/a/../b.db"),
    ] {
        fails(&outcache(&bad, &["stats"], None), 2, "'..'");
    }
    assert!(!dir.path().join("b").exists() && !dir.path().join("a").exists());
}

/// `--grace` below a minute is refused without `--force`.
#[test]
fn a_short_grace_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    fails(
        &outcache(&u, &["prune", "--orphans", "--grace", "0s"], None),
        2,
        "--force",
    );
    ok(&outcache(
        &u,
        &["prune", "--orphans", "--grace", "0s", "--force"],
        None,
    ));
    ok(&outcache(
        &u,
        &["prune", "--orphans", "--grace", "1m"],
        None,
    ));
}

/// A row written by a newer format version is reported apart, never removed by `--corrupt`, and stops
/// the orphan sweep (its blobs look unreferenced).
#[test]
fn rows_of_a_newer_format_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    ok(&outcache(
        &u,
        &["put", "t", "--inputs", "{}", "--output", "1"],
        None,
    ));
    let seg = dir.path().join("rows/t");
    let newer = seg.join(format!("{}.json", "a".repeat(64)));
    std::fs::write(&newer, br#"{"v":2,"whatever":"a newer outcache"}"#).unwrap();
    let stats = json(&outcache(&u, &["stats", "--json"], None));
    assert_eq!(
        (
            stats["newer_format_rows"].as_u64(),
            stats["corrupt_rows"].as_u64()
        ),
        (Some(1), Some(0))
    );
    fails(
        &outcache(
            &u,
            &["prune", "--orphans", "--corrupt", "--grace", "1h"],
            None,
        ),
        2,
        "newer outcache",
    );
    ok(&outcache(&u, &["prune", "--corrupt"], None));
    assert!(newer.exists(), "--corrupt removed a newer version's row");
}

/// Refs the TypeScript original wrote (dots in the name) resolve.
#[test]
fn typescript_blob_names_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    ok(&outcache(&u, &["stats"], None));
    std::fs::write(
        dir.path().join("blobs/__run.6a3f.image_0123.out.bin"),
        b"from ts",
    )
    .unwrap();
    let out = outcache(
        &u,
        &["cat", "fsfolder://blobs/__run.6a3f.image_0123.out.bin"],
        None,
    );
    assert_eq!(ok(&out), "from ts");
}

#[cfg(unix)]
mod links_and_fifos {
    //! The link policy: below its root the cache never follows a symlink and never opens anything but a
    //! regular file; what it did not write is reported, never deleted, and never hangs it.

    use super::*;
    use std::os::unix::fs::symlink;

    fn fifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// A directory outside the cache with a file a janitor must never touch.
    fn victim() -> (tempfile::TempDir, std::path::PathBuf) {
        let outside = tempfile::tempdir().unwrap();
        let precious = outside.path().join("precious.bin");
        std::fs::write(&precious, b"not yours").unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(86_400);
        std::fs::File::options()
            .write(true)
            .open(&precious)
            .unwrap()
            .set_modified(old)
            .unwrap();
        (outside, precious)
    }

    #[test]
    fn a_symlinked_tmp_or_blobs_dir_is_never_swept() {
        for dir_name in ["tmp", "blobs"] {
            let dir = tempfile::tempdir().unwrap();
            let u = url(dir.path());
            ok(&outcache(&u, &["stats"], None));
            let (outside, precious) = victim();
            let named = outside.path().join("x_0123456789abcdef_0123.bin");
            std::fs::write(&named, b"also not yours").unwrap();
            let old = std::time::SystemTime::now() - Duration::from_secs(86_400);
            std::fs::File::options()
                .write(true)
                .open(&named)
                .unwrap()
                .set_modified(old)
                .unwrap();
            std::fs::remove_dir(dir.path().join(dir_name)).unwrap();
            symlink(outside.path(), dir.path().join(dir_name)).unwrap();
            let report = outcache(&u, &["prune", "--orphans", "--grace", "1m", "--json"], None);
            assert!(report.status.code().is_some());
            assert!(
                precious.exists() && named.exists(),
                "{dir_name}: a file outside the root was deleted"
            );
            let stats = json(&outcache(&u, &["stats", "--json"], None));
            assert!(
                stats["foreign_entries"].as_u64() >= Some(1),
                "{dir_name}: {stats}"
            );
        }
    }

    #[test]
    fn a_symlinked_row_segment_is_never_written_read_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let u = url(dir.path());
        ok(&outcache(
            &u,
            &["put", "t", "--inputs", "{}", "--output", "1"],
            None,
        ));
        let (outside, _) = victim();
        let garbage = outside.path().join(format!("{}.json", "b".repeat(64)));
        std::fs::write(&garbage, b"{ not a row").unwrap();
        std::fs::remove_dir_all(dir.path().join("rows/t")).unwrap();
        symlink(outside.path(), dir.path().join("rows/t")).unwrap();

        let put = outcache(
            &u,
            &["put", "t", "--inputs", "{\"n\":1}", "--output", "2"],
            None,
        );
        fails(&put, 1, "symbolic link");
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            2,
            "a row was written outside the root"
        );
        let stats = json(&outcache(&u, &["stats", "--json"], None));
        assert_eq!(
            (
                stats["corrupt_rows"].as_u64(),
                stats["foreign_entries"].as_u64()
            ),
            (Some(0), Some(1))
        );
        ok(&outcache(
            &u,
            &["prune", "--corrupt", "--orphans", "--grace", "1m"],
            None,
        ));
        assert!(garbage.exists(), "--corrupt deleted a file behind a link");
    }

    #[test]
    fn touching_rows_never_reaches_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let u = url(dir.path());
        ok(&outcache(
            &u,
            &["put", "t", "--inputs", "{}", "--output", "1"],
            None,
        ));
        let row = common::only_file_in(&dir.path().join("rows/t"));
        let (_outside, precious) = victim();
        // The file outside holds a valid row, so following the link would make a hit and touch it.
        std::fs::copy(&row, &precious).unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(86_400);
        std::fs::File::options()
            .write(true)
            .open(&precious)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let before = std::fs::metadata(&precious).unwrap().modified().unwrap();
        let content = std::fs::read(&precious).unwrap();
        std::fs::remove_file(&row).unwrap();
        symlink(&precious, &row).unwrap();
        let _ = outcache(&u, &["get", "t", "--inputs", "{}"], None);
        assert_eq!(
            std::fs::metadata(&precious).unwrap().modified().unwrap(),
            before
        );
        assert_eq!(std::fs::read(&precious).unwrap(), content);
    }

    /// A FIFO named like a row or a blob: stats, prune (dry run or not), get and cat finish (no hang), and
    /// the FIFO stays.
    #[test]
    fn fifos_never_hang_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let u = url(dir.path());
        ok(&outcache(
            &u,
            &["put", "t", "--inputs", "{}", "--output", "1"],
            None,
        ));
        let row = common::only_file_in(&dir.path().join("rows/t"));
        std::fs::remove_file(&row).unwrap();
        fifo(&row);
        let blob = dir.path().join("blobs/x_0123456789abcdef_00.bin");
        fifo(&blob);
        let run = |args: &[&str]| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (u, owned): (String, Vec<String>) =
                (u.clone(), args.iter().map(|a| a.to_string()).collect());
            std::thread::spawn(move || {
                let owned: Vec<&str> = owned.iter().map(String::as_str).collect();
                let _ = tx.send(outcache(&u, &owned, None));
            });
            rx.recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("{args:?} hung on a FIFO"))
        };
        let stats = json(&run(&["stats", "--json"]));
        assert_eq!(stats["foreign_entries"].as_u64(), Some(2), "{stats}");
        ok(&run(&[
            "prune",
            "--orphans",
            "--corrupt",
            "--grace",
            "1m",
            "--dry-run",
        ]));
        ok(&run(&[
            "prune",
            "--orphans",
            "--corrupt",
            "--grace",
            "0s",
            "--force",
        ]));
        let get = run(&["get", "t", "--inputs", "{}"]);
        assert_ne!(get.status.code(), Some(0), "a FIFO was served as a row");
        let cat = run(&["cat", "fsfolder://blobs/x_0123456789abcdef_00.bin"]);
        assert_eq!(
            cat.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&cat.stderr)
        );
        let meta = |p: &Path| std::fs::symlink_metadata(p).unwrap().file_type();
        use std::os::unix::fs::FileTypeExt;
        assert!(
            meta(&row).is_fifo() && meta(&blob).is_fifo(),
            "a FIFO was removed"
        );
    }

    /// The root itself may be a link: that is the operator's choice.
    #[test]
    fn a_symlinked_root_works() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        symlink(&real, &link).unwrap();
        let u = url(&link);
        ok(&outcache(
            &u,
            &["put", "t", "--inputs", "{}", "--output", "1"],
            None,
        ));
        assert_eq!(
            ok(&outcache(&u, &["get", "t", "--inputs", "{}"], None)),
            "1"
        );
        assert!(real.join("rows").is_dir());
    }
}

/// Opening an existing cache writes nothing, so a read-only cache can be read; a write to it fails with
/// one line naming the path. Where this machine lets the test mount a read-only tmpfs (root in a VM), the
/// cache really is read-only; the no-write check runs everywhere.
#[test]
fn a_read_only_cache_can_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let stored = ok(&outcache(
        &u,
        &["put-blob", "b", "--inputs", "{}"],
        Some(&vec![5u8; 100_000]),
    ));
    ok(&outcache(
        &u,
        &["put", "t", "--inputs", "{}", "--output", "1"],
        None,
    ));
    let snapshot = |root: &Path| {
        let mut entries = Vec::new();
        for sub in ["", "rows", "rows/t", "blobs", "tmp"] {
            let d = root.join(sub);
            let meta = std::fs::metadata(&d).unwrap();
            entries.push((
                sub.to_owned(),
                meta.modified().unwrap(),
                std::fs::read_dir(&d).unwrap().count(),
            ));
        }
        entries
    };
    let before = snapshot(dir.path());
    std::thread::sleep(Duration::from_millis(20));
    let reads = |u: &str| {
        assert_eq!(ok(&outcache(u, &["get", "t", "--inputs", "{}"], None)), "1");
        ok(&outcache(u, &["cat", &stored], None));
        ok(&outcache(u, &["stats"], None));
        ok(&outcache(
            u,
            &["prune", "--orphans", "--older-than", "1d", "--dry-run"],
            None,
        ));
    };
    reads(&u);
    assert_eq!(
        snapshot(dir.path()),
        before,
        "reading the cache wrote into it"
    );

    // A real read-only mount, where the machine allows one.
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("note: cannot mount a tmpfs here; the no-write check above stands for read-only");
        return;
    }
    let copy = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", dir.path().display()))
        .arg(mnt.path())
        .status()
        .unwrap();
    let remount = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(mnt.path())
        .status()
        .unwrap();
    let ro = url(mnt.path());
    let result = std::panic::catch_unwind(|| {
        assert!(copy.success() && remount.success());
        reads(&ro);
        let write = outcache(&ro, &["put", "t2", "--inputs", "{}", "--output", "1"], None);
        fails(&write, 1, &mnt.path().display().to_string());
    });
    let _ = std::process::Command::new("umount")
        .arg(mnt.path())
        .status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
