//! The janitor: remove rows past an age, blobs no row references and dead temp objects (sparing anything
//! younger than a grace period, so writes in flight are never hit), and least-recently-used rows beyond a
//! size budget; plus the inventory behind `outcache stats`. Everything works through the trait's
//! listings, so it serves every backend and wrapper alike.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use crate::error::Result;
use crate::store::{BlobEntry, BlobState, CorruptEntry, OutputCache, RowEntry};

/// What an orphan sweep found (and, unless it was a dry run, removed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrphanSweep {
    /// Published blobs no row references, older than the grace period.
    pub blobs: Vec<BlobEntry>,
    /// Temp objects older than the grace period.
    pub temps: Vec<BlobEntry>,
    /// Bytes those entries hold.
    pub bytes: u64,
    /// True if nothing was removed.
    pub dry_run: bool,
}

/// Find unreferenced blobs and temps last modified more than `grace` ago.
///
/// Blobs are listed *before* rows: a blob whose row commits while the sweep runs is then seen as
/// referenced, and a blob written after the blob listing is not a candidate at all.
pub async fn find_orphans(backend: &dyn OutputCache, grace: Duration) -> Result<OrphanSweep> {
    let cutoff = SystemTime::now()
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let entries = backend.list_blobs().await?;
    let referenced: HashSet<String> = backend
        .list_rows()
        .await?
        .into_iter()
        .flat_map(|r| r.refs)
        .collect();
    let mut sweep = OrphanSweep {
        dry_run: true,
        ..OrphanSweep::default()
    };
    for entry in entries {
        if entry.modified > cutoff {
            continue;
        }
        match entry.state {
            BlobState::Published if !referenced.contains(&entry.id) => {
                sweep.bytes += entry.size;
                sweep.blobs.push(entry);
            }
            BlobState::Temp => {
                sweep.bytes += entry.size;
                sweep.temps.push(entry);
            }
            BlobState::Published => {}
        }
    }
    Ok(sweep)
}

/// Find orphans as [`find_orphans`] does and, unless `dry_run`, remove them.
pub async fn sweep_orphans(
    backend: &dyn OutputCache,
    grace: Duration,
    dry_run: bool,
) -> Result<OrphanSweep> {
    let mut sweep = find_orphans(backend, grace).await?;
    sweep.dry_run = dry_run;
    if !dry_run {
        for blob in &sweep.blobs {
            backend.delete_blob(&blob.id).await?;
        }
        for temp in &sweep.temps {
            backend.remove_temp(&temp.id).await?;
        }
    }
    Ok(sweep)
}

/// What `prune` should remove.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct PruneOptions {
    /// Rows committed more than this long ago, with their blobs.
    pub older_than: Option<Duration>,
    /// Blobs no row references and temp objects, last modified more than `grace` ago.
    pub orphans: bool,
    /// How old an orphan or temp must be before it is removed (writes in flight are younger).
    pub grace: Duration,
    /// Evict least-recently-used rows (with their blobs) until the cache holds at most this many bytes.
    pub max_size: Option<u64>,
    /// Only rows whose task type starts with this (age and size eviction; orphans cannot be scoped).
    pub prefix: Option<String>,
    /// Remove rows that cannot be decoded. Without it, their presence stops an orphan sweep: their blobs
    /// cannot be told from orphans.
    pub corrupt: bool,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
}

impl PruneOptions {
    /// Options that remove nothing until criteria are set.
    pub fn new() -> Self {
        PruneOptions {
            grace: DEFAULT_GRACE,
            ..Default::default()
        }
    }
}

/// Rows handed to `delete_rows` at once.
const PRUNE_BATCH: usize = 256;

/// Default grace period for orphans and temps.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// Counts for one reason of removal.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Removed {
    /// Rows.
    pub rows: u64,
    /// Published blobs.
    pub blobs: u64,
    /// Temp objects.
    pub temps: u64,
    /// Bytes they held.
    pub bytes: u64,
}

impl Removed {
    fn add(&mut self, other: &Removed) {
        self.rows += other.rows;
        self.blobs += other.blobs;
        self.temps += other.temps;
        self.bytes += other.bytes;
    }
}

/// What a prune removed (or, on a dry run, would remove).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PruneReport {
    /// Rows removed.
    pub rows_removed: u64,
    /// Published blobs removed (with their rows, or as orphans).
    pub blobs_removed: u64,
    /// Temp objects removed.
    pub temps_removed: u64,
    /// Bytes freed.
    pub bytes_reclaimed: u64,
    /// True if nothing was removed.
    pub dry_run: bool,
    /// Rows older than `older_than`, with their blobs.
    pub by_age: Removed,
    /// Unreferenced blobs and stale temps.
    pub orphans: Removed,
    /// Least-recently-used rows evicted for `max_size`, with their blobs.
    pub by_size: Removed,
    /// Rows that cannot be decoded, found (and removed if asked).
    pub corrupt: Removed,
}

