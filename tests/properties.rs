//! Property tests for everything that parses input: ref strings (no accepted ref ever names a path
//! outside its backend's directory), the canonical fingerprint (key order and number spelling never
//! matter, real differences always do), the envelope codec (round trip; garbage is an error, not a
//! panic), and URL and config parsing (never a panic, bad input is a typed error).

use outcache::config::{Location, parse_duration, parse_size, redact_url};
use outcache::wire::{check_ref_syntax, fingerprint, parse_ref_name};
use outcache::{CacheRef, Error, InlineBinary};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Arbitrary JSON, a few levels deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// The same JSON text with every object's keys in reverse order and every integer written as a float.
fn respell(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .rev()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), respell(v)))
                .collect();
            format!("{{ {} }}", parts.join(" , "))
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(respell).collect::<Vec<_>>().join(",")
        ),
        Value::Number(n) if n.is_i64() && n.as_i64().unwrap().unsigned_abs() < (1 << 53) => {
            format!("{}.0", n)
        }
        other => other.to_string(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn fingerprints_ignore_key_order_and_number_spelling(value in arb_json()) {
        let respelled: Value = serde_json::from_str(&respell(&value)).unwrap();
        prop_assert_eq!(fingerprint(&value).unwrap(), fingerprint(&respelled).unwrap());
    }

    #[test]
    fn fingerprints_see_real_differences(value in arb_json(), extra in "\\PC{1,8}") {
        let wrapped = json!({ "v": value, "k": extra });
        let changed = json!({ "v": value, "k": format!("{extra}!") });
        prop_assert_ne!(fingerprint(&wrapped).unwrap(), fingerprint(&changed).unwrap());
    }

    #[test]
    fn accepted_ref_names_are_single_clean_segments(reference in "\\PC{0,40}|fsfolder://blobs/[A-Za-z0-9_./\\\\-]{0,30}\\.bin") {
        if let Some(name) = parse_ref_name(&reference, "fsfolder://blobs/", ".bin") {
            prop_assert!(!name.is_empty() && name.len() + 4 <= 255);
            prop_assert!(!name.contains('/') && !name.contains('\\') && !name.starts_with('.'));
            let path = std::path::Path::new("/root/blobs").join(format!("{name}.bin"));
            prop_assert_eq!(path.parent(), Some(std::path::Path::new("/root/blobs")));
        }
    }

    #[test]
    fn ref_syntax_never_accepts_traversal(reference in "[a-z]{1,6}://([A-Za-z0-9._-]{0,6}/){0,3}[A-Za-z0-9._-]{0,6}") {
        if check_ref_syntax(&reference).is_ok() {
            let path = reference.split_once("://").unwrap().1;
            prop_assert!(path.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
        }
    }

    #[test]
    fn parsing_handed_in_refs_never_panics(text in "\\PC{0,60}") {
        match CacheRef::parse_arg(&text) {
            Ok(r) => prop_assert!(check_ref_syntax(&r.reference).is_ok()),
            Err(e) => prop_assert!(matches!(e, Error::InvalidRef { .. }), "{:?}", e),
        }
    }

    #[test]
    fn envelopes_round_trip(bytes in prop::collection::vec(any::<u8>(), 0..512), mime in proptest::option::of("[a-z]{1,8}/[a-z]{1,8}")) {
        let env = InlineBinary::encode(&bytes, mime.as_deref());
        let back = InlineBinary::decode(&env).unwrap().unwrap();
        prop_assert_eq!(&back.bytes[..], &bytes[..]);
        prop_assert_eq!(back.mime, mime);
    }

    #[test]
    fn garbage_envelopes_are_errors_not_panics(b64 in "\\PC{0,40}", size in any::<u64>()) {
        let value = json!({ "__binaryPortWire": 1, "base64": b64, "size": size });
        match InlineBinary::decode(&value) {
            Ok(Some(bin)) => prop_assert_eq!(bin.bytes.len() as u64, size),
            Ok(None) => prop_assert!(false, "an envelope was not recognised"),
            Err(e) => prop_assert!(matches!(e, Error::InvalidInput { .. }), "{:?}", e),
        }
    }

    #[test]
    fn url_parsing_never_panics_and_fails_typed(text in "\\PC{0,60}|(fs|file|sqlite|s3|memory)://\\PC{0,40}") {
        if let Err(e) = Location::parse(&text) {
            prop_assert!(matches!(e, Error::InvalidUrl { .. }), "{:?}", e);
        }
        let _ = redact_url(&text);
    }

    #[test]
    fn size_and_duration_parsing_never_panics(text in "\\PC{0,20}|[0-9]{1,25} ?(b|kb|KiB|MiB|GiB|TiB|x)") {
        let _ = parse_size(&text);
        let _ = parse_duration(&text);
    }
}

/// Numbers around the edges where doubles stop holding every integer.
fn arb_number() -> impl Strategy<Value = Value> {
    let two53 = 1u64 << 53;
    prop_oneof![
        (0u64..4096).prop_map(move |d| json!(two53 - 2048 + d)),
        (0u64..4096).prop_map(move |d| json!(-((two53 - 2048 + d) as i64))),
        (0u64..4096).prop_map(|d| json!(u64::MAX - d)),
        (0u64..4096).prop_map(|d| json!((1u64 << 60) + d * 7)),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(|u| json!(u as f64)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
    ]
}

/// The mathematical value of a JSON number, exactly: an integer where it is one.
enum Exact {
    Int(i128),
    Float(f64),
}

fn exact(v: &Value) -> Exact {
    let n = v.as_number().unwrap();
    if let Some(u) = n.as_u64() {
        return Exact::Int(u as i128);
    }
    if let Some(i) = n.as_i64() {
        return Exact::Int(i as i128);
    }
    let f = n.as_f64().unwrap();
    if f.fract() == 0.0 && f.abs() < 1e38 {
        Exact::Int(f as i128)
    } else {
        Exact::Float(f)
    }
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (exact(a), exact(b)) {
        (Exact::Int(x), Exact::Int(y)) => x == y,
        (Exact::Float(x), Exact::Float(y)) => x == y,
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// DESIGN §7 invariant 11: two inputs share a fingerprint exactly when they are the same value.
    #[test]
    fn numbers_share_a_fingerprint_only_when_they_are_the_same_value(a in arb_number(), b in arb_number()) {
        let (fa, fb) = (fingerprint(&json!({"n": a})).unwrap(), fingerprint(&json!({"n": b})).unwrap());
        prop_assert_eq!(fa == fb, same_value(&a, &b), "{} vs {}", a, b);
    }

    /// Within what doubles hold exactly, the canonical form is RFC 8785's, as the reference crate writes it.
    #[test]
    fn canonical_form_matches_the_reference_implementation(value in arb_json()) {
        // Round every number to the double nearest it, so all of them are in the shared domain.
        fn doubles_only(v: Value) -> Value {
            match v {
                Value::Number(n) => json!(n.as_f64().unwrap()),
                Value::Array(items) => Value::Array(items.into_iter().map(doubles_only).collect()),
                Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, doubles_only(v))).collect()),
                other => other,
            }
        }
        let value = doubles_only(value);
        prop_assert_eq!(
            outcache::wire::canonical_json(&value).unwrap(),
            serde_json_canonicalizer::to_string(&value).unwrap()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Garbage where a row record belongs (bytes, or JSON of any shape, including near-miss records with
    /// wrong types and huge numbers) is a typed error or a record, never a panic; the kind is never
    /// "newer format" unless `v` says so.
    #[test]
    fn garbage_row_records_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), value in arb_json(),
                                       v in any::<u64>(), created in any::<u64>()) {
        let _ = outcache::layout::decode_row(&bytes, "t", "f");
        let _ = outcache::layout::corrupt_kind(&bytes);
        let text = serde_json::to_vec(&value).unwrap();
        let _ = outcache::layout::decode_row(&text, "t", "f");
        let near = json!({"v": v, "task_type": value, "fingerprint": "a".repeat(64),
                          "created_at_ms": created, "output": value});
        let near = serde_json::to_vec(&near).unwrap();
        match outcache::layout::decode_row(&near, "t", "f") {
            Ok(_) => prop_assert_eq!(v, 1),
            Err(_) => {
                let kind = outcache::layout::corrupt_kind(&near);
                prop_assert_eq!(kind == outcache::CorruptKind::NewerFormat, v > 1);
            }
        }
    }

    /// Any JSON value goes through the ref and envelope readers without a panic.
    #[test]
    fn any_json_through_the_ref_readers_never_panics(value in arb_json()) {
        let _ = CacheRef::from_value(&value);
        let _ = outcache::wire::refs_in(&value);
        let _ = InlineBinary::decode(&value);
        let _ = outcache::wire::canonical_json(&value);
    }

    /// Any directory name goes through the task-segment decoder without a panic, and a decoded one
    /// encodes back to itself.
    #[test]
    fn task_segments_decode_garbage_safely(name in "\\PC{0,40}|[A-Za-z0-9._=-]{0,40}") {
        if let Some(task) = outcache::layout::decode_task_segment(&name) {
            prop_assert_eq!(outcache::layout::encode_task_segment(&task), name);
        }
    }
}
