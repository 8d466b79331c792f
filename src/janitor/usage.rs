//! Which blobs rows own, without holding the blob listing: the rows' claims on blobs and the published
//! blobs are sorted into runs that spill to temp files past a bound, then joined in one pass, so
//! neither listing is ever held whole, however large the cache. `stats` sums the bytes per task type
//! and a size budget the bytes per slice of access times ([`Usage`]); a row prune finds just the blobs
//! of the rows it removes ([`BlobIndex::claimed_by`]).
//!
//! A claim and a blob meet on the blob's id where rows were read (their refs name their blobs), and
//! on the key tag where rows were only listed (an object store): there a row owns the blobs that
//! carry its tag and were written no later than the row, as [`super::Ownership`] counts them.

use std::collections::{HashMap, HashSet};
use std::iter::Peekable;

use tokio::sync::mpsc;

use super::orphans::{blob_line, nanos, parse_blob_line, spill_failed};
use super::spill::{Merged, SortedLines};
use super::tag_parts;
use crate::error::Result;
use crate::store::{BlobEntry, BlobState, OutputCache, RowEntry};
use crate::wire::RowKey;

/// Only names without control characters are joined: lines are tab-separated and sort as `key TAB
/// …`, which orders them by key only while no key holds a byte below TAB. Blobs this crate writes
/// never do.
fn joinable(s: &str) -> bool {
    !s.bytes().any(|c| c < b' ')
}

/// The part of a line before its first tab.
fn join_key(line: &str) -> &str {
    line.split('\t').next().unwrap_or_default()
}

/// The published blobs as [`blob_line`]s, by id, and by key tag (`tag TAB` before the line), for
/// joins with rows' claims. Which of the two a join needs is known once the rows say whether they
/// were read or only listed; a blob listed before them goes into both.
pub(super) struct BlobIndex {
    by_id: Option<SortedLines>,
    by_tag: Option<SortedLines>,
    spill_lines: usize,
}

impl BlobIndex {
    /// `listing_only`: whether the rows were only listed, if known yet.
    pub(super) fn new(listing_only: Option<bool>, spill_lines: usize) -> Self {
        let lines = || Some(SortedLines::new(spill_lines));
        BlobIndex {
            by_id: if listing_only == Some(true) {
                None
            } else {
                lines()
            },
            by_tag: if listing_only == Some(false) {
                None
            } else {
                lines()
            },
            spill_lines,
        }
    }

    /// Every blob `backend` lists now, in a new index (see [`BlobIndex::new`]).
    pub(super) async fn listed(
        backend: &dyn OutputCache,
        listing_only: Option<bool>,
        spill_lines: usize,
    ) -> Result<Self> {
        use futures::TryStreamExt as _;
        let mut index = BlobIndex::new(listing_only, spill_lines);
        let mut pages = backend.blob_pages();
        while let Some(page) = pages.try_next().await? {
            for b in &page {
                index.push(b).await?;
            }
        }
        Ok(index)
    }

    /// Note a listed blob (only published ones are owned).
    pub(super) async fn push(&mut self, b: &BlobEntry) -> Result<()> {
        // `blob_line` refuses the names `joinable` would.
        let Some(line) = blob_line(b).filter(|_| b.state == BlobState::Published) else {
            return Ok(());
        };
        if let Some(by_tag) = self.by_tag.as_mut() {
            for tag in tag_parts(&b.id) {
                by_tag.push(format!("{tag}\t{line}")).await?;
            }
        }
        if let Some(by_id) = self.by_id.as_mut() {
            by_id.push(line).await?;
        }
        Ok(())
    }

    /// The lines to join with claims of rows read (`false`) or only listed (`true`).
    fn lines(self, listing_only: bool) -> SortedLines {
        let lines = if listing_only {
            self.by_tag
        } else {
            self.by_id
        };
        lines.unwrap_or_else(|| SortedLines::new(1))
    }

    /// The blobs `rows` may own: those their refs name where rows were read, those carrying their
    /// key tags where rows were only listed. A superset: [`super::Ownership`] applies the rule itself.
    pub(super) async fn claimed_by(
        self,
        backend: &dyn OutputCache,
        rows: &[RowEntry],
        listing_only: bool,
    ) -> Result<Vec<BlobEntry>> {
        let mut wanted = SortedLines::new(self.spill_lines);
        for r in rows {
            if listing_only {
                wanted.push(backend.blob_tag(&r.key)).await?;
            } else {
                for id in r.refs.iter().filter(|id| joinable(id)) {
                    wanted.push(id.clone()).await?;
                }
            }
        }
        let index = self.lines(listing_only);
        tokio::task::spawn_blocking(move || {
            let mut groups = Groups::new(index, listing_only);
            let (mut found, mut seen) = (Vec::new(), HashSet::new());
            for key in wanted.into_sorted() {
                for b in groups.of(&key?)? {
                    if seen.insert(b.id.clone()) {
                        found.push(b.clone());
                    }
                }
            }
            Ok(found)
        })
        .await
        .map_err(|e| spill_failed(std::io::Error::other(e)))?
        .map_err(spill_failed)
    }
}

