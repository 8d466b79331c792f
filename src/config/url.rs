//! Cache URLs: `fs://`, `file://`, `sqlite://`, `s3://`, `gs://`, `az://`, `memory://` parsed into a [`Location`] (the raw
//! text checked for `..` first), the schemes this build knows, and the embedded default.

use std::path::PathBuf;

use url::Url;

use super::redact::redact_url;
use crate::error::{Error, Result};

/// The environment variable that names the cache when no URL is given.
pub const URL_ENV: &str = "OUTCACHE_URL";

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
        #[cfg(feature = "gcs")]
        "gs",
        #[cfg(feature = "azure")]
        "az",
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
    /// A cloud object store: `s3://bucket/optional/prefix?endpoint=…&region=…&allow_http=true`,
    /// `gs://bucket/prefix`, `az://container/prefix?use_emulator=true`.
    #[cfg(feature = "cloud")]
    Cloud {
        /// Which cloud.
        cloud: crate::backends::object::cloud::Cloud,
        /// The bucket (Azure: the container).
        bucket: String,
        /// The key prefix inside the bucket (may be empty).
        prefix: String,
        /// Query options (validated).
        options: StoreOptions,
    },
}

/// `s3://`, `gs://`, `az://`: the bucket (container) and prefix, and the options, validated.
#[cfg(feature = "cloud")]
#[cfg_attr(
    not(any(feature = "s3", feature = "gcs", feature = "azure")),
    allow(unreachable_code, unused_variables)
)]
fn parse_cloud(
    cloud: crate::backends::object::cloud::Cloud,
    text: &str,
    url: &Url,
) -> Result<Location> {
    let (scheme, holder) = (cloud.scheme(), cloud.holder());
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| {
            invalid(
                text,
                format!("{scheme}:// needs a {holder}: {scheme}://{holder}/optional/prefix"),
            )
        })?
        .to_owned();
    let prefix = cloud_prefix(text, url.path())?;
    let options: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    crate::backends::object::cloud::validate_options(cloud, &options)
        .map_err(|reason| invalid(text, reason))?;
    Ok(Location::Cloud {
        cloud,
        bucket,
        prefix,
        options: StoreOptions(options),
    })
}

/// The key prefix a cloud URL's path names: percent-decoded, as in a local path and as
/// `object_store::parse_url` reads it (`s3://b/my%20cache` is the prefix `my cache`, not `my%20cache`),
/// so `%2F` is a `/` and empty segments (`a//b`) count for nothing.
#[cfg(feature = "cloud")]
fn cloud_prefix(text: &str, path: &str) -> Result<String> {
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| invalid(text, "the prefix is not UTF-8 once percent-decoded"))?;
    if decoded.chars().any(char::is_control) {
        return Err(invalid(
            text,
            "the prefix holds a control character (such as %00 or %0A)",
        ));
    }
    Ok(decoded
        .split('/')
        .filter(|segment| !segment.is_empty())
        .collect::<Vec<_>>()
        .join("/"))
}

