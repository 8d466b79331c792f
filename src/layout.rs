//! The key layout shared by the backends that store rows as named files or objects (fs, object store):
//! the task-type path segment, the self-describing row record, and readable unique blob names. One
//! definition, so a cache copied from disk to a bucket keeps its meaning.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::BlobMeta;
use crate::wire::{RowKey, key_tag_of, sanitize_name, sha256_hex};

/// Version of the row record format.
pub const ROW_FORMAT_VERSION: u64 = 1;
/// Longest encoded task-type segment before it is replaced by a hash.
const MAX_SEGMENT: usize = 180;
/// Escape character of the task-type segment encoding (`.XX`, two uppercase hex digits per byte).
const ESCAPE: u8 = b'.';
/// First character of a hashed segment (never produced by the escape encoding).
const HASHED: char = '=';

/// The path segment for `task_type`: a lossless encoding that keeps `[A-Za-z0-9_-]` and writes every
/// other byte as `.XX`. It is safe as a file name and an object-key segment (never `.`, `..`, `/`, `%`),
/// and prefix-preserving, so prefix deletes can match on segments. A segment that would be longer than 180
/// characters becomes `=<sha256 of the task type>`; its records carry the exact task type.
pub fn encode_task_segment(task_type: &str) -> String {
    let mut out = String::with_capacity(task_type.len());
    for b in task_type.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push(ESCAPE as char);
            out.push_str(&format!("{b:02X}"));
        }
    }
    if out.len() > MAX_SEGMENT {
        format!("{HASHED}{}", sha256_hex(task_type.as_bytes()))
    } else {
        out
    }
}

/// The task type a segment encodes, or `None` for a hashed or foreign segment.
pub fn decode_task_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            ESCAPE => {
                let hex = segment.get(i + 1..i + 3)?;
                if !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
                {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    // Only the one spelling the encoder writes is ours (`a.41` would decode to `aA`, which lives in
    // `aA`): anything else is a foreign name.
    String::from_utf8(out)
        .ok()
        .filter(|task| encode_task_segment(task) == segment)
}

/// Whether rows in the segment `segment` (whose task type decodes to `decoded`, if it does) can match
/// a task-type prefix: hashed segments always may (their records must be read).
pub fn segment_may_match(decoded: Option<&str>, prefix: &str) -> bool {
    decoded.is_none_or(|t| t.starts_with(prefix))
}

/// Milliseconds since the epoch.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The time `ms` milliseconds after the epoch.
pub fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The largest row record a backend writes or reads: SQLite's own limit on a value (10^9 bytes), so a
/// row that one backend stores every backend can. A larger output is refused when written; a file or
/// object named like a row but larger is garbled, and only its first [`OVERSIZED_ROW_HEAD`] bytes are
/// ever read, so a giant one planted in a shared cache cannot exhaust a reader's memory.
pub const MAX_ROW_BYTES: u64 = 1_000_000_000;

/// How much of a row-named file or object over [`MAX_ROW_BYTES`] is read: enough to tell what it is.
pub const OVERSIZED_ROW_HEAD: usize = 4096;

/// The bytes of a row record: `{"v":1,"task_type","fingerprint","created_at_ms","output"}`.
pub fn encode_row(key: &RowKey, output: &Value, created_at: SystemTime) -> Result<Vec<u8>> {
    let record = json!({
        "v": ROW_FORMAT_VERSION,
        "task_type": key.task_type(),
        "fingerprint": key.fingerprint(),
        "created_at_ms": millis(created_at),
        "output": output,
    });
    let bytes = serde_json::to_vec(&record).map_err(|e| Error::InvalidInput {
        what: format!("output for {key}"),
        reason: e.to_string(),
    })?;
    check_row_len(key, bytes.len() as u64)?;
    Ok(bytes)
}

/// [`decode_row`] of a row file or object of `size` bytes, of which `bytes` were read (only the head
/// of one over [`MAX_ROW_BYTES`], which is garbled whatever it holds).
pub fn decode_row_of_size(
    bytes: &[u8],
    size: u64,
    task_type: &str,
    fingerprint: &str,
) -> Result<RowRecord> {
    if size > MAX_ROW_BYTES {
        return Err(Error::CorruptRow {
            task_type: task_type.into(),
            fingerprint: fingerprint.into(),
            reason: format!(
                "{size} bytes, larger than any row ({MAX_ROW_BYTES} at most): not read"
            ),
        });
    }
    decode_row(bytes, task_type, fingerprint)
}

/// Refuses a row record of `len` bytes for `key` if it is over [`MAX_ROW_BYTES`].
fn check_row_len(key: &RowKey, len: u64) -> Result<()> {
    if len <= MAX_ROW_BYTES {
        return Ok(());
    }
    Err(Error::InvalidInput {
        what: format!("output for {key}"),
        reason: format!(
            "its row would be {len} bytes, over the {MAX_ROW_BYTES} a row may hold: store large \
             outputs as blobs (put_stream, put-blob)"
        ),
    })
}

/// What kind of unusable record `bytes` is: one of a newer format version (a newer outcache shares the
/// cache; never removed) or garbled.
pub fn corrupt_kind(bytes: &[u8]) -> crate::store::CorruptKind {
    let newer = serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| v.get("v").and_then(Value::as_u64))
        .is_some_and(|v| v > ROW_FORMAT_VERSION);
    if newer {
        crate::store::CorruptKind::NewerFormat
    } else {
        crate::store::CorruptKind::Garbled
    }
}

