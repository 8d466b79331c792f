//! `outcache serve` against raw baselines in the same run (127.0.0.1, fs backend, durable):
//! - 1 KiB GET hits from 32 concurrent clients, against a minimal handler on the same HTTP stack that
//!   answers with `std::fs::read` of a file (no cache, no verification);
//! - a 256 MiB upload and download through the server, against the same put and verified read in
//!   process (`Cache::put_stream`, `Cache::open_stream`), and against the transport alone (a handler
//!   that drains the upload, one that sends a buffer already in memory).
//!
//! Run: `cargo bench --features serve --bench serve` (`OUTCACHE_SERVE_BENCH_MIB=256`,
//! `OUTCACHE_SERVE_BENCH_ROUNDS=6`: the big transfers alternate which contender goes first).

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::Samples;
use futures::StreamExt;
use outcache::serve::ServeOptions;
use outcache::{BlobOptions, Cache, CacheRef};
use serde_json::json;

const KEYS: usize = 1000;
const CLIENTS: usize = 32;
const PER_CLIENT: usize = 200;

async fn listen(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    base
}

/// `outcache serve` itself (its accept loop and limits, not only its routes) over `cache`.
async fn serve(cache: &Cache) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let options = ServeOptions {
        allow_anonymous_writes: true,
        ..ServeOptions::default()
    };
    let served = outcache::serve::serve(listener, cache.clone(), options, std::future::pending());
    tokio::spawn(async move { served.await.unwrap() });
    base
}

