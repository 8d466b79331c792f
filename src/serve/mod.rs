//! `outcache serve`: the cache behind HTTP, for build tools that already speak a remote-cache protocol.
//! Each protocol's key space is a task type and a request's key is the task's input, so the server is
//! the engine with a URL in front: bodies stream in with bounded memory, are published atomically
//! (or not at all) and stream out verified, on any backend.
//!
//! - **Simple key/value** (ccache's `remote_storage = http://…`, sccache/Gradle-style clients):
//!   `GET`/`HEAD`/`PUT`/`DELETE /<any path>`; the path is the key, so ccache's `flat` and `subdirs`
//!   layouts work as they are (task type `http`). sccache's WebDAV storage too: `PROPFIND` of a folder
//!   says it exists, which is all its client asks before a write.
//! - **Bazel HTTP cache**: `/ac/<sha256>` (task type `bazel/ac`) and `/cas/<sha256>` (`bazel/cas`), where
//!   an upload whose bytes do not hash to its key is refused and never stored; under an instance
//!   prefix too (`/<instance>/ac/<sha256>`, a cache of its own). ccache's `bazel` layout lands here
//!   too.
//! - **Turborepo remote cache** (API v8): `GET`/`HEAD`/`PUT /v8/artifacts/:hash` (task type
//!   `turbo/<team>`, from `teamId` or `slug`), with `x-artifact-duration` and `x-artifact-tag` kept and
//!   returned; `POST /v8/artifacts` (what the cache holds of a list of hashes); `GET
//!   /v8/artifacts/status`; `POST /v8/artifacts/events` (accepted, not kept).
//! - Operations: `/healthz` (the process answers); `/readyz` (the cache answers a read, else 503);
//!   `/metrics` in Prometheus text format.
//!
//! Auth: bearer tokens (`Authorization: Bearer T`, or HTTP Basic with the token as password, which is
//! how ccache sends `http://user:T@host/`). With tokens configured every request but `/healthz` and
//! `/readyz` needs one and writes need a read-write one; with none, reads are open and writes are
//! refused unless the operator allows anonymous writes. Tokens are compared by digest and never logged.

/// One line to stderr through [`say`]: never fails, never panics.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::serve::say(format_args!($($arg)*))
    };
}

mod auth;
mod connections;
mod janitor;
mod metrics;
mod offload;
mod turbo;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use auth::{Access, Tokens};
pub use janitor::JanitorSchedule;
pub use metrics::ServeMetrics;
use metrics::{Outcome, Protocol};

use crate::engine::{BlobOptions, Cache};
use crate::error::Error;
use crate::wire::{CacheRef, InlineBinary};

/// Where the server listens by default: loopback only, so opening it to a network is a decision.
pub const DEFAULT_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8080),
);
/// Largest upload accepted by default.
pub const DEFAULT_MAX_BODY: u64 = 4 << 30;
/// How long a client may go without sending (or taking) a byte of a body by default (nginx's
/// `client_body_timeout` and `send_timeout`).
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Connections open at once by default (nginx's `worker_connections` is 512 to 1024): each can hold a
/// transfer's buffers and a file or two, so the cap bounds both memory and file descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// How the server treats its clients.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Who may read and write.
    pub tokens: Tokens,
    /// Accept writes without a token when no tokens are configured.
    pub allow_anonymous_writes: bool,
    /// Largest request body accepted (413 above it, and nothing stored).
    pub max_body: u64,
    /// Longest wait for a client to send the next bytes of an upload, or to take the next bytes of a
    /// download: an upload that stalls longer is answered 408 and stores nothing, a download is cut
    /// off (the connection closed), so a stalled or hostile client cannot hold a connection, a thread
    /// or a temp file for ever. The same limit bounds how long a client may take to send a request's
    /// head, and how long a connection may sit idle between requests. Zero turns the limit off.
    pub idle_timeout: std::time::Duration,
    /// Connections open at once; clients past it wait to be accepted until one closes.
    pub max_connections: usize,
    /// One line per request on stderr: method, path, status, bytes, duration.
    pub access_log: bool,
    /// The janitor on a schedule while serving, its outcomes on `/metrics`.
    pub janitor: Option<JanitorSchedule>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            tokens: Tokens::default(),
            allow_anonymous_writes: false,
            max_body: DEFAULT_MAX_BODY,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            access_log: false,
            janitor: None,
        }
    }
}

#[derive(Clone)]
struct Served {
    cache: Cache,
    options: Arc<ServeOptions>,
    metrics: Arc<ServeMetrics>,
    offload: offload::Offload,
}

