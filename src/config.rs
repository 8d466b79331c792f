//! Naming a backend: cache URLs (`fs:///abs/dir`, `file:///abs/dir`, `sqlite:///…`, `s3://…`,
//! `memory://`) parsed into a [`Location`], the `OUTCACHE_URL` variable, the TOML config file with its
//! precedence, sizes and durations, the redaction rule, and the embedded default on local disk. One
//! parser, so the library and the CLI agree; [`crate::backends::open`] turns a location into a backend.

use std::path::PathBuf;

use url::Url;

use crate::error::{Error, Result};

/// The environment variable that names the cache when no URL is given.
pub const URL_ENV: &str = "OUTCACHE_URL";

/// Parse a byte size: a number (whole or decimal) with an optional unit (`B`, `KB`, `MB`, `GB`, `TB`
/// decimal; `KiB`, `MiB`, `GiB`, `TiB` binary; case-insensitive, spaces allowed), e.g. `10GiB`, `1.5GiB`,
/// `512 MB`, `4096`. A fraction of a byte rounds down.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let bad = || format!("{text:?} is not a size like 10GiB, 1.5GiB or 512MB");
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || fraction.contains('.') || fraction.len() > 9 {
        return Err(bad());
    }
    let digits = format!("{whole}{fraction}");
    let mantissa: u128 = digits.parse().map_err(|_| bad())?;
    let factor: u128 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use B, KB, MB, GB, KiB, MiB, GiB …)"
            ));
        }
    };
    let scale = 10u128.pow(fraction.len() as u32);
    mantissa
        .checked_mul(factor)
        .map(|bytes| bytes / scale)
        .and_then(|bytes| u64::try_from(bytes).ok())
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parse a duration like `30d`, `1h 30m`, `90s` (humantime).
pub fn parse_duration(text: &str) -> std::result::Result<std::time::Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 30d or 1h: {e}"))
}

/// The URL schemes this build understands.
pub fn supported_schemes() -> &'static [&'static str] {
    &[
        "memory",
        #[cfg(feature = "fs")]
        "fs",
        #[cfg(feature = "fs")]
        "file",
        #[cfg(feature = "sqlite")]
        "sqlite",
        #[cfg(feature = "s3")]
        "s3",
    ]
}

/// The embedded default: the fs backend under `$XDG_CACHE_HOME/outcache`, else `~/.cache/outcache`.
pub fn default_url() -> Result<String> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| Error::InvalidUrl {
            url: String::new(),
            reason: "no URL given, OUTCACHE_URL unset, and neither XDG_CACHE_HOME nor HOME is set"
                .into(),
        })?;
    let dir = base.join("outcache");
    Url::from_directory_path(&dir)
        .map(|u| {
            u.as_str()
                .trim_end_matches('/')
                .replacen("file://", "fs://", 1)
        })
        .map_err(|()| Error::InvalidUrl {
            url: dir.display().to_string(),
            reason: "the default cache directory is not an absolute path".into(),
        })
}

/// The URL to use: `explicit` if given, else `OUTCACHE_URL`, else [`default_url`].
pub fn effective_url(explicit: Option<&str>) -> Result<String> {
    match explicit {
        Some(url) => Ok(url.to_owned()),
        None => match std::env::var(URL_ENV) {
            Ok(url) if !url.trim().is_empty() => Ok(url),
            _ => default_url(),
        },
    }
}

/// Object-store options from a URL's query, in object_store's key conventions (`endpoint`, `region`,
/// `allow_http`, …) plus outcache's own `timeout`, `connect_timeout`, `max_retries` and `retry_timeout`.
/// Debug shows keys only: values may be secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StoreOptions(pub Vec<(String, String)>);

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| format!("{k}=<redacted>")))
            .finish()
    }
}

