//! The `outcache` binary's contract, run as a user would: stdout, stderr and exit codes.
//! 0 success, 1 miss / unresolved, 2 bad input, 3 integrity failure.

mod common;

use std::path::Path;
use std::process::Output;

use common::outcache;

fn url(dir: &Path) -> String {
    format!("fs://{}", dir.display())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed run: the expected exit code, one line on stderr, no panic.
fn assert_fails(o: &Output, code: i32, mentions: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(
        err.contains(mentions),
        "stderr {err:?} should mention {mentions:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
    if code != 2 || !err.contains("Usage") {
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "one line expected: {err:?}"
        );
    }
}

#[test]
fn put_then_get_hits_whatever_the_nested_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let put = outcache(
        &u,
        &[
            "put",
            "llm/summarize",
            "--inputs",
            r#"{"doc":{"id":7,"lang":"en"},"model":"m1"}"#,
            "--output",
            r#"{"summary":"short"}"#,
        ],
        None,
    );
    assert!(put.status.success(), "{}", stderr(&put));
    let get = outcache(
        &u,
        &[
            "get",
            "llm/summarize",
            "--inputs",
            r#"{"model":"m1","doc":{"lang":"en","id":7.0}}"#,
        ],
        None,
    );
    assert!(get.status.success(), "{}", stderr(&get));
    assert_eq!(stdout(&get), r#"{"summary":"short"}"#);
}

#[test]
fn a_miss_prints_nothing_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let o = outcache(&url(dir.path()), &["get", "t", "--inputs", "{}"], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "");
}