/// A row record as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct RowRecord {
    /// The key the record says it belongs to.
    pub key: RowKey,
    /// The output.
    pub output: Value,
    /// When it was committed.
    pub created_at: SystemTime,
    /// Bytes of the record.
    pub size: u64,
}

impl RowRecord {
    /// The row this record holds for a lookup of `key`: a record of another key under `key`'s name (a
    /// file or object copied or renamed by hand, a hash collision of segments) is corrupt, never served.
    /// `holder` names what held it in the error ("file", "object").
    pub fn into_row_for(self, key: &RowKey, holder: &str) -> Result<crate::store::Row> {
        if self.key != *key {
            // On a case-insensitive file system (macOS, Windows) task types that differ only in case
            // share a directory, so the same inputs share a file: say so, as that is the likely cause.
            let case_only = self.key.fingerprint() == key.fingerprint()
                && self.key.task_type().eq_ignore_ascii_case(key.task_type());
            return Err(Error::CorruptRow {
                task_type: key.task_type().into(),
                fingerprint: key.fingerprint().into(),
                reason: format!(
                    "{holder} holds the row for {}{}",
                    self.key,
                    if case_only {
                        " (the task types differ only in letter case, which a case-insensitive file \
                         system does not tell apart: give them names that differ otherwise)"
                    } else {
                        ""
                    }
                ),
            });
        }
        Ok(crate::store::Row {
            output: self.output,
            created_at: self.created_at,
        })
    }
}

/// Parse a row record. `task_type` and `fingerprint` name the row in the error if it is corrupt (the
/// key it was looked up by, or whatever the caller knows).
pub fn decode_row(bytes: &[u8], task_type: &str, fingerprint: &str) -> Result<RowRecord> {
    let bad = |reason: String| Error::CorruptRow {
        task_type: task_type.into(),
        fingerprint: fingerprint.into(),
        reason,
    };
    /// The record as written, parsed in one pass with the strings borrowed: no map of the record's
    /// fields is built (a hit is mostly this parse).
    #[derive(serde::Deserialize)]
    struct Record<'a> {
        v: Value,
        #[serde(borrow)]
        task_type: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        fingerprint: Option<std::borrow::Cow<'a, str>>,
        created_at_ms: Option<Value>,
        output: Option<Value>,
    }
    let record: Record<'_> = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_data() && serde_json::from_slice::<Value>(bytes).is_ok_and(|v| !v.is_object()) {
            bad("not a JSON object".into())
        } else if e.is_data() {
            bad(format!("a field of the wrong type: {e}"))
        } else {
            bad(format!("not valid JSON: {e}"))
        }
    })?;
    if record.v.as_u64() != Some(ROW_FORMAT_VERSION) {
        return Err(bad(format!("unknown row format {}", record.v)));
    }
    let task = record
        .task_type
        .ok_or_else(|| bad("missing \"task_type\"".into()))?;
    let fp = record
        .fingerprint
        .ok_or_else(|| bad("missing \"fingerprint\"".into()))?;
    let key = RowKey::from_parts(&task, &fp).map_err(|e| bad(e.to_string()))?;
    let created = record
        .created_at_ms
        .ok_or_else(|| bad("missing \"created_at_ms\"".into()))?
        .as_u64()
        .ok_or_else(|| bad("created_at_ms is not a number".into()))?;
    let output = record
        .output
        .ok_or_else(|| bad("missing \"output\"".into()))?;
    Ok(RowRecord {
        key,
        output,
        created_at: from_millis(created),
        size: bytes.len() as u64,
    })
}

