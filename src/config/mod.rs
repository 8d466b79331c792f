//! Naming a backend: cache URLs (`fs:///abs/dir`, `file:///abs/dir`, `sqlite:///…`, `s3://…`,
//! `memory://`) parsed into a [`Location`], the `OUTCACHE_URL` variable, the TOML config file with its
//! precedence, sizes and durations, the redaction rule, and the embedded default on local disk. One
//! parser, so the library and the CLI agree; [`crate::backends::open`] turns a location into a backend.

mod file;
mod redact;
mod units;
mod url;

pub use file::{
    CONFIG_ENV, Config, DEFAULT_CONFIG_FILE, MAX_SETTINGS_FILE, ServeSettings, Source,
    read_text_file,
};
pub use redact::{REDACTED, is_public_option, is_secret_key, redact_url, scrub_urls};
pub use units::{parse_duration, parse_listen_addr, parse_size};
pub use url::{Location, StoreOptions, URL_ENV, default_url, effective_url, supported_schemes};
