//! `outcache serve` over HTTP, as a client sees it: the simple key/value and Bazel protocols on a real
//! listener (127.0.0.1, an ephemeral port) over the fs and SQLite backends; auth; refusals that store
//! nothing; and a blob that fails verification never reaching a client whole.
#![cfg(feature = "serve")]

#[cfg(feature = "s3")]
mod common;

use std::sync::Arc;

use outcache::serve::{ServeOptions, Tokens};
use outcache::{Cache, OutputCache, OutputCacheExt};
use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use sha2::{Digest, Sha256};

struct Server {
    base: String,
    cache: Cache,
    _dir: tempfile::TempDir,
}

async fn start(backend: &str, options: ServeOptions) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let url = match backend {
        "fs" => format!("fs://{}", dir.path().display()),
        "sqlite" => format!("sqlite://{}/c.db", dir.path().display()),
        other => other.to_owned(), // a URL
    };
    start_on(dir, &url, options).await
}

async fn start_on(dir: tempfile::TempDir, url: &str, options: ServeOptions) -> Server {
    let cache = Cache::open(url).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let served = cache.clone();
    tokio::spawn(async move {
        outcache::serve::serve(listener, served, options, std::future::pending())
            .await
            .unwrap();
    });
    Server {
        base,
        cache,
        _dir: dir,
    }
}

