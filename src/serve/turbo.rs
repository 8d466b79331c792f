//! The Turborepo remote cache API (v8), as `turbo` speaks it with `TURBO_API`, `TURBO_TOKEN` and
//! `TURBO_TEAM`: artifacts by hash per team, with the duration and signature tag the client sends
//! kept beside them (a small sidecar row) and returned on a hit.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::metrics::Protocol;
use super::{Served, check, handle, not_allowed, status as reply};

const DURATION: &str = "x-artifact-duration";
const TAG: &str = "x-artifact-tag";
/// The longest `x-artifact-tag` kept. turbo's is a base64 HMAC (44 bytes); the tag is stored with the
/// artifact and sent back with every hit, so a huge one would bloat the row and break clients that
/// cap a header line (64 KiB in some).
const MAX_TAG_BYTES: usize = 1024;

/// A request's query, as given: pairs in order, a name repeated as often as it was sent.
type QueryPairs = Vec<(String, String)>;

/// The task type of a team's artifacts (`None` for a malformed team): `teamId` and `slug` are separate
/// namespaces (a client that switches between them sees two caches).
///
/// Refused: a team that is too long, holds control characters or bytes that are not UTF-8, or is named
/// twice (`teamId=a&teamId=b`: a proxy that checked one of them must not see the request act on the
/// other). The team is escaped into the task type (`%` and `/`), so that no team's name reaches
/// another's rows: unescaped, team `a/meta` would read and replace team `a`'s artifact metadata.
fn team_task(query: &[(String, String)]) -> Option<String> {
    let named = |name: &str| {
        let mut given = query.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
        match (given.next(), given.next()) {
            (_, Some(_)) => Err(()),
            (one, None) => Ok(one),
        }
    };
    let (kind, team) = match (named("teamId").ok()?, named("slug").ok()?) {
        (Some(id), _) => ("id", id.as_str()),
        (None, Some(slug)) => ("slug", slug.as_str()),
        (None, None) => ("none", ""),
    };
    // U+FFFD is what the query's decoding makes of bytes that are not UTF-8: `%FF` and `%FE` would
    // otherwise both name the team "\u{FFFD}" and share its artifacts.
    if team.len() > 256 || team.chars().any(|c| c.is_control() || c == '\u{FFFD}') {
        return None;
    }
    let team = team.replace('%', "%25").replace('/', "%2F");
    Some(format!("turbo/{kind}/{team}"))
}

fn json_reply(code: StatusCode, value: &Value) -> Response {
    let content_type = HeaderValue::from_static("application/json");
    (
        code,
        [(axum::http::header::CONTENT_TYPE, content_type)],
        value.to_string(),
    )
        .into_response()
}

/// What [`valid_hash`] allows, as a refusal says it.
const HASH_RULE: &str = "a hash is 1 to 128 of [A-Za-z0-9_-]";

fn valid_hash(hash: &str) -> bool {
    !hash.is_empty()
        && hash.len() <= 128
        && hash
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `GET /v8/artifacts/status`: caching is enabled (for any client allowed to read).
pub(super) async fn status(State(state): State<Served>, headers: HeaderMap) -> Response {
    if let Some(refused) = check(&state, &headers, &Method::GET) {
        return refused;
    }
    json_reply(StatusCode::OK, &json!({ "status": "enabled" }))
}

/// `POST /v8/artifacts/events`: usage events, accepted and not kept (bounded: the body is not read).
pub(super) async fn events(State(state): State<Served>, headers: HeaderMap) -> Response {
    if let Some(refused) = check(&state, &headers, &Method::GET) {
        return refused;
    }
    StatusCode::OK.into_response()
}

/// Most hashes one query may ask about, and the largest query body.
const QUERY_HASHES: usize = 1000;
const QUERY_BODY: usize = 256 << 10;

/// `POST /v8/artifacts` with `{"hashes": [...]}`: for each hash, its size, the task duration its
/// uploader reported and its tag, or `{"error": {"message": …}}` for one not in the cache (as
/// Vercel's API answers). Reads rows only, never a blob.
pub(super) async fn query(
    State(state): State<Served>,
    Query(params): Query<QueryPairs>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method != Method::POST {
        return not_allowed("POST");
    }
    if let Some(refused) = check(&state, &headers, &Method::GET) {
        return refused;
    }
    let Some(task) = team_task(&params) else {
        return reply(StatusCode::BAD_REQUEST, "a malformed team");
    };
    let Ok(body) = axum::body::to_bytes(body, QUERY_BODY).await else {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a query is at most {QUERY_BODY} bytes"),
        );
    };
    let hashes = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(mut q)) => match q.remove("hashes") {
            Some(Value::Array(hashes)) => hashes,
            _ => return reply(StatusCode::BAD_REQUEST, "expected {\"hashes\": [...]}"),
        },
        _ => return reply(StatusCode::BAD_REQUEST, "expected {\"hashes\": [...]}"),
    };
    if hashes.len() > QUERY_HASHES {
        return reply(
            StatusCode::BAD_REQUEST,
            format!("a query asks about at most {QUERY_HASHES} hashes"),
        );
    }
    let not_found = json!({ "error": { "message": "Artifact not found" } });
    let mut answer = serde_json::Map::new();
    for hash in hashes {
        let Some(hash) = hash.as_str().filter(|h| valid_hash(h)) else {
            return reply(StatusCode::BAD_REQUEST, HASH_RULE);
        };
        let inputs = json!({ "hash": hash });
        let stored = match state.cache.get(&task, &inputs).await {
            Ok(stored) => stored,
            Err(e) => return super::backend_error(&state, Protocol::Turbo, &e),
        };
        let size = stored.as_ref().and_then(|v| {
            crate::wire::CacheRef::from_value(v)
                .and_then(|r| r.size)
                .or_else(|| v.get("size").and_then(Value::as_u64))
        });
        let Some(size) = size else {
            answer.insert(hash.to_owned(), not_found.clone());
            continue;
        };
        let meta = state
            .cache
            .get(&format!("{task}/meta"), &inputs)
            .await
            .ok()
            .flatten()
            .unwrap_or(Value::Null);
        let duration = meta
            .get("duration")
            .and_then(Value::as_str)
            .and_then(|d| d.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let mut info = json!({ "size": size, "taskDurationMs": duration });
        if let Some(tag) = meta.get("tag").and_then(Value::as_str) {
            info["tag"] = tag.into();
        }
        answer.insert(hash.to_owned(), info);
    }
    json_reply(StatusCode::OK, &Value::Object(answer))
}