/// What prune is doing, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Entries removed so far.
    pub done: u64,
    /// Entries to remove in all.
    pub total: u64,
}

/// Count row `r` and those of its blobs not already gone into `counts`; returns the bytes that frees.
fn take_row<'a>(
    r: &'a RowEntry,
    blob_size: &HashMap<&'a str, u64>,
    gone: &mut HashSet<&'a str>,
    counts: &mut Removed,
) -> u64 {
    let mut freed = r.size;
    counts.rows += 1;
    for id in &r.refs {
        if let Some((&id, &size)) = blob_size.get_key_value(id.as_str()) {
            if gone.insert(id) {
                counts.blobs += 1;
                freed += size;
            }
        }
    }
    counts.bytes += freed;
    freed
}

/// Remove what `options` select, reporting progress after each removal. The plan is made from one
/// listing (blobs first, then rows, so a blob whose row commits meanwhile counts as referenced), and the
/// report is the plan, so a dry run reports exactly what the same prune would remove from the same cache.
pub async fn prune(
    backend: &dyn OutputCache,
    options: &PruneOptions,
    mut progress: impl FnMut(Progress),
) -> Result<PruneReport> {
    if options.orphans && options.prefix.is_some() {
        return Err(crate::Error::InvalidInput {
            what: "prune options".into(),
            reason: "orphan blobs carry no task type, so --orphans cannot be scoped by --prefix \
                     (scope by run id instead, or drop --prefix)"
                .into(),
        });
    }
    let now = SystemTime::now();
    let blobs = backend.list_blobs().await?;
    let rows = backend.list_rows().await?;
    let corrupt = backend.list_corrupt().await?;
    if options.orphans && !options.corrupt && !corrupt.is_empty() {
        return Err(crate::Error::InvalidInput {
            what: "prune".into(),
            reason: format!(
                "{} row(s) cannot be decoded (first: {}: {}); their blobs cannot be told from orphans, so \
                 the orphan sweep stops here. Remove them with --corrupt (see them with --dry-run --corrupt)",
                corrupt.len(),
                corrupt[0].id,
                corrupt[0].reason
            ),
        });
    }
    let blob_size: HashMap<&str, u64> = blobs
        .iter()
        .filter(|b| b.state == BlobState::Published)
        .map(|b| (b.id.as_str(), b.size))
        .collect();
    let in_scope = |r: &RowEntry| {
        options
            .prefix
            .as_deref()
            .is_none_or(|p| r.key.task_type().starts_with(p))
    };

    let mut gone_blobs: HashSet<&str> = HashSet::new();
    let mut doomed_rows: Vec<&RowEntry> = Vec::new();
    let mut doomed: HashSet<usize> = HashSet::new();
    let mut report = PruneReport {
        dry_run: options.dry_run,
        ..PruneReport::default()
    };
    if let Some(age) = options.older_than {
        let cutoff = now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH);
        for (i, r) in rows.iter().enumerate() {
            if in_scope(r) && r.created_at < cutoff {
                doomed.insert(i);
                doomed_rows.push(r);
                take_row(r, &blob_size, &mut gone_blobs, &mut report.by_age);
            }
        }
    }

    let mut orphan_blobs: Vec<&BlobEntry> = Vec::new();
    let mut stale_temps: Vec<&BlobEntry> = Vec::new();
    if options.orphans {
        let cutoff = now
            .checked_sub(options.grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let referenced: HashSet<&str> = rows
            .iter()
            .flat_map(|r| r.refs.iter().map(String::as_str))
            .collect();
        for b in &blobs {
            if b.modified > cutoff {
                continue;
            }
            match b.state {
                BlobState::Published
                    if !referenced.contains(b.id.as_str()) && gone_blobs.insert(&b.id) =>
                {
                    report.orphans.blobs += 1;
                    report.orphans.bytes += b.size;
                    orphan_blobs.push(b);
                }
                BlobState::Temp => {
                    report.orphans.temps += 1;
                    report.orphans.bytes += b.size;
                    stale_temps.push(b);
                }
                BlobState::Published => {}
            }
        }
    }

    if let Some(budget) = options.max_size {
        let temps_left: u64 = blobs
            .iter()
            .filter(|b| b.state == BlobState::Temp && !stale_temps.iter().any(|t| t.id == b.id))
            .map(|b| b.size)
            .sum();
        let mut total: u64 = temps_left
            + rows
                .iter()
                .enumerate()
                .filter(|(i, _)| !doomed.contains(i))
                .map(|(_, r)| r.size)
                .sum::<u64>()
            + blob_size
                .iter()
                .filter(|(id, _)| !gone_blobs.contains(*id))
                .map(|(_, s)| s)
                .sum::<u64>();
        let mut candidates: Vec<(usize, &RowEntry)> = rows
            .iter()
            .enumerate()
            .filter(|(i, r)| !doomed.contains(i) && in_scope(r))
            .collect();
        candidates.sort_by_key(|(_, r)| (r.last_access.unwrap_or(r.created_at), r.created_at));
        for (i, r) in candidates {
            if total <= budget {
                break;
            }
            doomed.insert(i);
            doomed_rows.push(r);
            total = total.saturating_sub(take_row(
                r,
                &blob_size,
                &mut gone_blobs,
                &mut report.by_size,
            ));
        }
    }

    if options.corrupt {
        for c in &corrupt {
            report.corrupt.rows += 1;
            report.corrupt.bytes += c.size;
        }
    }

    let mut all = Removed::default();
    for part in [
        &report.by_age,
        &report.orphans,
        &report.by_size,
        &report.corrupt,
    ] {
        all.add(part);
    }
    report.rows_removed = all.rows;
    report.blobs_removed = all.blobs;
    report.temps_removed = all.temps;
    report.bytes_reclaimed = all.bytes;
    if options.dry_run {
        return Ok(report);
    }

    let doomed_corrupt: &[CorruptEntry] = if options.corrupt { &corrupt } else { &[] };
    let total =
        (doomed_rows.len() + orphan_blobs.len() + stale_temps.len() + doomed_corrupt.len()) as u64;
    let mut done = 0;
    let mut step = |progress: &mut dyn FnMut(Progress)| {
        done += 1;
        progress(Progress { done, total });
    };
    for c in doomed_corrupt {
        backend.remove_corrupt(&c.id).await?;
        step(&mut progress);
    }
    let keys: Vec<crate::RowKey> = doomed_rows.iter().map(|r| r.key.clone()).collect();
    for batch in keys.chunks(PRUNE_BATCH) {
        backend.delete_rows(batch).await?;
        for _ in batch {
            step(&mut progress);
        }
    }
    for b in orphan_blobs {
        backend.delete_blob(&b.id).await?;
        step(&mut progress);
    }
    for t in stale_temps {
        backend.remove_temp(&t.id).await?;
        step(&mut progress);
    }
    Ok(report)
}

