//! The CLI as operators run it from cron, CI scripts and pipes: a closed pipe ends a command quietly, a
//! full disk is a one-line error (exit 1), and data on disk never makes it panic.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};

use common::outcache;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outcache"));
    c.env_remove("OUTCACHE_URL").env_remove("OUTCACHE_CONFIG");
    c
}

/// A cache with a row whose output is 1 MB (more than a pipe holds), and its URL.
fn big_row() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let u = format!("fs://{}", dir.path().display());
    let output = serde_json::to_string(&"x".repeat(1 << 20)).unwrap();
    let file = dir.path().join("out.json");
    std::fs::write(&file, &output).unwrap();
    let args = [
        "put",
        "t",
        "--inputs",
        "{}",
        "--output-file",
        file.to_str().unwrap(),
    ];
    let put = outcache(&u, &args, None);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    (dir, u)
}

/// Every command that prints, with its stdout a pipe whose reader is already gone (`| head -c0`): the
/// first write fails with EPIPE, and the command ends quietly with exit 0, nothing on stderr.
#[cfg(target_os = "linux")]
#[test]
fn a_closed_pipe_ends_commands_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (_dir, u) = big_row();
    for args in [
        vec!["get", "t", "--inputs", "{}"],
        vec!["stats"],
        vec!["stats", "--json"],
        vec!["config"],
        vec!["prune", "--older-than", "30d"],
    ] {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two descriptors, which we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the two descriptors pipe(2) just opened, owned by nothing else.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(reader);
        let out = bin()
            .arg("--url")
            .arg(&u)
            .args(&args)
            .stdout(Stdio::from(writer))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} printed on a closed pipe: {err}");
    }
}

