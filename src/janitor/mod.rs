//! The janitor: remove rows past an age, blobs no row references and dead temp objects, and
//! least-recently-used rows beyond a size budget; plus the inventory behind `outcache stats`. Everything
//! works through the trait's listings, so it serves every backend and wrapper alike.
//!
//! ## Design
//! One planner (`plan`) reads one listing — blobs first, then rows, so a blob whose row commits while
//! the janitor runs is seen as referenced, and a blob written after the blob listing is no candidate at
//! all — and decides everything; [`prune`] carries the plan out, and the public orphan sweeps
//! ([`find_orphans`], [`sweep_orphans`]) are the same plan restricted to orphans, so no caller can skip a
//! guard. A dry run reports the plan and changes nothing.
//!
//! **Memory.** The orphan sweep holds no listing: blobs ([`OutputCache::blob_pages`]) and the refs rows
//! hold ([`OutputCache::row_ref_pages`]) arrive a page at a time into sorted runs that spill to unnamed
//! temp files past [`PruneOptions::spill_lines`], and one merged pass over the two sorted sets finds
//! the unreferenced blobs (themselves spilled, then deleted a batch at a time). Its memory is bounded
//! whatever the cache's size, except the ledger of blobs seen unreferenced within the grace period.
//! An age prune streams the row listing and keeps only the rows it removes. A size budget holds its
//! candidates up to [`PruneOptions::spill_lines`] and past that lists the rows and the blobs twice more
//! instead (an access-time histogram, then a select pass: `lru.rs`). Both sort the blobs into spilled
//! runs and join them with the rows they hold to count what each row takes along (`usage.rs`), so they
//! hold the rows they remove and those rows' blobs, not the blob listing. `--corrupt` holds both
//! listings.
//!
//! ## Races with writers (nothing is locked; every rule below is what keeps that safe)
//! - **Rows are deleted by version.** A row is deleted only if it is still the one listed (same commit
//!   time, [`OutputCache::delete_rows_listed`]): a row rewritten between the listing and the delete is
//!   a fresh row and stays.
//! - **A row's delete takes only the blobs it owns** (the ownership rule, [`crate::wire::ref_owned_by`]):
//!   blobs it only cites stay for their owners, and the report counts only what was removed. Where
//!   rows are only listed, the plan counts a row's blobs by the key tag in their names; one of those
//!   that no row refers to (left by an overwrite) is an orphan, and with `--orphans` the sweep takes
//!   and counts it, since the delete of a row it reads takes only the blobs the row refers to.
//! - **The grace period protects writes in flight and readers of replaced rows.** A blob is an orphan
//!   candidate only if it is older than the grace period *and* the janitor first saw it unreferenced at
//!   least the grace period ago. The first sighting is kept in a small ledger row
//!   (`outcache/janitor`) written by non-dry runs, so a blob orphaned by an overwrite gets its grace from
//!   (at the latest) the moment it became an orphan, not from when it was written: a reader still
//!   holding the old row can read it for that long. A lost ledger only makes the next run more careful.
//! - **Temps** (writes in flight or left by a crash) are removed only once untouched for the grace period.
//!   The CLI refuses a grace below [`MIN_GRACE`] without `--force`: on a live cache a shorter one sweeps
//!   the temps of writes still streaming.
//! - **Rows it cannot read stop the orphan sweep**, since the blobs they reference cannot be seen:
//!   garbled rows until removed with `--corrupt`, rows of a newer format version (a newer outcache
//!   shares the cache) always — those are never removed. The prune fails with
//!   [`Error::OrphanSweepBlocked`] and removes nothing; `outcache serve`'s schedule then prunes by age
//!   and size without the sweep. (An object store with a refs index reads
//!   only the rows marked as holding refs; a row without a marker held none when written.) Foreign
//!   entries (links, FIFOs where the cache keeps files) are reported and never touched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::store::{
    BlobEntry, BlobState, CorruptEntry, CorruptKind, ListedBlobs, OutputCache, RowEntry, RowVersion,
};
use crate::wire::{RowKey, sha256_hex};

pub use crate::options::DEFAULT_GRACE;
pub use spill::DEFAULT_SPILL_LINES;

mod lru;
mod orphans;
mod spill;
mod usage;

use orphans::{OrphanReader, OrphanRule, blob_line, nanos, referenced_refs, spill_failed};

/// The shortest grace period the CLI accepts without `--force`: below it, the temps of writes still
/// streaming on a live cache would be swept.
pub const MIN_GRACE: Duration = Duration::from_secs(60);

/// Task type of the janitor's own ledger row (first sightings of orphans). Never pruned, never counted.
pub const LEDGER_TASK_TYPE: &str = "outcache/janitor";