/// A parsed cache URL.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// `memory://`: a fresh in-process cache.
    Memory,
    /// `fs:///abs/dir` or `file:///abs/dir`.
    #[cfg(feature = "fs")]
    Fs {
        /// The root directory (absolute).
        root: PathBuf,
        /// `?durable=false` turns fsync off.
        durable: bool,
    },
    /// `sqlite:///abs/path/cache.db`.
    #[cfg(feature = "sqlite")]
    Sqlite {
        /// The database file (absolute).
        path: PathBuf,
        /// `?durable=false` commits with `synchronous=NORMAL`.
        durable: bool,
    },
    /// `s3://bucket/optional/prefix?endpoint=…&region=…&allow_http=true`.
    #[cfg(feature = "s3")]
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix inside the bucket (may be empty).
        prefix: String,
        /// Query options (validated).
        options: StoreOptions,
    },
}

fn invalid(url: &str, reason: impl Into<String>) -> Error {
    Error::InvalidUrl {
        url: redact_url(url),
        reason: reason.into(),
    }
}

/// What a redacted value prints as.
pub const REDACTED: &str = "<redacted>";

/// **The redaction rule**: a value is printed only if its key is on this allow-list of options known to
/// hold no secret (region, bucket, endpoint, timeouts, sizes, flags); every other value — credentials,
/// SSE-C keys, proxy URLs, anything unknown or misspelt — prints as [`REDACTED`]. Errors name keys, never
/// values. The check is on the percent-decoded, lowercased key with object_store's `aws_` prefix removed.
pub fn is_public_option(key: &str) -> bool {
    const PUBLIC: &[&str] = &[
        "region",
        "default_region",
        "bucket",
        "bucket_name",
        "endpoint",
        "endpoint_url",
        "allow_http",
        "allow_invalid_certificates",
        "virtual_hosted_style_request",
        "skip_signature",
        "unsigned_payload",
        "checksum_algorithm",
        "s3_express",
        "request_payer",
        "conditional_put",
        "disable_tagging",
        "imdsv1_fallback",
        "timeout",
        "connect_timeout",
        "max_retries",
        "retry_timeout",
        "durable",
    ];
    let decoded = percent_decode(key).to_ascii_lowercase();
    let bare = decoded.strip_prefix("aws_").unwrap_or(&decoded);
    PUBLIC.contains(&bare)
}

/// Whether an option key's value must never be shown: everything not on the allow-list
/// ([`is_public_option`]).
pub fn is_secret_key(key: &str) -> bool {
    !is_public_option(key)
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("k={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| text.to_owned())
}

/// How a public option's value prints: an endpoint without its userinfo (a password or token may sit
/// there) or query; anything else as it is.
fn public_value(key: &str, value: &str) -> String {
    let decoded = percent_decode(key).to_ascii_lowercase();
    if decoded.contains("endpoint") {
        return strip_userinfo_and_query(value);
    }
    value.to_owned()
}

fn strip_userinfo_and_query(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or(url);
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            let hidden = if authority.contains('@') {
                format!("{REDACTED}@")
            } else {
                String::new()
            };
            format!("{scheme}://{hidden}{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// `text` (an error message from a client library) with every URL in it passed through [`redact_url`]:
/// userinfo and non-public query values become [`REDACTED`].
pub fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The URL starts at the scheme before `://` and ends at whitespace or a quote.
        let start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || "+.-".contains(c)))
            .map_or(0, |i| i + 1);
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || "\"'<>`".contains(c))
            .map_or(rest.len(), |i| at + i);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// `url` for messages and logs: any userinfo (`user:password@`, a bare `TOKEN@`) replaced by
/// [`REDACTED`], and the value of every query option not on the allow-list ([`is_public_option`]) too.
pub fn redact_url(url: &str) -> String {
    let url = url.trim();
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let base = base.split('#').next().unwrap_or(base);
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://{REDACTED}@{host}{path}"),
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    let Some(query) = query else {
        return base;
    };
    let query = query.split('#').next().unwrap_or(query);
    let pairs: Vec<String> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if is_public_option(key) {
                format!("{key}={}", public_value(key, &percent_decode(value)))
            } else {
                format!("{key}={REDACTED}")
            }
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

#[cfg(any(feature = "fs", feature = "sqlite"))]
fn parse_bool(url: &str, key: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(invalid(
            url,
            format!("{key} must be true or false, not {value:?}"),
        )),
    }
}

