//! The engine's settings and the defaults every layer shares (the engine, the config file, the janitor),
//! kept below all of them so none has to reach up for a number.

use std::time::Duration;

/// Default reference threshold: binary outputs below this size are kept inline in the row.
pub const DEFAULT_REFERENCE_THRESHOLD: u64 = 64 * 1024;
/// Default inline limit: the most a backend without blob streaming will hold inline in one row.
pub const DEFAULT_INLINE_LIMIT: u64 = 16 * 1024 * 1024;
/// Bytes a push-style writer lets a producer get ahead of the backend before `push` waits.
pub const DEFAULT_HIGH_WATER_MARK: usize = 8 * 1024 * 1024;
/// Default grace period of the janitor for orphans and temps.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// Engine settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CacheOptions {
    /// Binary outputs smaller than this go inline; refs smaller than this are hydrated by [`crate::Cache::get`].
    /// 0 keeps every binary output as a ref.
    pub reference_threshold: u64,
    /// Largest binary output kept inline when the backend cannot stream blobs; above it,
    /// [`crate::Error::TooLarge`].
    pub inline_limit: u64,
    /// Check every blob read against the ref's `size` and `sha256` (default true).
    pub verify_reads: bool,
    /// Bytes a [`crate::Cache::writer`] lets a producer push ahead of the backend before `push` waits
    /// (default 8 MiB).
    pub high_water_mark: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            reference_threshold: DEFAULT_REFERENCE_THRESHOLD,
            inline_limit: DEFAULT_INLINE_LIMIT,
            verify_reads: true,
            high_water_mark: DEFAULT_HIGH_WATER_MARK,
        }
    }
}

impl CacheOptions {
    /// Set [`CacheOptions::reference_threshold`].
    pub fn reference_threshold(mut self, bytes: u64) -> Self {
        self.reference_threshold = bytes;
        self
    }
    /// Set [`CacheOptions::inline_limit`].
    pub fn inline_limit(mut self, bytes: u64) -> Self {
        self.inline_limit = bytes;
        self
    }
    /// Set [`CacheOptions::high_water_mark`].
    pub fn high_water_mark(mut self, bytes: usize) -> Self {
        self.high_water_mark = bytes;
        self
    }
    /// Set [`CacheOptions::verify_reads`].
    pub fn verify_reads(mut self, verify: bool) -> Self {
        self.verify_reads = verify;
        self
    }
}