/// `<sanitized task type>_<key tag>[_<port>]_<uuid>`: readable, unique per write whatever the sanitising
/// merged, and carrying the [`crate::wire::key_tag`] of the row it was written for (the ownership rule,
/// [`crate::wire::ref_owned_by`]). Only `[A-Za-z0-9_-]`, at most 123 characters.
pub fn blob_name(meta: &BlobMeta) -> String {
    let tag = key_tag_of(&meta.task_type, &meta.fingerprint);
    let mut name = format!("{}_{tag}", sanitize_name(&meta.task_type, 40));
    if let Some(port) = &meta.port {
        name.push('_');
        name.push_str(&sanitize_name(port, 32));
    }
    name.push('_');
    name.push_str(&Uuid::new_v4().simple().to_string());
    name
}

/// Whether `name` (the backend's suffix, such as fs's `.bin`, taken off) has the shape [`blob_name`]
/// gives it: parts joined by `_`, the last a UUID, 32 hex digits (or 8-4-4-4-12, as the TypeScript
/// original wrote them), then optionally `.<sha256>` (fs names record the digest). The janitor knows
/// a cache's blobs by it, so a file or object someone else keeps under `blobs/` (a project directory
/// with a `blobs/firmware.bin`, a bucket shared with other data) is never swept as an orphan.
pub fn is_blob_name(name: &str) -> bool {
    let name = match name.rsplit_once('.') {
        Some((head, digest)) if crate::wire::is_fingerprint(digest) => head,
        _ => name,
    };
    name.rsplit_once('_').is_some_and(|(head, uuid)| {
        !head.is_empty() && (is_uuid_hex(uuid) || is_hyphenated_uuid(uuid))
    })
}

fn is_hyphenated_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `name` is the file (or object) name of a row: `<fingerprint>.json`, 64 lowercase hex digits.
/// The janitor reports anything else in the rows area as foreign and never removes it, so a cache
/// pointed at a directory or bucket that also holds other data cannot delete that data as "corrupt".
pub fn is_row_file_name(name: &str) -> bool {
    name.strip_suffix(".json")
        .is_some_and(crate::wire::is_fingerprint)
}

/// Whether `name` is a temp file name the fs backend writes in `tmp/`: `row-`, `blob-` or (left by
/// earlier versions' write probe) `probe-`, then 32 lowercase hex digits and `.tmp`. Only these are
/// temps to the janitor; any other file there is foreign, reported and never removed.
pub fn is_temp_file_name(name: &str) -> bool {
    ["row-", "blob-", "probe-"].iter().any(|kind| {
        name.strip_prefix(kind)
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .is_some_and(is_uuid_hex)
    })
}