/// The absolute local path of an `fs:`/`file:`/`sqlite:` URL and its `durable` option.
#[cfg(any(feature = "fs", feature = "sqlite"))]
fn local_path_and_durability(text: &str, url: &Url) -> Result<(PathBuf, bool)> {
    let scheme = url.scheme();
    if url
        .host_str()
        .is_some_and(|h| !h.is_empty() && h != "localhost")
    {
        return Err(invalid(
            text,
            format!(
                "{scheme}:// needs an absolute path with three slashes, e.g. {scheme}:///var/cache/outcache"
            ),
        ));
    }
    let mut durable = true;
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "durable" => durable = parse_bool(text, "durable", &value)?,
            other => {
                return Err(invalid(
                    text,
                    format!("unknown option {other:?} (known: durable)"),
                ));
            }
        }
    }
    // `url` only turns `file:` URLs into paths; the path part is still percent-encoded.
    let path = Url::parse(&format!("file://{}", url.path()))
        .ok()
        .filter(|_| !url.cannot_be_a_base())
        .ok_or_else(|| invalid(text, "not an absolute local path"))?
        .to_file_path()
        .map_err(|()| invalid(text, "not an absolute local path"))?;
    if !path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
        return Err(invalid(text, "the path must be absolute and free of '..'"));
    }
    Ok((path, durable))
}

/// Whether the path part of a URL's raw text has a `..` segment, plain or percent-encoded.
fn has_dot_dot_segment(text: &str) -> bool {
    let path = text.split(['?', '#']).next().unwrap_or(text);
    let path = path.split_once("://").map_or(path, |(_, rest)| rest);
    path.split(['/', '\\']).any(|segment| {
        let decoded = segment.replace("%2e", ".").replace("%2E", ".");
        decoded == ".."
    })
}

