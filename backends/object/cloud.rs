//! Cloud object stores by URL — `s3://bucket/prefix` (feature `s3`), `gs://bucket/prefix` (`gcs`),
//! `az://container/prefix` (`azure`) — with options in object_store's conventions, credentials from
//! each cloud's standard environment variables, and deliberate timeouts and retries. One validation
//! and one opening path for all three, so every scheme refuses unknown keys and redacts alike.
// The `cloud` feature on its own names no cloud: the enum is then empty and its matches unreachable.
#![cfg_attr(
    not(any(feature = "s3", feature = "gcs", feature = "azure")),
    allow(unreachable_code, unused_variables, unused_imports, dead_code)
)]

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

use super::ObjectCache;
use crate::error::{Error, Result};

/// Default per-request timeout (a dead endpoint fails within timeout × retries, bounded by the retry
/// timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default retries of a failed request.
pub const DEFAULT_MAX_RETRIES: usize = 3;
/// Default bound on the time spent retrying one request.
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(30);

/// outcache's own options (everything else goes to object_store's builder for the cloud).
const OWN: [&str; 4] = ["timeout", "connect_timeout", "max_retries", "retry_timeout"];

/// A cloud object store this build can open by URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cloud {
    /// `s3://`: AWS S3 and S3-compatible stores (MinIO, Ceph, R2 …).
    #[cfg(feature = "s3")]
    S3,
    /// `gs://`: Google Cloud Storage.
    #[cfg(feature = "gcs")]
    Gcs,
    /// `az://`: Azure Blob Storage (and the Azurite emulator with `use_emulator=true`).
    #[cfg(feature = "azure")]
    Azure,
}

impl Cloud {
    /// The cloud a URL scheme names, if this build has it.
    pub fn from_scheme(scheme: &str) -> Option<Cloud> {
        match scheme {
            #[cfg(feature = "s3")]
            "s3" => Some(Cloud::S3),
            #[cfg(feature = "gcs")]
            "gs" => Some(Cloud::Gcs),
            #[cfg(feature = "azure")]
            "az" => Some(Cloud::Azure),
            _ => None,
        }
    }

    /// The URL scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            #[cfg(feature = "s3")]
            Cloud::S3 => "s3",
            #[cfg(feature = "gcs")]
            Cloud::Gcs => "gs",
            #[cfg(feature = "azure")]
            Cloud::Azure => "az",
        }
    }

    /// What the URL's host names: a bucket, or Azure's container.
    pub fn holder(self) -> &'static str {
        match self {
            #[cfg(feature = "azure")]
            Cloud::Azure => "container",
            #[allow(unreachable_patterns)]
            _ => "bucket",
        }
    }

    /// Whether `key` is one of object_store's configuration keys for this cloud.
    fn knows(self, key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        match self {
            #[cfg(feature = "s3")]
            Cloud::S3 => key.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok(),
            #[cfg(feature = "gcs")]
            Cloud::Gcs => key.parse::<object_store::gcp::GoogleConfigKey>().is_ok(),
            #[cfg(feature = "azure")]
            Cloud::Azure => key.parse::<object_store::azure::AzureConfigKey>().is_ok(),
        }
    }

    fn example_keys(self) -> &'static str {
        match self {
            #[cfg(feature = "s3")]
            Cloud::S3 => "endpoint, region, allow_http",
            #[cfg(feature = "gcs")]
            Cloud::Gcs => "service_account, application_credentials",
            #[cfg(feature = "azure")]
            Cloud::Azure => "account_name, use_emulator, endpoint, allow_http",
        }
    }
}

fn duration(key: &str, value: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|e| format!("{key}={value:?} is not a duration like 30s or 2m: {e}"))
}