#[test]
fn put_reads_the_output_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let file = dir.path().join("out.json");
    std::fs::write(&file, r#"{"from":"file"}"#).unwrap();
    let put = outcache(
        &u,
        &[
            "put",
            "t",
            "--inputs",
            "[1]",
            "--output-file",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert!(put.status.success(), "{}", stderr(&put));
    assert_eq!(
        stdout(&outcache(&u, &["get", "t", "--inputs", "[1.0]"], None)),
        r#"{"from":"file"}"#
    );
}

#[test]
fn put_blob_below_the_threshold_is_an_inline_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let o = outcache(
        &url(dir.path()),
        &[
            "put-blob",
            "t",
            "--inputs",
            "{}",
            "--mime",
            "text/plain",
            "-",
        ],
        Some(b"small bytes"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["__binaryPortWire"], 1);
    assert_eq!(v["base64"], "c21hbGwgYnl0ZXM=");
    assert_eq!(v["mime"], "text/plain");
}

#[test]
fn put_blob_then_cat_returns_identical_bytes_by_json_or_ref_string() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let file = dir.path().join("input.bin");
    std::fs::write(&file, &data).unwrap();
    let o = outcache(
        &u,
        &[
            "put-blob",
            "render",
            "--inputs",
            r#"{"f":1}"#,
            "--mime",
            "image/png",
            "--port",
            "image",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let stored = stdout(&o);
    let v: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(v["kind"], "task-graph/CacheRef");
    assert_eq!(v["size"], 3_000_000);
    assert_eq!(v["mime"], "image/png");
    assert_eq!(v["port"], "image");
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);

    let by_json = outcache(&u, &["cat", &stored], None);
    assert!(by_json.status.success(), "{}", stderr(&by_json));
    assert!(by_json.stdout == data, "cat by JSON returned other bytes");
    let by_string = outcache(&u, &["cat", v["$ref"].as_str().unwrap()], None);
    assert!(
        by_string.stdout == data,
        "cat by ref string returned other bytes"
    );

    let got = outcache(&u, &["get", "render", "--inputs", r#"{"f":1}"#], None);
    assert_eq!(stdout(&got), stored, "get returns the stored ref");
}

/// `cat -o` renames a verified temp file over FILE, which must never replace what is not a regular file:
/// renamed over `/dev/null`, it left the machine's `/dev/null` a regular file that collected every write
/// (and then fed them to anything reading it, `cargo`'s compiler probe among them). A device or FIFO is
/// written in place; a link keeps pointing where it did; a file keeps its mode; a new file gets the umask.
#[test]
fn cat_to_a_device_fifo_or_link_writes_through_and_keeps_the_node() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};

    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let put = outcache(&u, &["put-blob", "t", "--inputs", "{}"], Some(&data));
    assert!(put.status.success(), "{}", stderr(&put));
    let stored = stdout(&put);
    let c_path = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
    // `cat -o path`, with the blob held and verified first (64MiB) or streamed (64KiB).
    let cat_into = |path: &Path, max_buffer: &str| {
        let path = path.to_str().unwrap();
        outcache(
            &u,
            &["cat", &stored, "-o", path, "--max-buffer", max_buffer],
            None,
        )
    };
    let cat_to = |path: &Path, max_buffer: &str| {
        let o = cat_into(path, max_buffer);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    // A character device node (major, minor) in the temp dir, so a regression cannot break the host's.
    let device = |name: &str, major, minor| {
        let path = dir.path().join(name);
        // SAFETY: a valid NUL-terminated path; mknod only creates a node in our temp dir.
        let made = unsafe {
            libc::mknod(
                c_path(&path).as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        (made == 0).then_some(path)
    };

    // A character device like /dev/null (1,3).
    if let Some(null) = device("null", 1, 3) {
        for max_buffer in ["64MiB", "64KiB"] {
            cat_to(&null, max_buffer);
            let meta = std::fs::symlink_metadata(&null).unwrap();
            assert!(
                meta.file_type().is_char_device(),
                "cat -o replaced a device node with {meta:?}"
            );
        }
        // A device that refuses the bytes (/dev/full, 1,7) fails the command, held or streamed: a
        // write that is only finished in the background must not lose its error.
        let full = device("full", 1, 7).expect("a second device node");
        for max_buffer in ["64MiB", "64KiB"] {
            assert_fails(&cat_into(&full, max_buffer), 1, "No space left on device");
        }
    } else {
        let e = std::io::Error::last_os_error();
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root and makes device nodes: {e}"
        );
        eprintln!("mknod refused ({e}): the device case rests on the FIFO below");
    }

    // A FIFO: the reader gets every byte, verified (held, then streamed), and the FIFO stays one.
    let fifo = dir.path().join("fifo");
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a FIFO in our temp dir.
    let made = unsafe { libc::mkfifo(c_path(&fifo).as_ptr(), 0o600) };
    assert_eq!(made, 0, "mkfifo: {}", std::io::Error::last_os_error());
    for max_buffer in ["64MiB", "64KiB"] {
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        cat_to(&fifo, max_buffer);
        assert!(
            reader.join().unwrap() == data,
            "the FIFO's reader got other bytes"
        );
        let meta = std::fs::symlink_metadata(&fifo).unwrap();
        assert!(
            meta.file_type().is_fifo(),
            "cat -o replaced a FIFO with {meta:?}"
        );
    }

    // A link to a file: the target gets the bytes and keeps its mode, the link stays a link.
    let target = dir.path().join("target.bin");
    std::fs::write(&target, b"old").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    let link = dir.path().join("link.bin");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    cat_to(&link, "64MiB");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link was replaced"
    );
    assert!(
        std::fs::read(&target).unwrap() == data,
        "the link's target did not get the bytes"
    );
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "replacing a file changed its mode");
    // A link to nothing yet (relative, as most are): the file it names is created, the link kept.
    let dangling = dir.path().join("dangling.bin");
    std::os::unix::fs::symlink("made-through-link.bin", &dangling).unwrap();
    cat_to(&dangling, "64MiB");
    assert!(
        std::fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(std::fs::read(dir.path().join("made-through-link.bin")).unwrap() == data);

    // A new file gets 0666 less the umask (the test binary's umask, which the child inherits).
    // Read from /proc rather than set and reset, which would race the other tests' file creation.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
        .unwrap();
    let fresh = dir.path().join("fresh.bin");
    cat_to(&fresh, "64MiB");
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666 & !umask, "a new file's mode ignores the umask");

    // A directory is refused by name, and nothing lands inside it.
    let o = outcache(
        &u,
        &["cat", &stored, "-o", dir.path().to_str().unwrap()],
        None,
    );
    assert_fails(&o, 2, "is a directory");
    let temps = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with(".outcache-cat-")
        })
        .count();
    assert_eq!(temps, 0, "a refused -o left a temp file");
}