impl Location {
    /// Parse a cache URL. Unknown schemes, relative paths and unknown options are errors.
    pub fn parse(text: &str) -> Result<Self> {
        // URL parsing normalises `a/../b` (and `%2e%2e`) away before any check could see it: look at the
        // raw text, so a `..` is refused as the docs say rather than silently resolved.
        if has_dot_dot_segment(text) {
            return Err(invalid(text, "'..' path segments are not allowed"));
        }
        let url = Url::parse(text.trim()).map_err(|e| invalid(text, e.to_string()))?;
        match url.scheme() {
            "memory" => {
                if url.query().is_some() {
                    return Err(invalid(text, "memory:// takes no options"));
                }
                Ok(Location::Memory)
            }
            #[cfg(feature = "fs")]
            "fs" | "file" => {
                let (root, durable) = local_path_and_durability(text, &url)?;
                Ok(Location::Fs { root, durable })
            }
            #[cfg(feature = "sqlite")]
            "sqlite" => {
                let (path, durable) = local_path_and_durability(text, &url)?;
                if url.path().ends_with('/') {
                    return Err(invalid(
                        text,
                        "names a directory; give the database file, e.g. sqlite:///var/cache/outcache.db",
                    ));
                }
                Ok(Location::Sqlite { path, durable })
            }
            #[cfg(feature = "s3")]
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| {
                        invalid(text, "s3:// needs a bucket: s3://bucket/optional/prefix")
                    })?
                    .to_owned();
                let prefix = url.path().trim_matches('/').to_owned();
                let options: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                crate::backends::object::s3::validate_options(&options)
                    .map_err(|reason| invalid(text, reason))?;
                Ok(Location::S3 {
                    bucket,
                    prefix,
                    options: StoreOptions(options),
                })
            }
            other => Err(invalid(
                text,
                format!(
                    "unknown scheme {other:?} (supported: {})",
                    supported_schemes().join(", ")
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "fs")]
    #[test]
    fn parses_the_supported_forms() {
        assert_eq!(Location::parse("memory://").unwrap(), Location::Memory);
        assert_eq!(
            Location::parse("fs:///tmp/x").unwrap(),
            Location::Fs {
                root: "/tmp/x".into(),
                durable: true
            }
        );
        assert_eq!(
            Location::parse("file:///tmp/a%20b?durable=false").unwrap(),
            Location::Fs {
                root: "/tmp/a b".into(),
                durable: false
            }
        );
    }

    #[test]
    fn redacts_secrets_and_keeps_the_rest() {
        assert_eq!(
            redact_url(
                "s3://b/p?endpoint=http://h:1&aws_secret_access_key=S&access_key_id=K&token=T&region=r"
            ),
            "s3://b/p?endpoint=http://h:1&aws_secret_access_key=<redacted>&access_key_id=<redacted>&token=<redacted>&region=r"
        );
        assert_eq!(
            redact_url("s3://TOKEN@b/p?endpoint=http://u:pw@h:1/x?q=1&%73ecret%5Faccess%5Fkey=S"),
            "s3://<redacted>@b/p?endpoint=http://<redacted>@h:1/x&%73ecret%5Faccess%5Fkey=<redacted>"
        );
        assert_eq!(redact_url("s3://user:pw@host/x"), "s3://<redacted>@host/x");
        assert_eq!(redact_url("fs:///tmp/x"), "fs:///tmp/x");
        assert_eq!(
            scrub_urls(
                "Error performing GET http://u:pw@h:9/b?list-type=2&X-Amz-Signature=S in 2ms"
            ),
            "Error performing GET http://<redacted>@h:9/b?list-type=<redacted>&X-Amz-Signature=<redacted> in 2ms"
        );
        assert_eq!(scrub_urls("no url here"), "no url here");
    }

    #[test]
    fn parses_sizes_and_durations() {
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512 MB"), Ok(512_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "GiB", "10 parsecs", "-1", "99999999999999999999TiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_duration("30d"),
            Ok(std::time::Duration::from_secs(30 * 86400))
        );
        assert!(parse_duration("soon").is_err());
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn parses_sqlite_urls() {
        assert_eq!(
            Location::parse("sqlite:///tmp/c.db?durable=false").unwrap(),
            Location::Sqlite {
                path: "/tmp/c.db".into(),
                durable: false
            }
        );
    }

    #[test]
    fn refuses_bad_urls_with_a_reason() {
        for bad in [
            "fs://relative/dir",
            "fs:relative",
            "ftp://x",
            "fs:///tmp/x?speed=fast",
            "fs:///tmp/x?durable=maybe",
            "sqlite://relative.db",
            "sqlite:///tmp/dir/",
            "not a url",
            "",
        ] {
            let err = Location::parse(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {err}");
        }
    }
}

/// The environment variable that names a config file.
pub const CONFIG_ENV: &str = "OUTCACHE_CONFIG";
/// The config file used when neither `--config` nor `OUTCACHE_CONFIG` names one, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "outcache.toml";

/// A byte size in a config file: a number of bytes or a string like `"64KiB"`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self, key: &str) -> Result<u64> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(t) => parse_size(t).map_err(|reason| Error::InvalidInput {
                what: format!("config key {key}"),
                reason,
            }),
        }
    }
}

/// The `[janitor]` table.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JanitorFile {
    grace: Option<String>,
}

/// What a TOML config file may hold. Unknown keys are an error that names them.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    url: Option<String>,
    reference_threshold: Option<SizeValue>,
    inline_limit: Option<SizeValue>,
    high_water_mark: Option<SizeValue>,
    durable: Option<bool>,
    verify_reads: Option<bool>,
    #[serde(default)]
    object_store: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    janitor: JanitorFile,
}

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag.
    Flag(&'static str),
    /// An environment variable.
    Env(&'static str),
    /// A config file.
    File(PathBuf),
    /// Built in.
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "flag {flag}"),
            Source::Env(var) => write!(f, "env {var}"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Default => f.write_str("default"),
        }
    }
}