fn is_uuid_hex(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Prefix of the temp ids that name a scratch directory (see [`scratch_dirs`]).
pub const SCRATCH_ID_PREFIX: &str = "scratch/";

/// Whether `name` is a scratch directory name `outcache-conformance-<32 hex>` or
/// `outcache-bench-<32 hex>`: where `outcache conformance` and `outcache bench` work (a child of a
/// cache, removed when they end).
pub fn is_scratch_name(name: &str) -> bool {
    ["outcache-conformance-", "outcache-bench-"]
        .iter()
        .any(|p| name.strip_prefix(p).is_some_and(is_uuid_hex))
}

/// The scratch directories directly in `dir` that an interrupted `conformance` or `bench` run left
/// (a signal is handled, a SIGKILL is not), as temps: id `scratch/<name>`, the bytes under them, and
/// their newest modification, so the janitor counts them and removes stale ones past its grace like any
/// temp. Links are never followed.
pub fn scratch_dirs(dir: &std::path::Path) -> Vec<crate::store::BlobEntry> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            is_scratch_name(&name).then(|| {
                let (size, modified) = tree_usage(&e.path());
                crate::store::BlobEntry {
                    id: format!("{SCRATCH_ID_PREFIX}{name}"),
                    state: crate::store::BlobState::Temp,
                    size,
                    modified,
                }
            })
        })
        .collect()
}

/// Bytes of the regular files under `dir` and the newest modification time in it (links not followed).
fn tree_usage(dir: &std::path::Path) -> (u64, SystemTime) {
    let mut size = 0;
    let mut newest = std::fs::symlink_metadata(dir)
        .and_then(|m| m.modified())
        .unwrap_or(UNIX_EPOCH);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let Ok(meta) = entry.metadata() else { continue };
            if let Ok(m) = meta.modified() {
                newest = newest.max(m);
            }
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                size += meta.len();
            }
        }
    }
    (size, newest)
}