#[test]
fn put_blob_of_a_directory_or_a_missing_file_names_it_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let u = url(&cache);
    let input = dir.path().join("not-a-file");
    std::fs::create_dir(&input).unwrap();
    let o = outcache(
        &u,
        &["put-blob", "t", "--inputs", "{}", input.to_str().unwrap()],
        None,
    );
    assert_fails(&o, 1, "not-a-file: is a directory");
    let missing = dir.path().join("missing.bin");
    let o = outcache(
        &u,
        &["put-blob", "t", "--inputs", "{}", missing.to_str().unwrap()],
        None,
    );
    assert_fails(&o, 1, "missing.bin");
    let got = outcache(&u, &["get", "t", "--inputs", "{}"], None);
    assert_eq!(got.status.code(), Some(1), "a row was stored");
    let temps = std::fs::read_dir(cache.join("tmp")).map_or(0, |d| d.count());
    assert_eq!(temps, 0, "a temp file was left");
}

#[test]
fn cat_of_a_damaged_blob_fails_with_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let o = outcache(
        &u,
        &["put-blob", "t", "--inputs", "{}"],
        Some(&vec![5u8; 200_000]),
    );
    let stored = stdout(&o);
    let v: serde_json::Value = serde_json::from_str(&stored).unwrap();
    let name = v["$ref"]
        .as_str()
        .unwrap()
        .strip_prefix("fsfolder://blobs/")
        .unwrap();
    std::fs::write(dir.path().join("blobs").join(name), vec![6u8; 200_000]).unwrap();
    let cat = outcache(&u, &["cat", &stored], None);
    assert_fails(&cat, 3, "integrity check failed");
}

#[test]
fn cat_of_an_unknown_ref_exits_1_and_a_forged_one_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let unknown = outcache(&u, &["cat", "fsfolder://blobs/never_written.bin"], None);
    assert_fails(&unknown, 1, "does not resolve");
    for forged in [
        "fsfolder://blobs/../../etc/passwd",
        "/etc/passwd",
        r##"{"$ref":"#/x"}"##,
        "fsfolder://blobs/a\\..\\b",
    ] {
        let o = outcache(&u, &["cat", forged], None);
        assert_fails(&o, 2, "invalid cache ref");
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn bad_input_is_a_one_line_error_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    assert_fails(
        &outcache(&u, &["get", "t", "--inputs", "{not json"], None),
        2,
        "--inputs JSON",
    );
    assert_fails(
        &outcache(&u, &["put", "t", "--inputs", "{}", "--output", "[1,"], None),
        2,
        "--output JSON",
    );
    assert_fails(
        &outcache(&u, &["get", "", "--inputs", "{}"], None),
        2,
        "task type",
    );
    assert_fails(
        &outcache("ftp://host/x", &["get", "t", "--inputs", "{}"], None),
        2,
        "unknown scheme",
    );
    assert_fails(
        &outcache("fs://relative/dir", &["get", "t", "--inputs", "{}"], None),
        2,
        "absolute path",
    );
    assert_fails(
        &outcache(
            "fs:///tmp/x?fast=yes",
            &["get", "t", "--inputs", "{}"],
            None,
        ),
        2,
        "unknown option",
    );
    let put_output_file = |path: &Path| {
        let args = ["put", "t", "--inputs", "{}", "--output-file"];
        let mut args = args.to_vec();
        args.push(path.to_str().unwrap());
        outcache(&u, &args, None)
    };
    assert_fails(
        &put_output_file(&dir.path().join("missing.json")),
        1,
        "missing.json",
    );
    // Past the largest row no backend stores the output: refused, not read into memory whole (the
    // same bound holds a path that never ends, such as /dev/zero).
    let huge = dir.path().join("huge.json");
    let file = std::fs::File::create(&huge).unwrap();
    file.set_len(outcache::layout::MAX_ROW_BYTES + 1).unwrap();
    assert_fails(&put_output_file(&huge), 2, "larger than the largest row");
    let usage = outcache(&u, &["put", "t", "--inputs", "{}"], None);
    assert_eq!(usage.status.code(), Some(2), "clap usage errors exit 2");
}

#[test]
fn an_unwritable_cache_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let o = outcache(
        &format!("fs://{}/cache", file.display()),
        &["put", "t", "--inputs", "{}", "--output", "1"],
        None,
    );
    assert_fails(&o, 1, "plain-file");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"x",
        "the file in the way was not touched"
    );
}

#[test]
fn conformance_runs_in_an_isolated_child_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let put = outcache(
        &u,
        &[
            "put",
            "existing",
            "--inputs",
            "{}",
            "--output",
            "\"keep me\"",
        ],
        None,
    );
    assert!(put.status.success());
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let o = outcache(&u, &["conformance"], None);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    let last = out.lines().last().unwrap();
    let passed: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert!(
        passed >= 25 && last.ends_with(" passed, 0 failed, 0 skipped"),
        "{last}"
    );
    assert_eq!(out.lines().filter(|l| l.starts_with("ok ")).count(), passed);
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "conformance left entries behind");
    assert_eq!(
        stdout(&outcache(&u, &["get", "existing", "--inputs", "{}"], None)),
        "\"keep me\""
    );
}