/// Transfers from this size up (or of unknown size) get a thread of their own when one is free
/// (`offload`); below it the hand-over would cost more than the overlap gains.
const OFFLOAD_FROM: u64 = 1 << 20;
/// Request-body frames arrive as tens to hundreds of KiB and are copied into pieces of this size
/// before they cross to the thread storing them: the two then wake each other once a MiB, not per
/// frame, and hyper gets its read buffer back at once and reads into memory already warm (holding its
/// frames instead, to spare the copy, measured slower: every read then lands in fresh memory).
const UPLOAD_GATHER: usize = 1 << 20;
/// Gathered pieces queued between the connection's task and the thread storing them.
const UPLOAD_QUEUE_FRAMES: usize = 2;
/// Buffers an upload gathers into in turn: more than the pieces it can have in flight (this queue, the
/// backend's writer queue, one being hashed, one being written), so a buffer is free when it comes round.
const GATHER_BUFFERS: usize = 8;

/// The server's routes over `cache`, with its metrics (for an embedding server, and for tests).
pub fn router(cache: Cache, options: ServeOptions) -> (Router, Arc<ServeMetrics>) {
    let metrics = Arc::new(ServeMetrics::default());
    let state = Served {
        cache,
        options: Arc::new(options),
        metrics: metrics.clone(),
        offload: offload::Offload::default(),
    };
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/ac/{digest}", any(bazel_ac))
        .route("/cas/{digest}", any(bazel_cas))
        .route("/v8/artifacts", any(turbo::query))
        .route("/v8/artifacts/status", get(turbo::status))
        .route("/v8/artifacts/events", any(turbo::events))
        .route("/v8/artifacts/{hash}", any(turbo::artifact))
        .route("/{*key}", any(key_value))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            log_and_count,
        ))
        .with_state(state);
    (router, metrics)
}

/// Serve `cache` on `listener` until `shutdown` resolves; requests in flight (uploads included) finish
/// first, and a new upload started after the signal is not accepted. Dropping the future drops every
/// connection (an upload cut off that way stores nothing).
pub async fn serve(
    listener: tokio::net::TcpListener,
    cache: Cache,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> crate::Result<()> {
    let limits = connections::Limits {
        idle: options.idle_timeout,
        max_connections: options.max_connections,
    };
    let schedule = options.janitor.clone();
    let backend = cache.backend().clone();
    let (router, metrics) = router(cache, options);
    // Stopped with the server, however it stops (its future dropped too).
    let _janitor = schedule.map(|schedule| {
        let stopped = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(janitor::run(backend, schedule, metrics, stopped.clone()));
        StopOnDrop { task, stopped }
    });
    connections::run(listener, router, limits, shutdown)
        .await
        .map_err(|e| Error::io("serve", "listener", e))
}

/// Stops the janitor's task when dropped. An abort alone takes effect only when the task next waits,
/// and back-to-back prunes whose I/O completes at once (a short period, a small fs cache) may not wait
/// for many runs: the flag keeps any further run from starting once the server is gone.
struct StopOnDrop {
    task: tokio::task::JoinHandle<()>,
    stopped: Arc<AtomicBool>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        self.task.abort();
    }
}

/// How long `/readyz` waits for the cache to answer.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// `/readyz`: 200 once a read of one row reaches the cache (a miss is an answer), 503 if it fails or
/// takes longer than [`READY_WITHIN`]; so a load balancer stops sending requests to a server whose
/// backend it cannot reach (`/healthz` only says the process answers). Like `/healthz` it needs no
/// token: it tells nothing about what is stored. It goes to the backend directly, so probes do not
/// show as misses in the engine's counters.
async fn readyz(State(state): State<Served>) -> Response {
    let probe = async {
        let key = crate::wire::RowKey::new("outcache/readyz", &json!("probe"))?;
        state.cache.backend().get_row(&key).await
    };
    match tokio::time::timeout(READY_WITHIN, probe).await {
        Ok(Ok(_)) => "ready\n".into_response(),
        Ok(Err(e)) => {
            failed(format_args!("not ready: {e}"));
            status(
                StatusCode::SERVICE_UNAVAILABLE,
                "the cache cannot be read; see the server log",
            )
        }
        Err(_) => status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the cache did not answer within {READY_WITHIN:?}"),
        ),
    }
}

async fn metrics_text(State(state): State<Served>) -> Response {
    let mut text = state.metrics.prometheus();
    text.push_str(&state.cache.metrics().prometheus());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response()
}

