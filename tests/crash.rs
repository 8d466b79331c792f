//! Crash safety under SIGKILL, on fs and SQLite. A child process (this same binary, in child mode) runs
//! several concurrent writers of rows and streamed blobs; the parent kills it with SIGKILL at random
//! moments. After every kill: every ref of every row resolves to a whole blob whose size and SHA-256
//! match (no partial or corrupt blob, no row pointing at a missing one), every row decodes, and an orphan
//! sweep with no grace period leaves no temp file or orphan chunk behind.
//!
//! 50 kills per backend by default; `OUTCACHE_CRASH_KILLS=200` for more. A plain-main test (no libtest
//! harness) so that the child mode is not a test of its own; it prints `N passed, N failed`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use outcache::OutputCacheExt as _;
use outcache::config::Location;
use outcache::janitor::sweep_orphans;
use outcache::{BlobOptions, BlobState, Cache, CacheOptions};
use serde_json::json;

const CHILD_ENV: &str = "OUTCACHE_CRASH_CHILD_URL";

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn engine(url: &str) -> Cache {
    let backend = outcache::backends::open(&Location::parse(url).unwrap()).unwrap();
    Cache::with_options(backend, CacheOptions::default().reference_threshold(4096))
}

/// Child mode: write forever until killed.
fn child(url: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cache = engine(url);
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        for w in 0..4u64 {
            let cache = cache.clone();
            tokio::spawn(async move {
                let mut rng = seed ^ (w + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                loop {
                    let key = xorshift(&mut rng) % 16;
                    let inputs = json!({ "w": w, "k": key });
                    if xorshift(&mut rng) % 3 == 0 {
                        let n = (xorshift(&mut rng) % 64) as usize;
                        cache
                            .put(
                                "crash/rows",
                                &inputs,
                                &json!({ "n": n, "pad": "x".repeat(n * 8) }),
                            )
                            .await
                            .unwrap();
                    } else {
                        // Up to 3 MiB in 64 KiB chunks: many writes are caught mid-stream.
                        let size = (xorshift(&mut rng) % (3 << 20)) as usize;
                        let byte = xorshift(&mut rng) as u8;
                        let chunks = (0..size).step_by(65_536).map(move |i| {
                            Ok(bytes::Bytes::from(vec![byte; (size - i).min(65_536)]))
                        });
                        let stream = futures::stream::iter(chunks.collect::<Vec<_>>()).boxed();
                        cache
                            .put_stream("crash/blobs", &inputs, stream, BlobOptions::default())
                            .await
                            .unwrap();
                    }
                }
            });
        }
        // The writers run until the parent kills this process.
        futures::future::pending::<()>().await;
    });
}

fn spawn_child(url: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, url)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the writer child")
}

/// Everything that must hold after a kill; returns how many rows and refs were checked.
async fn check(url: &str) -> Result<(usize, usize), String> {
    let cache = engine(url);
    let backend = cache.backend().clone();
    let rows = backend
        .list_rows()
        .await
        .map_err(|e| format!("listing rows: {e}"))?;
    let mut refs = 0;
    for row in &rows {
        let stored = backend
            .get_row(&row.key)
            .await
            .map_err(|e| format!("row {}: {e}", row.key))?;
        let output = stored
            .ok_or(format!("row {} listed but missing", row.key))?
            .output;
        for r in outcache::wire::refs_in(&output) {
            refs += 1;
            if r.sha256.is_none() || r.size.is_none() {
                return Err(format!(
                    "row {} holds a ref without size/sha256: {r:?}",
                    row.key
                ));
            }
            match cache.read(&r).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(format!(
                        "row {} points at a missing blob {}",
                        row.key, r.reference
                    ));
                }
                Err(e) => return Err(format!("row {}: {e}", row.key)),
            }
        }
    }
    sweep_orphans(backend.as_ref(), Duration::ZERO, false)
        .await
        .map_err(|e| format!("sweep: {e}"))?;
    let left: Vec<_> = backend.list_blobs().await.map_err(|e| e.to_string())?;
    if let Some(temp) = left.iter().find(|b| b.state == BlobState::Temp) {
        return Err(format!("a temp survived the sweep: {temp:?}"));
    }
    Ok((rows.len(), refs))
}

async fn crash_loop(name: &str, url: &str, kills: usize, rng: &mut u64) -> Result<(), String> {
    let (mut rows, mut refs) = (0, 0);
    for k in 0..kills {
        let mut child = spawn_child(url);
        let wait = 30 + xorshift(rng) % 250;
        std::thread::sleep(Duration::from_millis(wait));
        let killed = child.kill(); // SIGKILL
        child.wait().map_err(|e| e.to_string())?;
        killed.map_err(|e| e.to_string())?;
        let (r, f) = check(url)
            .await
            .map_err(|e| format!("{name}, after kill {k} ({wait} ms in): {e}"))?;
        rows = rows.max(r);
        refs += f;
    }
    if rows == 0 || refs == 0 {
        return Err(format!(
            "{name}: the child never committed a row with a blob; the test proved nothing"
        ));
    }
    eprintln!("{name}: {kills} kills, up to {rows} rows, {refs} refs verified");
    Ok(())
}

fn main() {
    if let Ok(url) = std::env::var(CHILD_ENV) {
        child(&url);
        return;
    }
    // Invoked by `cargo test` with libtest flags; a filter that does not match "crash" skips us.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if args.iter().any(|a| !"crash".contains(a.as_str())) || std::env::args().any(|a| a == "--list")
    {
        return;
    }
    let kills: usize = std::env::var("OUTCACHE_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut rng = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash: seed {rng}, {kills} kills per backend");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cases: Vec<(&str, String)> = vec![("fs", format!("fs://{}/fs", dir.path().display()))];
    if cfg!(feature = "sqlite") {
        cases.push((
            "sqlite",
            format!("sqlite://{}/sqlite/c.db", dir.path().display()),
        ));
    }
    let (mut passed, mut failed) = (0, 0);
    for (name, url) in &cases {
        match rt.block_on(crash_loop(name, url, kills, &mut rng)) {
            Ok(()) => {
                println!("test crash_{name} ... ok");
                passed += 1;
            }
            Err(e) => {
                println!("test crash_{name} ... FAILED: {e}");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
