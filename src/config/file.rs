//! The TOML config file and the precedence of settings: flag, then environment, then file, then default.

use std::path::PathBuf;

use super::redact::{REDACTED, is_public_option, public_value, redact_url};
use super::units::{parse_duration, parse_size};
use ::url::Url;

use super::URL_ENV;
#[cfg(feature = "cloud")]
use super::url::invalid;
use super::url::{Location, default_url};
use crate::error::{Error, Result};

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

/// The `[serve]` table, as written.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    listen: Option<String>,
    tokens_file: Option<PathBuf>,
    allow_anonymous_writes: Option<bool>,
    max_body: Option<SizeValue>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    prune_every: Option<String>,
    older_than: Option<String>,
    max_size: Option<SizeValue>,
    orphans: Option<bool>,
}

/// `outcache serve`'s settings from the config file's `[serve]` table, each used where its flag (or
/// environment variable) is not given; `None` where the file does not set it. Checked when the file is
/// loaded, so a bad value fails every command, naming its key.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ServeSettings {
    /// `serve.listen`: the address to listen on.
    pub listen: Option<std::net::SocketAddr>,
    /// `serve.tokens_file`: relative to the config file's directory.
    pub tokens_file: Option<PathBuf>,
    /// `serve.allow_anonymous_writes`.
    pub allow_anonymous_writes: Option<bool>,
    /// `serve.max_body`: the largest upload.
    pub max_body: Option<u64>,
    /// `serve.idle_timeout`.
    pub idle_timeout: Option<std::time::Duration>,
    /// `serve.max_connections`.
    pub max_connections: Option<usize>,
    /// `serve.prune_every`, with `older_than`, `max_size` and `orphans`: the janitor's schedule.
    pub prune_every: Option<std::time::Duration>,
    /// `serve.older_than`.
    pub older_than: Option<std::time::Duration>,
    /// `serve.max_size`.
    pub max_size: Option<u64>,
    /// `serve.orphans`.
    pub orphans: Option<bool>,
}

impl ServeFile {
    /// Checks and converts every value set, naming the key of one that is wrong; a relative
    /// `tokens_file` is taken relative to `dir`, the config file's directory.
    fn settings(self, dir: &std::path::Path) -> Result<ServeSettings> {
        let bad = |key: &str, reason: String| Error::InvalidInput {
            what: format!("config key serve.{key}"),
            reason,
        };
        let duration = |key: &str, v: Option<String>| {
            v.map(|v| parse_duration(&v).map_err(|reason| bad(key, reason)))
                .transpose()
        };
        let size = |key: &str, v: Option<SizeValue>| {
            v.map(|v| v.bytes(&format!("serve.{key}"))).transpose()
        };
        if self.max_connections == Some(0) {
            return Err(bad("max_connections", "must be at least 1".into()));
        }
        Ok(ServeSettings {
            listen: self
                .listen
                .map(|l| super::parse_listen_addr(&l).map_err(|e| bad("listen", e)))
                .transpose()?,
            tokens_file: self.tokens_file.map(|p| dir.join(p)),
            allow_anonymous_writes: self.allow_anonymous_writes,
            max_body: size("max_body", self.max_body)?,
            idle_timeout: duration("idle_timeout", self.idle_timeout)?,
            max_connections: self.max_connections,
            prune_every: match duration("prune_every", self.prune_every)? {
                Some(every) if every.is_zero() => {
                    return Err(bad("prune_every", "must be longer than zero".into()));
                }
                every => every,
            },
            older_than: duration("older_than", self.older_than)?,
            max_size: size("max_size", self.max_size)?,
            orphans: self.orphans,
        })
    }
}

/// The `[serve]` keys, in the order `outcache config` shows them.
const SERVE_KEYS: [&str; 10] = [
    "listen",
    "tokens_file",
    "allow_anonymous_writes",
    "max_body",
    "idle_timeout",
    "max_connections",
    "prune_every",
    "older_than",
    "max_size",
    "orphans",
];

impl ServeSettings {
    /// How `outcache config` shows the value of `key` (`serve.…`); `None` where the file does not
    /// set it.
    fn value(&self, key: &str) -> Option<String> {
        let duration =
            |d: Option<std::time::Duration>| d.map(|d| humantime::format_duration(d).to_string());
        match key.trim_start_matches("serve.") {
            "listen" => self.listen.map(|a| a.to_string()),
            "tokens_file" => self.tokens_file.as_ref().map(|p| p.display().to_string()),
            "allow_anonymous_writes" => self.allow_anonymous_writes.map(|b| b.to_string()),
            "max_body" => self.max_body.map(|n| n.to_string()),
            "idle_timeout" => duration(self.idle_timeout),
            "max_connections" => self.max_connections.map(|n| n.to_string()),
            "prune_every" => duration(self.prune_every),
            "older_than" => duration(self.older_than),
            "max_size" => self.max_size.map(|n| n.to_string()),
            "orphans" => self.orphans.map(|b| b.to_string()),
            _ => None,
        }
    }
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
    #[serde(default)]
    serve: ServeFile,
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
    /// `outcache serve`'s settings from the `[serve]` table.
    pub serve: ServeSettings,
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
                let text =
                    read_text_file(&path, MAX_SETTINGS_FILE).map_err(|e| Error::InvalidInput {
                        what: format!("config file {}", path.display()),
                        reason: match e.kind() {
                            std::io::ErrorKind::InvalidData => "is not UTF-8 text".to_owned(),
                            std::io::ErrorKind::FileTooLarge => e.to_string(),
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
        let file_dir = path
            .as_deref()
            .and_then(std::path::Path::parent)
            .unwrap_or(std::path::Path::new(""));
        let serve = file.serve.settings(file_dir)?;
        for key in SERVE_KEYS.iter().filter(|k| serve.value(k).is_some()) {
            sources.push((format!("serve.{key}"), from_file()));
        }
        Ok(Config {
            url: url.0,
            options,
            durable: file.durable,
            object_store: file.object_store.into_iter().collect(),
            janitor_grace,
            serve,
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
            #[cfg(feature = "cloud")]
            Location::Cloud { cloud, options, .. } => {
                for (k, v) in &self.object_store {
                    if !options.0.iter().any(|(have, _)| have == k) {
                        options.0.push((k.clone(), v.clone()));
                    }
                }
                crate::backends::object::cloud::validate_options(*cloud, &options.0)
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
                serve if serve.starts_with("serve.") => self.serve.value(serve).unwrap_or_default(),
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

/// The most a settings file (the config file, a tokens file) may hold: far past any real one, and
/// a path that never ends (`/dev/zero`) is refused at it rather than read until memory runs out.
pub const MAX_SETTINGS_FILE: u64 = 1 << 20;

/// The text of the file at `path`, read no further than `limit` bytes: a plain file over it is
/// refused from its size (nothing read), anything else (a FIFO, a device) once it passes the limit.
/// Over the limit is [`std::io::ErrorKind::FileTooLarge`]; not UTF-8 is `InvalidData`.
pub fn read_text_file(path: &std::path::Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read as _;
    let too_big = || {
        std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {limit} bytes"),
        )
    };
    let file = std::fs::File::open(path)?;
    if file.metadata()?.len() > limit {
        return Err(too_big());
    }
    let mut text = String::new();
    file.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(text)
}