fn writer() -> ServeOptions {
    ServeOptions {
        allow_anonymous_writes: true,
        ..ServeOptions::default()
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

/// The status of a PUT of `body` to `url` (no token).
async fn put(client: &reqwest::Client, url: &str, body: impl Into<reqwest::Body>) -> StatusCode {
    client.put(url).body(body).send().await.unwrap().status()
}

/// The whole body of a GET of `url` (no token).
async fn get_body(client: &reqwest::Client, url: &str) -> bytes::Bytes {
    client.get(url).send().await.unwrap().bytes().await.unwrap()
}

/// The server's `/metrics` page.
async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    let body = get_body(client, &format!("{base}/metrics")).await;
    String::from_utf8(body.to_vec()).unwrap()
}

/// The temps (writes in flight or abandoned) the cache lists.
async fn temps(cache: &Cache) -> Vec<outcache::BlobEntry> {
    let listed = cache.backend().list_blobs().await.unwrap();
    listed
        .into_iter()
        .filter(|b| b.state == outcache::BlobState::Temp)
        .collect()
}

async fn blobs(server: &Server) -> usize {
    server.cache.backend().list_blobs().await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_round_trips_large_and_small_bodies_on_fs_and_sqlite() {
    for backend in ["fs", "sqlite"] {
        let server = start(backend, writer()).await;
        let client = reqwest::Client::new();
        for (path, body) in [
            ("ccache/ab/cdef", pattern(300_000)),
            ("small", b"tiny".to_vec()),
        ] {
            let url = format!("{}/{path}", server.base);
            assert_eq!(
                client.get(&url).send().await.unwrap().status(),
                StatusCode::NOT_FOUND
            );
            let stored = put(&client, &url, body.clone()).await;
            assert_eq!(stored, StatusCode::OK, "{backend} {path}");
            let got = client.get(&url).send().await.unwrap();
            assert_eq!(got.status(), StatusCode::OK);
            assert_eq!(
                got.bytes().await.unwrap().as_ref(),
                body.as_slice(),
                "{backend} {path}"
            );
            let head = client.head(&url).send().await.unwrap();
            assert_eq!(head.status(), StatusCode::OK);
            let length = head.headers().get(reqwest::header::CONTENT_LENGTH).cloned();
            assert_eq!(
                length,
                Some(body.len().into()),
                "{backend} {path}: HEAD's length"
            );
            assert_eq!(
                client.delete(&url).send().await.unwrap().status(),
                StatusCode::NO_CONTENT
            );
            assert_eq!(
                client.get(&url).send().await.unwrap().status(),
                StatusCode::NOT_FOUND
            );
        }
    }
}

/// The backends a big transfer is tried on: fs and SQLite, and S3 when the test command's moto runs
/// (required under `CI=true`).
fn big_transfer_backends() -> Vec<String> {
    #[cfg_attr(not(feature = "s3"), allow(unused_mut))]
    let mut backends = vec!["fs".to_owned(), "sqlite".to_owned()];
    #[cfg(feature = "s3")]
    if let Some(url) = common::server_env("OUTCACHE_S3_URL") {
        let child = format!("serve-{}", uuid::Uuid::new_v4().simple());
        backends.push(common::s3_child(&url, &child));
    }
    backends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_bodies_round_trip_with_and_without_a_length_on_every_backend() {
    // Over a MiB: stored on a thread of their own and read ahead on one.
    let body = pattern(3_000_000);
    for backend in big_transfer_backends() {
        let server = start(&backend, writer()).await;
        let client = reqwest::Client::new();
        let with_length = format!("{}/big/length", server.base);
        assert_eq!(
            put(&client, &with_length, body.clone()).await,
            StatusCode::OK
        );
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
            body.chunks(70_000).map(|c| Ok(c.to_vec())).collect();
        let chunked = format!("{}/big/chunked", server.base);
        let streamed = reqwest::Body::wrap_stream(futures::stream::iter(pieces));
        assert_eq!(put(&client, &chunked, streamed).await, StatusCode::OK);
        for url in [&with_length, &chunked] {
            let got = get_body(&client, url).await;
            assert!(
                got.as_ref() == body.as_slice(),
                "{backend}: {url} came back different"
            );
        }
        let left = temps(&server.cache).await;
        assert!(
            left.is_empty(),
            "{backend}: temps left after the uploads: {left:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cas_upload_that_does_not_hash_to_its_key_is_refused_and_never_stored() {
    // 200 kB is hashed on the connection's task; 3 MB on a thread of its own, fed by the connection.
    for size in [200_000, 3_000_000] {
        cas_digest_refusal(size).await;
    }
}

async fn cas_digest_refusal(size: usize) {
    let server = start("fs", writer()).await;
    let client = reqwest::Client::new();
    let body = pattern(size);
    let digest = outcache::wire::hex(&Sha256::digest(&body));
    let good = format!("{}/cas/{digest}", server.base);
    assert_eq!(put(&client, &good, body.clone()).await, StatusCode::OK);
    assert_eq!(get_body(&client, &good).await.as_ref(), body.as_slice());
    let before = blobs(&server).await;

    let wrong = format!("{}/cas/{}", server.base, "0".repeat(64));
    let refused = client.put(&wrong).body(body.clone()).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let why = refused.text().await.unwrap();
    assert!(why.contains("does not hash to its key"), "{size} B: {why}");
    assert_eq!(
        client.get(&wrong).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        blobs(&server).await,
        before,
        "a refused upload left a blob or temp"
    );

    // The action cache takes any bytes under a digest key; malformed keys are refused.
    let ac = format!("{}/ac/{}", server.base, "a".repeat(64));
    assert_eq!(put(&client, &ac, "result").await, StatusCode::OK);
    assert_eq!(
        client.get(&ac).send().await.unwrap().text().await.unwrap(),
        "result"
    );
    let bad = format!("{}/ac/not-a-digest", server.base);
    assert_eq!(
        client.get(&bad).send().await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
}

/// A CAS upload of bytes the cache already holds whole is checked and acknowledged, but writes no
/// second blob (which would only wait out the grace period as an orphan); a wrong body under a held
/// digest is still refused, and a held blob damaged on disk is replaced by the next upload of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cas_upload_of_held_bytes_writes_nothing_new_but_heals_a_damaged_blob() {
    for backend in ["fs", "sqlite"] {
        // 200 B goes inline in the row; 300 kB and 3 MB into a blob (the last on its own thread).
        for size in [200, 300_000, 3_000_000] {
            cas_reupload(backend, size).await;
        }
    }
}

async fn cas_reupload(backend: &str, size: usize) {
    let server = start(backend, writer()).await;
    let client = reqwest::Client::new();
    let body = pattern(size);
    let digest = outcache::wire::hex(&Sha256::digest(&body));
    let url = format!("{}/cas/{digest}", server.base);
    assert_eq!(put(&client, &url, body.clone()).await, StatusCode::OK);
    let listed = server.cache.backend().list_blobs().await.unwrap();
    for _ in 0..3 {
        assert_eq!(put(&client, &url, body.clone()).await, StatusCode::OK);
    }
    assert_eq!(
        server.cache.backend().list_blobs().await.unwrap(),
        listed,
        "{backend} {size} B: a re-upload wrote a blob"
    );
    let mut wrong = body.clone();
    wrong[size / 2] ^= 1;
    let refused = client.put(&url).body(wrong).send().await.unwrap();
    assert_eq!(
        refused.status(),
        StatusCode::BAD_REQUEST,
        "{backend} {size} B"
    );
    assert_eq!(get_body(&client, &url).await.as_ref(), body.as_slice());
    let metrics = metrics_text(&client, &server.base).await;
    assert!(
        metrics.contains("outcache_serve_uploads_stored_total{protocol=\"bazel_cas\"} 4\n")
            && metrics.contains("outcache_serve_uploads_refused_total{protocol=\"bazel_cas\"} 1\n"),
        "{backend} {size} B:\n{metrics}"
    );
    if backend != "fs" || listed.is_empty() {
        return;
    }
    // Damage the held blob (same size, one byte flipped, as a bad disk would): the next upload of
    // those bytes is stored anew, and the digest serves whole again.
    let file = std::fs::read_dir(server._dir.path().join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            listed[0]
                .id
                .contains(p.file_name().unwrap().to_str().unwrap())
        })
        .unwrap();
    let mut damaged = std::fs::read(&file).unwrap();
    damaged[size - 1] ^= 0xff;
    std::fs::write(&file, damaged).unwrap();
    assert_eq!(put(&client, &url, body.clone()).await, StatusCode::OK);
    assert_eq!(
        get_body(&client, &url).await.as_ref(),
        body.as_slice(),
        "{size} B: the damaged blob was kept"
    );
}

/// Bazel under an instance prefix (`--remote_cache=http://host/linux`) is still Bazel: its CAS
/// uploads are checked against their digest (not stored as plain keys), and each prefix is a cache
/// of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_under_an_instance_prefix_checks_digests_and_keeps_instances_apart() {
    let server = start("fs", writer()).await;
    let client = reqwest::Client::new();
    let body = pattern(100_000);
    let digest = outcache::wire::hex(&Sha256::digest(&body));
    let base = &server.base;

    let wrong = format!("{base}/linux/cas/{}", "0".repeat(64));
    let refused = client.put(&wrong).body(body.clone()).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let why = refused.text().await.unwrap();
    assert!(why.contains("does not hash to its key"), "{why}");
    assert_eq!(blobs(&server).await, 0, "a refused upload was stored");

    let good = format!("{base}/linux/cas/{digest}");
    assert_eq!(put(&client, &good, body.clone()).await, StatusCode::OK);
    assert_eq!(get_body(&client, &good).await.as_ref(), body.as_slice());
    let ac = format!("{base}/team/linux/ac/{}", "b".repeat(64));
    assert_eq!(put(&client, &ac, "result").await, StatusCode::OK);
    assert_eq!(get_body(&client, &ac).await.as_ref(), b"result");

    for elsewhere in [
        format!("{base}/cas/{digest}"),
        format!("{base}/mac/cas/{digest}"),
        format!("{base}/ac/{}", "b".repeat(64)),
        format!("{base}/linux/ac/{}", "b".repeat(64)),
    ] {
        let status = client.get(&elsewhere).send().await.unwrap().status();
        assert_eq!(status, StatusCode::NOT_FOUND, "{elsewhere}");
    }
    let metrics = metrics_text(&client, base).await;
    // A 405 names the methods the route takes (RFC 9110): Bazel's entries are not deleted by clients.
    for (url, allow) in [
        (&ac, "GET, HEAD, PUT, POST"),
        (&format!("{base}/plain-key"), "GET, HEAD, PUT, POST, DELETE"),
    ] {
        let patch = client.patch(url).send().await.unwrap();
        assert_eq!(patch.status(), StatusCode::METHOD_NOT_ALLOWED, "{url}");
        assert_eq!(patch.headers()["allow"], allow, "{url}");
    }
    let delete = client.delete(&ac).send().await.unwrap();
    assert_eq!(delete.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get_body(&client, &ac).await.as_ref(), b"result");
    // Counted as Bazel's, not as plain keys.
    for line in [
        "outcache_serve_uploads_refused_total{protocol=\"bazel_cas\"} 1",
        "outcache_serve_uploads_stored_total{protocol=\"bazel_cas\"} 1",
        "outcache_serve_uploads_stored_total{protocol=\"bazel_ac\"} 1",
        "outcache_serve_uploads_stored_total{protocol=\"http\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_upload_is_refused_and_nothing_is_stored() {
    let server = start(
        "fs",
        ServeOptions {
            max_body: 10_000,
            ..writer()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let url = format!("{}/big", server.base);
    // Declared too large: refused before the body is read (a client still sending may see the
    // connection close instead of the 413).
    match client.put(&url).body(pattern(20_000)).send().await {
        Ok(declared) => assert_eq!(declared.status(), StatusCode::PAYLOAD_TOO_LARGE),
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    // Streamed with no length, found too large on the way.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..4).map(|_| Ok(pattern(5_000))).collect();
    let streamed = client
        .put(&url)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        client.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(blobs(&server).await, 0);
}

/// Sends the head of a PUT to `path` (`framing`: a `Content-Length` or chunked header) and `sent`
/// bytes of its body (chunked: one whole chunk and no last one); returns the connection, still open.
async fn partial_upload(
    server: &Server,
    path: &str,
    framing: &str,
    sent: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let host = server.base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!("PUT {path} HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    if framing.starts_with("Transfer-Encoding") {
        conn.write_all(format!("{sent:x}\r\n").as_bytes())
            .await
            .unwrap();
        conn.write_all(&pattern(sent)).await.unwrap();
        conn.write_all(b"\r\n").await.unwrap();
    } else {
        conn.write_all(&pattern(sent)).await.unwrap();
    }
    conn.flush().await.unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_half_way_stores_nothing_and_leaves_no_temp() {
    for backend in ["fs", "sqlite"] {
        let server = start(backend, writer()).await;
        let client = reqwest::Client::new();
        // A small declared body (stored on the connection's task), a big one and one of unknown length
        // (both stored on a thread of their own, fed by the connection's task).
        let cases = [
            ("/short", "Content-Length: 500000", 200_000),
            ("/long", "Content-Length: 8000000", 3_000_000),
            ("/chunked", "Transfer-Encoding: chunked", 3_000_000),
        ];
        for (path, framing, sent) in cases {
            drop(partial_upload(&server, path, framing, sent).await); // and cut off
        }
        // The server notices each cut on its own time: wait for the temps to go.
        let mut left = usize::MAX;
        for _ in 0..500 {
            left = blobs(&server).await;
            if left == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(left, 0, "{backend}: a cut-off upload left a blob or temp");
        for (path, _, _) in cases {
            let url = format!("{}{path}", server.base);
            assert_eq!(
                client.get(&url).send().await.unwrap().status(),
                StatusCode::NOT_FOUND,
                "{backend}{path}: a cut-off upload was stored"
            );
        }
        assert!(
            server.cache.backend().list_rows().await.unwrap().is_empty(),
            "{backend}: a cut-off upload left a row"
        );
    }
}

/// An fs server that lets a client idle for 300 ms at most.
async fn impatient() -> Server {
    let options = ServeOptions {
        idle_timeout: std::time::Duration::from_millis(300),
        ..writer()
    };
    start("fs", options).await
}

/// An upload that stops sending (the connection left open) is answered 408 once the idle timeout
/// passes, stores nothing and leaves no temp — on both store paths, declared and chunked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_times_out_with_408_and_stores_nothing() {
    use tokio::io::AsyncReadExt;
    let server = impatient().await;
    let cases = [
        ("/stall/small", "Content-Length: 400000", 200_000),
        ("/stall/big", "Content-Length: 6000000", 3_000_000),
        ("/stall/chunked", "Transfer-Encoding: chunked", 3_000_000),
    ];
    for (path, framing, sent) in cases {
        let mut conn = partial_upload(&server, path, framing, sent).await;
        // Then nothing, with the connection open: the server must answer on its own.
        let mut answer = vec![0u8; 12];
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            conn.read_exact(&mut answer),
        )
        .await;
        assert!(read.is_ok(), "{path}: no answer 10 s into the stall");
        read.unwrap().unwrap();
        assert_eq!(&answer, b"HTTP/1.1 408", "{path}");
    }
    let client = reqwest::Client::new();
    for (path, _, _) in cases {
        let url = format!("{}{path}", server.base);
        assert_eq!(
            client.get(&url).send().await.unwrap().status(),
            StatusCode::NOT_FOUND,
            "{path}: a stalled upload was stored"
        );
    }
    let left = temps(&server.cache).await;
    assert!(left.is_empty(), "stalled uploads left temps: {left:?}");
}

/// A download the client stops taking (the connection left open) is cut off once the idle timeout
/// passes: the server closes the connection short of the body's length, so the client can never take
/// what it got for the whole, and the server's reader stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_the_client_stops_taking_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = impatient().await;
    let size = 48 << 20; // well past what the socket buffers hold between the two ends
    let client = reqwest::Client::new();
    let url = format!("{}/big", server.base);
    assert_eq!(put(&client, &url, pattern(size)).await, StatusCode::OK);
    let host = server.base.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&host).await.unwrap();
    let request = format!("GET /big HTTP/1.1\r\nHost: {host}\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut first = vec![0u8; 64 << 10];
    conn.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    // Take nothing for well past the idle timeout, then drain what is left: the connection must end
    // (EOF or reset) before the whole body has come through.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let mut taken = first.len();
    let mut buf = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => taken += n,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection stayed open");
    assert!(
        taken < size,
        "the whole body ({taken} bytes) came through after the client stalled"
    );
    // The client's stall is not the cache failing.
    let metrics = metrics_text(&client, &server.base).await;
    assert!(
        metrics.contains("outcache_serve_errors_total{protocol=\"http\"} 0\n"),
        "{metrics}"
    );
}

/// Reads `conn` until the server closes it (EOF or reset); the bytes it sent, or None if it was still
/// open after `secs`.
async fn until_closed(conn: &mut tokio::net::TcpStream, secs: u64) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(std::time::Duration::from_secs(secs), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(got)
}

/// `/readyz` answers 200 while a read reaches the cache and 503 when it does not (an S3 endpoint
/// nobody listens on), where `/healthz` still says the process is up; neither needs a token.
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_whether_the_cache_answers() {
    let mut tokens = Tokens::default();
    tokens.add_read_write("t");
    let options = || ServeOptions {
        tokens: tokens.clone(),
        ..ServeOptions::default()
    };
    let client = reqwest::Client::new();
    let ready = start("fs", options()).await;
    let got = client
        .get(format!("{}/readyz", ready.base))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    let dead = "s3://bucket/p?endpoint=http://127.0.0.1:1&allow_http=true\
                &access_key_id=k&secret_access_key=s";
    let unreachable = start(dead, options()).await;
    let got = client
        .get(format!("{}/readyz", unreachable.base))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::SERVICE_UNAVAILABLE);
    let alive = client
        .get(format!("{}/healthz", unreachable.base))
        .send()
        .await
        .unwrap();
    assert_eq!(alive.status(), StatusCode::OK);
}

/// A connection to `server` that has sent `bytes` (raw: part of a request, or a whole one).
async fn sent(server: &Server, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let host = server.base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(host).await.unwrap();
    conn.write_all(bytes).await.unwrap();
    conn
}

/// A client that sends half a request head and then nothing, or keeps a connection idle after its
/// request, is let go once the idle timeout passes: neither can hold a connection (and its file
/// descriptor) for ever. Without a limit (0) the connection stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_head_and_an_idle_connection_are_let_go() {
    const HALF: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
    let server = impatient().await;
    let mut half = sent(&server, HALF).await;
    assert!(
        until_closed(&mut half, 10).await.is_some(),
        "a half-sent head held its connection 10 s"
    );

    let mut idle = sent(&server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let answered = until_closed(&mut idle, 10)
        .await
        .expect("an idle keep-alive connection was kept 10 s");
    assert!(
        answered.starts_with(b"HTTP/1.1 200"),
        "the request before the idle time was answered: {:?}",
        String::from_utf8_lossy(&answered)
    );

    let patient = start(
        "fs",
        ServeOptions {
            idle_timeout: std::time::Duration::ZERO,
            ..writer()
        },
    )
    .await;
    let mut half = sent(&patient, HALF).await;
    assert!(
        until_closed(&mut half, 2).await.is_none(),
        "--idle-timeout 0 still let a slow client go"
    );
}

/// Past `max_connections` a client waits to be accepted (it is not refused), and is served as soon
/// as a connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_past_the_connection_cap_wait_their_turn() {
    let server = start(
        "fs",
        ServeOptions {
            max_connections: 2,
            ..writer()
        },
    )
    .await;
    let host = server.base.trim_start_matches("http://").to_owned();
    let first = tokio::net::TcpStream::connect(&host).await.unwrap();
    let _second = tokio::net::TcpStream::connect(&host).await.unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/healthz", server.base);
    let waiting = tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was served while two were open: {:?}",
        waiting.await
    );
    drop(first);
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("the waiting client was not served once a connection closed")
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// An embedder that drops the server's future drops its connections with it: an upload in flight
/// is cut off (the client sees its connection end), stores nothing and leaves no temp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_server_drops_its_connections_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&format!("fs://{}", dir.path().display())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let serving = tokio::spawn(outcache::serve::serve(
        listener,
        cache.clone(),
        writer(),
        std::future::pending(),
    ));
    let server = Server {
        base,
        cache,
        _dir: dir,
    };
    let mut conn = partial_upload(&server, "/dropped", "Content-Length: 6000000", 3_000_000).await;
    // Until the temp file shows, the upload may not have reached the backend yet.
    for _ in 0..200 {
        if !temps(&server.cache).await.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    serving.abort();
    assert!(serving.await.unwrap_err().is_cancelled());
    assert!(
        until_closed(&mut conn, 10).await.is_some(),
        "the connection outlived the server"
    );
    let mut left = temps(&server.cache).await;
    for _ in 0..200 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        left = temps(&server.cache).await;
    }
    assert!(left.is_empty(), "a dropped upload left temps: {left:?}");
    let rows = outcache::OutputCacheExt::list_rows(server.cache.backend().as_ref())
        .await
        .unwrap();
    assert!(rows.is_empty(), "a dropped upload stored {rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_before_the_body_is_read_says_the_connection_closes() {
    // hyper closes a connection whose request body was left unread rather than read the rest: a
    // response that did not say so sent the client's next request down a connection about to close
    // (reqwest: `IncompleteMessage`).
    let server = start("fs", ServeOptions::default()).await; // no tokens: writes refused
    let client = reqwest::Client::new();
    let url = format!("{}/some/key", server.base);
    for _ in 0..5 {
        let refused = client
            .put(&url)
            .body(pattern(200_000))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert_eq!(refused.headers()["connection"], "close");
        let miss = client.get(&url).send().await.unwrap();
        assert_eq!(miss.status(), StatusCode::NOT_FOUND);
        assert!(
            miss.headers().get("connection").is_none(),
            "a read keeps it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_gate_reads_and_writes() {
    // No tokens: reads are open, writes refused unless anonymous writes are allowed.
    let open = start("fs", ServeOptions::default()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/k", open.base);
    assert_eq!(
        client.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(put(&client, &url, "x").await, StatusCode::FORBIDDEN);

    let mut tokens = Tokens::parse("# tokens\nrw writer-token\nro reader-token\n").unwrap();
    tokens.add_read_only("another-reader");
    let gated = start(
        "fs",
        ServeOptions {
            tokens,
            ..ServeOptions::default()
        },
    )
    .await;
    let url = format!("{}/k", gated.base);
    assert_eq!(
        client.get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client
            .get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client
            .put(&url)
            .bearer_auth("reader-token")
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        client
            .put(&url)
            .bearer_auth("writer-token")
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // Basic auth with the token as password (ccache's http://user:TOKEN@host/).
    let got = client
        .get(&url)
        .basic_auth("ccache", Some("reader-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.text().await.unwrap(), "x");
    // /healthz needs no token.
    let health = client
        .get(format!("{}/healthz", gated.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert!(Tokens::parse("rw\n").is_err() && Tokens::parse("admin t\n").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_fails_verification_never_reaches_the_client_whole() {
    let server = start("fs", writer()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/victim", server.base);
    let body = pattern(3_000_000);
    assert_eq!(put(&client, &url, body.clone()).await, StatusCode::OK);
    // Flip one byte of the stored blob (same size), as a bad disk would.
    let blob = server.cache.backend().list_blobs().await.unwrap().remove(0);
    let root = server._dir.path().join("blobs");
    let file = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| blob.id.contains(p.file_name().unwrap().to_str().unwrap()))
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[2_999_999] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let got = client.get(&url).send().await.unwrap();
    assert_eq!(
        got.status(),
        StatusCode::OK,
        "headers go out before the bytes are read"
    );
    match got.bytes().await {
        Ok(b) => panic!("the client received {} bytes as a complete body", b.len()),
        Err(e) => assert!(e.is_body() || e.is_decode() || e.is_request(), "{e}"),
    }
    // The status went out as 200, so the failure is counted (and logged) when the body breaks off.
    let errors = "outcache_serve_errors_total{protocol=\"http\"} 1\n";
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = metrics_text(&client, &server.base).await;
        if metrics.contains(errors) {
            // And only what went out counts as sent: not the whole blob.
            let sent: u64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix("outcache_serve_bytes_out_total{protocol=\"http\"} "))
                .and_then(|n| n.parse().ok())
                .expect("a bytes_out line");
            assert!(sent < 3_000_000, "{sent} bytes counted as sent");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the broken-off download was not counted as an error:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_hits_misses_and_refusals() {
    let server = start("sqlite", writer()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/m", server.base);
    client.get(&url).send().await.unwrap();
    put(&client, &url, "v").await;
    client.get(&url).send().await.unwrap();
    client
        .put(format!("{}/cas/{}", server.base, "1".repeat(64)))
        .body("v")
        .send()
        .await
        .unwrap();
    let text = metrics_text(&client, &server.base).await;
    for line in [
        "outcache_serve_hits_total{protocol=\"http\"} 1",
        "outcache_serve_misses_total{protocol=\"http\"} 1",
        "outcache_serve_uploads_stored_total{protocol=\"http\"} 1",
        "outcache_serve_uploads_refused_total{protocol=\"bazel_cas\"} 1",
        "outcache_engine_puts_total 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    let _: &Arc<dyn OutputCache> = server.cache.backend();
}

/// A download counts as in flight until its body is done with, not only until its headers went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_stays_in_flight_until_its_body_is_done() {
    let server = start("fs", writer()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/big", server.base);
    assert!(put(&client, &url, pattern(8 << 20)).await.is_success());
    let in_flight = || async {
        let text = reqwest::get(format!("{}/metrics", server.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("outcache_serve_in_flight "))
            .expect("the gauge")
            .to_owned();
        line.rsplit(' ').next().unwrap().parse::<i64>().unwrap()
    };
    // Headers received, body not read: the server is still sending (8 MiB exceed the socket buffers).
    let mut download = client.get(&url).send().await.unwrap();
    assert!(download.status().is_success());
    // The /metrics request itself is in flight while it answers.
    assert_eq!(
        in_flight().await,
        2,
        "a download whose body is unread is in flight"
    );
    let mut got = 0;
    while let Some(chunk) = download.chunk().await.unwrap() {
        got += chunk.len();
    }
    assert_eq!(got, 8 << 20);
    drop(download);
    let mut settled = in_flight().await;
    for _ in 0..100 {
        if settled == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        settled = in_flight().await;
    }
    assert_eq!(
        settled, 1,
        "only the /metrics request itself once the body is done"
    );
}

/// Load, bounded (64 clients for `OUTCACHE_SERVE_LOAD_SECS`, default 5 s, on 127.0.0.1): hits, misses
/// and uploads of 1 KiB to 256 KiB mixed, with the janitor pruning by age and sweeping orphans all the
/// while. Every request succeeds, every hit is byte-exact, and no temp file is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_the_janitor_running_gives_no_errors_and_no_wrong_bytes() {
    let secs: u64 = std::env::var("OUTCACHE_SERVE_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&format!("fs://{}?durable=false", dir.path().display())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let served = cache.clone();
    tokio::spawn(async move {
        outcache::serve::serve(listener, served, writer(), std::future::pending())
            .await
            .unwrap();
    });
    // A key's bytes depend only on the key, so any hit can be checked whoever wrote it.
    // Every tenth key is over a MiB, so uploads stored on a thread of their own (and downloads read
    // ahead on one) take part too; every other one of those is sent with no length.
    let body_of = |k: u64| -> Vec<u8> {
        let len = if k % 10 == 0 {
            (1 << 20) + (k as usize * 7919) % (2 << 20)
        } else {
            1024 + (k as usize * 7919) % (256 << 10)
        };
        (0..len).map(|i| (i as u64 * 31 + k) as u8).collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let janitor = {
        let (backend, stop) = (cache.backend().clone(), stop.clone());
        tokio::spawn(async move {
            let mut runs = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut options = outcache::janitor::PruneOptions::new();
                options.older_than = Some(std::time::Duration::from_secs(2));
                options.orphans = true;
                options.grace = std::time::Duration::from_secs(1);
                outcache::janitor::prune(backend.as_ref(), &options, |_| {})
                    .await
                    .unwrap();
                runs += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            runs
        })
    };
    let client = reqwest::Client::new();
    let clients: Vec<_> = (0..64u64)
        .map(|c| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                let (mut hits, mut misses, mut puts) = (0u64, 0u64, 0u64);
                let mut n = 0u64;
                while std::time::Instant::now() < deadline {
                    n += 1;
                    let k = (c * 131 + n * 17) % 200;
                    let url = format!("{base}/load/{k}");
                    if n % 3 == 0 {
                        let body = if k % 20 == 0 {
                            let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
                                body_of(k).chunks(100_000).map(|c| Ok(c.to_vec())).collect();
                            reqwest::Body::wrap_stream(futures::stream::iter(pieces))
                        } else {
                            body_of(k).into()
                        };
                        let put = client.put(&url).body(body).send().await.unwrap();
                        assert_eq!(put.status(), StatusCode::OK, "PUT {k}");
                        puts += 1;
                    } else {
                        let got = client.get(&url).send().await.unwrap();
                        match got.status() {
                            StatusCode::OK => {
                                let bytes = got.bytes().await.unwrap();
                                assert!(
                                    bytes.as_ref() == body_of(k).as_slice(),
                                    "wrong bytes for {k}"
                                );
                                hits += 1;
                            }
                            StatusCode::NOT_FOUND => misses += 1,
                            other => panic!("GET {k}: {other}"),
                        }
                    }
                }
                (hits, misses, puts)
            })
        })
        .collect();
    let (mut hits, mut misses, mut puts) = (0, 0, 0);
    for c in clients {
        let (h, m, p) = c.await.unwrap();
        hits += h;
        misses += m;
        puts += p;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let runs = janitor.await.unwrap();
    assert!(
        hits > 0 && misses > 0 && puts > 0 && runs > 0,
        "{hits} {misses} {puts} {runs}"
    );
    let left = temps(&cache).await;
    assert!(left.is_empty(), "temps left: {left:?}");
    eprintln!(
        "load: {hits} hits, {misses} misses, {puts} uploads, {runs} janitor runs in {secs} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turborepo_artifacts_keep_their_duration_and_tag_per_team() {
    let mut tokens = Tokens::default();
    tokens.add_read_write("turbo-token");
    let server = start(
        "sqlite",
        ServeOptions {
            tokens,
            ..ServeOptions::default()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let url = |team: &str| format!("{}/v8/artifacts/0123abcd?teamId={team}", server.base);
    let status = client
        .get(format!("{}/v8/artifacts/status", server.base))
        .bearer_auth("turbo-token")
        .send()
        .await
        .unwrap();
    assert_eq!(status.text().await.unwrap(), r#"{"status":"enabled"}"#);
    assert_eq!(
        client.get(url("team1")).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let artifact = pattern(150_000);
    let put = client
        .put(url("team1"))
        .bearer_auth("turbo-token")
        .header("x-artifact-duration", "1234")
        .header("x-artifact-tag", "signed-tag")
        .body(artifact.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::ACCEPTED);
    let got = client
        .get(url("team1"))
        .bearer_auth("turbo-token")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.headers()["x-artifact-duration"], "1234");
    assert_eq!(got.headers()["x-artifact-tag"], "signed-tag");
    assert_eq!(got.bytes().await.unwrap().as_ref(), artifact.as_slice());
    // A duration that is not whole milliseconds is refused, and neither it nor the artifact stored;
    // so is a tag too long to keep and send back with every hit, or one that is not visible ASCII.
    let fresh = format!("{}/v8/artifacts/0123abce?teamId=team1", server.base);
    let long_tag = "t".repeat(1025);
    let refusals = ["abc", "-5", "1.5", "", "99999999999999999999999"]
        .map(|d| ("x-artifact-duration", HeaderValue::from_static(d)))
        .into_iter()
        .chain([
            ("x-artifact-tag", HeaderValue::from_str(&long_tag).unwrap()),
            (
                "x-artifact-tag",
                HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
            ),
        ]);
    for (name, value) in refusals {
        let refused = client
            .put(&fresh)
            .bearer_auth("turbo-token")
            .header(name, value.clone())
            .body(artifact.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            refused.status(),
            StatusCode::BAD_REQUEST,
            "{name}: {value:?}"
        );
        let head = client.head(&fresh).bearer_auth("turbo-token").send();
        assert_eq!(head.await.unwrap().status(), StatusCode::NOT_FOUND);
    }
    // The longest tag kept comes back whole.
    let longest = "t".repeat(1024);
    let put = client
        .put(&fresh)
        .bearer_auth("turbo-token")
        .header("x-artifact-tag", &longest)
        .body(artifact.clone())
        .send();
    assert_eq!(put.await.unwrap().status(), StatusCode::ACCEPTED);
    let got = client.get(&fresh).bearer_auth("turbo-token").send();
    assert_eq!(
        got.await.unwrap().headers()["x-artifact-tag"],
        longest.as_str()
    );
    // Another team's namespace does not see it; events are accepted and not kept.
    let other = client
        .head(url("team2"))
        .bearer_auth("turbo-token")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    // A team that is not UTF-8 is refused: decoded, `%FF` and `%FE` would be one team.
    for team in ["%FF", "%FE", "a%0Ab"] {
        let refused = client
            .put(url(team))
            .bearer_auth("turbo-token")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{team}");
    }
    let events = client
        .post(format!("{}/v8/artifacts/events", server.base))
        .bearer_auth("turbo-token")
        .body(r#"[{"source":"REMOTE","event":"HIT","hash":"0123abcd"}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let bad = client
        .get(format!("{}/v8/artifacts/bad.hash", server.base))
        .bearer_auth("turbo-token")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // The query endpoint answers per hash from the rows alone, per team, and stores nothing.
    let query = |team: &str, body: &'static str| {
        client
            .post(format!("{}/v8/artifacts?teamId={team}", server.base))
            .bearer_auth("turbo-token")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let answer = query("team1", r#"{"hashes":["0123abcd","ffff"]}"#)
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({
            "0123abcd": {"size": 150_000, "taskDurationMs": 1234, "tag": "signed-tag"},
            "ffff": {"error": {"message": "Artifact not found"}},
        })
    );
    let elsewhere = query("team2", r#"{"hashes":["0123abcd"]}"#).await.unwrap();
    let elsewhere: serde_json::Value =
        serde_json::from_slice(&elsewhere.bytes().await.unwrap()).unwrap();
    assert_eq!(
        elsewhere["0123abcd"]["error"]["message"],
        "Artifact not found"
    );
    for malformed in [
        r#"{"hashes":"0123abcd"}"#,
        r#"{"hashes":["bad.hash"]}"#,
        "[1,2",
    ] {
        let refused = query("team1", malformed).await.unwrap();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{malformed}");
    }
    let rows = outcache::OutputCacheExt::list_rows(server.cache.backend().as_ref())
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        4,
        "the two artifacts accepted and their metadata only: {rows:?}"
    );
    // Only the API's methods: a POST to an artifact stores nothing.
    let post = client
        .post(url("team3"))
        .bearer_auth("turbo-token")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers()["allow"], "GET, HEAD, PUT");
}

/// A team name is a namespace of its own whatever it holds: team `a/meta` is not where team `a` keeps
/// its artifacts' metadata (so it cannot read or replace another team's signature tags), `a/b` and
/// `a%2Fb` stay apart, and a team named twice in one query is refused rather than one of the two
/// picked (a proxy that checked the first must not let the request act on the second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turbo_team_names_cannot_reach_another_teams_rows() {
    let server = start("fs", writer()).await;
    let client = reqwest::Client::new();
    let url = |query: &str| format!("{}/v8/artifacts/0123abcd?{query}", server.base);
    let put = |query: &str, body: &'static str, tag: &'static str| {
        client
            .put(url(query))
            .header("x-artifact-duration", "77")
            .header("x-artifact-tag", tag)
            .body(body)
            .send()
    };
    assert_eq!(
        put("teamId=a", "team a's artifact", "a-tag")
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    // `a/meta` would be where team `a` keeps what its uploaders said, if teams were spliced in raw.
    for team in ["a%2Fmeta", "a/meta"] {
        let got = client
            .get(url(&format!("teamId={team}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            got.status(),
            StatusCode::NOT_FOUND,
            "{team} sees nothing yet"
        );
    }
    assert_eq!(
        put("teamId=a%2Fmeta", "team a/meta's artifact", "meta-tag")
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    let got = client.get(url("teamId=a")).send().await.unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(
        got.headers()["x-artifact-tag"],
        "a-tag",
        "team a's tag kept"
    );
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"team a's artifact");
    let got = client.get(url("teamId=a%2Fmeta")).send().await.unwrap();
    assert_eq!(got.headers()["x-artifact-tag"], "meta-tag");
    assert_eq!(
        got.bytes().await.unwrap().as_ref(),
        b"team a/meta's artifact"
    );
    // A team spelled with a `%` of its own is yet another team.
    let got = client.get(url("teamId=a%252Fmeta")).send().await.unwrap();
    assert_eq!(got.status(), StatusCode::NOT_FOUND);

    for twice in ["teamId=a&teamId=b", "slug=a&slug=b", "teamId=a&teamId=a"] {
        let refused = put(twice, "x", "t").await.unwrap();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{twice}");
        let refused = client.get(url(twice)).send().await.unwrap();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{twice}");
    }
    let queried = client
        .post(format!("{}/v8/artifacts?teamId=a&teamId=b", server.base))
        .body(r#"{"hashes":["0123abcd"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(queried.status(), StatusCode::BAD_REQUEST);
}

/// An embedder's server runs its janitor schedule (`ServeOptions::janitor`) and stops it with itself:
/// once the `serve` future is dropped, nothing more is pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_schedule_runs_with_the_server_and_stops_with_it() {
    // Zero too: an embedder's zero is "as often as it can", never a panic.
    for every in [
        std::time::Duration::from_millis(50),
        std::time::Duration::ZERO,
    ] {
        schedule_runs_and_stops(every).await;
    }
}

async fn schedule_runs_and_stops(every: std::time::Duration) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&format!("fs://{}", dir.path().display())).unwrap();
    let mut prune = outcache::janitor::PruneOptions::new();
    prune.older_than = Some(std::time::Duration::ZERO);
    let options = ServeOptions {
        janitor: Some(outcache::serve::JanitorSchedule {
            every,
            options: prune,
        }),
        ..writer()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = tokio::spawn(outcache::serve::serve(
        listener,
        cache.clone(),
        options,
        std::future::pending(),
    ));
    let present = |i: u32| {
        let cache = cache.clone();
        async move {
            cache
                .get("t", &serde_json::json!(i))
                .await
                .unwrap()
                .is_some()
        }
    };
    cache
        .put("t", &serde_json::json!(1), &serde_json::json!("old"))
        .await
        .unwrap();
    let mut pruned = false;
    for _ in 0..100 {
        if !present(1).await {
            pruned = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(pruned, "the schedule never pruned");

    server.abort();
    let _ = server.await;
    cache
        .put("t", &serde_json::json!(2), &serde_json::json!("kept"))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(present(2).await, "the janitor outlived its server");
}

/// With a size budget the scheduled janitor's `/metrics` show the budget and the size it left, which
/// is what the cache then holds; without one neither series is shown (not a misleading 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_shows_its_budget_and_the_size_it_left() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&format!("fs://{}", dir.path().display())).unwrap();
    for i in 0..20u32 {
        let filler = "x".repeat(1000 + i as usize);
        cache
            .put("t", &serde_json::json!(i), &serde_json::json!(filler))
            .await
            .unwrap();
    }
    let metrics_with = |budget: Option<u64>| {
        let cache = cache.clone();
        async move {
            let mut prune = outcache::janitor::PruneOptions::new();
            prune.max_size = budget;
            prune.orphans = budget.is_none();
            let options = ServeOptions {
                janitor: Some(outcache::serve::JanitorSchedule {
                    every: std::time::Duration::from_millis(20),
                    options: prune,
                }),
                ..writer()
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let server = tokio::spawn(outcache::serve::serve(
                listener,
                cache,
                options,
                std::future::pending(),
            ));
            let client = reqwest::Client::new();
            let mut text = String::new();
            for _ in 0..200 {
                text = metrics_text(&client, &base).await;
                if !text.contains("outcache_serve_janitor_runs_ok_total 0") {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            server.abort();
            let _ = server.await;
            text
        }
    };
    let gauge = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.parse::<u64>().unwrap())
    };
    let unbudgeted = metrics_with(None).await;
    assert!(
        !unbudgeted.contains("outcache_serve_janitor_runs_ok_total 0"),
        "{unbudgeted}"
    );
    for name in ["max_size_bytes", "size_after_bytes"] {
        let name = format!("outcache_serve_janitor_{name}");
        assert_eq!(gauge(&unbudgeted, &name), None, "{unbudgeted}");
    }
    let budget = 12_000;
    let budgeted = metrics_with(Some(budget)).await;
    assert_eq!(
        gauge(&budgeted, "outcache_serve_janitor_max_size_bytes"),
        Some(budget),
        "{budgeted}"
    );
    let left = gauge(&budgeted, "outcache_serve_janitor_size_after_bytes").expect("no size gauge");
    let inv = outcache::janitor::inventory(cache.backend().as_ref(), 1)
        .await
        .unwrap();
    assert!(left <= budget && left > 0, "{left} bytes left of {budget}");
    assert_eq!(left, inv.row_bytes + inv.blob_bytes + inv.temp_bytes);
}

/// `PROPFIND` of a folder says it exists (what a WebDAV client asks before it writes), with its path
/// escaped in the XML; a key is not described, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propfind_describes_folders_only() {
    let server = start("fs", writer()).await;
    let client = reqwest::Client::new();
    let propfind = reqwest::Method::from_bytes(b"PROPFIND").unwrap();
    let folder = client
        .request(propfind.clone(), format!("{}/a&b/c/", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(folder.status(), StatusCode::MULTI_STATUS);
    let xml = folder.text().await.unwrap();
    assert!(
        xml.contains("<D:href>/a&amp;b/c/</D:href>") && xml.contains("<D:collection/>"),
        "{xml}"
    );
    let key = client
        .request(propfind, format!("{}/a/key", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(key.status(), StatusCode::NOT_FOUND);
    assert_eq!(blobs(&server).await, 0);
    assert!(server.cache.backend().list_rows().await.unwrap().is_empty());
}