/// Rows handed to `delete_rows_listed` at once (an object store re-lists each batch's key range and
/// deletes it in one bulk request of up to a thousand).
const PRUNE_BATCH: usize = 1000;
/// Batches deleted at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// Orphan blobs deleted at once (one request each on an object store).
const ORPHAN_DELETES_IN_FLIGHT: usize = 16;

fn ledger_key() -> RowKey {
    RowKey::from_parts(LEDGER_TASK_TYPE, &sha256_hex(b"orphans first seen"))
        .unwrap_or_else(|_| unreachable!("a constant, valid key"))
}

/// What an orphan sweep found (and, unless it was a dry run, removed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrphanSweep {
    /// Published blobs no row references, past the grace period.
    pub blobs: Vec<BlobEntry>,
    /// Temp objects older than the grace period (those removed; in a dry run, those that would be).
    pub temps: Vec<BlobEntry>,
    /// Bytes those entries hold.
    pub bytes: u64,
    /// True if nothing was removed.
    pub dry_run: bool,
}

/// Find unreferenced blobs and temps past `grace` (see the module docs for what "past" means), with every
/// guard of [`prune`]: unreadable rows stop it with an error.
pub async fn find_orphans(backend: &dyn OutputCache, grace: Duration) -> Result<OrphanSweep> {
    sweep_orphans(backend, grace, true).await
}

/// Find orphans as [`find_orphans`] does and, unless `dry_run`, remove them.
pub async fn sweep_orphans(
    backend: &dyn OutputCache,
    grace: Duration,
    dry_run: bool,
) -> Result<OrphanSweep> {
    let mut options = PruneOptions::new();
    options.orphans = true;
    options.grace = grace;
    options.dry_run = dry_run;
    let mut plan = plan(backend, &options).await?;
    // This API hands back the whole list; `prune` never holds it.
    let mut blobs = Vec::new();
    let mut relisted = spill::SortedLines::new(spill::DEFAULT_SPILL_LINES);
    let mut reader = OrphanReader::new(std::mem::take(&mut plan.orphan_blobs));
    loop {
        let chunk = reader.next_chunk(PRUNE_BATCH).await?;
        if chunk.is_empty() {
            break;
        }
        for b in chunk {
            if let Some(line) = blob_line(&b) {
                relisted.push(line).await?;
            }
            blobs.push(b);
        }
    }
    plan.orphan_blobs = relisted;
    let mut sweep = OrphanSweep {
        blobs,
        temps: plan.stale_temps.clone(),
        bytes: plan.report.orphans.bytes,
        dry_run,
    };
    if !dry_run {
        let (report, temps_left) = execute(backend, plan, |_| {}).await?;
        sweep.temps.retain(|t| !temps_left.contains(&t.id));
        sweep.bytes = report.orphans.bytes;
    }
    Ok(sweep)
}

/// What `prune` should remove.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct PruneOptions {
    /// Rows committed more than this long ago, with their blobs.
    pub older_than: Option<Duration>,
    /// Blobs no row references and temp objects, past the grace period.
    pub orphans: bool,
    /// How long an orphan or temp must have been one before it is removed (writes in flight and readers
    /// of replaced rows are younger).
    pub grace: Duration,
    /// Evict least-recently-used rows (with their blobs) until the cache holds at most this many bytes.
    pub max_size: Option<u64>,
    /// Only rows whose task type starts with this (age and size eviction; orphans cannot be scoped).
    pub prefix: Option<String>,
    /// Remove garbled rows. Without it, their presence stops an orphan sweep: their blobs cannot be told
    /// from orphans.
    pub corrupt: bool,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// How many lines (blob names, refs) of each set the orphan sweep keeps in memory before it sorts
    /// them into an unnamed temp file under `$TMPDIR`; 0 means [`DEFAULT_SPILL_LINES`]. The sweep
    /// lists and reads page by page, so this bounds its memory whatever the cache's size. A size
    /// budget holds at most this many candidate rows; past it, it lists the rows twice more instead.
    pub spill_lines: usize,
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
    /// Published blobs removed (with their owning rows, or as orphans).
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
    /// Garbled rows, found (and removed if asked).
    pub corrupt: Removed,
    /// Listed rows not deleted because they changed before their delete: rewritten (and so kept) or
    /// already removed by someone else (another janitor).
    #[serde(default)]
    pub rows_kept_rewritten: u64,
    /// With a size budget (`max_size`), the bytes the cache holds after this prune (on a dry run,
    /// would hold), counted as the budget counts them: rows, published blobs and temps. `None`
    /// without a budget: only the budget's planning adds the whole cache up.
    #[serde(default)]
    pub size_after: Option<u64>,
}