/// One access-log line per request (never its headers: they carry tokens), and the in-flight gauge.
async fn log_and_count(
    State(state): State<Served>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let (method, path) = (request.method().clone(), loggable(request.uri().path()));
    let in_flight = state.metrics.start();
    let (request, body_read) = watch_body(request);
    let mut response = next.run(request).await;
    if !body_read.load(Ordering::Acquire) {
        // Answered before the body was read to its end (a refusal, a cut-off upload): hyper then
        // closes the connection rather than read the rest, so say so, or a client that keeps the
        // connection for its next request finds it closed under that request.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if state.options.access_log {
        let size = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        say!(
            "{method} {path} {} {size} {:.1}ms",
            response.status().as_u16(),
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    response.map(|body| {
        Body::new(Tracked {
            body,
            tracker: in_flight,
        })
    })
}

/// `request` with its body watched, and a flag set once the body has been read to its end (at once
/// if it has none).
fn watch_body(request: Request) -> (Request, Arc<AtomicBool>) {
    let (parts, body) = request.into_parts();
    let read = Arc::new(AtomicBool::new(http_body::Body::is_end_stream(&body)));
    let watched = Tracked {
        body,
        tracker: read.clone(),
    };
    (Request::from_parts(parts, Body::new(watched)), read)
}

/// Longest path an access-log line shows: a key may be 1 KiB and a refused path far longer, and
/// one request should not make a line an operator's log tools choke on.
const LOGGED_PATH: usize = 200;

/// `path` as the access log shows it: whole up to [`LOGGED_PATH`] bytes, else its start and its length.
fn loggable(path: &str) -> String {
    if path.len() <= LOGGED_PATH {
        return path.to_owned();
    }
    let mut end = LOGGED_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &path[..end], path.len())
}

/// A body passed through unchanged, with a tracker along: a guard held until the body is dropped (a
/// response keeps its request counted as in flight until its body is done with), or a flag told when
/// the body ends (a request's, read to its end).
struct Tracked<T> {
    body: Body,
    tracker: T,
}

trait Tracker: Send + Unpin + 'static {
    /// The body has ended.
    fn ended(&self) {}
}

impl Tracker for metrics::InFlight {}

impl Tracker for Arc<AtomicBool> {
    fn ended(&self) {
        self.store(true, Ordering::Release);
    }
}

