//! What an engine did, counted: hits, misses (and the misses a dangling ref caused), puts, bytes in and
//! out, verification failures. Lock-free counters an application reads with [`crate::Cache::metrics`]
//! and exports however it likes (a server turns them into Prometheus lines).

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of an engine's counters since it was created (clones of a [`crate::Cache`] share them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// `get` calls that returned an output.
    pub hits: u64,
    /// `get` calls that returned `None` (no row, or a row whose blob is gone).
    pub misses: u64,
    /// Of the misses, those whose row existed but referenced a blob that no longer resolves.
    pub dangling_misses: u64,
    /// Rows written (`put`, and `put_stream` once its row committed).
    pub puts: u64,
    /// Binary bytes taken in by `put_stream` (inline or streamed into a blob).
    pub bytes_in: u64,
    /// Blob bytes handed out by reads (`read`, `open_stream`, hydration on `get`).
    pub bytes_out: u64,
    /// Reads that failed verification (size or SHA-256), whether a whole read or a stream.
    pub verification_failures: u64,
}

/// The live counters behind [`Metrics`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) dangling_misses: AtomicU64,
    pub(crate) puts: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) verification_failures: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Metrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Metrics {
            hits: get(&self.hits),
            misses: get(&self.misses),
            dangling_misses: get(&self.dangling_misses),
            puts: get(&self.puts),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            verification_failures: get(&self.verification_failures),
        }
    }
}

impl Metrics {
    /// The counters in Prometheus text format, as `outcache_engine_<name>` counters.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for (name, help, value) in [
            ("hits", "get calls that returned an output", self.hits),
            ("misses", "get calls that returned nothing", self.misses),
            (
                "dangling_misses",
                "misses whose row referenced a blob that is gone",
                self.dangling_misses,
            ),
            ("puts", "rows written", self.puts),
            ("bytes_in", "binary bytes taken in", self.bytes_in),
            ("bytes_out", "blob bytes handed out", self.bytes_out),
            (
                "verification_failures",
                "reads that failed verification",
                self.verification_failures,
            ),
        ] {
            out.push_str(&format!(
                "# HELP outcache_engine_{name}_total {help}\n# TYPE outcache_engine_{name}_total counter\noutcache_engine_{name}_total {value}\n"
            ));
        }
        out
    }
}