/// 32 clients, each GETting 200 random keys of `KEYS` from `base/{prefix}{i}`; checks every body.
async fn hammer(client: &reqwest::Client, base: &str, prefix: &str) {
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, base, prefix) = (client.clone(), base.to_owned(), prefix.to_owned());
            tokio::spawn(async move {
                for n in 0..PER_CLIENT {
                    let i = (c * 7919 + n * 104_729) % KEYS;
                    let body = client
                        .get(format!("{base}/{prefix}{i}"))
                        .send()
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap();
                    assert_eq!(body.len(), 1024);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

fn pattern(n: usize, seed: u8) -> Bytes {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

fn chunks(data: &Bytes) -> Vec<Bytes> {
    (0..data.len())
        .step_by(1 << 20)
        .map(|s| data.slice(s..(s + (1 << 20)).min(data.len())))
        .collect()
}

/// PUT `data` to `url` in 1 MiB chunks (streamed, no length); panics unless it is stored.
async fn upload(client: &reqwest::Client, url: String, data: &Bytes) {
    let body = reqwest::Body::wrap_stream(futures::stream::iter(
        chunks(data).into_iter().map(Ok::<_, std::io::Error>),
    ));
    let put = client.put(url).body(body).send().await.unwrap();
    assert!(put.status().is_success());
}

/// GET `url` and consume its body as it streams; returns the bytes received.
async fn download(client: &reqwest::Client, url: String) -> usize {
    let mut stream = client.get(url).send().await.unwrap().bytes_stream();
    let mut n = 0;
    while let Some(chunk) = stream.next().await {
        n += chunk.unwrap().len();
    }
    n
}

/// One round of big transfers on one cache, the contenders taking turns at going first: the disk's
/// durable-write rate swings between writes seconds apart (MEASURED.md), so the medians of alternating
/// rounds are compared.
struct Transfers<'a> {
    client: &'a reqwest::Client,
    data: &'a Bytes,
    samples: &'a Samples,
}

impl Transfers<'_> {
    async fn round(&self, cache: &Cache, served: &str, round: usize, case: &str) {
        let (up, down) = (format!("upload{case}"), format!("download{case}"));
        let in_process_first = round % 2 == 0;
        let mut stored = None;
        for turn in 0..2 {
            if (turn == 0) == in_process_first {
                let started = std::time::Instant::now();
                let chunks = futures::stream::iter(chunks(self.data).into_iter().map(Ok)).boxed();
                let inputs = json!({ "round": round });
                let put =
                    cache.put_stream("bench/in-process", &inputs, chunks, BlobOptions::default());
                stored = Some(put.await.unwrap());
                self.samples.record(&up, "in-process", started.elapsed());
            } else {
                let started = std::time::Instant::now();
                upload(self.client, format!("{served}/big{round}"), self.data).await;
                self.samples.record(&up, "serve", started.elapsed());
            }
        }
        let r = CacheRef::from_value(&stored.expect("stored in process")).unwrap();
        for turn in 0..2 {
            if (turn == 0) == in_process_first {
                let started = std::time::Instant::now();
                let mut stream = cache.open_stream(&r).await.unwrap().unwrap();
                let mut n = 0;
                while let Some(chunk) = stream.next().await {
                    n += chunk.unwrap().len();
                }
                assert_eq!(n, self.data.len());
                self.samples.record(&down, "in-process", started.elapsed());
            } else {
                let started = std::time::Instant::now();
                let n = download(self.client, format!("{served}/big{round}")).await;
                assert_eq!(n, self.data.len());
                self.samples.record(&down, "serve", started.elapsed());
            }
        }
        // Start each round from an empty cache: a not-durable write then never reaches the disk, and
        // the disk holds no more than one round's blobs.
        let mut everything = outcache::janitor::PruneOptions::new();
        everything.older_than = Some(std::time::Duration::ZERO);
        outcache::janitor::prune(cache.backend().as_ref(), &everything, |_| {})
            .await
            .unwrap();
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&format!("fs://{}/cache", dir.path().display())).unwrap();
        let served = serve(&cache).await;
        let raw_dir = dir.path().join("raw");
        std::fs::create_dir_all(&raw_dir).unwrap();
        let files = Arc::new(raw_dir.clone());
        // The transport alone: a handler that drains an upload, and one that sends a buffer already in
        // memory (what HTTP on this machine costs, with the client on the same cores).
        let mib: usize = std::env::var("OUTCACHE_SERVE_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256);
        let data = pattern(mib << 20, 7);
        let held = data.clone();
        let transport = listen(
            axum::Router::new()
                .route(
                    "/drain",
                    axum::routing::put(|body: axum::body::Body| async move {
                        let mut stream = body.into_data_stream();
                        let mut n = 0usize;
                        while let Some(chunk) = stream.next().await {
                            n += chunk.unwrap().len();
                        }
                        n.to_string()
                    }),
                )
                .route(
                    "/held",
                    axum::routing::get(move || {
                        let held = held.clone();
                        async move {
                            axum::body::Body::from_stream(futures::stream::iter(
                                chunks(&held).into_iter().map(Ok::<_, std::io::Error>),
                            ))
                        }
                    }),
                ),
        )
        .await;
        let raw = listen(axum::Router::new().route(
            "/{name}",
            axum::routing::get(
                move |axum::extract::Path(name): axum::extract::Path<String>| {
                    let files = files.clone();
                    async move { Bytes::from(std::fs::read(files.join(name)).unwrap()) }
                },
            ),
        ))
        .await;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(CLIENTS)
            .build()
            .unwrap();
        for i in 0..KEYS {
            let body = pattern(1024, i as u8);
            std::fs::write(raw_dir.join(format!("k{i}")), &body).unwrap();
            client
                .put(format!("{served}/k{i}"))
                .body(body)
                .send()
                .await
                .unwrap();
        }

        let samples = Samples::default();
        hammer(&client, &served, "k").await; // warm both
        hammer(&client, &raw, "k").await;
        for _ in 0..5 {
            let started = std::time::Instant::now();
            hammer(&client, &raw, "k").await;
            samples.record("hits", "raw", started.elapsed());
            let started = std::time::Instant::now();
            hammer(&client, &served, "k").await;
            samples.record("hits", "serve", started.elapsed());
        }
        let requests = (CLIENTS * PER_CLIENT) as f64;
        samples.print_ratio(
            "1 KiB GET hits, 32 clients",
            &["hits"],
            "raw",
            "serve",
            |_| (requests, "req"),
        );

        let rounds: usize = std::env::var("OUTCACHE_SERVE_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(6);
        let quick = Cache::open(&format!(
            "fs://{}/quick?durable=false",
            dir.path().display()
        ))
        .unwrap();
        let quick_served = serve(&quick).await;
        for round in 0..rounds {
            let started = std::time::Instant::now();
            upload(&client, format!("{transport}/drain"), &data).await;
            samples.record("upload", "http-only", started.elapsed());
            let started = std::time::Instant::now();
            assert_eq!(
                download(&client, format!("{transport}/held")).await,
                data.len()
            );
            samples.record("download", "http-only", started.elapsed());
            let transfers = Transfers {
                client: &client,
                data: &data,
                samples: &samples,
            };
            transfers.round(&cache, &served, round, "").await;
            transfers
                .round(&quick, &quick_served, round, ", not durable")
                .await;
        }
        samples.print_ratio(
            &format!("{mib} MiB upload and download"),
            &["upload", "download"],
            "in-process",
            "serve",
            |_| ((mib as f64) * 1.048_576, "MB"),
        );
        samples.print_ratio(
            &format!(
                "{mib} MiB upload and download, not durable (the server's own cost, no fsync)"
            ),
            &["upload, not durable", "download, not durable"],
            "in-process",
            "serve",
            |_| ((mib as f64) * 1.048_576, "MB"),
        );
        samples.print_ratio(
            &format!("{mib} MiB over HTTP: the server against the transport alone"),
            &["upload", "download"],
            "http-only",
            "serve",
            |_| ((mib as f64) * 1.048_576, "MB"),
        );
    });
}