impl<T: Tracker> http_body::Body for Tracked<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.body.is_end_stream() {
            self.tracker.ended();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn status(code: StatusCode, text: impl Into<String>) -> Response {
    (code, format!("{}\n", text.into())).into_response()
}

/// 405 for a method the route does not take, with the `Allow` header RFC 9110 asks for.
fn not_allowed(allow: &'static str) -> Response {
    let mut response = status(StatusCode::METHOD_NOT_ALLOWED, format!("allowed: {allow}"));
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// The response for a request `access` does not allow for `method` (401 without a token, 403 with one).
fn check(state: &Served, headers: &HeaderMap, method: &Method) -> Option<Response> {
    let access = state.options.tokens.access(headers);
    let writes = !matches!(*method, Method::GET | Method::HEAD);
    let allowed = match access {
        Access::ReadWrite => true,
        Access::ReadOnly => !writes,
        Access::Anonymous if state.options.tokens.is_empty() => {
            !writes || state.options.allow_anonymous_writes
        }
        Access::Anonymous | Access::Denied => false,
    };
    if allowed {
        return None;
    }
    Some(match access {
        Access::ReadOnly => status(StatusCode::FORBIDDEN, "a read-only token cannot write"),
        Access::Denied => status(StatusCode::UNAUTHORIZED, "unknown token"),
        _ if state.options.tokens.is_empty() => status(
            StatusCode::FORBIDDEN,
            "writes need a token (the server allows no anonymous writes)",
        ),
        _ => {
            let mut r = status(StatusCode::UNAUTHORIZED, "a token is needed");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer, Basic realm=\"outcache\""),
            );
            r
        }
    })
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn bazel_ac(
    State(state): State<Served>,
    Path(digest): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    bazel(&state, None, false, &digest, method, &headers, body).await
}

async fn bazel_cas(
    State(state): State<Served>,
    Path(digest): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    bazel(&state, None, true, &digest, method, &headers, body).await
}

/// A Bazel path under an instance prefix, as `--remote_cache=http://host/INSTANCE` sends it:
/// `INSTANCE/ac/<digest>` or `INSTANCE/cas/<digest>` gives `(INSTANCE, cas, digest)`.
fn bazel_instance_path(key: &str) -> Option<(&str, bool, &str)> {
    let (rest, digest) = key.rsplit_once('/')?;
    let (instance, store) = rest.rsplit_once('/')?;
    let cas = match store {
        "ac" => false,
        "cas" => true,
        _ => return None,
    };
    (!instance.is_empty() && is_sha256_hex(digest)).then_some((instance, cas, digest))
}

/// The action cache (`cas: false`: any bytes under a digest key) or the content-addressed store
/// (`cas: true`: an upload must hash to its key).
async fn bazel(
    state: &Served,
    instance: Option<&str>,
    cas: bool,
    digest: &str,
    method: Method,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    if !is_sha256_hex(digest) {
        return status(StatusCode::BAD_REQUEST, "the key must be 64 hex digits");
    }
    let digest = digest.to_ascii_lowercase();
    // Each instance prefix is a cache of its own (`linux/ac/D` is not `ac/D`); no prefix keeps the
    // key entries were stored under before prefixes were told apart.
    let key = match instance {
        Some(instance) => json!({ "digest": digest, "instance": instance }),
        None => json!({ "digest": digest }),
    };
    let (protocol, task) = if cas {
        (Protocol::BazelCas, "bazel/cas")
    } else {
        (Protocol::BazelAc, "bazel/ac")
    };
    let expect = cas.then_some(digest);
    handle(state, protocol, task, key, method, headers, body, expect).await
}

async fn key_value(
    State(state): State<Served>,
    Path(key): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if key.is_empty() || key.len() > 1024 || key.split('/').any(|p| p == ".." || p == ".") {
        return status(
            StatusCode::BAD_REQUEST,
            "a key is a path of 1 to 1024 bytes without . or .. segments",
        );
    }
    if let Some((instance, cas, digest)) = bazel_instance_path(&key) {
        // Bazel's under a prefix: its CAS uploads are checked against their digest like the others.
        return bazel(&state, Some(instance), cas, digest, method, &headers, body).await;
    }
    if method.as_str() == "PROPFIND" {
        if let Some(refused) = check(&state, &headers, &Method::GET) {
            return refused;
        }
        return collection(&key);
    }
    let key = json!({ "key": key });
    handle(
        &state,
        Protocol::KeyValue,
        "http",
        key,
        method,
        &headers,
        body,
        None,
    )
    .await
}

/// WebDAV's `PROPFIND` (RFC 4918), as far as a WebDAV client that stores files needs it (opendal's,
/// which sccache uses, stats a file's folder before it writes, and makes the folder if it is
/// missing): every path ending in `/` is a folder that exists, since any prefix of a key is one; a
/// key itself is not described (404). Its `MKCOL` then gets a 405, "exists" in RFC 4918.
fn collection(key: &str) -> Response {
    if !key.ends_with('/') {
        return status(
            StatusCode::NOT_FOUND,
            "only folders (paths ending in /) are described",
        );
    }
    let href: String = format!("/{key}")
        .chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            c => c.to_string(),
        })
        .collect();
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<D:multistatus xmlns:D=\"DAV:\"><D:response>\
         <D:href>{href}</D:href><D:propstat><D:prop>\
         <D:getlastmodified>Thu, 01 Jan 1970 00:00:00 GMT</D:getlastmodified>\
         <D:resourcetype><D:collection/></D:resourcetype></D:prop>\
         <D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response></D:multistatus>\n"
    );
    (
        StatusCode::MULTI_STATUS,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml; charset=utf-8"),
        )],
        xml,
    )
        .into_response()
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    state: &Served,
    protocol: Protocol,
    task: &str,
    inputs: Value,
    method: Method,
    headers: &HeaderMap,
    body: Body,
    expect_sha256: Option<String>,
) -> Response {
    if let Some(refused) = check(state, headers, &method) {
        return refused;
    }
    match method {
        Method::GET | Method::HEAD => {
            fetch(state, protocol, task, &inputs, method == Method::HEAD).await
        }
        Method::PUT | Method::POST => {
            store(state, protocol, task, &inputs, headers, body, expect_sha256).await
        }
        Method::DELETE if protocol == Protocol::KeyValue => {
            match state.cache.delete(task, &inputs).await {
                Ok(true) => StatusCode::NO_CONTENT.into_response(),
                Ok(false) => status(StatusCode::NOT_FOUND, "no such key"),
                Err(e) => backend_error(state, protocol, &e),
            }
        }
        _ if protocol == Protocol::KeyValue => not_allowed("GET, HEAD, PUT, POST, DELETE"),
        _ => not_allowed("GET, HEAD, PUT, POST"),
    }
}

/// Writes `line` and a newline to stderr, ignoring a failed write. The server's log and messages go
/// there; a reader that went away (`outcache serve 2>&1 | logger` with the logger gone: a closed pipe)
/// or a full disk under a redirected log must not fail a request, as `eprintln!` would by panicking
/// in its handler.
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Says on stderr (logging is off unless asked for) and to `tracing` that something of the server's
/// failed: an operator sees every failure without turning logging on.
fn failed(what: std::fmt::Arguments<'_>) {
    tracing::error!(target: "outcache::serve", "{what}");
    say!("outcache serve: {what}");
}

fn backend_error(state: &Served, protocol: Protocol, e: &Error) -> Response {
    state.metrics.count(protocol, Outcome::Error, 0);
    failed(format_args!("{e}"));
    if e.is_out_of_space() {
        // Nothing was stored (a write that fails publishes nothing); the client may retry elsewhere.
        return status(
            StatusCode::INSUFFICIENT_STORAGE,
            "the cache is out of space; nothing stored",
        );
    }
    status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the cache failed; see the server log",
    )
}