impl PruneReport {
    fn total(&mut self) {
        let mut all = Removed::default();
        for part in [&self.by_age, &self.orphans, &self.by_size, &self.corrupt] {
            all.add(part);
        }
        self.rows_removed = all.rows;
        self.blobs_removed = all.blobs;
        self.temps_removed = all.temps;
        self.bytes_reclaimed = all.bytes;
    }

    /// Bytes the budget counts that this report removes (corrupt rows are not in its count).
    fn budgeted_bytes(&self) -> u64 {
        self.by_age.bytes + self.orphans.bytes + self.by_size.bytes
    }
}

/// What prune is doing, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Entries removed so far.
    pub done: u64,
    /// Entries to remove in all.
    pub total: u64,
}

/// Everything one janitor run will do, decided from one listing.
#[derive(Debug, Default)]
struct Plan {
    report: PruneReport,
    corrupt: Vec<CorruptEntry>,
    by_age: Vec<RowEntry>,
    by_size: Vec<RowEntry>,
    /// Which blobs each row's delete takes along, to count what deleted rows freed.
    owned: Ownership,
    /// Orphan blobs, as sorted [`blob_line`]s (spilled past a bound: there may be millions).
    orphan_blobs: spill::SortedLines,
    stale_temps: Vec<BlobEntry>,
    /// The orphan ledger to save after the run (`None`: leave it as it is).
    ledger: Option<BTreeMap<String, u64>>,
    /// Orphans a row prune had claimed as its rows', counted with the orphans instead.
    swept_not_cascaded: HashSet<String>,
}

/// Which published blobs a row's delete takes along, as the janitor counts them: the refs it holds that
/// it owns (the ownership rule) or, where the rows were listed and not read
/// ([`crate::store::RowScan::listing_only`]), the blobs whose names carry its key tag and that were
/// written no later than the row — what such a backend's by-name cascade deletes.
#[derive(Debug, Default)]
struct Ownership {
    listing_only: bool,
    /// When the blob listing these blobs came from began: set where the rows were only listed, so
    /// the deletes can hand each row's blobs to the backend instead of it listing them again.
    listing_began: Option<SystemTime>,
    size: HashMap<String, u64>,
    /// Published blobs by the key tags in their names: (id, size, modified).
    by_tag: HashMap<String, Vec<(String, u64, SystemTime)>>,
}