/// Walks sorted index lines alongside sorted keys, handing out the blobs under each key in turn. A
/// key's blobs are held only while its claims are read (one row's, as a rule).
struct Groups {
    index: Peekable<Merged>,
    by_tag: bool,
    key: String,
    blobs: Vec<BlobEntry>,
}

impl Groups {
    fn new(index: SortedLines, by_tag: bool) -> Self {
        Groups {
            index: index.into_sorted().peekable(),
            by_tag,
            key: String::new(),
            blobs: Vec::new(),
        }
    }

    /// The blobs under `key`; keys must come in sorted order.
    fn of(&mut self, key: &str) -> std::io::Result<&[BlobEntry]> {
        if key == self.key {
            return Ok(&self.blobs);
        }
        self.key = key.to_owned();
        self.blobs.clear();
        while let Some(next) = self.index.peek() {
            let line = match next {
                Ok(line) => line,
                Err(_) => {
                    return Err(self
                        .index
                        .next()
                        .and_then(|r| r.err())
                        .unwrap_or_else(|| std::io::Error::other("a sorted run failed")));
                }
            };
            match join_key(line).cmp(key) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => {
                    let entry = if self.by_tag {
                        line.split_once('\t').map(|(_, rest)| rest)
                    } else {
                        Some(line.as_str())
                    };
                    if let Some(b) = entry.and_then(parse_blob_line) {
                        self.blobs.push(b);
                    }
                }
                std::cmp::Ordering::Greater => break,
            }
            self.index.next();
        }
        Ok(&self.blobs)
    }
}

/// Task types by index (claims carry the index, so a task type's text is held once).
#[derive(Default)]
struct TaskTypes {
    names: Vec<String>,
    index: HashMap<String, usize>,
}

impl TaskTypes {
    fn index_of(&mut self, task_type: &str) -> usize {
        if let Some(&i) = self.index.get(task_type) {
            return i;
        }
        self.names.push(task_type.to_owned());
        self.index
            .insert(task_type.to_owned(), self.names.len() - 1);
        self.names.len() - 1
    }
}

/// The rows' claims and the blobs, gathered for [`Usage::blob_bytes_per_group`]: each claim names
/// the group its bytes count towards (a task type for `stats`, a slice of access times for a budget).
pub(super) struct Usage {
    listing_only: bool,
    tasks: TaskTypes,
    claims: SortedLines,
    blobs: BlobIndex,
}

/// Candidates sent back per batch (two batches queue at most: a few tens of KB).
const CANDIDATES_PER_BATCH: usize = 64;

/// A blob a claim may own, pending the backend's own ownership rule.
struct Candidate {
    task: usize,
    group: usize,
    fingerprint: String,
    id: String,
    size: u64,
}

impl Usage {
    /// `listing_only`: the rows come from a listing (refs unknown), so claims join on key tags.
    pub(super) fn new(listing_only: bool, spill_lines: usize) -> Self {
        Self::over(
            BlobIndex::new(Some(listing_only), spill_lines),
            listing_only,
        )
    }

    /// Claims to join with `blobs` (built for `listing_only` rows, or for either).
    pub(super) fn over(blobs: BlobIndex, listing_only: bool) -> Self {
        Usage {
            listing_only,
            tasks: TaskTypes::default(),
            claims: SortedLines::new(blobs.spill_lines),
            blobs,
        }
    }

    /// Note the blobs row `r` owns (or, listing only, may own) as its task type's.
    pub(super) async fn claim(&mut self, backend: &dyn OutputCache, r: &RowEntry) -> Result<()> {
        let task = self.tasks.index_of(r.key.task_type());
        self.claim_for(backend, r, task).await
    }

    /// Note the blobs row `r` owns (or, listing only, may own) as `group`'s: `id TAB task TAB group`,
    /// or `tag TAB created TAB task TAB group TAB fingerprint`.
    pub(super) async fn claim_for(
        &mut self,
        backend: &dyn OutputCache,
        r: &RowEntry,
        group: usize,
    ) -> Result<()> {
        let task = self.tasks.index_of(r.key.task_type());
        if self.listing_only {
            let line = format!(
                "{}\t{}\t{task}\t{group}\t{}",
                backend.blob_tag(&r.key),
                nanos(r.created_at),
                r.key.fingerprint()
            );
            return self.claims.push(line).await;
        }
        for id in &r.refs {
            if joinable(id) && backend.owns_ref(&r.key, id) {
                self.claims.push(format!("{id}\t{task}\t{group}")).await?;
            }
        }
        Ok(())
    }

    /// Note a listed blob (only published ones are owned).
    pub(super) async fn blob(&mut self, b: &BlobEntry) -> Result<()> {
        self.blobs.push(b).await
    }