/// A hit streams its bytes (verified on the way out: a blob that fails verification ends the body early,
/// so a client that was told its length never takes a short body for the whole); a miss is 404.
async fn fetch(
    state: &Served,
    protocol: Protocol,
    task: &str,
    inputs: &Value,
    head: bool,
) -> Response {
    let value = match state.cache.get(task, inputs).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            state.metrics.count(protocol, Outcome::Miss, 0);
            return status(StatusCode::NOT_FOUND, "miss");
        }
        Err(e) => return backend_error(state, protocol, &e),
    };
    let octets = HeaderValue::from_static("application/octet-stream");
    if let Some(r) = CacheRef::from_value(&value) {
        let size = r.size.unwrap_or(0);
        if head {
            state.metrics.count(protocol, Outcome::Hit, 0);
            return (
                [
                    (header::CONTENT_TYPE, octets),
                    (header::CONTENT_LENGTH, size.into()),
                ],
                (),
            )
                .into_response();
        }
        let big = r.size.is_none_or(|n| n >= OFFLOAD_FROM);
        return match state.cache.open_stream(&r).await {
            Ok(Some(stream)) => {
                state.metrics.count(protocol, Outcome::Hit, 0);
                let counted = state.metrics.clone();
                let (metrics, reference) = (state.metrics.clone(), r.reference.clone());
                let broke_off = move |why: BrokeOff| match why {
                    BrokeOff::Failed(e) => {
                        metrics.count(protocol, Outcome::Error, 0);
                        failed(format_args!("download of {reference} cut off: {e}"));
                    }
                    BrokeOff::Stalled(idle) => say!(
                        "outcache serve: download of {reference} cut off: the client took nothing for {idle:?}"
                    ),
                };
                let body = Body::from_stream(
                    hold_last(run_ahead(
                        stream,
                        big.then(|| state.offload.try_place()).flatten(),
                        state.options.idle_timeout,
                        broke_off,
                    ))
                    .map(move |c| {
                        if let Ok(chunk) = &c {
                            counted.sent(protocol, chunk.len() as u64);
                        }
                        c.map_err(std::io::Error::other)
                    }),
                );
                (
                    [
                        (header::CONTENT_TYPE, octets),
                        (header::CONTENT_LENGTH, size.into()),
                    ],
                    body,
                )
                    .into_response()
            }
            Ok(None) => {
                state.metrics.count(protocol, Outcome::Miss, 0);
                status(StatusCode::NOT_FOUND, "miss")
            }
            Err(e) => backend_error(state, protocol, &e),
        };
    }
    match InlineBinary::decode(&value) {
        Ok(Some(inline)) => {
            let size = inline.bytes.len() as u64;
            state
                .metrics
                .count(protocol, Outcome::Hit, if head { 0 } else { size });
            let body = if head {
                Body::empty()
            } else {
                Body::from(inline.bytes)
            };
            (
                [
                    (header::CONTENT_TYPE, octets),
                    (header::CONTENT_LENGTH, size.into()),
                ],
                body,
            )
                .into_response()
        }
        Ok(None) => backend_error(
            state,
            protocol,
            &Error::InvalidInput {
                what: format!("the {task} entry"),
                reason: "holds JSON, not bytes (written by something other than the server)".into(),
            },
        ),
        Err(e) => backend_error(state, protocol, &e),
    }
}

/// Feeds `body` to the thread storing it, gathered into pieces of [`UPLOAD_GATHER`]; finishes the
/// handover only when the whole body arrived (and, given `expect_sha256`, hashes to it), so a cut-off
/// upload is never stored short and a wrong one never stored at all.
async fn pump(
    body: impl futures::Stream<Item = crate::Result<Bytes>> + Send,
    tx: offload::Handover,
    expect_sha256: Option<String>,
    refusal: &std::sync::Mutex<Option<Refusal>>,
) {
    let mut body = std::pin::pin!(body);
    let mut buffers = GatherBuffers::default();
    let mut gathered = buffers.next();
    let mut hasher = expect_sha256.as_ref().map(|_| Sha256::new());
    while let Some(frame) = body.next().await {
        let bytes = match frame {
            Ok(bytes) => bytes,
            Err(e) => {
                tx.send(Err(e)).await;
                return;
            }
        };
        if let Some(h) = hasher.as_mut() {
            h.update(&bytes);
        }
        gathered.extend_from_slice(&bytes);
        if gathered.len() < UPLOAD_GATHER {
            continue;
        }
        if !tx.send(Ok(buffers.give_back(&mut gathered))).await {
            return; // the put stopped; its error says why
        }
        gathered = buffers.next();
    }
    if !gathered.is_empty() && !tx.send(Ok(buffers.give_back(&mut gathered))).await {
        return;
    }
    if let (Some(h), Some(expect)) = (hasher, expect_sha256) {
        if crate::wire::hex(&h.finalize()) != expect {
            // Refused before the put sees the end: its write fails and publishes nothing.
            refuse(refusal, Refusal::WrongDigest);
            let wrong = std::io::Error::other("the body does not hash to its key");
            tx.send(Err(Error::stream(wrong))).await;
            return;
        }
    }
    tx.finish().await;
}

