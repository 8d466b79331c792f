//! Configuration as operators meet it: flag > environment > file > default, unknown keys named, file
//! values applied, secrets never printed.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn run(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outcache"));
    cmd.current_dir(dir)
        .args(args)
        .env_remove("OUTCACHE_URL")
        .env_remove("OUTCACHE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn effective(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["config", "--json"]);
    let out = run(dir, env, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn precedence_is_flag_then_env_then_file_then_default() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let home = d.join("home");
    let env_home = [("HOME", home.to_str().unwrap()), ("XDG_CACHE_HOME", "")];
    let v = effective(d, &env_home, &[]);
    assert_eq!(v["url"]["source"], "default");
    assert!(
        v["url"]["value"]
            .as_str()
            .unwrap()
            .ends_with("/home/.cache/outcache"),
        "{v}"
    );

    std::fs::write(
        d.join("outcache.toml"),
        "url = \"fs:///from/file\"\nreference_threshold = \"1KiB\"\n",
    )
    .unwrap();
    let v = effective(d, &env_home, &[]);
    assert_eq!(v["url"]["value"], "fs:///from/file");
    assert!(
        v["url"]["source"].as_str().unwrap().starts_with("file "),
        "{v}"
    );
    assert_eq!(v["reference_threshold"]["value"], "1024");

    let v = effective(d, &[("OUTCACHE_URL", "fs:///from/env")], &[]);
    assert_eq!(
        (v["url"]["value"].as_str(), v["url"]["source"].as_str()),
        (Some("fs:///from/env"), Some("env OUTCACHE_URL"))
    );

    let v = effective(
        d,
        &[("OUTCACHE_URL", "fs:///from/env")],
        &["--url", "fs:///from/flag"],
    );
    assert_eq!(
        (v["url"]["value"].as_str(), v["url"]["source"].as_str()),
        (Some("fs:///from/flag"), Some("flag --url"))
    );

    let other = d.join("other.toml");
    std::fs::write(&other, "url = \"memory://\"\n").unwrap();
    let v = effective(d, &[("OUTCACHE_CONFIG", other.to_str().unwrap())], &[]);
    assert_eq!(
        v["url"]["value"], "memory://",
        "OUTCACHE_CONFIG beats ./outcache.toml"
    );
    let v = effective(
        d,
        &[("OUTCACHE_CONFIG", other.to_str().unwrap())],
        &["--config", d.join("outcache.toml").to_str().unwrap()],
    );
    assert_eq!(
        v["url"]["value"], "fs:///from/file",
        "--config beats OUTCACHE_CONFIG"
    );
}

#[test]
fn unknown_keys_and_bad_values_are_errors_that_name_them() {
    let dir = tempfile::tempdir().unwrap();
    for (text, mentions) in [
        (
            "url = \"memory://\"\nrefrence_threshold = 5\n",
            "refrence_threshold",
        ),
        ("[janitor]\ngrase = \"1h\"\n", "grase"),
        ("inline_limit = \"lots\"\n", "inline_limit"),
        (
            "url = \"memory://\"\n[janitor]\ngrace = \"soon\"\n",
            "janitor.grace",
        ),
        ("url = [1, 2]\n", "url"),
    ] {
        std::fs::write(dir.path().join("outcache.toml"), text).unwrap();
        let out = run(dir.path(), &[], &["config"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(mentions), "{text}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn file_values_apply_and_secrets_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::write(
        dir.path().join("outcache.toml"),
        format!(
            "url = \"fs://{}\"\nreference_threshold = \"1KiB\"\n[object_store]\nregion = \"eu-west-1\"\naws_secret_access_key = \"TOPSECRET\"\n",
            cache.display()
        ),
    )
    .unwrap();
    let put = {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_outcache"))
            .current_dir(dir.path())
            .env_remove("OUTCACHE_URL")
            .args(["put-blob", "t", "--inputs", "{}", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&[1u8; 2048]).unwrap();
        child.wait_with_output().unwrap()
    };
    let stored: Value = serde_json::from_slice(&put.stdout).unwrap();
    assert_eq!(
        stored["kind"], "task-graph/CacheRef",
        "2 KiB is above the file's 1 KiB threshold: {stored}"
    );

    let secret_url = "s3://b/p?endpoint=http://127.0.0.1:1&secret_access_key=URLSECRET";
    for args in [
        vec!["config"],
        vec!["config", "--json"],
        vec!["--url", secret_url, "config"],
    ] {
        let out = run(dir.path(), &[("AWS_SECRET_ACCESS_KEY", "ENVSECRET")], &args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for secret in ["TOPSECRET", "URLSECRET", "ENVSECRET"] {
            assert!(!text.contains(secret), "{args:?} printed a secret: {text}");
        }
        assert!(text.contains("eu-west-1"), "{text}");
    }
}

/// The redaction rule, tried as an attacker would: a fresh random marker in every secret-bearing place a
/// URL, a config file and the environment offer (userinfo, SSE-C key, proxy URL with a password, endpoint
/// userinfo, percent-encoded and misspelt key names, a TOML syntax error on a secret's line), through every
/// command, succeeding or failing: the marker appears in no output.
#[cfg(feature = "s3")]
#[test]
fn no_secret_reaches_any_output() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("MARK{}", uuid::Uuid::new_v4().simple());
    let m = marker.as_str();
    let dead = "endpoint=http://127.0.0.1:9&allow_http=true&max_retries=0&retry_timeout=1s&connect_timeout=1s&timeout=2s";
    #[cfg(feature = "azure")]
    let az_dead = "endpoint=http://127.0.0.1:9/acct&allow_http=true&max_retries=0&retry_timeout=1s&connect_timeout=1s&timeout=2s";
    #[allow(unused_mut)]
    let mut urls = [
        format!("s3://{m}@bucket/p?{dead}"),
        format!("s3://user:{m}@bucket/p?{dead}"),
        format!("s3://bucket/p?{dead}&sse_customer_key_base64={m}"),
        format!("s3://bucket/p?{dead}&aws_sse_customer_key_base64={m}"),
        format!("s3://bucket/p?{dead}&proxy_url=http://u:{m}@proxy:8080"),
        format!("s3://bucket/p?allow_http=true&max_retries=0&endpoint=http://u:{m}@127.0.0.1:9"),
        format!("s3://bucket/p?{dead}&%73ecret%5Faccess%5Fkey={m}"),
        format!("s3://bucket/p?{dead}&secret_acess_key={m}"),
        format!("s3://bucket/p?{dead}&token={m}"),
        // The options' `?` typed as `&`, an unset variable in front of them, or no URL at all.
        format!("s3://bucket/p&secret_access_key={m}&{dead}"),
        format!("&secret_access_key={m}&access_key_id=AKID"),
        format!("secret_access_key={m}"),
    ]
    .to_vec();
    #[cfg(feature = "azure")]
    urls.extend([
        format!("az://container/p?account_name=acct&access_key={m}&{az_dead}"),
        format!("az://container/p?account_name=acct&sas_key={m}&{az_dead}"),
        format!(
            "az://container/p?account_name=acct&client_secret={m}&client_id=c&tenant_id=t&{az_dead}"
        ),
        format!("az://{m}@container/p?account_name=acct&{az_dead}"),
    ]);
    #[cfg(feature = "gcs")]
    urls.extend([
        format!("gs://bucket/p?service_account_key={m}&max_retries=0&retry_timeout=1s&timeout=2s"),
        format!(
            "gs://bucket/p?service_account_key=%7B%22private_key%22%3A%22{m}%22%7D&max_retries=0"
        ),
    ]);
    let files = [
        format!(
            "url = \"s3://bucket/p?{dead}\"\n[object_store]\nsse_customer_key_base64 = \"{m}\"\n"
        ),
        format!(
            "url = \"s3://bucket/p?{dead}\"\n[object_store]\nproxy_url = \"http://u:{m}@p:1\"\n"
        ),
        format!("url = \"memory://\"\nsecret_access_key = {m}\"\n"),
        format!("url = \"memory://\"\n[object_store]\naws_secret_access_key = \"{m}\n"),
    ];
    let commands: [&[&str]; 6] = [
        &["config"],
        &["config", "--json"],
        &["stats"],
        &["get", "t", "--inputs", "{}"],
        &["put", "t", "--inputs", "{}", "--output", "1"],
        &["prune", "--older-than", "1d", "--dry-run"],
    ];
    let check = |out: std::process::Output, what: &str| {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(m), "{what} printed the secret: {text}");
        assert!(!text.contains("panicked"), "{what}: {text}");
    };
    for url in &urls {
        for args in commands {
            let mut all = vec!["--url", url.as_str()];
            all.extend_from_slice(args);
            check(run(dir.path(), &[], &all), &format!("{url} {args:?}"));
        }
    }
    for (i, file) in files.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, file).unwrap();
        for args in commands {
            let mut all = vec!["--config", path.to_str().unwrap()];
            all.extend_from_slice(args);
            check(run(dir.path(), &[], &all), &format!("file {i} {args:?}"));
        }
    }
    let env = [
        ("AWS_SECRET_ACCESS_KEY", m),
        ("AWS_SESSION_TOKEN", m),
        ("AWS_ACCESS_KEY_ID", m),
    ];
    let url = format!("s3://bucket/p?{dead}");
    for args in commands {
        let mut all = vec!["--url", url.as_str()];
        all.extend_from_slice(args);
        check(run(dir.path(), &env, &all), &format!("env {args:?}"));
    }
}

/// An endpoint object_store cannot use is refused when the cache opens, saying what to give: a plain
/// `http://` one without `allow_http=true` (object_store alone failed every request with a bare
/// "builder error"), one that is no http(s) URL, and a region no request can carry. With the option the request goes out (and fails
/// here on the dead port, as a dead server does).
#[cfg(all(feature = "s3", feature = "azure"))]
#[test]
fn an_endpoint_or_region_object_store_cannot_use_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let fast = "max_retries=0&retry_timeout=1s&connect_timeout=1s&timeout=2s";
    for (url, fixed) in [
        (
            format!(
                "s3://b/p?endpoint=http://127.0.0.1:9&access_key_id=a&secret_access_key=s&{fast}"
            ),
            true,
        ),
        (
            format!(
                "s3://b/p?endpoint=HTTP://127.0.0.1:9&access_key_id=a&secret_access_key=s&allow_http=false&{fast}"
            ),
            false,
        ),
        (
            format!(
                "az://c/p?account_name=acct&access_key=a2V5&endpoint=http://127.0.0.1:9/acct&{fast}"
            ),
            true,
        ),
    ] {
        let out = run(dir.path(), &[], &["--url", &url, "stats"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains("add allow_http=true"), "{url}: {stderr}");
        if fixed {
            let allowed = format!("{url}&allow_http=true");
            let out = run(dir.path(), &[], &["--url", &allowed, "stats"]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{allowed}: {stderr}");
            assert!(!stderr.contains("allow_http"), "{allowed}: {stderr}");
        }
    }
    // An endpoint that is no http(s) URL is refused too (without a scheme object_store panicked
    // signing the first request, with another scheme it failed each one with "builder error"), and so
    // is a region that cannot stand in a host name or a signature (a line break panicked too). Each
    // given in the URL (`key=value`) or in object_store's environment variable (`VAR=value`).
    let creds = format!("access_key_id=a&secret_access_key=s&{fast}");
    for (given, mentions) in [
        (
            "endpoint=127.0.0.1:9",
            "http:// or https:// URL with a host",
        ),
        (
            "endpoint=ftp://127.0.0.1:9",
            "http:// or https:// URL with a host",
        ),
        ("endpoint=http://", "http:// or https:// URL with a host"),
        (
            "AWS_ENDPOINT=127.0.0.1:9",
            "http:// or https:// URL with a host",
        ),
        ("proxy_url=notaurl", "proxy_url must be an http://"),
        ("PROXY_URL=ftp://proxy:21", "proxy_url must be an http://"),
        ("aws_proxy_url=http://", "proxy_url must be an http://"),
        ("AWS_PROXY_URL=notaurl", "proxy_url must be an http://"),
        ("region=us%0Aeast", "the region must be"),
        ("region=%20", "the region must be"),
        ("AWS_REGION=a b", "the region must be"),
    ] {
        let (url, env) = match given.split_once('=') {
            Some((var, value)) if var.starts_with("AWS_") && var.to_uppercase() == var => {
                (format!("s3://b/p?{creds}"), vec![(var, value)])
            }
            _ => (format!("s3://b/p?{given}&{creds}"), Vec::new()),
        };
        let out = run(dir.path(), &env, &["--url", &url, "stats"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{given}: {stderr}");
        assert!(
            stderr.contains(mentions) && !stderr.contains("panicked"),
            "{given}: {stderr}"
        );
    }
    // object_store's own environment variable counts too (it was dropped when outcache set its
    // timeouts, so http endpoints failed even with it set).
    let url =
        format!("s3://b/p?endpoint=http://127.0.0.1:9&access_key_id=a&secret_access_key=s&{fast}");
    let out = run(
        dir.path(),
        &[("AWS_ALLOW_HTTP", "true")],
        &["--url", &url, "stats"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error sending request"), "{stderr}");
}

/// A cloud URL's prefix is percent-decoded as a local path is: `my%20cache` names the prefix `my cache`
/// (the key a library caller opening that prefix reaches), not the literal `my%20cache`, which would be
/// stored as `my%2520cache` and reach nothing else. On the real S3-compatible server.
#[cfg(feature = "s3")]
#[test]
fn a_percent_encoded_s3_prefix_names_the_decoded_prefix() {
    let Some(base) = common::server_env("OUTCACHE_S3_URL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let url = common::s3_child(&base, &format!("my%20cache%25{tag}"));
    let out = run(
        dir.path(),
        &[],
        &[
            "--url", &url, "put", "t", "--inputs", "{}", "--output", "[1]",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let outcache::config::Location::Cloud {
        cloud,
        bucket,
        prefix,
        options,
    } = outcache::config::Location::parse(&base).unwrap()
    else {
        panic!("OUTCACHE_S3_URL is not a cloud URL");
    };
    let plain = format!("{prefix}/my cache%{tag}");
    let store =
        outcache::backends::object::cloud::open(cloud, &bucket, &plain, &options.0).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use outcache::OutputCache;
        let key = outcache::RowKey::new("t", &serde_json::json!({})).unwrap();
        let row = store
            .get_row(&key)
            .await
            .unwrap()
            .expect("stored under the decoded prefix");
        assert_eq!(row.output, serde_json::json!([1]));
        store.delete_prefix("").await.unwrap();
    });
}
