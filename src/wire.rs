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

/// Longest blob name with its suffix (the part of a ref string after the backend's prefix): a file name.
pub const MAX_REF_NAME_LEN: usize = 255;

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

/// Deepest nesting [`canonical_json`] accepts (serde_json's parser stops at 128 already; a value built in
/// code could be deeper and overflow the stack).
pub const MAX_INPUT_DEPTH: usize = 256;

/// Deepest nesting of arrays and objects an output may have. Outputs are stored as JSON and read back by
/// serde_json, whose parser stops at 128 levels; a backend may wrap the output in a record of its own
/// (the fs and object-store row record adds one level). 100 leaves that room on every backend, so an
/// output the engine accepts always reads back (`Cache::put` refuses a deeper one).
pub const MAX_OUTPUT_DEPTH: usize = 100;

/// Refuse an output nested deeper than [`MAX_OUTPUT_DEPTH`] levels of arrays and objects (empty ones
/// count, as they do for serde_json's parser), naming where. The walk stops at the limit, so a value
/// built in code to any depth gets an error, not a stack overflow.
pub fn check_output_depth(output: &Value) -> Result<()> {
    within_output_depth(output, &mut Vec::new())
}

/// `path` holds the steps to `value`: one per array or object around it.
fn within_output_depth<'a>(value: &'a Value, path: &mut Vec<PathStep<'a>>) -> Result<()> {
    if !(value.is_array() || value.is_object()) {
        return Ok(());
    }
    if path.len() >= MAX_OUTPUT_DEPTH {
        return Err(Error::InvalidInput {
            what: "output".into(),
            reason: format!(
                "nested deeper than {MAX_OUTPUT_DEPTH} levels of arrays and objects at {}",
                json_path(path)
            ),
        });
    }
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(PathStep::Index(i));
                within_output_depth(item, path)?;
                path.pop();
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                path.push(PathStep::Key(k));
                within_output_depth(v, path)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

/// Largest integer magnitude below which every integer is exactly an IEEE double (2^53).
const SAFE_INTEGER: u64 = 1 << 53;

/// The canonical form of `value`: RFC 8785 (JSON Canonicalization Scheme) — keys sorted by UTF-16 code
/// units at every depth, no insignificant whitespace, numbers as ECMAScript prints them (so `1.0` and `1`
/// are the same) — with one extension that keeps distinct inputs apart: an integer that no IEEE double
/// holds exactly (a 64-bit id above 2^53, say) is written as its exact decimal digits followed by `n`
/// (ECMAScript's BigInt spelling), which no double ever prints as. Every number a double holds exactly
/// (all of the safe range) canonicalises as RFC 8785 says, so existing fingerprints never change.
pub fn canonical_json(value: &Value) -> Result<String> {
    let mut out = String::with_capacity(64);
    let mut path = Vec::new();
    write_canonical(value, &mut out, &mut path)?;
    Ok(out)
}

/// One step of the path to a value, for error messages (`$.a[3].b`).
enum PathStep<'a> {
    Key(&'a str),
    Index(usize),
}

