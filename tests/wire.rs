//! The wire formats are the product's contract: golden vectors pin the fingerprint (RFC 8785) so it never
//! drifts between releases, and the CacheRef / envelope / ref-syntax rules are checked case by case.
//! Expected fingerprints were computed outside this crate (Python hashlib over the RFC's canonical text).

use outcache::wire::{
    MAX_OUTPUT_DEPTH, canonical_json, check_output_depth, check_ref_syntax, fingerprint,
    parse_ref_name, refs_in,
};
use outcache::{CacheRef, Error, InlineBinary, RowKey};
use serde_json::{Value, json};

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("test vector is valid JSON")
}

/// (input, canonical form, sha256 of the canonical form)
const GOLDEN: &[(&str, &str, &str)] = &[
    // RFC 8785 §3.2.2: number forms, string escapes, literals.
    (
        r#"{"numbers":[333333333.33333329,1E30,4.50,2e-3,0.000000000000000000000000001],"string":"\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/","literals":[null,true,false]}"#,
        r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#,
        "2d5e01a318d0f0879ab568c4be289c8b1f64ef8921a53c6277d5e069978baacb",
    ),
    // RFC 8785 §3.2.3: keys sorted by UTF-16 code units (the emoji's surrogates sort before U+FB33).
    (
        r#"{"\u20ac":"Euro Sign","\r":"Carriage Return","\ufb33":"Hebrew Letter Dalet With Dagesh","1":"One","\ud83d\ude00":"Emoji: Grinning Face","\u0080":"Control\u0080","\u00f6":"Latin Small Letter O With Diaeresis"}"#,
        "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\u{80}\",\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}",
        "fa0419490a23b737c2fb22bdd9ed93557c8a8a86a444bf23a9cae7c2547c279a",
    ),
    // Nested objects are sorted at every depth (the TypeScript original sorted only the top level).
    (
        r#"{ "z": "last", "a": { "c": [ { "e": null, "d": true } ], "b": 1.0 } }"#,
        r#"{"a":{"b":1,"c":[{"d":true,"e":null}]},"z":"last"}"#,
        "9c0fb66875527f9582856221a4e28168e5ab19564465b647579a37c90f1df71d",
    ),
    (
        "{ }",
        "{}",
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    ),
    (
        "1.0",
        "1",
        "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
    ),
];

#[test]
fn fingerprint_matches_golden_vectors() {
    for (input, canonical, sha) in GOLDEN {
        let value = parse(input);
        assert_eq!(
            canonical_json(&value).unwrap(),
            *canonical,
            "canonical form of {input}"
        );
        assert_eq!(fingerprint(&value).unwrap(), *sha, "fingerprint of {input}");
    }
}