pub(super) fn invalid(url: &str, reason: impl Into<String>) -> Error {
    Error::InvalidUrl {
        url: redact_url(url),
        reason: reason.into(),
    }
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
    // A NUL (`%00`) cannot be in a file name, and other control characters are not a path anyone
    // meant: refused here, not echoed raw to a terminal by the error of the first open.
    if path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .any(|b| b.is_ascii_control())
    {
        return Err(invalid(
            text,
            "the path holds a control character (such as %00 or %0A)",
        ));
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

/// Whether `text` holds `&KEY=` (KEY a word of letters, digits, `_` or `-`): how an option reads.
fn has_option_after_ampersand(text: &str) -> bool {
    text.split('&').skip(1).any(|after| {
        after.split_once('=').is_some_and(|(key, _)| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
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
        // The URL standard drops tabs and newlines anywhere in a URL: `fs:///tmp/a<TAB>b` would open
        // `/tmp/ab`. A control character inside a cache URL is a mistake; say so instead.
        if text.trim().chars().any(char::is_control) {
            return Err(invalid(
                text,
                "holds a control character (a tab or a line break?): percent-encode it if it is meant",
            ));
        }
        // `s3://bucket/prefix&secret_access_key=…` (a `&` typed for the `?`) would make the options
        // part of the path: a key prefix holding a secret, written into every object name.
        if !text.contains('?') && has_option_after_ampersand(text) {
            return Err(invalid(
                text,
                "options follow a '?', not a '&': write a '&' meant in a path as %26",
            ));
        }
        let url = Url::parse(text.trim()).map_err(|e| invalid(text, e.to_string()))?;
        // Both would otherwise be dropped without a word: `fs:///builds/cache#2` would open
        // `/builds/cache`, and `s3://KEY:SECRET@bucket` would sign with whatever the environment holds.
        if url.fragment().is_some() {
            return Err(invalid(
                text,
                "a '#' starts a URL fragment, which names nothing here: write a '#' in a path as %23",
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                text,
                "credentials in the URL's user part are not read: give them as options \
                 (access_key_id=…&secret_access_key=… for s3://), in the environment \
                 (AWS_ACCESS_KEY_ID …) or in the config file",
            ));
        }
        #[cfg(feature = "cloud")]
        if let Some(cloud) = crate::backends::object::cloud::Cloud::from_scheme(url.scheme()) {
            return parse_cloud(cloud, text, &url);
        }
        match url.scheme() {
            "memory" => {
                if url.query().is_some() {
                    return Err(invalid(text, "memory:// takes no options"));
                }
                // `memory://shared` would read as a cache named "shared" that others could open too;
                // every memory:// cache is a fresh one of its own.
                if url.host_str().is_some_and(|h| !h.is_empty()) || !matches!(url.path(), "" | "/")
                {
                    return Err(invalid(
                        text,
                        "memory:// takes no name or path: each one is a fresh cache of its own",
                    ));
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
    use crate::config::{parse_duration, parse_size, scrub_urls};

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
        // Options after the wrong separator, or no URL at all: the values are hidden all the same.
        assert_eq!(
            redact_url("s3://b/p&secret_access_key=S&region=r"),
            "s3://b/p&secret_access_key=<redacted>&region=r"
        );
        assert_eq!(
            redact_url("&secret_access_key=S&access_key_id=K"),
            "&secret_access_key=<redacted>&access_key_id=<redacted>"
        );
        assert_eq!(
            redact_url("secret_access_key=S"),
            "secret_access_key=<redacted>"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            scrub_urls(
                "Error performing GET http://u:pw@h:9/b?list-type=2&X-Amz-Signature=S in 2ms"
            ),
            "Error performing GET http://<redacted>@h:9/b?list-type=<redacted>&X-Amz-Signature=<redacted> in 2ms"
        );
        assert_eq!(scrub_urls("no url here"), "no url here");
    }

    #[cfg(feature = "s3")]
    #[test]
    fn refuses_credentials_in_the_user_part_without_echoing_them() {
        for bad in [
            "s3://AKIAKEY:SUPERSECRET@bucket/p",
            "s3://SUPERSECRET@bucket/p",
        ] {
            let err = Location::parse(bad).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {text}");
            assert!(text.contains("user part"), "{bad}: {text}");
            assert!(!text.contains("SUPERSECRET"), "{bad}: {text}");
        }
        Location::parse("s3://bucket/p?access_key_id=K&secret_access_key=S").unwrap();
    }

    #[test]
    fn options_after_an_ampersand_for_the_question_mark_are_refused_unechoed() {
        for bad in [
            "s3://bucket/p&secret_access_key=SUPERSECRET",
            "fs:///tmp/c&durable=false",
            "sqlite:///tmp/c.db&durable=false&x=SUPERSECRET",
        ] {
            let text = Location::parse(bad).unwrap_err().to_string();
            assert!(text.contains("follow a '?'"), "{bad}: {text}");
            assert!(!text.contains("SUPERSECRET"), "{bad}: {text}");
        }
        // A '&' that reads as no option is a path's own.
        #[cfg(feature = "fs")]
        assert!(Location::parse("fs:///tmp/R&D/cache").is_ok());
    }

    #[cfg(feature = "s3")]
    #[test]
    fn a_cloud_prefix_is_percent_decoded_as_a_local_path_is() {
        let prefix = |url: &str| match Location::parse(url).unwrap() {
            Location::Cloud { prefix, .. } => prefix,
            other => panic!("{url}: {other:?}"),
        };
        assert_eq!(prefix("s3://b/my%20cache"), "my cache");
        assert_eq!(prefix("s3://b/my cache/"), "my cache", "a raw space too");
        assert_eq!(prefix("s3://b/100%25"), "100%");
        assert_eq!(prefix("s3://b/a%2Fb//c/"), "a/b/c");
        assert_eq!(prefix("s3://b/caf%C3%A9"), "café");
        assert_eq!(prefix("s3://b"), "");
        for bad in ["s3://b/a%00b", "s3://b/a%0Ab", "s3://b/%FF"] {
            let err = Location::parse(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {err}");
        }
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
    fn a_control_character_is_refused_not_dropped_and_secrets_stay_hidden() {
        // The URL standard would have read this as `/tmp/ab`.
        let err = Location::parse("fs:///tmp/a\tb").unwrap_err().to_string();
        assert!(
            err.contains(r"a\tb") && err.contains("control character"),
            "{err}"
        );
        let err = Location::parse("s3://b/p?secret_access_key=SEKRIT\nX")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("SEKRIT"), "{err}");
        // Whitespace around the whole URL (a config value, a pasted line) is still trimmed.
        assert_eq!(Location::parse(" memory://\n").unwrap(), Location::Memory);
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
            "fs:///tmp/builds#2",
            "sqlite:///tmp/c.db#x",
            "memory://#x",
            "memory://x",
            "memory:///shared",
            "fs:///tmp/a%00b",
            "fs:///tmp/a%0Ab",
            "sqlite:///tmp/c%1B.db",
            "fs:///tmp/a\tb",
            "fs:///tmp/a\nb",
            "s3://buck\ret/prefix",
            "not a url",
            "",
        ] {
            let err = Location::parse(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {err}");
        }
    }
}
