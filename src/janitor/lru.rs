//! A size budget (`prune --max-size`, least recently used rows first) over a row listing too large to
//! hold. The first listing only counts; past [`super::PruneOptions::spill_lines`] candidate rows it
//! keeps none. Then a second listing adds up, per slice of the access-time span, the bytes each row's
//! eviction would free (its blobs' by a spilled join with the blob listing, never held), which finds
//! the slice where the budget is met; a third takes every row older than that slice and, in exact LRU
//! order, as many of the slice's own rows as the budget still needs. The same rows go as when every
//! candidate is held and sorted (a test compares the two), for three listings of the rows and of the
//! blobs instead of one, and the memory of the evicted rows and one slice's instead of every row's
//! and every blob's.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;

use super::usage::{BlobIndex, Usage};
use super::{LEDGER_TASK_TYPE, Ownership, Removed, take_row};
use crate::error::Result;
use crate::store::{OutputCache, RowEntry};

/// Slices of the candidates' access-time span: the histogram's whole memory.
const SLICES: u128 = 4096;

/// A row's place in the eviction order: least recently used first, older commits first among equals.
pub(super) fn lru_order(r: &RowEntry) -> (SystemTime, SystemTime) {
    (r.last_access.unwrap_or(r.created_at), r.created_at)
}

/// What the first listing learnt about the candidates of a size budget.
#[derive(Debug, Default)]
pub(super) struct Candidates {
    /// Bytes of the rows that stay unless evicted (every row not removed by age, in scope or not).
    pub(super) rows_left: u64,
    /// Candidates held in the listing kept for the in-memory order.
    pub(super) held: usize,
    /// More candidates than may be held: none were kept, and [`evict_streamed`] lists again.
    pub(super) overflow: bool,
    oldest: Option<SystemTime>,
    newest: Option<SystemTime>,
}

impl Candidates {
    /// Count row `r`, which stays unless evicted; `true` if it is a candidate to hold.
    pub(super) fn count(&mut self, r: &RowEntry, in_scope: bool, limit: usize) -> bool {
        self.rows_left += r.size;
        if !in_scope {
            return false;
        }
        let (at, _) = lru_order(r);
        self.oldest = Some(self.oldest.map_or(at, |t| t.min(at)));
        self.newest = Some(self.newest.map_or(at, |t| t.max(at)));
        if self.overflow {
            return false;
        }
        if self.held < limit {
            self.held += 1;
            return true;
        }
        self.overflow = true;
        false
    }

    /// The slice of the access-time span that `r` falls in (rows listed since clamp to the ends).
    fn slice_of(&self, r: &RowEntry) -> usize {
        let (Some(oldest), Some(newest)) = (self.oldest, self.newest) else {
            return 0;
        };
        let span = newest
            .duration_since(oldest)
            .unwrap_or(Duration::ZERO)
            .as_nanos()
            + 1;
        let since = lru_order(r)
            .0
            .duration_since(oldest)
            .unwrap_or(Duration::ZERO)
            .as_nanos();
        (since.min(span - 1) * SLICES / span) as usize
    }
}

/// What [`evict_streamed`] works on.
pub(super) struct Budget<'a> {
    pub(super) backend: &'a dyn OutputCache,
    /// Whether a listed row is a candidate: in scope, not removed by age, not the janitor's ledger.
    pub(super) candidate: &'a (dyn Fn(&RowEntry) -> bool + Send + Sync),
    pub(super) budget: u64,
    /// Whether the rows come from a listing (their refs unknown): blobs are then theirs by key tag.
    pub(super) listing_only: bool,
    pub(super) spill_lines: usize,
}

/// Evict least recently used candidates until `total` is within the budget, listing the blobs and
/// the rows twice more; the evicted rows are counted into `counts` and returned, and the blobs they
/// own added to `owned`.
pub(super) async fn evict_streamed(
    job: &Budget<'_>,
    candidates: &Candidates,
    total: &mut u64,
    owned: &mut Ownership,
    gone: &mut HashSet<String>,
    counts: &mut Removed,
) -> Result<Vec<RowEntry>> {
    if *total <= job.budget {
        return Ok(Vec::new());
    }
    // Second listing: what evicting each slice would free. Blobs first, as the janitor always lists:
    // a row that commits in between then has its blob listed.
    let listing_only = Some(job.listing_only);
    let blobs = BlobIndex::listed(job.backend, listing_only, job.spill_lines).await?;
    let mut usage = Usage::over(blobs, job.listing_only);
    let mut freed = vec![0u64; SLICES as usize];
    let mut pages = job.backend.shallow_row_pages();
    while let Some(page) = pages.try_next().await? {
        for r in page.rows.iter().filter(|r| is_candidate(job, r)) {
            let slice = candidates.slice_of(r);
            freed[slice] += r.size;
            usage.claim_for(job.backend, r, slice).await?;
        }
    }
    drop(pages);
    let blob_bytes = usage
        .blob_bytes_per_group(job.backend, freed.len(), gone)
        .await?;
    for (slice, bytes) in blob_bytes.into_iter().enumerate() {
        freed[slice] += bytes;
    }
    // The slice where the running sum first covers the excess: all before it go, it goes in part.
    let mut excess = *total - job.budget;
    let mut cut = freed.len();
    for (slice, bytes) in freed.iter().enumerate() {
        if *bytes >= excess {
            cut = slice;
            break;
        }
        excess -= bytes;
    }
    // Third listing: every row of the older slices goes, and the cut slice's rows are held to order.
    let (mut older, mut edge) = (Vec::new(), Vec::new());
    let mut pages = job.backend.shallow_row_pages();
    while let Some(page) = pages.try_next().await? {
        for r in page.rows.into_iter().filter(|r| is_candidate(job, r)) {
            match candidates.slice_of(&r).cmp(&cut) {
                std::cmp::Ordering::Less => older.push(r),
                std::cmp::Ordering::Equal => edge.push(r),
                std::cmp::Ordering::Greater => {}
            }
        }
    }
    drop(pages);
    // The blobs of just those rows, from a third blob listing, to count what each eviction frees.
    let index = BlobIndex::listed(job.backend, listing_only, job.spill_lines).await?;
    let split = older.len();
    let mut held = older;
    held.extend(edge);
    owned.add(
        &index
            .claimed_by(job.backend, &held, job.listing_only)
            .await?,
    );
    let mut edge = held.split_off(split);
    let mut evicted = Vec::with_capacity(held.len());
    for r in held {
        let freed = take_row(job.backend, &r, owned, gone, counts);
        *total = total.saturating_sub(freed);
        evicted.push(r);
    }
    edge.sort_by_key(lru_order);
    for r in edge {
        if *total <= job.budget {
            break;
        }
        let freed = take_row(job.backend, &r, owned, gone, counts);
        *total = total.saturating_sub(freed);
        evicted.push(r);
    }
    Ok(evicted)
}

fn is_candidate(job: &Budget<'_>, r: &RowEntry) -> bool {
    r.key.task_type() != LEDGER_TASK_TYPE && (job.candidate)(r)
}