#[test]
fn conformance_on_memory_passes() {
    let o = outcache("memory://", &["conformance"], None);
    assert!(o.status.success(), "{}", stdout(&o));
    // A process's own map holds nobody else's entries: the neighbours case has nothing to plant in.
    assert!(
        stdout(&o).ends_with(" passed, 0 failed, 1 skipped"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("skip") && l.contains("janitor_leaves_what_it_did_not_write")),
        "{}",
        stdout(&o)
    );
}

#[test]
fn run_ids_isolate_rows_and_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    let with_run = |run: &str, args: &[&str], stdin: Option<&[u8]>| {
        let mut all = vec!["--run-id", run];
        all.extend_from_slice(args);
        outcache(&u, &all, stdin)
    };
    let put = with_run(
        "r1",
        &["put", "t", "--inputs", "{}", "--output", "\"r1 row\""],
        None,
    );
    assert!(put.status.success(), "{}", stderr(&put));
    let blob = with_run(
        "r1",
        &["put-blob", "b", "--inputs", "{}", "-"],
        Some(&[3u8; 100_000]),
    );
    assert!(blob.status.success(), "{}", stderr(&blob));
    let stored = stdout(&blob);

    assert_eq!(
        stdout(&with_run("r1", &["get", "t", "--inputs", "{}"], None)),
        "\"r1 row\""
    );
    assert_eq!(
        with_run("r1", &["cat", &stored], None).stdout.len(),
        100_000
    );

    let miss = with_run("r2", &["get", "t", "--inputs", "{}"], None);
    assert_eq!((miss.status.code(), stdout(&miss).as_str()), (Some(1), ""));
    assert_fails(
        &with_run("r2", &["cat", &stored], None),
        1,
        "does not resolve",
    );
    let shared = outcache(&u, &["get", "t", "--inputs", "{}"], None);
    assert_eq!(
        shared.status.code(),
        Some(1),
        "the shared tier sees a run's row"
    );
    assert_fails(
        &with_run("", &["get", "t", "--inputs", "{}"], None),
        2,
        "run id",
    );
}

#[test]
fn bench_measures_in_an_isolated_child_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    for url in [u.as_str(), "memory://"] {
        let o = outcache(
            url,
            &[
                "bench", "--size", "2MiB", "--rows", "20", "--runs", "1", "--json",
            ],
            None,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        for key in [
            "row_put_per_s",
            "row_get_per_s",
            "hits_per_s",
            "row_put_concurrent_per_s",
            "blob_write_mb_s",
            "blob_read_verified_mb_s",
            "blob_read_mb_s",
        ] {
            assert!(
                report[key].as_f64().is_some_and(|v| v > 0.0),
                "{url}: {key} in {report}"
            );
        }
        assert_eq!(report["blob_bytes"], 2 << 20);
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "bench left entries behind"
    );
}

/// Exit codes are the contract scripts branch on: they hold when stderr is a pipe nobody reads any
/// more (`outcache … 2>&1 | head -0`), where a message that cannot be written must not turn them
/// into a panic's 101.
#[cfg(unix)]
#[test]
fn exit_codes_hold_when_stderr_is_a_closed_pipe() {
    use std::os::fd::FromRawFd;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let u = url(dir.path());
    for (args, code) in [
        (
            &["put", "t", "--inputs", "not json", "--output", "1"][..],
            2,
        ),
        (&["get", "t", "--inputs", "{}"], 1),
        (&["--no-such-flag"], 2),
    ] {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) writes two descriptors into the two-element array it is given.
        let made = unsafe { libc::pipe(fds.as_mut_ptr()) };
        assert_eq!(made, 0);
        // SAFETY: both descriptors were just made by pipe(2) and are owned here alone.
        let (read_end, write_end) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        drop(read_end);
        let status = Command::new(env!("CARGO_BIN_EXE_outcache"))
            .arg("--url")
            .arg(&u)
            .args(args)
            .env_remove("OUTCACHE_URL")
            .env_remove("OUTCACHE_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::from(write_end))
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(code), "{args:?}");
    }
}