/// A reader that stops after one byte of a large output (`| head -c1`).
#[test]
fn a_reader_that_stops_early_ends_get_quietly() {
    let (_dir, u) = big_row();
    let mut child = bin()
        .arg("--url")
        .arg(&u)
        .args(["get", "t", "--inputs", "{}"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut one = [0u8; 1];
    assert_eq!(stdout.read(&mut one).unwrap(), 1);
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!((out.status.code(), err.as_ref()), (Some(0), ""));
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_a_one_line_error() {
    let (_dir, u) = big_row();
    for args in [
        vec!["get", "t", "--inputs", "{}"],
        vec!["stats"],
        vec!["config"],
    ] {
        let full = std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = bin()
            .arg("--url")
            .arg(&u)
            .args(&args)
            .stdout(full)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains("No space left"), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

/// A row committed after the year 9999 (data on disk, or a clock gone wrong) does not crash `stats`.
#[test]
fn stats_survives_commit_times_beyond_the_year_9999() {
    let dir = tempfile::tempdir().unwrap();
    let u = format!("fs://{}", dir.path().display());
    assert!(
        outcache(&u, &["put", "t", "--inputs", "{}", "--output", "1"], None)
            .status
            .success()
    );
    let row = common::only_file_in(&dir.path().join("rows/t"));
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&row).unwrap()).unwrap();
    record["created_at_ms"] = 400_000_000_000_000u64.into();
    std::fs::write(&row, record.to_string()).unwrap();
    let out = outcache(&u, &["stats"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("beyond the year 9999"));
}

/// Every usage error is one line on stderr, exit 2; what people type (`1.5GiB`) is accepted.
#[test]
fn usage_errors_are_one_line_exit_2() {
    for args in [
        vec!["prune", "--older-than", "-5d"],
        vec!["prune", "--orphans", "--grace", "abc"],
        vec!["prune", "--max-size", "1.5XB"],
        vec!["put", "t"],
        vec!["frobnicate"],
        vec!["stats", "--bogus"],
    ] {
        let out = bin()
            .arg("--url")
            .arg("memory://")
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err:?}");
        assert!(
            err.starts_with("outcache: error: ") && err.contains("(see --help)"),
            "{err}"
        );
    }
    let ok = bin()
        .args([
            "--url",
            "memory://",
            "prune",
            "--max-size",
            "1.5GiB",
            "--dry-run",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(outcache::config::parse_size("1.5GiB"), Ok(1_610_612_736));
    assert_eq!(outcache::config::parse_size("0.5 KB"), Ok(500));
    assert!(outcache::config::parse_size("1.2.3GiB").is_err());
    let help = bin().arg("--help").output().unwrap();
    assert!(help.status.success() && !help.stdout.is_empty());
}

/// `--config` naming a missing file, a directory, a file that is not UTF-8, or one past 1 MiB (a plain
/// file, or a FIFO that keeps on writing, such as a path that never ends) is bad input: exit 2.
#[test]
fn unreadable_config_files_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("binary.toml");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let missing = dir.path().join("missing.toml");
    // Valid TOML all the way (comments), so only the bound refuses them.
    let comments = "# a comment line\n".repeat(150_000);
    let big = dir.path().join("big.toml");
    std::fs::write(&big, &comments).unwrap();
    let stats_with_config = |path: &std::path::Path| {
        let out = bin().arg("--config").arg(path).arg("stats").output();
        out.unwrap()
    };
    for path in [&big, &dir.path().join("endless.toml")] {
        let out = if path == &big {
            stats_with_config(path)
        } else {
            let made = Command::new("mkfifo").arg(path).status().unwrap();
            assert!(made.success());
            let (fifo, text) = (path.clone(), comments.clone());
            let writer = std::thread::spawn(move || {
                use std::io::Write as _;
                let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
                // The reader stops at its bound and closes: a broken pipe here is the point.
                let _ = w.write_all(text.as_bytes());
            });
            let out = stats_with_config(path);
            writer.join().unwrap();
            out
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", path.display());
        assert!(err.contains("larger than 1048576 bytes"), "{err}");
    }
    for path in [missing.as_path(), dir.path(), binary.as_path()] {
        let out = stats_with_config(path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", path.display());
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    }
}

/// SIGTERM or SIGINT in the middle of `conformance` or `bench`: the command removes its scratch directory
/// and exits 128 + the signal's number.
#[cfg(unix)]
#[test]
fn an_interrupted_conformance_or_bench_leaves_nothing_behind() {
    for (args, signal, code) in [
        (vec!["conformance"], libc::SIGTERM, 143),
        (
            vec!["bench", "--size", "256MiB", "--rows", "100000"],
            libc::SIGINT,
            130,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let u = format!("fs://{}", dir.path().display());
        let child = bin()
            .arg("--url")
            .arg(&u)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the run's scratch directory exists, then interrupt it.
        let scratch = || -> Vec<String> {
            std::fs::read_dir(dir.path().join("tmp"))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        for _ in 0..200 {
            if !scratch().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        assert!(
            !scratch().is_empty(),
            "{args:?} never made its scratch directory"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        // SAFETY: kill(2) on the child we spawned.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains("interrupted"), "{args:?}: {err}");
        assert!(scratch().is_empty(), "{args:?} left {:?}", scratch());
    }
}

/// A scratch directory a SIGKILLed `conformance` or `bench` left is counted by `stats` as a temp and
/// removed by `prune --orphans` once past its grace (fs in its `tmp/`, SQLite beside the database).
#[test]
fn stale_scratch_directories_are_counted_and_pruned() {
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    let age = |path: &std::path::Path| {
        for entry in walk(path) {
            let f = std::fs::File::open(&entry).unwrap();
            f.set_modified(old).unwrap();
        }
    };
    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = vec![dir.to_path_buf()];
        for e in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
    let dir = tempfile::tempdir().unwrap();
    let name = format!("outcache-bench-{}", "ab".repeat(16));
    for (u, parent) in [
        (
            format!("fs://{}/fs", dir.path().display()),
            dir.path().join("fs/tmp"),
        ),
        (
            format!("sqlite://{}/db/c.db", dir.path().display()),
            dir.path().join("db"),
        ),
    ] {
        assert!(outcache(&u, &["stats"], None).status.success());
        let scratch = parent.join(&name).join("bench");
        std::fs::create_dir_all(&scratch).unwrap();
        std::fs::write(scratch.join("junk"), vec![0u8; 5000]).unwrap();
        age(&parent.join(&name));
        let stats: serde_json::Value =
            serde_json::from_slice(&outcache(&u, &["stats", "--json"], None).stdout).unwrap();
        assert_eq!(
            (stats["temps"].as_u64(), stats["temp_bytes"].as_u64()),
            (Some(1), Some(5000)),
            "{u}"
        );
        let prune = outcache(&u, &["prune", "--orphans", "--grace", "1h"], None);
        assert!(
            prune.status.success(),
            "{}",
            String::from_utf8_lossy(&prune.stderr)
        );
        assert!(
            !parent.join(&name).exists(),
            "{u}: the stale scratch directory survived"
        );
    }
}

/// Long transfers show bytes, rate and ETA on a terminal's stderr (here a pseudo-terminal from
/// util-linux `script`); nothing with `--quiet`, and nothing when stderr is not a terminal.
#[cfg(target_os = "linux")]
#[test]
fn long_transfers_show_progress_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let u = format!("fs://{}/c", dir.path().display());
    let file = dir.path().join("big.bin");
    std::fs::write(&file, vec![1u8; 200 << 20]).unwrap();
    let exe = env!("CARGO_BIN_EXE_outcache");
    let on_tty = |args: &str| {
        let out = Command::new("script")
            .args(["-qec", &format!("{exe} --url {u} {args}"), "/dev/null"])
            .output()
            .expect("util-linux `script` runs the command on a pseudo-terminal");
        String::from_utf8_lossy(&out.stdout).replace('\r', "\n")
    };
    let put = on_tty(&format!("put-blob t --inputs '{{}}' {}", file.display()));
    assert!(put.contains("eta"), "no progress on a terminal: {put}");
    let quiet = on_tty(&format!(
        "put-blob t --inputs '{{}}' {} --quiet",
        file.display()
    ));
    assert!(!quiet.contains("eta"), "progress despite --quiet: {quiet}");
    let stored = quiet
        .lines()
        .rev()
        .find(|l| l.contains("CacheRef"))
        .unwrap()
        .trim()
        .to_owned();
    let cat = on_tty(&format!(
        "cat '{stored}' -o {}/copy.bin",
        dir.path().display()
    ));
    assert!(
        cat.contains("eta"),
        "no progress for cat on a terminal: {cat}"
    );
    let piped = outcache(
        &u,
        &["put-blob", "t", "--inputs", "{}", file.to_str().unwrap()],
        None,
    );
    assert!(
        piped.status.success() && piped.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
}
