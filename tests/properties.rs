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
            prop_assert!(!name.is_empty() && name.len() <= 200);
            prop_assert!(!name.contains('/') && !name.contains('\\') && !name.contains('.'));
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