/// A cache's contents for `outcache stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Inventory {
    /// Number of rows.
    pub rows: u64,
    /// Bytes in rows.
    pub row_bytes: u64,
    /// Number of published blobs.
    pub blobs: u64,
    /// Bytes in published blobs.
    pub blob_bytes: u64,
    /// Temp objects (writes in flight or abandoned).
    pub temps: u64,
    /// Bytes in temp objects.
    pub temp_bytes: u64,
    /// Rows that cannot be decoded (`prune --corrupt` removes them).
    pub corrupt_rows: u64,
    /// Oldest row's commit time (ms since the epoch).
    pub oldest_ms: Option<u64>,
    /// Newest row's commit time (ms since the epoch).
    pub newest_ms: Option<u64>,
    /// Task types with the most bytes (rows plus the blobs they reference), largest first.
    pub top_task_types: Vec<TaskTypeUsage>,
}

/// Bytes and rows of one task type.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskTypeUsage {
    /// The task type.
    pub task_type: String,
    /// Its rows.
    pub rows: u64,
    /// Bytes of its rows and their blobs.
    pub bytes: u64,
}

/// Count what the cache holds; `top` task types by bytes.
pub async fn inventory(backend: &dyn OutputCache, top: usize) -> Result<Inventory> {
    let blobs = backend.list_blobs().await?;
    let rows = backend.list_rows().await?;
    let mut inv = Inventory {
        corrupt_rows: backend.list_corrupt().await?.len() as u64,
        ..Inventory::default()
    };
    let mut blob_size = HashMap::new();
    for b in &blobs {
        match b.state {
            BlobState::Published => {
                inv.blobs += 1;
                inv.blob_bytes += b.size;
                blob_size.insert(b.id.as_str(), b.size);
            }
            BlobState::Temp => {
                inv.temps += 1;
                inv.temp_bytes += b.size;
            }
        }
    }
    let mut per_task: HashMap<&str, TaskTypeUsage> = HashMap::new();
    for r in &rows {
        inv.rows += 1;
        inv.row_bytes += r.size;
        let ms = crate::layout::millis(r.created_at);
        inv.oldest_ms = Some(inv.oldest_ms.map_or(ms, |o| o.min(ms)));
        inv.newest_ms = Some(inv.newest_ms.map_or(ms, |n| n.max(ms)));
        let usage = per_task
            .entry(r.key.task_type())
            .or_insert_with(|| TaskTypeUsage {
                task_type: r.key.task_type().to_owned(),
                ..TaskTypeUsage::default()
            });
        usage.rows += 1;
        usage.bytes += r.size
            + r.refs
                .iter()
                .filter_map(|id| blob_size.get(id.as_str()))
                .sum::<u64>();
    }
    let mut tasks: Vec<TaskTypeUsage> = per_task.into_values().collect();
    tasks.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then_with(|| a.task_type.cmp(&b.task_type))
    });
    tasks.truncate(top);
    inv.top_task_types = tasks;
    Ok(inv)
}
