//! The wire formats: the contract with stored data and with the TypeScript task-graph that shares them.
//! Canonical fingerprints (RFC 8785), the branded [`CacheRef`], the inline binary envelope, row keys and
//! the strict ref-name check every backend uses. Changing anything here changes what existing caches mean.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The brand that makes a JSON object a cache ref (`"kind"`).
pub const CACHE_REF_KIND: &str = "task-graph/CacheRef";

/// The marker key of an inline binary envelope; its value is the envelope version (`1`).
pub const ENVELOPE_MARKER: &str = "__binaryPortWire";

/// Longest task type accepted, in bytes. Keys are stored in file and object names; keep them bounded.
pub const MAX_TASK_TYPE_LEN: usize = 1024;

/// Longest blob name (the part of a ref string after the backend's prefix).
pub const MAX_REF_NAME_LEN: usize = 200;

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The RFC 8785 (JSON Canonicalization Scheme) form of `value`: keys sorted at every depth, no
/// insignificant whitespace, numbers as ECMAScript prints them (so `1.0` and `1` are the same).
pub fn canonical_json(value: &Value) -> Result<String> {
    serde_json_canonicalizer::to_string(value).map_err(|e| Error::InvalidInput {
        what: "inputs".into(),
        reason: format!("cannot canonicalise: {e}"),
    })
}

/// The fingerprint of a task's inputs: lowercase hex SHA-256 of their canonical JSON.
pub fn fingerprint(inputs: &Value) -> Result<String> {
    Ok(sha256_hex(canonical_json(inputs)?.as_bytes()))
}

fn is_fingerprint(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The key of a row: the task type and the fingerprint of the task's inputs.
///
/// Both parts are validated on construction, so a backend may put them into file or object names
/// (after encoding the task type) without fear of traversal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    task_type: String,
    fingerprint: String,
}

impl RowKey {
    /// The key of `task_type` run on `inputs`.
    pub fn new(task_type: &str, inputs: &Value) -> Result<Self> {
        Self::from_parts(task_type, &fingerprint(inputs)?)
    }

    /// A key from a task type and an already computed fingerprint (64 lowercase hex digits).
    pub fn from_parts(task_type: &str, fingerprint: &str) -> Result<Self> {
        validate_task_type(task_type)?;
        if !is_fingerprint(fingerprint) {
            return Err(Error::InvalidInput {
                what: "fingerprint".into(),
                reason: format!("{fingerprint:?} is not 64 lowercase hex digits"),
            });
        }
        Ok(RowKey {
            task_type: task_type.to_owned(),
            fingerprint: fingerprint.to_owned(),
        })
    }

    /// The task type.
    pub fn task_type(&self) -> &str {
        &self.task_type
    }

    /// The input fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl std::fmt::Display for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.task_type, self.fingerprint)
    }
}