/// The parts of a blob name that can be a key tag (16 lowercase hex digits).
fn tag_parts(id: &str) -> impl Iterator<Item = &str> {
    crate::wire::name_parts(id).filter(|p| {
        p.len() == 16
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl Ownership {
    fn new(blobs: &[BlobEntry], listing_only: bool) -> Self {
        let mut owned = Ownership {
            listing_only,
            ..Ownership::default()
        };
        owned.add(blobs);
        owned
    }

    /// Know `blobs` too (the ones already known are skipped).
    fn add(&mut self, blobs: &[BlobEntry]) {
        for b in blobs.iter().filter(|b| b.state == BlobState::Published) {
            if self.size.insert(b.id.clone(), b.size).is_some() {
                continue;
            }
            if self.listing_only {
                for tag in tag_parts(&b.id) {
                    self.by_tag.entry(tag.to_owned()).or_default().push((
                        b.id.clone(),
                        b.size,
                        b.modified,
                    ));
                }
            }
        }
    }

    /// The blobs the delete of row `r` takes along, for the backend ([`crate::store::ListedBlobs`]):
    /// only where the rows were only listed (a backend that read them cascades by their refs).
    fn listed_for(&self, backend: &dyn OutputCache, r: &RowEntry) -> Option<ListedBlobs> {
        let listing_began = self.listing_began.filter(|_| self.listing_only)?;
        Some(ListedBlobs {
            ids: self
                .of(backend, r)
                .into_iter()
                .map(|(id, _)| id.to_owned())
                .collect(),
            listing_began,
        })
    }

    /// The published blobs (id, size) the delete of row `r` takes along.
    fn of<'a>(&'a self, backend: &dyn OutputCache, r: &'a RowEntry) -> Vec<(&'a str, u64)> {
        if self.listing_only {
            let tagged = self.by_tag.get(&backend.blob_tag(&r.key));
            tagged
                .into_iter()
                .flatten()
                .filter(|(id, _, modified)| {
                    *modified <= r.created_at && backend.owns_ref(&r.key, id)
                })
                .map(|(id, size, _)| (id.as_str(), *size))
                .collect()
        } else {
            r.refs
                .iter()
                .filter(|id| backend.owns_ref(&r.key, id))
                .filter_map(|id| Some((id.as_str(), *self.size.get(id.as_str())?)))
                .collect()
        }
    }
}

/// Count row `r` and the blobs its delete takes along that are not already counted in `gone` into
/// `counts`; returns the bytes that frees.
fn take_row(
    backend: &dyn OutputCache,
    r: &RowEntry,
    owned: &Ownership,
    gone: &mut HashSet<String>,
    counts: &mut Removed,
) -> u64 {
    let mut freed = r.size;
    counts.rows += 1;
    for (id, size) in owned.of(backend, r) {
        if !gone.contains(id) {
            gone.insert(id.to_owned());
            counts.blobs += 1;
            freed += size;
        }
    }
    counts.bytes += freed;
    freed
}

/// The orphan ledger: when the janitor first saw each blob unreferenced (ms since the epoch).
async fn load_ledger(backend: &dyn OutputCache) -> Result<BTreeMap<String, u64>> {
    let row = match backend.get_row(&ledger_key()).await {
        Ok(row) => row,
        Err(Error::CorruptRow { .. }) => None, // start afresh: only makes this run more careful
        Err(e) => return Err(e),
    };
    Ok(row
        .and_then(|r| r.output.get("orphans_first_seen_ms").cloned())
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default())
}

fn cutoff(now: SystemTime, age: Duration) -> SystemTime {
    now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Decide what `options` remove, from one listing.
async fn plan(backend: &dyn OutputCache, options: &PruneOptions) -> Result<Plan> {
    if options.orphans && options.prefix.is_some() {
        return Err(Error::InvalidInput {
            what: "prune options".into(),
            reason: "orphan blobs carry no task type, so --orphans cannot be scoped by --prefix \
                     (scope by run id instead, or drop --prefix)"
                .into(),
        });
    }
    let now = SystemTime::now();
    let grace_cutoff = cutoff(now, options.grace);
    let spill_lines = spill::limit(options.spill_lines);
    // Age and size prunes sort the blobs into spilled runs and keep just those of the rows they hold
    // (`usage::BlobIndex`); the search for garbled rows holds both listings whole. The orphan sweep
    // streams everything.
    let rows_prune = options.older_than.is_some() || options.max_size.is_some() || options.corrupt;
    let age_only = options.older_than.is_some() && options.max_size.is_none() && !options.corrupt;
    let mut blob_index =
        (rows_prune && !options.corrupt).then(|| usage::BlobIndex::new(None, spill_lines));
    // What the blobs hold, for a size budget's total.
    let (mut published_bytes, mut temp_bytes) = (0u64, 0u64);

    // The blobs first, page by page: a blob whose row commits while the janitor runs is then seen as
    // referenced, and one written after its page was listed is no candidate at all.
    let mut blobs: Vec<BlobEntry> = Vec::new();
    let mut published = spill::SortedLines::new(spill_lines);
    let mut plan = Plan {
        report: PruneReport {
            dry_run: options.dry_run,
            ..PruneReport::default()
        },
        orphan_blobs: spill::SortedLines::new(spill_lines),
        ..Plan::default()
    };
    {
        let mut pages = backend.blob_pages();
        while let Some(page) = pages.try_next().await? {
            for b in page {
                match b.state {
                    BlobState::Published => published_bytes += b.size,
                    BlobState::Temp => temp_bytes += b.size,
                    BlobState::Foreign => {}
                }
                if options.orphans {
                    match b.state {
                        BlobState::Published => {
                            if let Some(line) = blob_line(&b) {
                                published.push(line).await?;
                            }
                        }
                        BlobState::Temp if b.modified <= grace_cutoff => {
                            plan.report.orphans.temps += 1;
                            plan.report.orphans.bytes += b.size;
                            plan.stale_temps.push(b.clone());
                        }
                        BlobState::Temp | BlobState::Foreign => {}
                    }
                }
                if let Some(index) = blob_index.as_mut() {
                    index.push(&b).await?;
                } else if rows_prune {
                    blobs.push(b);
                }
            }
        }
    }

    let in_scope = |r: &RowEntry| {
        options
            .prefix
            .as_deref()
            .is_none_or(|p| r.key.task_type().starts_with(p))
    };
    // An age prune alone decides row by row, so it keeps only the rows it removes, page by page; a size
    // budget holds its candidates up to a bound and past it lists again (`lru`); the garbled-row search
    // holds the whole listing.
    let size_streamed = options.max_size.is_some() && !options.corrupt;
    let age_cutoff = options.older_than.map(|age| cutoff(now, age));
    let aged = |r: &RowEntry| age_cutoff.is_some_and(|c| in_scope(r) && r.created_at < c);
    let mut candidates = lru::Candidates::default();

    // The rows the row prunes choose from: every row read where garbled ones are to be found, else
    // as cheaply as the backend lists them.
    let (mut rows, unreadable, listing_only) = if !rows_prune {
        (Vec::new(), Vec::new(), false)
    } else if age_only {
        let (mut old, mut listing_only) = (Vec::new(), false);
        let mut pages = backend.shallow_row_pages();
        while let Some(page) = pages.try_next().await? {
            listing_only |= page.listing_only;
            old.extend(
                page.rows
                    .into_iter()
                    .filter(|r| r.key.task_type() != LEDGER_TASK_TYPE && aged(r)),
            );
        }
        (old, Vec::new(), listing_only)
    } else if size_streamed {
        let (mut kept, mut listing_only) = (Vec::new(), false);
        let mut pages = backend.shallow_row_pages();
        while let Some(page) = pages.try_next().await? {
            listing_only |= page.listing_only;
            for r in page.rows {
                if r.key.task_type() == LEDGER_TASK_TYPE {
                    continue;
                }
                let overflowing = candidates.overflow;
                if aged(&r) || candidates.count(&r, in_scope(&r), spill_lines) {
                    kept.push(r);
                } else if candidates.overflow && !overflowing {
                    kept.retain(|r| aged(r)); // too many to hold: the budget lists again
                }
            }
        }
        (kept, Vec::new(), listing_only)
    } else {
        let scan = if options.corrupt {
            backend.scan_rows().await?
        } else {
            all_pages(backend.shallow_row_pages()).await?
        };
        let rows: Vec<RowEntry> = scan
            .rows
            .into_iter()
            .filter(|r| r.key.task_type() != LEDGER_TASK_TYPE)
            .collect();
        (rows, scan.unreadable, scan.listing_only)
    };
    if let Some(index) = blob_index {
        blobs = index.claimed_by(backend, &rows, listing_only).await?;
    }
    plan.owned = Ownership::new(&blobs, listing_only);
    // Every blob listing the plan reads began after `now`: blobs of rows committed before it are in.
    plan.owned.listing_began = Some(now);

    let mut gone_blobs: HashSet<String> = HashSet::new();
    let mut doomed: HashSet<usize> = HashSet::new();
    let mut gone_blob_bytes = 0u64;
    if age_only {
        // Every row kept is one to remove.
        for r in &rows {
            take_row(
                backend,
                r,
                &plan.owned,
                &mut gone_blobs,
                &mut plan.report.by_age,
            );
        }
        plan.by_age = std::mem::take(&mut rows);
    } else {
        for (i, r) in rows.iter().enumerate() {
            if aged(r) {
                doomed.insert(i);
                let freed = take_row(
                    backend,
                    r,
                    &plan.owned,
                    &mut gone_blobs,
                    &mut plan.report.by_age,
                );
                gone_blob_bytes += freed - r.size;
                plan.by_age.push(r.clone());
            }
        }
    }

    if options.orphans {
        let referenced = referenced_refs(backend, options, spill_lines).await?;
        let seen = load_ledger(backend).await?;
        let rule = OrphanRule {
            cutoff_nanos: nanos(grace_cutoff),
            cutoff_ms: crate::layout::millis(grace_cutoff),
            now_ms: crate::layout::millis(now),
        };
        // An orphan the row prunes claimed (by key tag) is the sweep's to take and count: a row's
        // delete that reads the row takes only the blobs it refers to. The size budget needs the
        // orphans' ids.
        let claimed = std::mem::take(&mut gone_blobs);
        let keep_ids = options.max_size.is_some();
        let decided = tokio::task::spawn_blocking(move || {
            rule.decide(
                published,
                referenced,
                &claimed,
                &seen,
                keep_ids,
                spill_lines,
            )
            .map(|decided| (decided, claimed))
        })
        .await
        .map_err(|e| spill_failed(std::io::Error::other(e)))?
        .map_err(spill_failed)?;
        let (decided, claimed) = decided;
        gone_blobs = claimed;
        gone_blobs.extend(decided.ids);
        for (id, size) in decided.claimed {
            let by_age = &mut plan.report.by_age;
            by_age.blobs = by_age.blobs.saturating_sub(1);
            by_age.bytes = by_age.bytes.saturating_sub(size);
            gone_blob_bytes = gone_blob_bytes.saturating_sub(size);
            plan.swept_not_cascaded.insert(id);
        }
        plan.report.orphans.blobs += decided.count;
        plan.report.orphans.bytes += decided.bytes;
        gone_blob_bytes += decided.bytes;
        plan.orphan_blobs = decided.orphans;
        plan.ledger = Some(decided.ledger);
    }

    if let Some(budget) = options.max_size {
        let stale_temp_bytes: u64 = plan.stale_temps.iter().map(|t| t.size).sum();
        let temps_left = temp_bytes.saturating_sub(stale_temp_bytes);
        let rows_left: u64 = if size_streamed {
            candidates.rows_left
        } else {
            rows.iter()
                .enumerate()
                .filter(|(i, _)| !doomed.contains(i))
                .map(|(_, r)| r.size)
                .sum()
        };
        let blobs_left = published_bytes.saturating_sub(gone_blob_bytes);
        let mut total = temps_left + rows_left + blobs_left;
        if candidates.overflow {
            let candidate = |r: &RowEntry| in_scope(r) && !aged(r);
            let job = lru::Budget {
                backend,
                candidate: &candidate,
                budget,
                listing_only,
                spill_lines,
            };
            plan.by_size = lru::evict_streamed(
                &job,
                &candidates,
                &mut total,
                &mut plan.owned,
                &mut gone_blobs,
                &mut plan.report.by_size,
            )
            .await?;
        } else {
            let mut held: Vec<(usize, &RowEntry)> = rows
                .iter()
                .enumerate()
                .filter(|(i, r)| !doomed.contains(i) && in_scope(r))
                .collect();
            held.sort_by_key(|(_, r)| lru::lru_order(r));
            for (_, r) in held {
                if total <= budget {
                    break;
                }
                let freed = take_row(
                    backend,
                    r,
                    &plan.owned,
                    &mut gone_blobs,
                    &mut plan.report.by_size,
                );
                total = total.saturating_sub(freed);
                plan.by_size.push(r.clone());
            }
        }
        plan.report.size_after = Some(total);
    }

    if options.corrupt {
        plan.corrupt = unreadable
            .into_iter()
            .filter(|c| c.kind == CorruptKind::Garbled)
            .collect();
        for c in &plan.corrupt {
            plan.report.corrupt.rows += 1;
            plan.report.corrupt.bytes += c.size;
        }
    }
    // Deleted in key order: a batch is then one contiguous key range (an object store re-lists it).
    let by_key = |a: &RowEntry, b: &RowEntry| {
        (a.key.task_type(), a.key.fingerprint()).cmp(&(b.key.task_type(), b.key.fingerprint()))
    };
    plan.by_age.sort_by(by_key);
    plan.by_size.sort_by(by_key);
    plan.report.total();
    Ok(plan)
}

/// Every page of a row listing, in one [`RowScan`] (a row prune decides from the whole listing).
async fn all_pages(
    mut pages: futures::stream::BoxStream<'_, Result<crate::store::RowScan>>,
) -> Result<crate::store::RowScan> {
    let mut all = crate::store::RowScan::default();
    while let Some(page) = pages.try_next().await? {
        all.listing_only |= page.listing_only;
        all.rows.extend(page.rows);
        all.unreadable.extend(page.unreadable);
    }
    Ok(all)
}

/// Delete the listed `rows` by version and recount `counts` from the ones really deleted.
async fn delete_listed(
    backend: &dyn OutputCache,
    rows: &[RowEntry],
    owned: &Ownership,
    counted_elsewhere: &HashSet<String>,
    counts: &mut Removed,
    kept: &mut u64,
    step: &mut (dyn FnMut(u64) + Send),
) -> Result<()> {
    use futures::{StreamExt, TryStreamExt};
    let mut deleted: HashSet<RowKey> = HashSet::new();
    // A few batches at once: each is its own key range, and on an object store its re-listing is
    // the cost that dominates (SQLite serialises them on its writer; nothing is lost there).
    // Boxed with their types spelt out: an async closure here trips the compiler's `Send` inference.
    type Deleting<'a> = futures::future::BoxFuture<'a, Result<(u64, Vec<RowKey>)>>;
    let jobs: Vec<Deleting<'_>> = rows
        .chunks(PRUNE_BATCH)
        .map(|batch| -> Deleting<'_> {
            let versions: Vec<RowVersion> = batch
                .iter()
                .map(|r| RowVersion {
                    owned_blobs: owned.listed_for(backend, r),
                    ..r.listed_version()
                })
                .collect();
            Box::pin(async move {
                let gone = backend.delete_rows_listed(&versions).await?;
                Ok((versions.len() as u64, gone))
            })
        })
        .collect();
    let mut batches = futures::stream::iter(jobs).buffer_unordered(BATCHES_IN_FLIGHT);
    while let Some((listed, gone)) = batches.try_next().await? {
        deleted.extend(gone);
        step(listed);
    }
    *counts = Removed::default();
    let mut gone = counted_elsewhere.clone();
    for r in rows.iter().filter(|r| deleted.contains(&r.key)) {
        take_row(backend, r, owned, &mut gone, counts);
    }
    *kept += rows.len() as u64 - counts.rows;
    Ok(())
}

/// Carry out `plan`, reporting progress after each step; returns the report of what was removed.
/// Carries out `plan`; returns its report and the ids of the stale temps it found gone or in use
/// when it came to them (not removed, not counted).
async fn execute(
    backend: &dyn OutputCache,
    mut plan: Plan,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<(PruneReport, HashSet<String>)> {
    let total =
        (plan.corrupt.len() + plan.by_age.len() + plan.by_size.len() + plan.stale_temps.len())
            as u64
            + plan.orphan_blobs.len();
    let mut done = 0;
    let mut step = |n: u64| {
        done += n;
        progress(Progress { done, total });
    };
    let planned = plan.report.budgeted_bytes();
    let mut removed_corrupt = Removed::default();
    for c in &plan.corrupt {
        if backend.remove_corrupt(&c.id).await? {
            removed_corrupt.rows += 1;
            removed_corrupt.bytes += c.size;
        }
        step(1);
    }
    plan.report.corrupt = removed_corrupt;
    let report = &mut plan.report;
    delete_listed(
        backend,
        &plan.by_age,
        &plan.owned,
        &plan.swept_not_cascaded,
        &mut report.by_age,
        &mut report.rows_kept_rewritten,
        &mut step,
    )
    .await?;
    delete_listed(
        backend,
        &plan.by_size,
        &plan.owned,
        &plan.swept_not_cascaded,
        &mut report.by_size,
        &mut report.rows_kept_rewritten,
        &mut step,
    )
    .await?;
    let mut orphans = OrphanReader::new(std::mem::take(&mut plan.orphan_blobs));
    loop {
        let chunk = orphans.next_chunk(PRUNE_BATCH).await?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len() as u64;
        futures::stream::iter(chunk)
            .map(|b| async move { backend.delete_blob(&b.id).await })
            .buffer_unordered(ORPHAN_DELETES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        step(n);
    }
    let mut temps_left = HashSet::new();
    for t in &plan.stale_temps {
        if !backend.remove_temp(&t.id).await? {
            // Gone already (its write finished or failed meanwhile), or still being read (a deleted
            // SQLite blob a stream has pinned): not this run's to count.
            report.orphans.temps -= 1;
            report.orphans.bytes -= t.size;
            temps_left.insert(t.id.clone());
        }
        step(1);
    }
    if let Some(ledger) = plan.ledger {
        save_ledger(backend, ledger).await?;
    }
    report.total();
    // What the plan meant to remove and did not (rewritten rows, temps in use) is counted as still there.
    let unremoved = planned.saturating_sub(report.budgeted_bytes());
    report.size_after = report.size_after.map(|size| size + unremoved);
    if report.rows_removed + report.blobs_removed + report.temps_removed > 0 {
        backend.reclaim_space().await?;
    }
    Ok((plan.report, temps_left))
}

async fn save_ledger(backend: &dyn OutputCache, ledger: BTreeMap<String, u64>) -> Result<()> {
    let key = ledger_key();
    if ledger.is_empty() {
        backend.delete_row(&key).await?; // idempotent: nothing to do if there is none
        return Ok(());
    }
    let output: Value = json!({ "orphans_first_seen_ms": ledger });
    backend.save_row(&key, &output).await
}

/// Remove what `options` select, reporting progress after each removal. The plan is made from one
/// listing; a dry run reports exactly the plan, and a real run reports what it removed (rows rewritten
/// since the listing are kept and counted apart).
pub async fn prune(
    backend: &dyn OutputCache,
    options: &PruneOptions,
    progress: impl FnMut(Progress) + Send,
) -> Result<PruneReport> {
    let started = std::time::Instant::now();
    let plan = plan(backend, options).await?;
    let report = if options.dry_run {
        plan.report
    } else {
        execute(backend, plan, progress).await?.0
    };
    tracing::info!(
        target: "outcache::janitor",
        backend = %backend,
        dry_run = report.dry_run,
        rows_removed = report.rows_removed,
        blobs_removed = report.blobs_removed,
        temps_removed = report.temps_removed,
        bytes_reclaimed = report.bytes_reclaimed,
        rows_kept_rewritten = report.rows_kept_rewritten,
        millis = started.elapsed().as_millis() as u64,
        "prune"
    );
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
    /// Whether every row was read. `false` where the backend listed rows without reading them (an
    /// object store: `stats` then costs a listing, not a GET per row); rows that list fine but cannot
    /// be decoded are then not counted in `corrupt_rows` or `newer_format_rows` (`prune --dry-run
    /// --corrupt` reads every row and finds them).
    #[serde(default = "rows_read_default")]
    pub rows_read: bool,
    /// Rows that cannot be decoded (`prune --corrupt` removes them).
    pub corrupt_rows: u64,
    /// Rows of a newer format version (a newer outcache shares the cache; never removed).
    #[serde(default)]
    pub newer_format_rows: u64,
    /// Entries the cache did not write (links, FIFOs, files it does not name so …) where it keeps rows
    /// and blobs; never touched.
    #[serde(default)]
    pub foreign_entries: u64,
    /// Bytes the store occupies on disk where the backend can tell (SQLite: the database file and its
    /// log), beside the logical bytes above.
    #[serde(default)]
    pub storage_bytes: Option<u64>,
    /// Oldest row's commit time (ms since the epoch).
    pub oldest_ms: Option<u64>,
    /// Newest row's commit time (ms since the epoch).
    pub newest_ms: Option<u64>,
    /// Task types with the most bytes (rows plus the blobs they own), largest first.
    pub top_task_types: Vec<TaskTypeUsage>,
}

fn rows_read_default() -> bool {
    true
}

/// Bytes and rows of one task type.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskTypeUsage {
    /// The task type.
    pub task_type: String,
    /// Its rows.
    pub rows: u64,
    /// Bytes of its rows and the blobs they own.
    pub bytes: u64,
}

/// Count what the cache holds; `top` task types by bytes. Rows and blobs are taken a page at a time
/// ([`OutputCache::shallow_row_pages`], [`OutputCache::blob_pages`]); which blobs each task type's
/// rows own is found by joining sorted runs that spill to temp files past [`DEFAULT_SPILL_LINES`]
/// lines, so memory stays bounded however large the cache (`usage`).
pub async fn inventory(backend: &dyn OutputCache, top: usize) -> Result<Inventory> {
    inventory_spilling(backend, top, DEFAULT_SPILL_LINES).await
}

/// [`inventory`], keeping at most `spill_lines` lines of each sorted run in memory before spilling
/// it to a temp file (0: [`DEFAULT_SPILL_LINES`]).
pub async fn inventory_spilling(
    backend: &dyn OutputCache,
    top: usize,
    spill_lines: usize,
) -> Result<Inventory> {
    let spill_lines = spill::limit(spill_lines);
    let mut inv = Inventory {
        rows_read: true,
        storage_bytes: backend.storage_bytes().await?,
        ..Inventory::default()
    };
    // Rows first: whether they were read or only listed decides how blobs are matched to them.
    // Built with the first page, which says so.
    let mut usage: Option<usage::Usage> = None;
    let mut per_task: HashMap<String, TaskTypeUsage> = HashMap::new();
    let mut pages = backend.shallow_row_pages();
    while let Some(page) = pages.try_next().await? {
        let usage = usage.get_or_insert_with(|| usage::Usage::new(page.listing_only, spill_lines));
        inv.rows_read &= !page.listing_only;
        for c in &page.unreadable {
            match c.kind {
                CorruptKind::Garbled => inv.corrupt_rows += 1,
                CorruptKind::NewerFormat => inv.newer_format_rows += 1,
                CorruptKind::Foreign => inv.foreign_entries += 1,
            }
        }
        for r in page
            .rows
            .iter()
            .filter(|r| r.key.task_type() != LEDGER_TASK_TYPE)
        {
            inv.rows += 1;
            inv.row_bytes += r.size;
            let ms = crate::layout::millis(r.created_at);
            inv.oldest_ms = Some(inv.oldest_ms.map_or(ms, |o| o.min(ms)));
            inv.newest_ms = Some(inv.newest_ms.map_or(ms, |n| n.max(ms)));
            let entry = per_task
                .entry(r.key.task_type().to_owned())
                .or_insert_with(|| TaskTypeUsage {
                    task_type: r.key.task_type().to_owned(),
                    ..TaskTypeUsage::default()
                });
            entry.rows += 1;
            entry.bytes += r.size;
            usage.claim(backend, r).await?;
        }
    }
    let mut usage = usage.unwrap_or_else(|| usage::Usage::new(false, spill_lines));
    let mut blobs = backend.blob_pages();
    while let Some(page) = blobs.try_next().await? {
        for b in page {
            match b.state {
                BlobState::Published => {
                    inv.blobs += 1;
                    inv.blob_bytes += b.size;
                }
                BlobState::Temp => {
                    inv.temps += 1;
                    inv.temp_bytes += b.size;
                }
                BlobState::Foreign => inv.foreign_entries += 1,
            }
            usage.blob(&b).await?;
        }
    }
    for (task_type, bytes) in usage.blob_bytes_per_task_type(backend).await? {
        if let Some(entry) = per_task.get_mut(&task_type) {
            entry.bytes += bytes;
        }
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
