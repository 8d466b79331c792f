//! The one public error type. Each variant carries the key, ref, path or URL it is about, so a caller
//! (or an operator reading a log line) knows *what* failed, not only *that* something failed.

use std::path::PathBuf;

/// A boxed error from a lower layer (a backend's client, a producer's stream).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in outcache.
///
/// A cache **miss is not an error**: reads return `Ok(None)`. Unknown, foreign and malformed refs are misses
/// too when read through a backend; [`Error::InvalidRef`] is only raised where a caller *hands in* a ref to be
/// parsed (the CLI's `cat`, [`crate::CacheRef::parse_arg`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend does not implement an optional capability. Check [`crate::Capabilities`] first.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// The trait operation that was called, e.g. `write_blob`.
        operation: &'static str,
        /// The backend's name, e.g. `memory`.
        backend: String,
    },

    /// A ref string or CacheRef value that is not well formed (the backend would never resolve it).
    #[error("invalid cache ref {reference:?}: {reason}")]
    InvalidRef {
        /// The ref as handed in.
        reference: String,
        /// Why it was refused.
        reason: String,
    },

    /// A backend URL or configuration value that cannot be used.
    #[error("invalid cache URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as handed in (never holds secrets: credentials come from the environment).
        url: String,
        /// Why it was refused.
        reason: String,
    },

    /// Caller input that is not acceptable (malformed JSON, an empty task type, …).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What was being parsed, e.g. `--inputs JSON`.
        what: String,
        /// Why it was refused.
        reason: String,
    },

    /// A blob's bytes do not match the size or SHA-256 recorded in its CacheRef: it was truncated or
    /// corrupted after it was written. The bytes are never handed out as if they were good.
    #[error("integrity check failed for {reference}: expected {expected}, found {actual}")]
    Integrity {
        /// The blob's ref string.
        reference: String,
        /// What the CacheRef recorded (`sha256:…` or `size:…`).
        expected: String,
        /// What the stored bytes gave.
        actual: String,
    },

    /// A stored row that cannot be decoded (garbled file, foreign content).
    #[error("corrupt row for {task_type}/{fingerprint}: {reason}")]
    CorruptRow {
        /// The row's task type.
        task_type: String,
        /// The row's input fingerprint.
        fingerprint: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Rows the janitor cannot read stop its orphan sweep: the blobs they reference cannot be told from
    /// orphans. The prune that met them removed nothing; without the sweep the rest of it can run.
    #[error(
        "{rows} row(s) {why} (first: {first}); the blobs such rows reference cannot be seen, so \
             the orphan sweep stops here. {remedy}"
    )]
    OrphanSweepBlocked {
        /// How many such rows were listed.
        rows: u64,
        /// The first one's id and what is wrong with it.
        first: String,
        /// What the rows are: `cannot be decoded` or `were written by a newer outcache`.
        why: &'static str,
        /// What the operator can do about them.
        remedy: &'static str,
    },

    /// A store location that exists but is not an outcache store of a version this build can use (a
    /// foreign or corrupt database file, a newer schema). Nothing in it is modified or deleted.
    #[error("{location} is not a usable outcache store: {reason}")]
    NotACache {
        /// The file, directory or URL.
        location: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A binary output too large to keep inline on a backend that cannot stream blobs.
    #[error(
        "binary output for {task_type} exceeds the inline limit of {limit} bytes and {backend} cannot stream blobs"
    )]
    TooLarge {
        /// The task type being written.
        task_type: String,
        /// The configured inline limit in bytes.
        limit: u64,
        /// The backend's name.
        backend: String,
    },

    /// A byte range that does not fit the blob.
    #[error("invalid range for {reference}: {range} of a {size}-byte blob")]
    InvalidRange {
        /// The blob's ref string.
        reference: String,
        /// The range asked for.
        range: String,
        /// The blob's size.
        size: u64,
    },

    /// A branded ref inside a value does not resolve (its blob is gone or belongs to another backend).
    #[error("dangling cache ref {reference}")]
    DanglingRef {
        /// The ref string that did not resolve.
        reference: String,
    },

    /// The producer's byte stream failed; nothing was published.
    #[error("input stream failed: {source}")]
    Stream {
        /// The producer's error.
        #[source]
        source: BoxError,
    },

    /// A filesystem operation failed.
    #[error("{op} {path}: {source}", path = path.display())]
    Io {
        /// What was being done, e.g. `create temp file`.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Any other backend failure, with the backend's own error as the cause.
    #[error("{backend}: {context}: {source}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What was being done and on what key or ref.
        context: String,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// `Unsupported` for `operation` on `backend` (the default body of every optional trait method).
    pub fn unsupported(operation: &'static str, backend: impl ToString) -> Self {
        Error::Unsupported {
            operation,
            backend: backend.to_string(),
        }
    }

    /// Wrap a producer's stream error.
    pub fn stream(source: impl Into<BoxError>) -> Self {
        Error::Stream {
            source: source.into(),
        }
    }

    /// A filesystem error on `path` while doing `op`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// True for errors caused by what the caller handed in (exit code 2 in the CLI).
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            Error::InvalidRef { .. } | Error::InvalidUrl { .. } | Error::InvalidInput { .. }
        )
    }

    /// True when the store ran out of space (a full disk or quota, SQLite's "database or disk is
    /// full") anywhere in the error's chain of causes: the operator's problem, not a bug, and worth
    /// telling apart (`outcache serve` answers 507 Insufficient Storage).
    pub fn is_out_of_space(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                // `StorageFull` is ENOSPC; a quota (EDQUOT) std maps to `QuotaExceeded`.
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) {
                    return true;
                }
            }
            #[cfg(feature = "sqlite")]
            if let Some(sql) = e.downcast_ref::<rusqlite::Error>() {
                if sql.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                    return true;
                }
            }
            cause = e.source();
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ENOSPC's number where the tests run (Linux, macOS and the BSDs agree).
    const ENOSPC: i32 = 28;

    #[test]
    fn out_of_space_is_found_anywhere_in_the_chain_of_causes() {
        let full = |errno| {
            Error::io(
                "write temp file",
                "/c/tmp/x",
                std::io::Error::from_raw_os_error(errno),
            )
        };
        assert!(full(ENOSPC).is_out_of_space(), "ENOSPC");
        assert!(!full(13).is_out_of_space(), "EACCES is not a full disk");
        let wrapped = Error::stream(full(ENOSPC));
        assert!(wrapped.is_out_of_space(), "behind a stream error");
        let other = Error::stream(std::io::Error::other("reset by peer"));
        assert!(!other.is_out_of_space());
        #[cfg(feature = "sqlite")]
        {
            let sql = rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                None,
            );
            let backend = Error::Backend {
                backend: "sqlite".into(),
                context: "commit".into(),
                source: Box::new(sql),
            };
            assert!(backend.is_out_of_space(), "SQLITE_FULL");
        }
    }
}
