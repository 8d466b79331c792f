//! The server's own counters, per protocol: hits, misses, uploads stored and refused, bytes in and out,
//! errors, and requests in flight — exported in Prometheus text format beside the engine's.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A protocol the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    KeyValue,
    BazelAc,
    BazelCas,
    Turbo,
}

impl Protocol {
    const ALL: [Protocol; 4] = [
        Protocol::KeyValue,
        Protocol::BazelAc,
        Protocol::BazelCas,
        Protocol::Turbo,
    ];

    fn label(self) -> &'static str {
        match self {
            Protocol::KeyValue => "http",
            Protocol::BazelAc => "bazel_ac",
            Protocol::BazelCas => "bazel_cas",
            Protocol::Turbo => "turbo",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Hit,
    Miss,
    Stored,
    Refused,
    Error,
}

#[derive(Debug, Default)]
struct PerProtocol {
    hits: AtomicU64,
    misses: AtomicU64,
    stored: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// What the scheduled janitor did (`janitor.rs`).
#[derive(Debug, Default)]
struct JanitorCounters {
    runs_ok: AtomicU64,
    runs_failed: AtomicU64,
    sweeps_blocked: AtomicU64,
    rows: AtomicU64,
    blobs: AtomicU64,
    temps: AtomicU64,
    bytes: AtomicU64,
    last_ok_unix: AtomicU64,
    /// The size budget and the cache's size after the last run, [`UNKNOWN`] until known.
    max_size: AtomicU64,
    size_after: AtomicU64,
}

/// A gauge not known yet (no budget, or no run yet): left out of the text rather than shown as 0.
const UNKNOWN: u64 = u64::MAX;

/// The server's counters.
#[derive(Debug)]
pub struct ServeMetrics {
    per: [PerProtocol; 4],
    in_flight: AtomicI64,
    janitor: JanitorCounters,
}

impl Default for ServeMetrics {
    fn default() -> Self {
        let janitor = JanitorCounters {
            max_size: AtomicU64::new(UNKNOWN),
            size_after: AtomicU64::new(UNKNOWN),
            ..JanitorCounters::default()
        };
        ServeMetrics {
            per: Default::default(),
            in_flight: AtomicI64::new(0),
            janitor,
        }
    }
}

/// Counts a request in flight while it lives (it travels with the response body, so a download counts
/// until its last byte is sent or the client goes away).
pub(super) struct InFlight(std::sync::Arc<ServeMetrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServeMetrics {
    pub(super) fn start(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// `bytes` of a hit's body handed to the connection (a streamed body counts as it goes, so one
    /// cut off counts only what went out).
    pub(super) fn sent(&self, protocol: Protocol, bytes: u64) {
        self.per[protocol.index()]
            .bytes_out
            .fetch_add(bytes, Ordering::Relaxed);
    }

    pub(super) fn count(&self, protocol: Protocol, outcome: Outcome, bytes: u64) {
        let p = &self.per[protocol.index()];
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        match outcome {
            Outcome::Hit => {
                add(&p.hits, 1);
                add(&p.bytes_out, bytes);
            }
            Outcome::Miss => add(&p.misses, 1),
            Outcome::Stored => {
                add(&p.stored, 1);
                add(&p.bytes_in, bytes);
            }
            Outcome::Refused => add(&p.refused, 1),
            Outcome::Error => add(&p.errors, 1),
        }
    }

    /// A scheduled janitor run that removed what `report` says.
    pub(super) fn janitor_removed(&self, report: &crate::janitor::PruneReport) {
        let j = &self.janitor;
        j.runs_ok.fetch_add(1, Ordering::Relaxed);
        j.rows.fetch_add(report.rows_removed, Ordering::Relaxed);
        j.blobs.fetch_add(report.blobs_removed, Ordering::Relaxed);
        j.temps.fetch_add(report.temps_removed, Ordering::Relaxed);
        j.bytes.fetch_add(report.bytes_reclaimed, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        j.last_ok_unix.store(now, Ordering::Relaxed);
        if let Some(size) = report.size_after {
            j.size_after.store(size.min(UNKNOWN - 1), Ordering::Relaxed);
        }
    }

    /// The scheduled janitor's size budget (`--max-size`), shown beside the size it leaves.
    pub(super) fn janitor_budget(&self, max_size: Option<u64>) {
        let budget = max_size.map_or(UNKNOWN, |b| b.min(UNKNOWN - 1));
        self.janitor.max_size.store(budget, Ordering::Relaxed);
    }

    /// A scheduled janitor run that failed.
    pub(super) fn janitor_failed(&self) {
        self.janitor.runs_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A scheduled orphan sweep stopped by rows the janitor cannot read.
    pub(super) fn janitor_sweep_blocked(&self) {
        self.janitor.sweeps_blocked.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The counters in Prometheus text format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        type Pick = fn(&PerProtocol) -> &AtomicU64;
        let series: [(&str, &str, Pick); 7] = [
            ("hits", "requests served from the cache", |p| &p.hits),
            ("misses", "reads of keys not in the cache", |p| &p.misses),
            ("uploads_stored", "uploads stored", |p| &p.stored),
            (
                "uploads_refused",
                "uploads refused (size, digest, cut off); nothing stored",
                |p| &p.refused,
            ),
            ("errors", "requests the cache failed", |p| &p.errors),
            ("bytes_in", "bytes of uploads stored", |p| &p.bytes_in),
            ("bytes_out", "bytes of hits sent", |p| &p.bytes_out),
        ];
        for (name, help, pick) in series {
            out.push_str(&format!(
                "# HELP outcache_serve_{name}_total {help}\n# TYPE outcache_serve_{name}_total counter\n"
            ));
            for protocol in Protocol::ALL {
                let value = pick(&self.per[protocol.index()]).load(Ordering::Relaxed);
                out.push_str(&format!(
                    "outcache_serve_{name}_total{{protocol=\"{}\"}} {value}\n",
                    protocol.label()
                ));
            }
        }
        out.push_str(&format!(
            "# HELP outcache_serve_in_flight requests being served\n# TYPE outcache_serve_in_flight gauge\noutcache_serve_in_flight {}\n",
            self.in_flight()
        ));
        let j = &self.janitor;
        let janitor: [(&str, &str, &str, &AtomicU64); 8] = [
            (
                "runs_ok_total",
                "counter",
                "scheduled janitor runs that completed",
                &j.runs_ok,
            ),
            (
                "runs_failed_total",
                "counter",
                "scheduled janitor runs that failed (see the log)",
                &j.runs_failed,
            ),
            (
                "sweeps_blocked_total",
                "counter",
                "orphan sweeps stopped by rows that cannot be read (prune --corrupt)",
                &j.sweeps_blocked,
            ),
            (
                "rows_removed_total",
                "counter",
                "rows the scheduled janitor removed",
                &j.rows,
            ),
            (
                "blobs_removed_total",
                "counter",
                "blobs the scheduled janitor removed",
                &j.blobs,
            ),
            (
                "temps_removed_total",
                "counter",
                "temp files the scheduled janitor removed",
                &j.temps,
            ),
            (
                "bytes_reclaimed_total",
                "counter",
                "bytes the scheduled janitor freed",
                &j.bytes,
            ),
            (
                "last_success_timestamp_seconds",
                "gauge",
                "when a scheduled janitor run last completed (0: never)",
                &j.last_ok_unix,
            ),
        ];
        for (name, kind, help, value) in janitor {
            out.push_str(&format!(
                "# HELP outcache_serve_janitor_{name} {help}\n# TYPE outcache_serve_janitor_{name} {kind}\noutcache_serve_janitor_{name} {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        let sizes = [
            (
                "max_size_bytes",
                "the scheduled janitor's size budget (--max-size)",
                &j.max_size,
            ),
            (
                "size_after_bytes",
                "bytes in the cache after the last scheduled run, as --max-size counts them",
                &j.size_after,
            ),
        ];
        for (name, help, value) in sizes {
            let value = value.load(Ordering::Relaxed);
            if value != UNKNOWN {
                out.push_str(&format!(
                    "# HELP outcache_serve_janitor_{name} {help}\n# TYPE outcache_serve_janitor_{name} gauge\noutcache_serve_janitor_{name} {value}\n"
                ));
            }
        }
        out
    }
}