/// `GET`/`HEAD`/`PUT /v8/artifacts/:hash`.
pub(super) async fn artifact(
    State(state): State<Served>,
    Path(hash): Path<String>,
    Query(query): Query<QueryPairs>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !matches!(method, Method::GET | Method::HEAD | Method::PUT) {
        return not_allowed("GET, HEAD, PUT");
    }
    if !valid_hash(&hash) {
        return reply(StatusCode::BAD_REQUEST, HASH_RULE);
    }
    let Some(task) = team_task(&query) else {
        return reply(StatusCode::BAD_REQUEST, "a malformed team");
    };
    let inputs = json!({ "hash": hash });
    let meta_task = format!("{task}/meta");
    let is_put = method == Method::PUT;
    // Refused before anything is stored: a duration that is not whole milliseconds would be stored
    // and replayed to every client that hits the artifact, which turbo then fails to read.
    let duration = headers
        .get(DURATION)
        .map(|v| v.to_str().ok().map(str::trim));
    if is_put && duration.is_some_and(|d| d.is_none_or(|d| d.parse::<u64>().is_err())) {
        return reply(
            StatusCode::BAD_REQUEST,
            "x-artifact-duration must be a whole number of milliseconds",
        );
    }
    let tag = headers.get(TAG);
    if is_put && tag.is_some_and(|t| t.len() > MAX_TAG_BYTES || t.to_str().is_err()) {
        return reply(
            StatusCode::BAD_REQUEST,
            format!("x-artifact-tag must be visible ASCII of at most {MAX_TAG_BYTES} bytes"),
        );
    }
    let meta: Value = json!({
        "duration": duration.flatten(),
        "tag": tag.and_then(|v| v.to_str().ok()),
    });
    let mut response = handle(
        &state,
        Protocol::Turbo,
        &task,
        inputs.clone(),
        method,
        &headers,
        body,
        None,
    )
    .await;
    if is_put {
        if response.status() != StatusCode::OK {
            return response;
        }
        // The artifact is stored: keep what the client said about it (best effort; a hit without it
        // still replays, only without the duration saved).
        if let Err(e) = state.cache.put(&meta_task, &inputs, &meta).await {
            tracing::warn!(target: "outcache::serve", "turbo metadata for {hash}: {e}");
        }
        return json_reply(StatusCode::ACCEPTED, &json!({ "urls": [] }));
    }
    if response.status() == StatusCode::OK {
        if let Ok(Some(saved)) = state.cache.get(&meta_task, &inputs).await {
            for (name, key) in [(DURATION, "duration"), (TAG, "tag")] {
                if let Some(value) = saved
                    .get(key)
                    .and_then(Value::as_str)
                    .and_then(|v| HeaderValue::from_str(v).ok())
                {
                    response
                        .headers_mut()
                        .insert(HeaderName::from_static(name), value);
                }
            }
        }
    }
    response
}