/// The effective configuration: the URL and options, each with its source. Precedence: flag >
/// environment > config file > built-in default.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The cache URL (may hold secrets in its query: show it through [`redact_url`]).
    pub url: String,
    /// Engine options.
    pub options: crate::options::CacheOptions,
    /// Durability for fs and SQLite when the URL does not say (`durable=` in the URL wins).
    pub durable: Option<bool>,
    /// Object-store options added to an object-store URL's own (the URL's win).
    pub object_store: Vec<(String, String)>,
    /// Default grace period of the janitor.
    pub janitor_grace: std::time::Duration,
    /// Where each setting came from, by key, in a stable order.
    pub sources: Vec<(String, Source)>,
}

impl Config {
    /// Resolve the configuration: `url_flag` (`--url`) and `config_flag` (`--config`) first, then
    /// `OUTCACHE_URL` / `OUTCACHE_CONFIG`, then `./outcache.toml` if present, then the defaults.
    pub fn load(url_flag: Option<&str>, config_flag: Option<&std::path::Path>) -> Result<Self> {
        let file_path = match config_flag {
            Some(p) => Some((p.to_owned(), true)),
            None => match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
                Some(p) => Some((PathBuf::from(p), true)),
                None => {
                    Some((PathBuf::from(DEFAULT_CONFIG_FILE), false)).filter(|(p, _)| p.is_file())
                }
            },
        };
        let (file, path) = match file_path {
            Some((path, _required)) => {
                // A config file that cannot be read is bad input (exit 2), like a malformed one.
                let text = std::fs::read_to_string(&path).map_err(|e| Error::InvalidInput {
                    what: format!("config file {}", path.display()),
                    reason: match e.kind() {
                        std::io::ErrorKind::InvalidData => "is not UTF-8 text".to_owned(),
                        _ if path.is_dir() => "is a directory".to_owned(),
                        _ => format!("cannot be read: {e}"),
                    },
                })?;
                let file: ConfigFile = toml::from_str(&text).map_err(|e| {
                    // One line: the message and the line number, never the line itself (it may
                    // hold a secret).
                    let at = e.span().map(|span| {
                        let line = text[..span.start.min(text.len())].matches('\n').count();
                        let key = text
                            .lines()
                            .nth(line)
                            .and_then(|l| l.split_once('='))
                            .map(|(k, _)| k.trim())
                            .filter(|k| {
                                k.len() <= 64
                                    && k.bytes()
                                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
                            });
                        match key {
                            Some(key) => format!(" (line {}, key {key})", line + 1),
                            None => format!(" (line {})", line + 1),
                        }
                    });
                    Error::InvalidInput {
                        what: format!("config file {}", path.display()),
                        reason: format!("{}{}", e.message().trim(), at.unwrap_or_default()),
                    }
                })?;
                (file, Some(path))
            }
            None => (ConfigFile::default(), None),
        };
        let from_file = || Source::File(path.clone().unwrap_or_default());
        let mut sources = Vec::new();

        let url = match (
            url_flag,
            std::env::var(URL_ENV).ok().filter(|u| !u.trim().is_empty()),
            &file.url,
        ) {
            (Some(u), _, _) => (u.to_owned(), Source::Flag("--url")),
            (None, Some(u), _) => (u, Source::Env(URL_ENV)),
            (None, None, Some(u)) => (u.clone(), from_file()),
            (None, None, None) => (default_url()?, Source::Default),
        };
        sources.push(("url".to_owned(), url.1));