#[test]
fn fingerprint_ignores_key_order_at_every_depth_and_number_spelling() {
    let a = parse(r#"{"x":{"p":1,"q":[{"m":2.0,"n":"s"}]},"y":1e2}"#);
    let b = parse(r#"{"y":100,"x":{"q":[{"n":"s","m":2}],"p":1.00}}"#);
    assert_eq!(fingerprint(&a).unwrap(), fingerprint(&b).unwrap());
    assert_eq!(RowKey::new("t", &a).unwrap(), RowKey::new("t", &b).unwrap());
}

#[test]
fn fingerprint_distinguishes_real_differences() {
    let pairs = [
        (json!({"a": 1}), json!({"a": 2})),
        (json!({"a": 1}), json!({"a": "1"})),
        (json!([1, 2]), json!([2, 1])),
        (json!({"a": null}), json!({})),
        (json!({"a": {"b": 1}}), json!({"a.b": 1})),
    ];
    for (x, y) in pairs {
        assert_ne!(
            fingerprint(&x).unwrap(),
            fingerprint(&y).unwrap(),
            "{x} vs {y}"
        );
    }
}

#[test]
fn row_keys_refuse_bad_parts() {
    assert!(matches!(
        RowKey::new("", &json!({})),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        RowKey::new("a\nb", &json!({})),
        Err(Error::InvalidInput { .. })
    ));
    assert!(RowKey::new(&"x".repeat(1025), &json!({})).is_err());
    assert!(RowKey::from_parts("t", "../../etc/passwd").is_err());
    assert!(
        RowKey::from_parts("t", &"A".repeat(64)).is_err(),
        "uppercase hex is not canonical"
    );
    assert!(RowKey::from_parts("t", &"a".repeat(64)).is_ok());
}

#[test]
fn cache_ref_requires_the_brand_and_a_string_ref() {
    assert!(CacheRef::is_ref(
        &json!({"kind": "task-graph/CacheRef", "$ref": "fsfolder://blobs/a.bin"})
    ));
    for not_a_ref in [
        json!({"$ref": "#/definitions/x"}),
        json!({"kind": "task-graph/cacheref", "$ref": "x://y"}),
        json!({"kind": "task-graph/CacheRef", "$ref": 5}),
        json!({"kind": "task-graph/CacheRef"}),
        json!(["task-graph/CacheRef"]),
        json!("fsfolder://blobs/a.bin"),
    ] {
        assert!(!CacheRef::is_ref(&not_a_ref), "{not_a_ref}");
        assert_eq!(CacheRef::from_value(&not_a_ref), None);
    }
}

#[test]
fn cache_ref_preserves_unknown_and_mistyped_fields() {
    let wire = json!({
        "kind": "task-graph/CacheRef", "$ref": "fsfolder://blobs/a.bin", "size": 12, "mime": "image/png",
        "port": "out", "sha256": "ab", "future": {"x": [1]}, "size2": "y"
    });
    let r = CacheRef::from_value(&wire).unwrap();
    assert_eq!(
        (r.size, r.mime.as_deref(), r.port.as_deref()),
        (Some(12), Some("image/png"), Some("out"))
    );
    assert_eq!(r.to_value(), wire);
    let odd = json!({"kind": "task-graph/CacheRef", "$ref": "x://y", "size": "twelve"});
    let r = CacheRef::from_value(&odd).unwrap();
    assert_eq!(r.size, None);
    assert_eq!(
        r.to_value(),
        odd,
        "a mistyped size is kept as it was, not dropped"
    );
}

#[test]
fn refs_in_finds_branded_refs_at_any_depth_only() {
    let value = json!({
        "a": {"kind": "task-graph/CacheRef", "$ref": "m://blobs/1"},
        "b": [{"deep": {"kind": "task-graph/CacheRef", "$ref": "m://blobs/2"}}],
        "schema": {"$ref": "#/x"},
    });
    let found: Vec<String> = refs_in(&value).into_iter().map(|r| r.reference).collect();
    assert_eq!(found, ["m://blobs/1", "m://blobs/2"]);
}

#[test]
fn envelope_round_trips_bytes_and_mime() {
    for bytes in [&b""[..], b"\x00", b"hello \xff\xfe binary"] {
        let env = InlineBinary::encode(bytes, Some("application/x-test"));
        assert_eq!(env["__binaryPortWire"], 1);
        assert_eq!(env["size"], bytes.len());
        let back = InlineBinary::decode(&env).unwrap().unwrap();
        assert_eq!(&back.bytes[..], bytes);
        assert_eq!(back.mime.as_deref(), Some("application/x-test"));
    }
    let wire = json!({"__binaryPortWire": 1, "base64": "aGk=", "size": 2});
    assert_eq!(
        &InlineBinary::decode(&wire).unwrap().unwrap().bytes[..],
        b"hi"
    );
}

#[test]
fn envelope_codec_passes_other_values_through_and_rejects_garbage() {
    for other in [
        json!({"kind": "task-graph/CacheRef", "$ref": "x://y"}),
        json!({"base64": "aGk="}),
        json!(3),
    ] {
        assert_eq!(InlineBinary::decode(&other).unwrap(), None, "{other}");
    }
    for garbage in [
        json!({"__binaryPortWire": 1, "base64": "not base64!"}),
        json!({"__binaryPortWire": 1, "base64": 7}),
        json!({"__binaryPortWire": 1, "base64": "aGk=", "size": 3}),
    ] {
        assert!(
            matches!(
                InlineBinary::decode(&garbage),
                Err(Error::InvalidInput { .. })
            ),
            "{garbage}"
        );
    }
}

#[test]
fn ref_names_accept_exactly_one_clean_segment() {
    let p = "fsfolder://blobs/";
    assert_eq!(
        parse_ref_name("fsfolder://blobs/a_b-1.bin", p, ".bin"),
        Some("a_b-1")
    );
    for bad in [
        "fsfolder://blobs/.bin",
        "fsfolder://blobs/../x.bin",
        "fsfolder://blobs/a/b.bin",
        "fsfolder://blobs/a\\b.bin",
        "fsfolder://blobs/a\0.bin",
        "fsfolder://blobs/..bin",
        "fsfolder://blobs/.hidden.bin",
        "fsfolder://blobs//etc/passwd.bin",
        "fsfolder://blobs/a.bin/",
        "FSFOLDER://blobs/a.bin",
        "/abs/a.bin",
        "memory://blobs/a.bin",
    ] {
        assert_eq!(parse_ref_name(bad, p, ".bin"), None, "{bad:?}");
    }
    // Names up to a file name's 255 bytes (with ".bin") pass; longer ones do not.
    let longest = format!("fsfolder://blobs/{}.bin", "a".repeat(251));
    assert!(parse_ref_name(&longest, p, ".bin").is_some());
    let long = format!("fsfolder://blobs/{}.bin", "a".repeat(252));
    assert_eq!(parse_ref_name(&long, p, ".bin"), None);
}

/// DESIGN §2: refs the TypeScript original wrote (`^fsfolder://blobs/([\w.-]+\.bin)$`, dots allowed, as in
/// its run-private names) resolve here too.
#[test]
fn typescript_ref_names_with_dots_are_accepted() {
    let p = "fsfolder://blobs/";
    for (r, name) in [
        ("fsfolder://blobs/a.b.bin", "a.b"),
        (
            "fsfolder://blobs/__run.6a3f.image_render_0123.out.bin",
            "__run.6a3f.image_render_0123.out",
        ),
        ("fsfolder://blobs/x..y.bin", "x..y"),
    ] {
        assert_eq!(parse_ref_name(r, p, ".bin"), Some(name), "{r}");
    }
}

#[test]
fn ref_syntax_rejects_traversal_and_garbage_handed_in() {
    assert!(check_ref_syntax("fsfolder://blobs/a.bin").is_ok());
    assert!(check_ref_syntax("s3://bucket/prefix/blobs/x").is_ok());
    for bad in [
        "fsfolder://blobs/../../etc/passwd",
        "fsfolder://blobs/./x",
        "fsfolder://blobs//x",
        "fsfolder:///etc/passwd",
        "fsfolder://blobs/a b",
        "fsfolder://blobs/a\\b",
        "FS://x",
        "/etc/passwd",
        "plain",
    ] {
        assert!(check_ref_syntax(bad).is_err(), "{bad:?}");
        assert!(
            matches!(CacheRef::parse_arg(bad), Err(Error::InvalidRef { .. })),
            "{bad:?}"
        );
    }
    assert!(matches!(
        CacheRef::parse_arg(r##"{"$ref":"#/x"}"##),
        Err(Error::InvalidRef { .. })
    ));
    assert!(matches!(
        CacheRef::parse_arg("{not json"),
        Err(Error::InvalidRef { .. })
    ));
    let r = CacheRef::parse_arg(
        r#" {"kind":"task-graph/CacheRef","$ref":"fsfolder://blobs/a.bin","size":1} "#,
    )
    .unwrap();
    assert_eq!(
        (r.reference.as_str(), r.size),
        ("fsfolder://blobs/a.bin", Some(1))
    );
}

/// Distinct inputs never share a fingerprint (DESIGN §7 invariant 11): integers a double cannot hold exactly
/// are fingerprinted exactly, while every number a double holds keeps its RFC 8785 form.
#[test]
fn integers_beyond_2_pow_53_are_fingerprinted_exactly() {
    let fp = |v: Value| fingerprint(&json!({ "user_id": v })).unwrap();
    let two53: u64 = 1 << 53;
    assert_ne!(fp(json!(two53)), fp(json!(two53 + 1)));
    assert_ne!(fp(json!(u64::MAX)), fp(json!(u64::MAX - 1)));
    assert_ne!(fp(json!(i64::MIN + 1)), fp(json!(i64::MIN + 2)));
    assert_ne!(fp(json!(-(two53 as i64) - 1)), fp(json!(-(two53 as i64))));
    // A double holds 2^53 + 2 and 2^60 exactly: the integer and the double are one value, one key.
    assert_eq!(fp(json!(two53 + 2)), fp(json!((two53 + 2) as f64)));
    assert_eq!(fp(json!(1u64 << 60)), fp(json!((1u64 << 60) as f64)));
    // ... and the unrepresentable neighbour printed like the double's shortest form does not collide.
    assert_ne!(
        fp(json!(1_152_921_504_606_847_000u64)),
        fp(json!((1u64 << 60) as f64))
    );
    assert_eq!(
        canonical_json(&json!([9007199254740993u64, -9007199254740993i64])).unwrap(),
        "[9007199254740993n,-9007199254740993n]"
    );
    // The safe range keeps its RFC 8785 spelling (golden vectors above pin whole documents).
    assert_eq!(
        canonical_json(&json!([9007199254740992u64, 1.0, -0.0, 1e21])).unwrap(),
        "[9007199254740992,1,0,1e+21]"
    );
}

#[test]
fn text_inputs_refuse_integers_beyond_64_bits_naming_the_path() {
    use outcache::wire::parse_json;
    for text in [
        r#"{"a":{"ids":[1,18446744073709551617]}}"#,
        r#"{"a":{"ids":[1,-9223372036854775809]}}"#,
        r#"{"a":{"ids":[1, 100000000000000000000000000000]}}"#,
    ] {
        match parse_json("--inputs JSON", text) {
            Err(Error::InvalidInput { what, reason }) => {
                assert_eq!(what, "--inputs JSON");
                assert!(reason.contains("$.a.ids[1]"), "{reason}");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
    // Everything 64 bits hold, decimals and exponents (IEEE doubles), and digits inside strings pass.
    for text in [
        r#"{"a":18446744073709551615,"b":-9223372036854775808,"c":1e400000000000000000000}"#,
        r#"{"s":"18446744073709551617123","d":1.8446744073709551617e19}"#,
    ] {
        if text.contains("1e4000") {
            assert!(
                parse_json("x", text).is_err(),
                "an infinite double is refused"
            );
            continue;
        }
        parse_json("x", text).unwrap();
    }
    assert!(matches!(
        parse_json("x", "{"),
        Err(Error::InvalidInput { .. })
    ));
}

#[test]
fn text_inputs_refuse_a_key_named_twice_in_one_object() {
    use outcache::wire::parse_json;
    // serde_json alone keeps the last: `{"a":3,"a":4}` would be the task `{"a":4}`.
    for text in [
        r#"{"a":3,"a":4}"#,
        r#"{"a":3,"a":3}"#,
        r#"[1,{"x":{"deep":1,"b":[],"deep":2}}]"#,
        r#"{"a":1,"\u0061":2}"#,
    ] {
        match parse_json("--inputs JSON", text) {
            Err(Error::InvalidInput { what, reason }) => {
                assert_eq!(what, "--inputs JSON");
                assert!(reason.contains("appears twice"), "{text}: {reason}");
                assert!(reason.contains("column"), "{text}: says where: {reason}");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
    // The same key in different objects, and every kind of value, read as serde_json reads them.
    let text =
        r#"{"a":{"a":1},"b":[{"a":2},{"a":-3}],"c":[true,null,"s",1.5,-0.0,18446744073709551615]}"#;
    assert_eq!(
        parse_json("x", text).unwrap(),
        serde_json::from_str::<serde_json::Value>(text).unwrap()
    );
}

/// `levels` arrays and objects nested alternately around a number.
fn nested(levels: usize) -> Value {
    let mut v = json!(1);
    for i in 0..levels {
        // Built by hand: `json!` would serialize `v` again, recursively, at every level.
        v = if i % 2 == 0 {
            Value::Array(vec![json!(0), v])
        } else {
            Value::Object([("k".to_owned(), v)].into_iter().collect())
        };
    }
    v
}

/// Drop a deep value without recursion in serde_json's destructor.
fn drop_deep(mut v: Value) {
    loop {
        v = match v {
            Value::Array(mut items) => items.pop().unwrap_or(Value::Null),
            Value::Object(map) => map.into_iter().next().map_or(Value::Null, |(_, v)| v),
            _ => return,
        };
    }
}

#[test]
fn outputs_nest_up_to_the_limit_and_no_deeper() {
    for ok in [
        json!(1),
        json!([]),
        json!({}),
        nested(1),
        nested(MAX_OUTPUT_DEPTH),
    ] {
        check_output_depth(&ok).unwrap();
    }
    // What the engine accepts, serde_json reads back, with a record's level around it to spare.
    let text = json!({ "output": nested(MAX_OUTPUT_DEPTH) }).to_string();
    serde_json::from_str::<Value>(&text).unwrap();

    let e = check_output_depth(&nested(MAX_OUTPUT_DEPTH + 1)).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput { what, .. } if what == "output"),
        "{e:?}"
    );
    // The path names where: its first steps, a count of the rest, its last steps.
    let text = e.to_string();
    assert!(text.contains("deeper than 100 levels"), "{text}");
    assert!(text.contains("at $[1].k[1].k"), "{text}");
    assert!(text.contains("more)"), "{text}");
    assert!(
        text.len() < 300,
        "one line, not a path 100 steps long: {text}"
    );
    // An empty array or object is a level too, as it is to serde_json's parser.
    let mut empties = json!([]);
    for _ in 1..MAX_OUTPUT_DEPTH {
        empties = Value::Array(vec![empties]);
    }
    check_output_depth(&empties).unwrap();
    assert!(check_output_depth(&Value::Array(vec![empties])).is_err());

    // Any depth built in code is refused without overflowing the stack.
    let absurd = nested(200_000);
    assert!(check_output_depth(&absurd).is_err());
    drop_deep(absurd);
}

#[test]
fn absurdly_deep_inputs_are_refused_not_overflowed() {
    let mut v = json!(1);
    for _ in 0..1000 {
        v = json!([v]);
    }
    assert!(matches!(fingerprint(&v), Err(Error::InvalidInput { .. })));
    // Drop a deep value without recursion in serde_json's destructor.
    while let Value::Array(mut items) = v {
        v = items.pop().unwrap_or(Value::Null);
    }
}