/// Remove the scratch directory a [`scratch_dirs`] id names, inside `dir`. Anything else does nothing.
pub fn remove_scratch(dir: &std::path::Path, id: &str) -> Result<bool> {
    let Some(name) = id
        .strip_prefix(SCRATCH_ID_PREFIX)
        .filter(|n| is_scratch_name(n))
    else {
        return Ok(false);
    };
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        // remove_dir_all never follows links inside the tree.
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path)
            .map(|()| true)
            .map_err(|e| Error::io("remove scratch directory", &path, e)),
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::parse_ref_name;

    #[test]
    fn task_segments_are_lossless_safe_and_prefix_preserving() {
        for t in [
            "a",
            "session1",
            "session1-",
            "a/b",
            "a.2Fb",
            "a%2Fb",
            "é.x",
            "..",
            ".",
            "a b",
            "=x",
        ] {
            let enc = encode_task_segment(t);
            assert_eq!(decode_task_segment(&enc).as_deref(), Some(t), "{t}");
            assert!(
                enc != "." && enc != ".." && !enc.contains('/') && !enc.contains('%'),
                "{enc}"
            );
        }
        assert_ne!(encode_task_segment("a/b"), encode_task_segment("a.2Fb"));
        assert!(encode_task_segment("ab").starts_with(&encode_task_segment("a")));
        assert_eq!(
            decode_task_segment("a.2f"),
            None,
            "lowercase escapes are not ours"
        );
    }

    #[test]
    fn long_task_types_hash_and_do_not_decode() {
        let long = "x".repeat(500);
        let enc = encode_task_segment(&long);
        assert!(enc.starts_with('=') && enc.len() == 65);
        assert_eq!(decode_task_segment(&enc), None);
        assert!(segment_may_match(None, "anything"));
    }

    #[test]
    fn row_records_round_trip_and_garbage_is_corrupt() {
        let key = RowKey::new("t", &json!({"a": 1})).unwrap();
        let now = from_millis(millis(SystemTime::now()));
        let bytes = encode_row(&key, &json!({"x": [1]}), now).unwrap();
        let back = decode_row(&bytes, "t", "?").unwrap();
        assert_eq!(
            (back.key, back.output, back.created_at),
            (key, json!({"x": [1]}), now)
        );
        for garbage in [&b"{"[..], b"{}", b"{\"v\":2}", b"[1]"] {
            assert!(matches!(
                decode_row(garbage, "t", "f"),
                Err(Error::CorruptRow { .. })
            ));
        }
    }

    #[test]
    fn a_record_of_another_key_is_corrupt_and_a_case_only_difference_is_named() {
        let now = SystemTime::now();
        let inputs = json!({"a": 1});
        let stored = RowKey::new("Build", &inputs).unwrap();
        let record =
            |key: &RowKey| decode_row(&encode_row(key, &json!(1), now).unwrap(), "?", "?").unwrap();
        let reason = |looked_up: &RowKey| match record(&stored).into_row_for(looked_up, "file") {
            Err(Error::CorruptRow { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        let aliased = reason(&RowKey::new("build", &inputs).unwrap());
        assert!(aliased.contains("letter case"), "{aliased}");
        let other = reason(&RowKey::new("link", &inputs).unwrap());
        assert!(!other.contains("letter case"), "{other}");
        assert!(record(&stored).into_row_for(&stored, "file").is_ok());
    }

    #[test]
    fn blob_names_are_unique_and_match_a_strict_ref_pattern() {
        let meta = BlobMeta {
            task_type: "../../etc/passwd".into(),
            fingerprint: "f".repeat(64),
            port: Some("out/../x".into()),
            mime: None,
        };
        let (a, b) = (blob_name(&meta), blob_name(&meta));
        assert_ne!(a, b);
        for name in [a, b] {
            let r = format!("x://blobs/{name}.bin");
            assert_eq!(
                parse_ref_name(&r, "x://blobs/", ".bin"),
                Some(name.as_str())
            );
            assert!(is_blob_name(&name), "{name}");
            assert!(
                is_blob_name(&format!("{name}.{}", "0".repeat(64))),
                "{name}"
            );
        }
    }

    /// A row record over [`MAX_ROW_BYTES`] is refused when written (every reader would take it for
    /// garbled), with what to do instead; one at the bound is written. (Checked on the length:
    /// encoding a gigabyte takes close to a minute in a test build.)
    #[test]
    fn a_row_record_over_the_bound_is_refused_when_written() {
        let key = RowKey::from_parts("t", &"a".repeat(64)).unwrap();
        assert!(check_row_len(&key, MAX_ROW_BYTES).is_ok());
        match check_row_len(&key, MAX_ROW_BYTES + 1) {
            Err(e @ Error::InvalidInput { .. }) => {
                assert!(
                    e.to_string().contains("store large outputs as blobs"),
                    "{e}"
                )
            }
            other => panic!("an oversized row was accepted: {other:?}"),
        }
        assert!(encode_row(&key, &json!("small"), UNIX_EPOCH).is_ok());
    }

    /// What the janitor takes for the cache's own: the names it gives, and nothing merely close.
    #[test]
    fn only_the_names_the_cache_gives_are_its_own() {
        let (uuid, fp) = ("0123456789abcdef0123456789abcdef", "a".repeat(64));
        let ts_uuid = "123e4567-e89b-42d3-a456-426614174000";
        for ours in [
            format!("task_0123456789abcdef_{uuid}"),
            format!("task_0123456789abcdef_port_{uuid}.{fp}"),
            format!("task_{fp}_out_{ts_uuid}"),
        ] {
            assert!(is_blob_name(&ours), "{ours}");
        }
        for theirs in [
            "firmware".to_owned(),
            "readme.txt".to_owned(),
            uuid.to_owned(),
            format!("_{uuid}"),
            format!("x_{}", &uuid[1..]),
            format!("x_{}", uuid.to_uppercase().replace('A', "g")),
            format!("x_{uuid}.{}", &fp[1..]),
        ] {
            assert!(!is_blob_name(&theirs), "{theirs}");
        }
        assert!(is_row_file_name(&format!("{fp}.json")));
        for theirs in [
            "a.json",
            &format!("{}.json", fp.to_uppercase()),
            &fp,
            &format!("{fp}.json.bak"),
        ] {
            assert!(!is_row_file_name(theirs), "{theirs}");
        }
        for ours in ["row", "blob", "probe"] {
            assert!(is_temp_file_name(&format!("{ours}-{uuid}.tmp")));
        }
        for theirs in [
            "notes.txt",
            "blob-draft.tmp",
            &format!("other-{uuid}.tmp"),
            &format!("blob-{uuid}.tmp.1"),
        ] {
            assert!(!is_temp_file_name(theirs), "{theirs}");
        }
    }
}