/// `$` and the steps of `path`; a deep path keeps its first and last steps and counts the ones between,
/// so an error about a value 10 000 levels down stays one line.
fn json_path(path: &[PathStep<'_>]) -> String {
    const ENDS: usize = 8;
    let mut out = String::from("$");
    for (i, step) in path.iter().enumerate() {
        if path.len() > 3 * ENDS && i >= ENDS && i < path.len() - ENDS {
            if i == ENDS {
                out.push_str(&format!("…({} more)…", path.len() - 2 * ENDS));
            }
            continue;
        }
        match step {
            PathStep::Key(k) => {
                out.push('.');
                out.push_str(truncate(k, 40));
            }
            PathStep::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn write_canonical<'a>(
    value: &'a Value,
    out: &mut String,
    path: &mut Vec<PathStep<'a>>,
) -> Result<()> {
    if path.len() >= MAX_INPUT_DEPTH {
        return Err(Error::InvalidInput {
            what: "inputs".into(),
            reason: format!(
                "nested deeper than {MAX_INPUT_DEPTH} levels at {}",
                json_path(path)
            ),
        });
    }
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                path.push(PathStep::Index(i));
                write_canonical(item, out, path)?;
                path.pop();
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // RFC 8785 sorts by UTF-16 code units; for keys that are all in the BMP below the surrogates
            // (nearly all keys) that is the byte order, so only mixed keys pay for the conversion.
            if entries
                .iter()
                .all(|(k, _)| k.chars().all(|c| (c as u32) < 0xD800))
            {
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            } else {
                entries.sort_by_cached_key(|(k, _)| k.encode_utf16().collect::<Vec<u16>>());
            }
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                path.push(PathStep::Key(k));
                write_canonical(v, out, path)?;
                path.pop();
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_number(n: &serde_json::Number, out: &mut String) {
    let exact_integer = n
        .as_u64()
        .map(|u| (u, false))
        .or_else(|| n.as_i64().map(|i| (i.unsigned_abs(), true)));
    if let Some((magnitude, negative)) = exact_integer {
        // Above 2^53 a double holds only some integers: one it does not hold is written exactly, with the
        // BigInt marker, so it can never collide with the double next to it.
        if magnitude > SAFE_INTEGER && (magnitude as f64) as u128 != u128::from(magnitude) {
            if negative {
                out.push('-');
            }
            out.push_str(&magnitude.to_string());
            out.push('n');
            return;
        }
        let value = if negative {
            -(magnitude as f64)
        } else {
            magnitude as f64
        };
        out.push_str(ryu_js::Buffer::new().format_finite(value));
        return;
    }
    // serde_json holds only finite doubles.
    let value = n.as_f64().unwrap_or(0.0);
    out.push_str(ryu_js::Buffer::new().format_finite(value));
}

/// A JSON string as RFC 8785 writes it: `"` and `\` escaped, control characters as `\b \t \n \f \r`
/// or `\u00xx`, everything else verbatim.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parse JSON text handed in by a person or a file (the CLI's `--inputs`), refusing what `serde_json`
/// would silently change:
/// - integer literals outside the 64-bit range, which it rounds to a double, so that
///   `18446744073709551617` never reads as `18446744073709551616` (the error names the JSON path);
/// - an object naming a key twice, where it keeps the last: `{"a":3,"a":4}` would fingerprint as
///   `{"a":4}` and hit another task's entry. RFC 8785 canonicalises I-JSON (RFC 7493), which forbids
///   duplicate names.
///
/// Decimal and exponent literals are IEEE doubles, as RFC 8785 defines JSON numbers.
pub fn parse_json(what: &str, text: &str) -> Result<Value> {
    let StrictValue(value) = serde_json::from_str(text).map_err(|e| Error::InvalidInput {
        what: what.into(),
        reason: format!("not valid JSON: {e}"),
    })?;
    check_integer_literals(what, text, &value)?;
    Ok(value)
}

/// A [`Value`] read from text that refuses an object with a duplicate key (serde_json's own keeps the
/// last silently).
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "the key {key:?} appears twice in one object"
                )));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Walk the text beside its parsed value: every integer literal must be held exactly.
fn check_integer_literals(what: &str, text: &str, value: &Value) -> Result<()> {
    // Fast path: a big literal needs at least 17 digits in a row.
    let mut run = 0;
    if !text.bytes().any(|b| {
        run = if b.is_ascii_digit() { run + 1 } else { 0 };
        run >= 17
    }) {
        return Ok(());
    }
    let mut scanner = LiteralScanner {
        bytes: text.as_bytes(),
        pos: 0,
    };
    let mut path = Vec::new();
    scanner
        .value(value, &mut path)
        .map_err(|at| Error::InvalidInput {
            what: what.into(),
            reason: format!(
                "the integer at {at} does not fit in 64 bits and cannot be fingerprinted exactly \
             (pass it as a string)"
            ),
        })
}

/// A scanner over text already known to be valid JSON, matching it against its parsed value to find the
/// path of an integer literal that was rounded.
struct LiteralScanner<'t> {
    bytes: &'t [u8],
    pos: usize,
}