/// Refuse task types that are empty, too long or hold control characters.
pub fn validate_task_type(task_type: &str) -> Result<()> {
    let reason = if task_type.is_empty() {
        "must not be empty"
    } else if task_type.len() > MAX_TASK_TYPE_LEN {
        "is longer than 1024 bytes"
    } else if task_type.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(Error::InvalidInput {
        what: "task type".into(),
        reason: format!("{reason} ({:?})", truncate(task_type, 80)),
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The strict check behind every backend's refs: `reference` must be `prefix` followed by exactly one name
/// segment of `[A-Za-z0-9_-]` (1..=200 chars) and then `suffix`. Returns the name, or `None` for anything
/// else: other schemes, `..`, `/`, `\`, NUL, absolute paths, empty or overlong names.
pub fn parse_ref_name<'a>(reference: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    let name = reference.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let ok = !name.is_empty()
        && name.len() <= MAX_REF_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(name)
}

/// Map any text to the ref-name alphabet (`[A-Za-z0-9-]`, everything else `_`), keeping at most `max`
/// characters. Lossy: use it for readability only, next to something that keeps names unique.
pub fn sanitize_name(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A branded reference to a blob, as stored in a row in place of the bytes.
///
/// Wire form: `{"kind":"task-graph/CacheRef","$ref":"<opaque>","size":N?,"mime":"…"?,"port":"…"?,"sha256":"…"?}`.
/// Unknown fields are kept in [`CacheRef::extra`] and written back unchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheRef {
    /// The opaque, backend-specific ref string (`$ref`).
    pub reference: String,
    /// The blob's size in bytes.
    pub size: Option<u64>,
    /// The blob's media type.
    pub mime: Option<String>,
    /// The task output port the blob belongs to.
    pub port: Option<String>,
    /// Lowercase hex SHA-256 of the blob's bytes, computed while it was streamed in.
    pub sha256: Option<String>,
    /// Fields this version does not know, preserved for round trips.
    pub extra: Map<String, Value>,
}

impl CacheRef {
    /// A ref with only its ref string set.
    pub fn new(reference: impl Into<String>) -> Self {
        CacheRef {
            reference: reference.into(),
            size: None,
            mime: None,
            port: None,
            sha256: None,
            extra: Map::new(),
        }
    }

    /// True if `value` is a branded ref: an object whose `kind` is exactly the brand and whose `$ref` is a
    /// string. An unbranded `{"$ref":"#/x"}` (a JSON-Schema pointer) is not.
    pub fn is_ref(value: &Value) -> bool {
        matches!(value, Value::Object(map)
            if map.get("kind").and_then(Value::as_str) == Some(CACHE_REF_KIND)
                && map.get("$ref").is_some_and(Value::is_string))
    }

    /// The ref inside `value`, or `None` if `value` is not a branded ref. Known fields of the wrong type are
    /// kept as unknown fields rather than dropped.
    pub fn from_value(value: &Value) -> Option<Self> {
        if !Self::is_ref(value) {
            return None;
        }
        let map = value.as_object()?;
        let mut r = CacheRef::new(map.get("$ref")?.as_str()?);
        for (k, v) in map {
            match (k.as_str(), v) {
                ("kind" | "$ref", _) => {}
                ("size", Value::Number(n)) if n.as_u64().is_some() => r.size = n.as_u64(),
                ("mime", Value::String(s)) => r.mime = Some(s.clone()),
                ("port", Value::String(s)) => r.port = Some(s.clone()),
                ("sha256", Value::String(s)) => r.sha256 = Some(s.clone()),
                _ => {
                    r.extra.insert(k.clone(), v.clone());
                }
            }
        }
        Some(r)
    }

    /// The wire JSON of this ref.
    pub fn to_value(&self) -> Value {
        let mut map = self.extra.clone();
        map.insert("kind".into(), CACHE_REF_KIND.into());
        map.insert("$ref".into(), self.reference.clone().into());
        if let Some(size) = self.size {
            map.insert("size".into(), size.into());
        }
        for (key, field) in [
            ("mime", &self.mime),
            ("port", &self.port),
            ("sha256", &self.sha256),
        ] {
            if let Some(s) = field {
                map.insert(key.into(), s.clone().into());
            }
        }
        Value::Object(map)
    }

    /// Parse a ref handed in by a person: either a CacheRef's JSON or a bare ref string
    /// (`fsfolder://blobs/….bin`). Refuses anything that is neither, and ref strings with a character no
    /// backend uses (whitespace, control characters, `\`).
    pub fn parse_arg(text: &str) -> Result<Self> {
        let text = text.trim();
        let invalid = |reason: &str| Error::InvalidRef {
            reference: truncate(text, 200).to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = if text.starts_with('{') {
            let value: Value =
                serde_json::from_str(text).map_err(|e| invalid(&format!("not valid JSON: {e}")))?;
            Self::from_value(&value).ok_or_else(|| {
                invalid("JSON is not a branded CacheRef (needs \"kind\":\"task-graph/CacheRef\" and a string \"$ref\")")
            })?
        } else {
            CacheRef::new(text)
        };
        check_ref_syntax(&parsed.reference).map_err(invalid)?;
        Ok(parsed)
    }
}

/// The shape every backend's ref strings share: `scheme://seg/…/seg` with a lowercase scheme and
/// segments of `[A-Za-z0-9._-]` that are neither empty, `.` nor `..`. Passing it does not mean a backend
/// will resolve the ref (each applies its own stricter pattern); failing it means none ever will.
pub fn check_ref_syntax(reference: &str) -> std::result::Result<(), &'static str> {
    let (scheme, path) = reference
        .split_once("://")
        .ok_or("a ref string looks like scheme://name")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_lowercase())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b));
    if !scheme_ok {
        return Err("the scheme must be lowercase letters, digits, '+', '.' or '-'");
    }
    if reference.len() > 1024 {
        return Err("longer than 1024 characters");
    }
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err("empty, '.' or '..' path segments are not allowed");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err("only letters, digits, '.', '_' and '-' may appear between slashes");
        }
    }
    Ok(())
}

/// Bytes kept inside a row, decoded from the inline binary envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InlineBinary {
    /// The bytes.
    pub bytes: Bytes,
    /// Their media type.
    pub mime: Option<String>,
}

impl InlineBinary {
    /// The envelope `{"__binaryPortWire":1,"base64":"…","size":N,"mime":"…"?}` for `bytes`.
    pub fn encode(bytes: &[u8], mime: Option<&str>) -> Value {
        let mut map = Map::new();
        map.insert(ENVELOPE_MARKER.into(), 1.into());
        map.insert("base64".into(), BASE64.encode(bytes).into());
        map.insert("size".into(), (bytes.len() as u64).into());
        if let Some(mime) = mime {
            map.insert("mime".into(), mime.into());
        }
        Value::Object(map)
    }

    /// True if `value` claims to be an envelope (has the marker set to 1 and a `base64` field).
    pub fn is_envelope(value: &Value) -> bool {
        matches!(value, Value::Object(map)
            if map.get(ENVELOPE_MARKER).and_then(Value::as_u64) == Some(1) && map.contains_key("base64"))
    }

    /// Decode an envelope. `Ok(None)` if `value` is not an envelope (refs and plain data pass through); an
    /// error if it claims to be one but its base64 or size is wrong.
    pub fn decode(value: &Value) -> Result<Option<Self>> {
        if !Self::is_envelope(value) {
            return Ok(None);
        }
        let bad = |reason: String| Error::InvalidInput {
            what: "inline binary envelope".into(),
            reason,
        };
        let map = value.as_object().expect("is_envelope checked the object");
        let text = map["base64"]
            .as_str()
            .ok_or_else(|| bad("base64 is not a string".into()))?;
        let bytes = BASE64
            .decode(text)
            .map_err(|e| bad(format!("bad base64: {e}")))?;
        if let Some(size) = map.get("size") {
            if size.as_u64() != Some(bytes.len() as u64) {
                return Err(bad(format!(
                    "size {size} does not match {} decoded bytes",
                    bytes.len()
                )));
            }
        }
        let mime = map.get("mime").and_then(Value::as_str).map(str::to_owned);
        Ok(Some(InlineBinary {
            bytes: bytes.into(),
            mime,
        }))
    }
}

/// Every branded ref in `value`, depth first, in document order.
pub fn refs_in(value: &Value) -> Vec<CacheRef> {
    fn walk(value: &Value, out: &mut Vec<CacheRef>) {
        if let Some(r) = CacheRef::from_value(value) {
            out.push(r);
            return;
        }
        match value {
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            Value::Object(map) => map.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, &mut out);
    out
}