/// The buffers one upload gathers its frames into, taken in turn: by the time a buffer comes round
/// again its piece has usually been written and dropped, and `reserve` then reuses its memory (already
/// faulted in) instead of allocating fresh pages, which cost as much as the copy.
struct GatherBuffers(std::collections::VecDeque<BytesMut>);

impl Default for GatherBuffers {
    fn default() -> Self {
        GatherBuffers((0..GATHER_BUFFERS).map(|_| BytesMut::new()).collect())
    }
}

impl GatherBuffers {
    /// The oldest buffer, empty, with room for a piece.
    fn next(&mut self) -> BytesMut {
        let mut buf = self.0.pop_front().unwrap_or_default();
        buf.clear();
        buf.reserve(UPLOAD_GATHER);
        buf
    }

    /// The bytes gathered in `buf`, as a piece; the buffer goes to the back of the line.
    fn give_back(&mut self, buf: &mut BytesMut) -> Bytes {
        let piece = buf.split().freeze();
        self.0.push_back(std::mem::take(buf));
        piece
    }
}

/// Why an upload's own stream stopped it (set by the stream, read after the put failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    TooLarge,
    WrongDigest,
    Aborted,
    Stalled,
}

/// Record `why` an upload is refused, unless an earlier reason was (the first cause wins: a stall
/// also ends the stream as an abort would).
fn refuse(refusal: &std::sync::Mutex<Option<Refusal>>, why: Refusal) {
    refusal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert(why);
}

/// `work`, given up after `idle` (never, if `idle` is zero: `--idle-timeout 0` turns the limit off).
async fn within<T>(
    idle: std::time::Duration,
    work: impl std::future::Future<Output = T>,
) -> std::result::Result<T, tokio::time::error::Elapsed> {
    if idle.is_zero() {
        return Ok(work.await);
    }
    tokio::time::timeout(idle, work).await
}

/// The request body's frames, ending with an error (and [`Refusal::Stalled`]) when the client sends
/// nothing for `idle`.
fn idle_limited(
    body: Body,
    idle: std::time::Duration,
    refusal: Arc<std::sync::Mutex<Option<Refusal>>>,
) -> impl futures::Stream<Item = crate::Result<Bytes>> + Send + 'static {
    futures::stream::unfold(Some(body.into_data_stream()), move |frames| {
        let refusal = refusal.clone();
        async move {
            let mut frames = frames?;
            match within(idle, frames.next()).await {
                Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(frames))),
                Ok(Some(Err(e))) => Some((Err(Error::stream(e)), None)),
                Ok(None) => None,
                Err(_) => {
                    refuse(&refusal, Refusal::Stalled);
                    let stalled = format!("no bytes of the body for {idle:?}");
                    Some((Err(Error::stream(std::io::Error::other(stalled))), None))
                }
            }
        }
    })
}

async fn store(
    state: &Served,
    protocol: Protocol,
    task: &str,
    inputs: &Value,
    headers: &HeaderMap,
    body: Body,
    expect_sha256: Option<String>,
) -> Response {
    let max = state.options.max_body;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("bodies are limited to {max} bytes"),
        );
    }
    let refusal = Arc::new(std::sync::Mutex::new(None::<Refusal>));
    let body = idle_limited(body, state.options.idle_timeout, refusal.clone());
    if let Some(digest) = expect_sha256.as_deref() {
        if holds_whole(state, task, inputs, digest).await {
            // Checked as an upload is, and acknowledged, but not written: a second blob would only
            // become an orphan, filling the disk for the grace period (and, under --max-size, pushing
            // live entries out) for bytes the cache already holds.
            let (stream, received) = checked_body(body, max, expect_sha256, refusal.clone());
            let drained = crate::blob::drain(stream).await;
            return answer_upload(state, protocol, drained, &received, &refusal);
        }
    }
    // A big upload is hashed and written on a thread of its own, fed through a short queue by this
    // (the connection's) task, which then only reads the socket (see `offload`).
    let place = declared
        .is_none_or(|n| n >= OFFLOAD_FROM)
        .then(|| state.offload.try_place())
        .flatten();
    let put = |stream| {
        let (cache, task, inputs) = (state.cache.clone(), task.to_owned(), inputs.clone());
        async move {
            cache
                .put_stream(&task, &inputs, stream, BlobOptions::default())
                .await
        }
    };
    let (stored, received) = match place {
        Some(place) => {
            let (tx, pieces) = offload::handover(UPLOAD_QUEUE_FRAMES);
            // The digest is checked here, on the connection's task, while the upload's thread hashes
            // the same bytes for the ref: the two hashes overlap instead of taking turns on one core.
            let (stream, received) = checked_body(pieces, max, None, refusal.clone());
            let pumped = pump(body, tx, expect_sha256, &refusal);
            let ((), stored) = tokio::join!(pumped, offload::run_on(place, put(stream)));
            let stored = stored.unwrap_or_else(|| {
                Err(Error::stream(std::io::Error::other(
                    "the upload's thread panicked",
                )))
            });
            (stored, received)
        }
        None => {
            let (stream, received) = checked_body(body, max, expect_sha256, refusal.clone());
            (put(stream).await, received)
        }
    };
    answer_upload(state, protocol, stored.map(drop), &received, &refusal)
}