impl LiteralScanner<'_> {
    fn skip_ws(&mut self) {
        while self.pos < self.bytes.len() && self.bytes[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn skip_string(&mut self) {
        self.pos += 1; // the opening quote
        while self.pos < self.bytes.len() {
            match self.bytes[self.pos] {
                b'\\' => self.pos += 2,
                b'"' => {
                    self.pos += 1;
                    return;
                }
                _ => self.pos += 1,
            }
        }
    }

    /// Scan the value at the cursor; `Err(path)` names a rounded integer literal.
    fn value<'v>(
        &mut self,
        value: &'v Value,
        path: &mut Vec<PathStep<'v>>,
    ) -> std::result::Result<(), String> {
        self.skip_ws();
        match value {
            Value::Object(map) => {
                self.pos += 1; // {
                loop {
                    self.skip_ws();
                    if self.bytes.get(self.pos) == Some(&b'}') {
                        self.pos += 1;
                        return Ok(());
                    }
                    if self.bytes.get(self.pos) == Some(&b',') {
                        self.pos += 1;
                        self.skip_ws();
                    }
                    let start = self.pos;
                    self.skip_string();
                    let key: String =
                        serde_json::from_slice(&self.bytes[start..self.pos]).unwrap_or_default();
                    self.skip_ws();
                    self.pos += 1; // :
                    // With duplicate keys serde_json keeps the last; scanning an earlier duplicate against
                    // the kept value is still safe for numbers (it checks the literal's own digits).
                    let (k, child) = map
                        .get_key_value(key.as_str())
                        .ok_or_else(|| json_path(path))?;
                    path.push(PathStep::Key(k));
                    self.value(child, path)?;
                    path.pop();
                }
            }
            Value::Array(items) => {
                self.pos += 1; // [
                for (i, item) in items.iter().enumerate() {
                    self.skip_ws();
                    if self.bytes.get(self.pos) == Some(&b',') {
                        self.pos += 1;
                    }
                    path.push(PathStep::Index(i));
                    self.value(item, path)?;
                    path.pop();
                }
                self.skip_ws();
                self.pos += 1; // ]
                Ok(())
            }
            Value::String(_) => {
                self.skip_string();
                Ok(())
            }
            Value::Number(_) => {
                let start = self.pos;
                while self.pos < self.bytes.len()
                    && matches!(
                        self.bytes[self.pos],
                        b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'
                    )
                {
                    self.pos += 1;
                }
                let literal = &self.bytes[start..self.pos];
                let integer = !literal.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
                if integer
                    && std::str::from_utf8(literal)
                        .ok()
                        .and_then(|t| t.parse::<i128>().ok())
                        .is_none_or(|n| u64::try_from(n).is_err() && i64::try_from(n).is_err())
                {
                    return Err(json_path(path));
                }
                Ok(())
            }
            Value::Bool(b) => {
                self.pos += if *b { 4 } else { 5 };
                Ok(())
            }
            Value::Null => {
                self.pos += 4;
                Ok(())
            }
        }
    }
}

/// The fingerprint of a task's inputs: lowercase hex SHA-256 of their canonical JSON.
pub fn fingerprint(inputs: &Value) -> Result<String> {
    Ok(sha256_hex(canonical_json(inputs)?.as_bytes()))
}

pub(crate) fn is_fingerprint(s: &str) -> bool {
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
/// segment of `[A-Za-z0-9_.-]` and then `suffix`, name and suffix together at most 255 bytes (a file name),
/// the name not starting with `.` (so never `.`, `..` or a hidden file). The TypeScript original's names
/// (`^fsfolder://blobs/([\w.-]+\.bin)$`) pass. Returns the name, or `None` for anything else: other
/// schemes, `/`, `\`, NUL, absolute paths, empty or overlong names.
pub fn parse_ref_name<'a>(reference: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    let name = reference.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let ok = !name.is_empty()
        && name.len() + suffix.len() <= MAX_REF_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    ok.then_some(name)
}

/// The ownership tag of the row `key`: the first 16 hex digits of SHA-256(task type, NUL, fingerprint).
/// Every blob name a backend makes carries the tag of the key it was written for (see
/// [`crate::layout::blob_name`]), which is how a row's delete tells the blobs it wrote from the ones it
/// only cites.
pub fn key_tag(key: &RowKey) -> String {
    key_tag_of(key.task_type(), key.fingerprint())
}

/// [`key_tag`] of a key given as its two parts (not validated: a blob's metadata names its key this way).
pub fn key_tag_of(task_type: &str, fingerprint: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(task_type.as_bytes());
    hasher.update([0]);
    hasher.update(fingerprint.as_bytes());
    let mut tag = hex(&hasher.finalize());
    tag.truncate(16);
    tag
}

/// **The ownership rule**: a row owns a blob, and its delete cascades to it, only if the blob was written
/// for that row's key, which the blob's name records as one of its `_`/`.`-separated parts (the
/// [`key_tag`]). A ref a row merely cites (a pass-through of another task's output, a run-private row
/// citing the shared tier, a blob written before names carried tags) is never deleted with the row; the
/// janitor's orphan sweep frees it once no row references it.
pub fn ref_owned_by(reference: &str, key: &RowKey) -> bool {
    let tag = key_tag(key);
    name_parts(reference).any(|part| part == tag)
}

/// The `_`/`.`-separated parts of the last path segment of a ref or blob name: where a blob name
/// carries the [`key_tag`] of its owner (the ownership rule reads it here, and so do the janitor's and
/// the object store's by-name lookups).
pub fn name_parts(reference: &str) -> impl Iterator<Item = &str> {
    let name = reference.rsplit('/').next().unwrap_or(reference);
    name.split(['_', '.'])
}

/// The refs in `output` that the row `key` owns (see [`ref_owned_by`]), each once.
pub fn owned_refs<'a>(key: &RowKey, refs: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in refs {
        if ref_owned_by(r, key) && !out.iter().any(|o| o == r) {
            out.push(r.to_owned());
        }
    }
    out
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
        let Some(map) = value.as_object() else {
            return Ok(None); // is_envelope saw an object: unreachable, and harmless
        };
        let text = map
            .get("base64")
            .and_then(Value::as_str)
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
