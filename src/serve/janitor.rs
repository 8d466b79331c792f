//! The janitor on a schedule while serving (`--prune-every`), with its outcomes on `/metrics` and
//! stderr, so an operator can alert on a janitor that stopped freeing space.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::metrics::ServeMetrics;
use crate::janitor::{PruneOptions, PruneReport, prune};
use crate::store::OutputCache;

/// Runs `options` every `every` (at least a millisecond), until the server stops.
#[derive(Clone, Debug)]
pub struct JanitorSchedule {
    /// How often.
    pub every: std::time::Duration,
    /// What each run removes.
    pub options: PruneOptions,
}

/// Runs the schedule until `stopped` is set (the caller also aborts the task when the server stops).
pub(super) async fn run(
    backend: Arc<dyn OutputCache>,
    schedule: JanitorSchedule,
    metrics: Arc<ServeMetrics>,
    stopped: Arc<AtomicBool>,
) {
    // A zero period would panic in `interval`; an embedder's zero means "as often as it can".
    let every = schedule.every.max(std::time::Duration::from_millis(1));
    metrics.janitor_budget(schedule.options.max_size);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if stopped.load(Ordering::Acquire) {
            return;
        }
        once(backend.as_ref(), &schedule.options, &metrics).await;
        // A run that never had to wait, followed by a tick already due, would otherwise keep this
        // worker (and the abort) waiting for the next one.
        tokio::task::yield_now().await;
    }
}

/// One run, reported on stderr and in `metrics`. Rows the janitor cannot read stop the orphan sweep
/// (their blobs cannot be told from orphans) and with it the whole prune: a server would then never
/// apply its age and size limits again and fill its disk, so the rest of the prune runs without the
/// sweep, and the refusal is reported each time until an operator removes those rows.
async fn once(backend: &dyn OutputCache, options: &PruneOptions, metrics: &ServeMetrics) {
    let report = |r: PruneReport| {
        let left = r
            .size_after
            .map(|size| format!("; {size} bytes left"))
            .unwrap_or_default();
        say!(
            "outcache serve: janitor removed {} rows, {} blobs, {} temps{left}",
            r.rows_removed,
            r.blobs_removed,
            r.temps_removed
        );
        metrics.janitor_removed(&r);
    };
    let failed = |e: crate::Error| {
        say!("outcache serve: janitor: {e}");
        metrics.janitor_failed();
    };
    match prune(backend, options, |_| {}).await {
        Ok(r) => report(r),
        Err(e @ crate::Error::OrphanSweepBlocked { .. }) => {
            metrics.janitor_sweep_blocked();
            failed(e);
            if options.older_than.is_none() && options.max_size.is_none() {
                return;
            }
            let mut rest = options.clone();
            rest.orphans = false;
            say!("outcache serve: janitor: pruning by age and size without the orphan sweep");
            match prune(backend, &rest, |_| {}).await {
                Ok(r) => report(r),
                Err(e) => failed(e),
            }
        }
        Err(e) => failed(e),
    }
}