/// Whether the content-addressed entry `inputs` of `task` is stored and its bytes, read back whole,
/// hash to `digest`. Read in full rather than trusted from the ref: a blob damaged on disk is then not
/// kept for ever by every re-upload of it being acknowledged, but replaced by the next one.
async fn holds_whole(state: &Served, task: &str, inputs: &Value, digest: &str) -> bool {
    let Ok(Some(value)) = state.cache.get(task, inputs).await else {
        return false;
    };
    if let Some(r) = CacheRef::from_value(&value) {
        if r.sha256.as_deref() != Some(digest) {
            return false;
        }
        let Ok(Some(stream)) = state.cache.open_stream(&r).await else {
            return false;
        };
        // The stream fails at its end if the bytes do not hash to the ref's sha256 (the digest).
        return match crate::blob::drain(stream).await {
            Ok(()) => true,
            Err(e) => {
                failed(format_args!(
                    "the held {task} entry {digest} failed its read-back, so the upload replaces it: {e}"
                ));
                false
            }
        };
    }
    matches!(InlineBinary::decode(&value), Ok(Some(inline)) if crate::wire::sha256_hex(&inline.bytes) == digest)
}

/// The answer to an upload that was stored (or, already held, taken whole) or failed.
fn answer_upload(
    state: &Served,
    protocol: Protocol,
    stored: crate::Result<()>,
    received: &std::sync::atomic::AtomicU64,
    refusal: &std::sync::Mutex<Option<Refusal>>,
) -> Response {
    let max = state.options.max_body;
    match stored {
        Ok(()) => {
            let n = received.load(std::sync::atomic::Ordering::SeqCst);
            state.metrics.count(protocol, Outcome::Stored, n);
            StatusCode::OK.into_response()
        }
        Err(e) => {
            let why = *refusal.lock().unwrap_or_else(|p| p.into_inner());
            match why {
                Some(Refusal::TooLarge) => {
                    state.metrics.count(protocol, Outcome::Refused, 0);
                    status(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("bodies are limited to {max} bytes"),
                    )
                }
                Some(Refusal::WrongDigest) => {
                    state.metrics.count(protocol, Outcome::Refused, 0);
                    status(
                        StatusCode::BAD_REQUEST,
                        "the body does not hash to its key; nothing stored",
                    )
                }
                Some(Refusal::Aborted) => {
                    state.metrics.count(protocol, Outcome::Refused, 0);
                    status(
                        StatusCode::BAD_REQUEST,
                        "the upload was cut off; nothing stored",
                    )
                }
                Some(Refusal::Stalled) => {
                    state.metrics.count(protocol, Outcome::Refused, 0);
                    let idle = state.options.idle_timeout;
                    status(
                        StatusCode::REQUEST_TIMEOUT,
                        format!("no bytes of the body for {idle:?}; nothing stored"),
                    )
                }
                None => backend_error(state, protocol, &e),
            }
        }
    }
}

/// The request body as a byte stream that fails (recording why) past `max` bytes, on a digest other
/// than `expect_sha256` at its end, or when the client's upload breaks off; and a counter of the bytes
/// taken.
fn checked_body<E>(
    frames: impl futures::Stream<Item = std::result::Result<Bytes, E>> + Send + 'static,
    max: u64,
    expect_sha256: Option<String>,
    refusal: Arc<std::sync::Mutex<Option<Refusal>>>,
) -> (crate::ByteStream, Arc<std::sync::atomic::AtomicU64>) {
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = received.clone();
    struct Taking<S> {
        inner: S,
        hasher: Option<Sha256>,
        expect: Option<String>,
        total: u64,
        done: bool,
    }
    let start = Taking {
        inner: Box::pin(frames),
        hasher: expect_sha256.as_ref().map(|_| Sha256::new()),
        expect: expect_sha256,
        total: 0,
        done: false,
    };
    let refuse = move |why: Refusal, refusal: &Arc<std::sync::Mutex<Option<Refusal>>>| {
        refuse(refusal, why);
        Error::stream(std::io::Error::other(format!("{why:?}")))
    };
    let stream = futures::stream::try_unfold(start, move |mut s| {
        let (refusal, counter) = (refusal.clone(), counter.clone());
        async move {
            if s.done {
                return Ok(None);
            }
            match s.inner.next().await {
                Some(Ok(chunk)) => {
                    s.total += chunk.len() as u64;
                    if s.total > max {
                        return Err(refuse(Refusal::TooLarge, &refusal));
                    }
                    if let Some(h) = s.hasher.as_mut() {
                        h.update(&chunk);
                    }
                    counter.store(s.total, std::sync::atomic::Ordering::SeqCst);
                    Ok(Some((chunk, s)))
                }
                Some(Err(_)) => Err(refuse(Refusal::Aborted, &refusal)),
                None => {
                    if let (Some(h), Some(expect)) = (s.hasher.take(), s.expect.as_deref()) {
                        if crate::wire::hex(&h.finalize()) != expect {
                            return Err(refuse(Refusal::WrongDigest, &refusal));
                        }
                    }
                    s.done = true;
                    Ok(Some((Bytes::new(), s)))
                }
            }
        }
    })
    .filter(|c| futures::future::ready(!matches!(c, Ok(b) if b.is_empty())));
    (stream.boxed(), received)
}