/// Refuse unknown option keys (object_store would silently drop them) and malformed values of
/// outcache's own options. The message names the key, never the value.
pub fn validate_options(
    cloud: Cloud,
    options: &[(String, String)],
) -> std::result::Result<(), String> {
    for (key, value) in options {
        match key.as_str() {
            "timeout" | "connect_timeout" | "retry_timeout" => {
                duration(key, value)?;
            }
            "max_retries" => {
                value
                    .parse::<usize>()
                    .map_err(|_| format!("max_retries must be a whole number, not {value:?}"))?;
            }
            other
                if (other.to_ascii_lowercase().contains("endpoint")
                    || other.to_ascii_lowercase().ends_with("url"))
                    && has_userinfo(value) =>
            {
                return Err(format!(
                    "{other} must not carry credentials (user:password@); give them as options or in \
                     the cloud's environment variables"
                ));
            }
            other if cloud.knows(other) => {}
            other => {
                return Err(format!(
                    "unknown option {other:?} (object_store {} keys such as {}, or {})",
                    cloud.scheme(),
                    cloud.example_keys(),
                    OWN.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// Refuses a proxy URL the HTTP client cannot use, from the URL's options or the environment: it
/// would otherwise fail only the first request, with "error sending request". The value may carry a
/// password, so it is never echoed.
fn check_proxy(proxy: Option<String>, invalid: &dyn Fn(String) -> Error) -> Result<()> {
    let usable = |value: &str| {
        url::Url::parse(value).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https" | "socks5" | "socks5h")
                && u.host_str().is_some_and(|h| !h.is_empty())
        })
    };
    match proxy {
        Some(value) if !usable(&value) => Err(invalid(
            "proxy_url must be an http://, https:// or socks5:// URL with a host, e.g. \
             proxy_url=http://proxy.internal:3128"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Whether a URL's authority holds userinfo (`user@`, `user:password@`).
fn has_userinfo(url: &str) -> bool {
    url.split_once("://").is_some_and(|(_, rest)| {
        rest.split(['/', '?', '#'])
            .next()
            .is_some_and(|authority| authority.contains('@'))
    })
}

/// The timeouts and retries of outcache's own options (already validated): the client's settings as
/// config pairs, applied on top of what the builder read from the environment (so `AWS_ALLOW_HTTP`
/// and the like still count), and the retry policy.
fn client_and_retry(
    options: &[(String, String)],
    invalid: &impl Fn(String) -> Error,
) -> Result<(Vec<(ClientConfigKey, String)>, RetryConfig)> {
    let (mut timeout, mut connect_timeout) = (DEFAULT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT);
    let (mut max_retries, mut retry_timeout) = (DEFAULT_MAX_RETRIES, DEFAULT_RETRY_TIMEOUT);
    for (key, value) in options {
        match key.as_str() {
            "timeout" => timeout = duration(key, value).map_err(invalid)?,
            "connect_timeout" => connect_timeout = duration(key, value).map_err(invalid)?,
            "retry_timeout" => retry_timeout = duration(key, value).map_err(invalid)?,
            "max_retries" => {
                max_retries = value
                    .parse()
                    .map_err(|_| invalid(format!("max_retries={value:?}")))?
            }
            _ => {}
        }
    }
    let client = vec![
        (
            ClientConfigKey::Timeout,
            format!("{}ms", timeout.as_millis()),
        ),
        (
            ClientConfigKey::ConnectTimeout,
            format!("{}ms", connect_timeout.as_millis()),
        ),
    ];
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries,
        retry_timeout,
    };
    Ok((client, retry))
}

/// The options meant for object_store's builder (outcache's own taken out), keys lowercased.
fn store_options(options: &[(String, String)]) -> impl Iterator<Item = (String, String)> + '_ {
    options
        .iter()
        .filter(|(k, _)| !OWN.contains(&k.as_str()))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
}

/// Refuses an endpoint object_store cannot talk to, before any request: one that is not an
/// `http(s)://host` URL (object_store panicked signing a request to `127.0.0.1:9000`, and failed every
/// request to an `ftp://` one with a bare "builder error"), and a plain `http://` one without
/// `allow_http=true`. The endpoint itself is never echoed: its userinfo may hold a secret.
#[cfg(any(feature = "s3", feature = "azure"))]
fn check_endpoint(
    endpoint: Option<String>,
    allow_http: Option<String>,
    invalid: &dyn Fn(String) -> Error,
) -> Result<()> {
    let Some(endpoint) = endpoint else {
        return Ok(());
    };
    let parsed = url::Url::parse(&endpoint).ok();
    let scheme = parsed.as_ref().map(|u| u.scheme().to_owned());
    let has_host = parsed.as_ref().is_some_and(|u| u.host_str().is_some());
    match scheme.as_deref() {
        Some("https") if has_host => Ok(()),
        Some("http") if has_host => {
            if allow_http.is_some_and(|v| v.eq_ignore_ascii_case("true")) {
                Ok(())
            } else {
                Err(invalid(
                    "the endpoint is plain http://: add allow_http=true to the URL to use it \
                     without TLS (or give an https:// endpoint)"
                        .into(),
                ))
            }
        }
        _ => Err(invalid(
            "the endpoint must be an http:// or https:// URL with a host, e.g. \
             endpoint=https://minio.internal:9000"
                .into(),
        )),
    }
}

/// Open `<scheme>://bucket/prefix` with `options` (already validated by [`validate_options`]).
pub fn open(
    cloud: Cloud,
    bucket: &str,
    prefix: &str,
    options: &[(String, String)],
) -> Result<ObjectCache> {
    let label = format!("{}://{bucket}/{prefix}", cloud.scheme());
    let invalid = |reason: String| Error::InvalidUrl {
        url: label.clone(),
        reason,
    };
    let (client, retry) = client_and_retry(options, &invalid)?;
    let unknown = |key: &str| invalid(format!("unknown option {key:?}"));
    let store: Arc<dyn ObjectStore> = match cloud {
        #[cfg(feature = "s3")]
        Cloud::S3 => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            // Client options first: `allow_http` and friends below are client settings too.
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry);
            for (key, value) in client {
                builder = builder.with_config(AmazonS3ConfigKey::Client(key), value);
            }
            for (key, value) in store_options(options) {
                let parsed = key
                    .parse::<AmazonS3ConfigKey>()
                    .map_err(|_| unknown(&key))?;
                builder = builder.with_config(parsed, value);
            }
            let has_endpoint = builder
                .get_config_value(&AmazonS3ConfigKey::Endpoint)
                .is_some();
            let has_key = builder
                .get_config_value(&AmazonS3ConfigKey::AccessKeyId)
                .is_some();
            let unsigned = builder
                .get_config_value(&AmazonS3ConfigKey::SkipSignature)
                .is_some_and(|v| v == "true");
            // The region goes into every request's host or signature: a space or a line break in
            // it made object_store panic signing the first request.
            let region = builder.get_config_value(&AmazonS3ConfigKey::Region);
            if region.is_some_and(|r| {
                r.is_empty()
                    || !r
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            }) {
                return Err(invalid(
                    "the region must be letters, digits, '-', '_' or '.' (e.g. region=us-east-1)"
                        .into(),
                ));
            }
            check_proxy(
                builder.get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::ProxyUrl)),
                &invalid,
            )?;
            check_endpoint(
                builder.get_config_value(&AmazonS3ConfigKey::Endpoint),
                builder.get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)),
                &invalid,
            )?;
            if has_endpoint && !has_key && !unsigned {
                // Without static credentials object_store would ask the AWS instance metadata
                // service, which an S3-compatible endpoint never needs.
                return Err(invalid(
                    "a custom endpoint needs credentials: set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY (or skip_signature=true for a public bucket)"
                        .into(),
                ));
            }
            Arc::new(builder.build().map_err(|e| invalid(e.to_string()))?)
        }
        #[cfg(feature = "gcs")]
        Cloud::Gcs => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
            let mut builder = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry);
            for (key, value) in client {
                builder = builder.with_config(GoogleConfigKey::Client(key), value);
            }
            for (key, value) in store_options(options) {
                let parsed = key.parse::<GoogleConfigKey>().map_err(|_| unknown(&key))?;
                builder = builder.with_config(parsed, value);
            }
            check_proxy(
                builder.get_config_value(&GoogleConfigKey::Client(ClientConfigKey::ProxyUrl)),
                &invalid,
            )?;
            Arc::new(builder.build().map_err(|e| invalid(e.to_string()))?)
        }
        #[cfg(feature = "azure")]
        Cloud::Azure => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let mut builder = MicrosoftAzureBuilder::from_env()
                .with_container_name(bucket)
                .with_retry(retry);
            for (key, value) in client {
                builder = builder.with_config(AzureConfigKey::Client(key), value);
            }
            for (key, value) in store_options(options) {
                let parsed = key.parse::<AzureConfigKey>().map_err(|_| unknown(&key))?;
                builder = builder.with_config(parsed, value);
            }
            check_proxy(
                builder.get_config_value(&AzureConfigKey::Client(ClientConfigKey::ProxyUrl)),
                &invalid,
            )?;
            let emulator = builder
                .get_config_value(&AzureConfigKey::UseEmulator)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
            if !emulator {
                check_endpoint(
                    builder.get_config_value(&AzureConfigKey::Endpoint),
                    builder.get_config_value(&AzureConfigKey::Client(ClientConfigKey::AllowHttp)),
                    &invalid,
                )?;
            }
            Arc::new(builder.build().map_err(|e| invalid(e.to_string()))?)
        }
    };
    // S3 (ListObjectsV2), GCS and Azure (List Blobs) all list keys in lexicographic order.
    Ok(ObjectCache::new(store, Path::from(prefix), label).with_sorted_listing(true))
}