        let mut options = crate::options::CacheOptions::default();
        let mut size = |key: &str, value: &Option<SizeValue>, target: &mut u64| -> Result<()> {
            let source = match value {
                Some(v) => {
                    *target = v.bytes(key)?;
                    from_file()
                }
                None => Source::Default,
            };
            sources.push((key.to_owned(), source));
            Ok(())
        };
        size(
            "reference_threshold",
            &file.reference_threshold,
            &mut options.reference_threshold,
        )?;
        size(
            "inline_limit",
            &file.inline_limit,
            &mut options.inline_limit,
        )?;
        let mut hwm = options.high_water_mark as u64;
        size("high_water_mark", &file.high_water_mark, &mut hwm)?;
        options.high_water_mark = usize::try_from(hwm).unwrap_or(usize::MAX);
        if let Some(v) = file.verify_reads {
            options.verify_reads = v;
        }
        sources.push((
            "verify_reads".to_owned(),
            if file.verify_reads.is_some() {
                from_file()
            } else {
                Source::Default
            },
        ));
        sources.push((
            "durable".to_owned(),
            if file.durable.is_some() {
                from_file()
            } else {
                Source::Default
            },
        ));
        let janitor_grace = match &file.janitor.grace {
            Some(g) => {
                sources.push(("janitor.grace".to_owned(), from_file()));
                parse_duration(g).map_err(|reason| Error::InvalidInput {
                    what: "config key janitor.grace".into(),
                    reason,
                })?
            }
            None => {
                sources.push(("janitor.grace".to_owned(), Source::Default));
                crate::options::DEFAULT_GRACE
            }
        };
        for key in file.object_store.keys() {
            sources.push((format!("object_store.{key}"), from_file()));
        }
        Ok(Config {
            url: url.0,
            options,
            durable: file.durable,
            object_store: file.object_store.into_iter().collect(),
            janitor_grace,
            sources,
        })
    }

    /// The backend location: the URL, with the file's durability and object-store options added where
    /// the URL does not set them.
    pub fn location(&self) -> Result<Location> {
        let mut location = Location::parse(&self.url)?;
        #[allow(unused_variables)] // unused when no backend with URL options is compiled in
        let url_keys: Vec<String> = Url::parse(self.url.trim())
            .map(|u| u.query_pairs().map(|(k, _)| k.into_owned()).collect())
            .unwrap_or_default();
        match &mut location {
            #[cfg(feature = "fs")]
            Location::Fs { durable, .. } => {
                if let (Some(d), false) = (self.durable, url_keys.iter().any(|k| k == "durable")) {
                    *durable = d;
                }
            }
            #[cfg(feature = "sqlite")]
            Location::Sqlite { durable, .. } => {
                if let (Some(d), false) = (self.durable, url_keys.iter().any(|k| k == "durable")) {
                    *durable = d;
                }
            }
            #[cfg(feature = "s3")]
            Location::S3 { options, .. } => {
                for (k, v) in &self.object_store {
                    if !options.0.iter().any(|(have, _)| have == k) {
                        options.0.push((k.clone(), v.clone()));
                    }
                }
                crate::backends::object::s3::validate_options(&options.0)
                    .map_err(|reason| invalid(&self.url, reason))?;
            }
            Location::Memory => {}
        }
        Ok(location)
    }

    /// The effective settings as `(key, value, source)` lines, secrets redacted.
    pub fn describe(&self) -> Vec<(String, String, String)> {
        let value = |key: &str| -> String {
            match key {
                "url" => redact_url(&self.url),
                "reference_threshold" => self.options.reference_threshold.to_string(),
                "inline_limit" => self.options.inline_limit.to_string(),
                "high_water_mark" => self.options.high_water_mark.to_string(),
                "verify_reads" => self.options.verify_reads.to_string(),
                "durable" => self
                    .durable
                    .map_or("true (unless the URL says)".into(), |d| d.to_string()),
                "janitor.grace" => humantime::format_duration(self.janitor_grace).to_string(),
                other => {
                    let k = other.trim_start_matches("object_store.");
                    let v = self
                        .object_store
                        .iter()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.clone());
                    if is_public_option(k) {
                        public_value(k, &v.unwrap_or_default())
                    } else {
                        REDACTED.into()
                    }
                }
            }
        };
        self.sources
            .iter()
            .map(|(key, source)| (key.clone(), value(key), source.to_string()))
            .collect()
    }
}