    /// The bytes of owned blobs per task type (claims noted with [`Usage::claim`]).
    pub(super) async fn blob_bytes_per_task_type(
        self,
        backend: &dyn OutputCache,
    ) -> Result<HashMap<String, u64>> {
        let names = self.tasks.names.clone();
        let bytes = self
            .blob_bytes_per_group(backend, names.len(), &HashSet::new())
            .await?;
        Ok(names.into_iter().zip(bytes).collect())
    }

    /// The bytes of owned blobs per group, `groups` of them, leaving out the blobs in `skip` (already
    /// counted elsewhere). The join reads the sorted runs on a blocking thread; tag-joined candidates
    /// come back in batches to be checked with the backend's ownership rule.
    pub(super) async fn blob_bytes_per_group(
        self,
        backend: &dyn OutputCache,
        groups: usize,
        skip: &HashSet<String>,
    ) -> Result<Vec<u64>> {
        let Usage {
            listing_only,
            tasks,
            claims,
            blobs,
        } = self;
        let index = blobs.lines(listing_only);
        let mut bytes = vec![0u64; groups];
        let (tx, mut rx) = mpsc::channel::<Vec<Candidate>>(2);
        let join = tokio::task::spawn_blocking(move || join(claims, index, listing_only, &tx));
        while let Some(batch) = rx.recv().await {
            for c in batch {
                let owned = !listing_only
                    || RowKey::from_parts(&tasks.names[c.task], &c.fingerprint)
                        .is_ok_and(|key| backend.owns_ref(&key, &c.id));
                if owned && !skip.contains(&c.id) {
                    if let Some(sum) = bytes.get_mut(c.group) {
                        *sum += c.size;
                    }
                }
            }
        }
        join.await
            .map_err(|e| spill_failed(std::io::Error::other(e)))?
            .map_err(spill_failed)?;
        Ok(bytes)
    }
}

/// Joins the sorted claims with the blob index; sends every (claim, blob) pair that meets, in batches.
fn join(
    claims: SortedLines,
    index: SortedLines,
    listing_only: bool,
    tx: &mpsc::Sender<Vec<Candidate>>,
) -> std::io::Result<()> {
    let mut groups = Groups::new(index, listing_only);
    let mut batch = Vec::new();
    for claim in claims.into_sorted() {
        let claim = claim?;
        let Some((created, task, group, fingerprint)) = parse_claim(&claim, listing_only) else {
            continue;
        };
        for b in groups.of(join_key(&claim))? {
            if listing_only && nanos(b.modified) > created {
                continue; // written after the row: a newer write's, not this row's
            }
            batch.push(Candidate {
                task,
                group,
                fingerprint: fingerprint.to_owned(),
                id: b.id.clone(),
                size: b.size,
            });
        }
        if batch.len() >= CANDIDATES_PER_BATCH
            && tx.blocking_send(std::mem::take(&mut batch)).is_err()
        {
            return Ok(()); // the caller is gone
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(batch);
    }
    Ok(())
}

/// A claim line as (created, task, group, fingerprint) (see [`Usage::claim_for`]).
fn parse_claim(line: &str, listing_only: bool) -> Option<(u64, usize, usize, &str)> {
    let mut parts = line.split('\t').skip(1);
    let created = if listing_only {
        parts.next()?.parse().ok()?
    } else {
        0
    };
    let task = parts.next()?.parse().ok()?;
    let group = parts.next()?.parse().ok()?;
    Some((created, task, group, parts.next().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(id: &str, size: u64) -> BlobEntry {
        BlobEntry {
            id: id.to_owned(),
            state: BlobState::Published,
            size,
            modified: std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn each_key_finds_its_own_blobs_kept_or_spilled() {
        for spill in [1, 1000] {
            let mut index = BlobIndex::new(None, spill);
            for b in [
                blob("ab", 1),
                blob("ab-c", 2),
                blob("abc", 3),
                blob("b", 4),
                blob("odd\u{1}id", 5),
            ] {
                index.push(&b).await.unwrap();
            }
            let mut wanted = SortedLines::new(spill);
            for key in ["abc", "ab", "ab", "zz", "odd\u{1}id"] {
                wanted.push(key.to_owned()).await.unwrap();
            }
            let mut groups = Groups::new(index.lines(false), false);
            let mut found = Vec::new();
            let mut last = String::new();
            for key in wanted.into_sorted() {
                let key = key.unwrap();
                if key != last {
                    found.extend(groups.of(&key).unwrap().iter().cloned());
                }
                last = key;
            }
            let mut ids: Vec<(&str, u64)> = found.iter().map(|b| (b.id.as_str(), b.size)).collect();
            ids.sort();
            // A key that prefixes another finds only its own blob; a name with a control character
            // is never joined (its lines would sort apart from its key).
            assert_eq!(ids, [("ab", 1), ("abc", 3)], "spilling at {spill}");
        }
    }
}
