//! `put-blob` streams: a 1 GiB upload (into fs and into SQLite) from stdin holds peak RSS under 64 MiB, and `cat` gives the same
//! bytes back with flat memory too. Its own test binary, because it reads the peak RSS of waited-for
//! children (`getrusage(RUSAGE_CHILDREN)`), which other tests' children would muddle.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

const GIB: usize = 1 << 30;
const LIMIT_KIB: i64 = 64 * 1024;

fn children_peak_rss_kib() -> i64 {
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    usage.ru_maxrss // KiB on Linux
}

fn chunk(i: usize) -> Vec<u8> {
    (0..1 << 20)
        .map(|j| ((i * 7 + j * 13) % 251) as u8)
        .collect()
}

#[test]
fn a_1_gib_put_blob_into_fs_and_its_cat_keep_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    one_gib_round_trip(&format!("fs://{}", dir.path().display()));
}

#[cfg(feature = "sqlite")]
#[test]
fn a_1_gib_put_blob_into_sqlite_and_its_cat_keep_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    one_gib_round_trip(&format!("sqlite://{}/big.db", dir.path().display()));
}

#[cfg(feature = "s3")]
#[test]
fn a_1_gib_put_blob_into_s3_and_its_cat_keep_memory_flat() {
    let Some(url) = common::server_env("OUTCACHE_S3_URL") else {
        return;
    };
    one_gib_round_trip(&common::s3_child(
        &url,
        &format!("rss-{}", std::process::id()),
    ));
}

/// Peak RSS is the maximum over every child waited for so far, so the checks stay valid whichever test
/// runs first.
fn one_gib_round_trip(url: &str) {
    let url = url.to_owned();
    let bin = env!("CARGO_BIN_EXE_outcache");

    let mut child = Command::new(bin)
        .args([
            "--url",
            &url,
            "put-blob",
            "big/upload",
            "--inputs",
            r#"{"size":"1GiB"}"#,
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut expected = Sha256::new();
    let chunks: Vec<Vec<u8>> = (0..4).map(chunk).collect();
    for i in 0..GIB >> 20 {
        let c = &chunks[i % 4];
        expected.update(c);
        stdin.write_all(c).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let put_peak = children_peak_rss_kib();
    assert!(
        put_peak < LIMIT_KIB,
        "put-blob of 1 GiB peaked at {} MiB RSS",
        put_peak / 1024
    );

    let stored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = outcache::wire::hex(&expected.finalize());
    assert_eq!(stored["size"], GIB as u64);
    assert_eq!(stored["sha256"], expected.as_str());

    let mut cat = Command::new(bin)
        .args(["--url", &url, "cat", &stored.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = cat.stdout.take().unwrap();
    let (mut got, mut total, mut buf) = (Sha256::new(), 0usize, vec![0u8; 1 << 20]);
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
        got.update(&buf[..n]);
    }
    assert!(cat.wait().unwrap().success());
    assert_eq!(total, GIB);
    assert_eq!(outcache::wire::hex(&got.finalize()), expected);
    let cat_peak = children_peak_rss_kib();
    assert!(
        cat_peak < LIMIT_KIB,
        "cat of 1 GiB peaked at {} MiB RSS",
        cat_peak / 1024
    );
    eprintln!(
        "peak RSS: put-blob {} MiB, cat {} MiB",
        put_peak / 1024,
        cat_peak / 1024
    );
}
