//! S3 failure modes, against real servers: a dead endpoint fails fast with a clear error, and a server
//! killed in the middle of a 200 MiB `put-blob` makes the command fail within its timeouts and leaves no
//! object and no row (checked after restarting s3s-fs, whose state survives on disk).

#![cfg(feature = "s3")]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outcache::config::Location;
use outcache::{BlobState, RowKey};
use serde_json::json;

use common::free_port;

/// A running s3s-fs, killed (SIGKILL) and reaped when dropped, even if the test panics.
struct Server(Child);

impl Server {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn start_s3s(bin: &str, root: &Path, port: u16) -> Server {
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--access-key",
            "outcache-test",
            "--secret-key",
            "outcache-test",
        ])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start s3s-fs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server(child)
}

const FAST_FAIL: &str = "timeout=5s&connect_timeout=2s&max_retries=2&retry_timeout=5s";

#[tokio::test]
async fn a_dead_endpoint_fails_quickly_with_a_clear_error() {
    let port = free_port(); // nothing listens here
    let url = format!("s3://bucket/x?endpoint=http://127.0.0.1:{port}&allow_http=true&{FAST_FAIL}");
    // SAFETY: this test binary sets the same dummy credentials in every test that sets any, so a
    // concurrent reader of the environment sees the same values either way.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "outcache-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "outcache-test");
    }
    let cache = outcache::backends::open(&Location::parse(&url).unwrap()).unwrap();
    let started = Instant::now();
    let err = cache
        .get_row(&RowKey::new("t", &json!({})).unwrap())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let msg = err.to_string();
    eprintln!("dead endpoint after {took:?}: {msg}");
    assert!(
        msg.contains("s3://bucket/x") && msg.contains("read"),
        "{msg}"
    );
    assert!(
        !msg.contains("outcache-test"),
        "credentials leaked into the error: {msg}"
    );
}

#[tokio::test]
async fn a_server_killed_mid_upload_fails_the_put_and_leaves_nothing() {
    let Some(bin) = common::server_env("OUTCACHE_S3S_FS") else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bucket")).unwrap();
    let port = free_port();
    let mut server = start_s3s(&bin, root.path(), port);
    let url =
        format!("s3://bucket/kill?endpoint=http://127.0.0.1:{port}&allow_http=true&{FAST_FAIL}");

    let mut put = Command::new(env!("CARGO_BIN_EXE_outcache"))
        .args([
            "--url",
            &url,
            "put-blob",
            "big/upload",
            "--inputs",
            r#"{"kill":true}"#,
            "-",
        ])
        .env("AWS_ACCESS_KEY_ID", "outcache-test")
        .env("AWS_SECRET_ACCESS_KEY", "outcache-test")
        .env("AWS_REGION", "us-east-1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = put.stdin.take().unwrap();
    let chunk = vec![7u8; 1 << 20];
    let started = Instant::now();
    for i in 0..200 {
        if i == 40 {
            server.kill(); // SIGKILL, 40 MiB in: several parts are done, more in flight
        }
        if stdin.write_all(&chunk).is_err() {
            break; // the command already gave up
        }
    }
    drop(stdin);
    let out = put.wait_with_output().unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "put-blob succeeded against a dead server"
    );
    assert!(
        took < Duration::from_secs(60),
        "put-blob took {took:?} to fail"
    );
    assert!(
        stderr.starts_with("outcache: error:") && stderr.contains("blob"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    eprintln!("killed server: put-blob failed after {took:?}: {stderr}");

    let _server = start_s3s(&bin, root.path(), port);
    // SAFETY: see above; the same values.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "outcache-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "outcache-test");
    }
    let cache = outcache::backends::open(&Location::parse(&url).unwrap()).unwrap();
    let blobs: Vec<_> = cache.list_blobs().await.unwrap();
    assert!(
        blobs.iter().all(|b| b.state != BlobState::Published),
        "a partial blob was published: {blobs:?}"
    );
    let key = RowKey::new("big/upload", &json!({"kill": true})).unwrap();
    assert_eq!(
        cache.get_row(&key).await.unwrap(),
        None,
        "a row exists for the failed upload"
    );
}
