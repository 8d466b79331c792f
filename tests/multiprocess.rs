//! Several OS processes writing and reading the same keys in one cache at once (fs directory, SQLite
//! file): no errors, no torn reads, every blob a process wrote reads back whole.

mod common;

use common::outcache;
use serde_json::{Value, json};

fn hammer(url: &str) {
    let workers: Vec<_> = (0..3)
        .map(|p| {
            let url = url.to_owned();
            std::thread::spawn(move || {
                for i in 0..25 {
                    // Same keys from every process, and a private one each.
                    for inputs in [json!({"shared": i}), json!({"process": p, "i": i})] {
                        let inputs = inputs.to_string();
                        let value = json!({"by": p, "i": i}).to_string();
                        let put = outcache(
                            &url,
                            &["put", "hammer", "--inputs", &inputs, "--output", &value],
                            None,
                        );
                        assert!(
                            put.status.success(),
                            "put: {}",
                            String::from_utf8_lossy(&put.stderr)
                        );
                        let get = outcache(&url, &["get", "hammer", "--inputs", &inputs], None);
                        assert!(
                            get.status.success(),
                            "get: {}",
                            String::from_utf8_lossy(&get.stderr)
                        );
                        let got: Value = serde_json::from_slice(&get.stdout).unwrap();
                        assert_eq!(got["i"], i, "a torn or foreign row: {got}");
                    }
                    let blob = vec![p as u8; 100_000 + i];
                    let out = outcache(
                        &url,
                        &[
                            "put-blob",
                            "hammer/blob",
                            "--inputs",
                            &json!({"i": i}).to_string(),
                        ],
                        Some(&blob),
                    );
                    assert!(
                        out.status.success(),
                        "put-blob: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let cat = outcache(&url, &["cat", &String::from_utf8_lossy(&out.stdout)], None);
                    assert!(
                        cat.status.success(),
                        "cat: {}",
                        String::from_utf8_lossy(&cat.stderr)
                    );
                    assert_eq!(cat.stdout.len(), 100_000 + i);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a worker failed");
    }
}

#[test]
fn processes_hammering_one_fs_cache_finish_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    hammer(&format!("fs://{}/shared", dir.path().display()));
}

#[cfg(feature = "sqlite")]
#[test]
fn processes_hammering_one_sqlite_database_finish_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    hammer(&format!("sqlite://{}/shared.db", dir.path().display()));
}