/// Why a download's body ended before its length.
enum BrokeOff {
    /// Reading or verifying the blob failed (the cache's fault).
    Failed(String),
    /// The client took nothing for this long.
    Stalled(std::time::Duration),
}

/// Chunks of `stream` in flight between its producer and its consumer.
const RUN_AHEAD_CHUNKS: usize = 2;

/// `stream` driven a few chunks ahead of whoever reads the result, by a thread of its own when given a
/// `place` (else by a task of its own): the work behind each chunk (reading and verifying a blob) then
/// runs on one core while the consumer's (sending it) runs on another, instead of taking turns. Dropping
/// the result stops the driver, at its next chunk, and drops `stream`; so does a consumer that takes
/// nothing for `idle`.
fn run_ahead(
    mut stream: crate::ByteStream,
    place: Option<tokio::sync::OwnedSemaphorePermit>,
    idle: std::time::Duration,
    broke_off: impl FnOnce(BrokeOff) + Send + 'static,
) -> crate::ByteStream {
    let (tx, ahead) = offload::handover(RUN_AHEAD_CHUNKS);
    let drive = async move {
        while let Some(item) = stream.next().await {
            let failure = item.as_ref().err().map(ToString::to_string);
            // A client that takes nothing for `idle` is let go: the body ends with an error (the
            // connection is closed, never a short body passed off as whole) and the reader stops.
            match within(idle, tx.send(item)).await {
                Ok(true) => {}
                Ok(false) => return, // the client went away: nothing of ours failed
                Err(_) => return broke_off(BrokeOff::Stalled(idle)),
            }
            if let Some(e) = failure {
                return broke_off(BrokeOff::Failed(e));
            }
        }
        tx.finish().await;
    };
    match place {
        Some(place) => drop(offload::on_thread(place, drive)),
        None => drop(tokio::spawn(drive)),
    }
    ahead
}

/// `stream` with each chunk held back until the next one arrives or the stream ends cleanly: the
/// engine's verification fails *after* a blob's last chunk, so the chunk that completes the body is
/// sent only once the whole blob is verified, and a client never receives all the bytes it was promised
/// of a blob that failed.
fn hold_last(stream: crate::ByteStream) -> crate::ByteStream {
    futures::stream::try_unfold((stream, None::<Bytes>), |(mut inner, held)| async move {
        match inner.next().await {
            // The first chunk goes out as an empty one (filtered below), the rest one step late.
            Some(Ok(chunk)) => Ok(Some((held.unwrap_or_default(), (inner, Some(chunk))))),
            Some(Err(e)) => Err(e),
            None => Ok(held.map(|last| (last, (inner, None)))),
        }
    })
    .filter(|c| futures::future::ready(!matches!(c, Ok(b) if b.is_empty())))
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_cut_short_in_the_access_log() {
        assert_eq!(loggable("/ac/abc"), "/ac/abc");
        let long = format!("/{}", "k".repeat(10_000));
        let logged = loggable(&long);
        assert!(logged.len() < LOGGED_PATH + 30, "{logged}");
        assert!(logged.ends_with("…(10001 bytes)"), "{logged}");
        let wide = "é".repeat(300); // never cut inside a character
        assert!(loggable(&wide).starts_with(&"é".repeat(100)));
    }

    #[tokio::test]
    async fn an_idle_limit_of_zero_waits_as_long_as_it_takes() {
        let slow = tokio::time::sleep(std::time::Duration::from_millis(50));
        assert!(within(std::time::Duration::ZERO, slow).await.is_ok());
        let slower = tokio::time::sleep(std::time::Duration::from_secs(5));
        assert!(
            within(std::time::Duration::from_millis(10), slower)
                .await
                .is_err()
        );
    }
}
