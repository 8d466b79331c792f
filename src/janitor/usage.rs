//! Which blobs rows own, without holding the blob listing: the rows' claims on blobs and the published
//! blobs are sorted into runs that spill to temp files past a bound, then joined in one pass, so
//! neither listing is ever held whole, however large the cache. `stats` sums the bytes per task type
//! ([`Usage`]); an age prune finds just the blobs of the rows it removes ([`BlobIndex`]).
//!
//! A claim and a blob meet on the blob's id where rows were read (their refs name their blobs), and
//! on the key tag where rows were only listed (an object store): there a row owns the blobs that
//! carry its tag and were written no later than the row, as [`super::Ownership`] counts them.

use std::collections::HashMap;

use tokio::sync::mpsc;

use super::orphans::{nanos, spill_failed};
use super::spill::SortedLines;
use super::tag_parts;
use crate::error::Result;
use crate::store::{BlobEntry, BlobState, OutputCache, RowEntry};
use crate::wire::{RowKey, key_tag};
use std::time::{Duration, SystemTime};

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

/// The rows' claims and the blobs, gathered for [`Usage::blob_bytes_per_task_type`].
pub(super) struct Usage {
    listing_only: bool,
    tasks: TaskTypes,
    claims: SortedLines,
    blobs: SortedLines,
}

/// Candidates sent back per batch (two batches queue at most: a few tens of KB).
const CANDIDATES_PER_BATCH: usize = 64;

/// A blob that a tag-joined claim may own, pending the backend's own ownership rule.
struct Candidate {
    task: usize,
    fingerprint: String,
    id: String,
    size: u64,
}

/// Only names without control characters are joined: lines are tab-separated and sort as `key TAB
/// …`, which orders them by key only while no key holds a byte below TAB. Blobs this crate writes
/// never do.
fn joinable(s: &str) -> bool {
    !s.bytes().any(|c| c < b' ')
}

impl Usage {
    /// `listing_only`: the rows come from a listing (refs unknown), so claims join on key tags.
    pub(super) fn new(listing_only: bool, spill_lines: usize) -> Self {
        Usage {
            listing_only,
            tasks: TaskTypes::default(),
            claims: SortedLines::new(spill_lines),
            blobs: SortedLines::new(spill_lines),
        }
    }

    /// Note the blobs row `r` owns (or, listing only, may own).
    pub(super) async fn claim(&mut self, backend: &dyn OutputCache, r: &RowEntry) -> Result<()> {
        let task = self.tasks.index_of(r.key.task_type());
        if self.listing_only {
            let line = format!(
                "{}\t{}\t{task}\t{}",
                key_tag(&r.key),
                nanos(r.created_at),
                r.key.fingerprint()
            );
            return self.claims.push(line).await;
        }
        for id in &r.refs {
            if joinable(id) && backend.owns_ref(&r.key, id) {
                self.claims.push(format!("{id}\t{task}")).await?;
            }
        }
        Ok(())
    }

    /// Note a listed blob (only published ones are owned).
    pub(super) async fn blob(&mut self, b: &BlobEntry) -> Result<()> {
        if b.state != BlobState::Published || !joinable(&b.id) {
            return Ok(());
        }
        if self.listing_only {
            for tag in tag_parts(&b.id) {
                let line = format!("{tag}\t{}\t{}\t{}", nanos(b.modified), b.id, b.size);
                self.blobs.push(line).await?;
            }
            return Ok(());
        }
        self.blobs.push(format!("{}\t{}", b.id, b.size)).await
    }

    /// The bytes of owned blobs per task type. The join reads the sorted runs on a blocking thread;
    /// tag-joined candidates come back in batches to be checked with the backend's ownership rule.
    pub(super) async fn blob_bytes_per_task_type(
        self,
        backend: &dyn OutputCache,
    ) -> Result<HashMap<String, u64>> {
        let Usage {
            listing_only,
            tasks,
            claims,
            blobs,
        } = self;
        let mut bytes = vec![0u64; tasks.names.len()];
        let (tx, mut rx) = mpsc::channel::<Vec<Candidate>>(2);
        let join = tokio::task::spawn_blocking(move || join(claims, blobs, listing_only, &tx));
        while let Some(batch) = rx.recv().await {
            for c in batch {
                let owned = !listing_only
                    || RowKey::from_parts(&tasks.names[c.task], &c.fingerprint)
                        .is_ok_and(|key| backend.owns_ref(&key, &c.id));
                if owned {
                    bytes[c.task] += c.size;
                }
            }
        }
        join.await
            .map_err(|e| spill_failed(std::io::Error::other(e)))?
            .map_err(spill_failed)?;
        Ok(tasks.names.into_iter().zip(bytes).collect())
    }
}

/// The part of a line before its first tab.
fn join_key(line: &str) -> &str {
    line.split('\t').next().unwrap_or_default()
}

/// Merges the sorted claims with the sorted blobs; sends every (claim, blob) pair that meets, in
/// batches. A key's blobs are held only while its claims are read (one row's, as a rule).
fn join(
    claims: SortedLines,
    blobs: SortedLines,
    listing_only: bool,
    tx: &mpsc::Sender<Vec<Candidate>>,
) -> std::io::Result<()> {
    let mut blobs = blobs.into_sorted().peekable();
    // The blobs of the key last joined: (key, [(modified, id, size)]).
    let mut group: (String, Vec<(u64, String, u64)>) = (String::new(), Vec::new());
    let mut batch = Vec::new();
    for claim in claims.into_sorted() {
        let claim = claim?;
        let key = join_key(&claim);
        if key != group.0 {
            group = (key.to_owned(), Vec::new());
            while let Some(next) = blobs.peek() {
                let line = match next {
                    Ok(line) => line,
                    Err(_) => {
                        return Err(blobs
                            .next()
                            .and_then(|r| r.err())
                            .unwrap_or_else(|| std::io::Error::other("a sorted run failed")));
                    }
                };
                match join_key(line).cmp(key) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => {
                        if let Some(blob) = parse_blob(line, listing_only) {
                            group.1.push(blob);
                        }
                    }
                    std::cmp::Ordering::Greater => break,
                }
                blobs.next();
            }
        }
        let Some((created, task, fingerprint)) = parse_claim(&claim, listing_only) else {
            continue;
        };
        for (modified, id, size) in &group.1 {
            if listing_only && *modified > created {
                continue; // written after the row: a newer write's, not this row's
            }
            batch.push(Candidate {
                task,
                fingerprint: fingerprint.to_owned(),
                id: id.clone(),
                size: *size,
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

/// A claim line: `id TAB task` (rows read) or `tag TAB created TAB task TAB fingerprint` (listing
/// only) as (created, task, fingerprint).
fn parse_claim(line: &str, listing_only: bool) -> Option<(u64, usize, &str)> {
    let mut parts = line.split('\t').skip(1);
    if listing_only {
        let created = parts.next()?.parse().ok()?;
        let task = parts.next()?.parse().ok()?;
        Some((created, task, parts.next()?))
    } else {
        Some((0, parts.next()?.parse().ok()?, ""))
    }
}

/// A blob line: `id TAB size` (rows read) or `tag TAB modified TAB id TAB size` (listing only) as
/// (modified, id, size).
fn parse_blob(line: &str, listing_only: bool) -> Option<(u64, String, u64)> {
    let mut parts = line.split('\t');
    if listing_only {
        parts.next()?;
        let modified = parts.next()?.parse().ok()?;
        let id = parts.next()?.to_owned();
        Some((modified, id, parts.next()?.parse().ok()?))
    } else {
        let id = parts.next()?.to_owned();
        Some((0, id, parts.next()?.parse().ok()?))
    }
}

/// The published blobs, by id and by key tag (rows not yet listed: which of the two a join needs is
/// known only once they are), for [`BlobIndex::claimed_by`].
pub(super) struct BlobIndex {
    by_id: SortedLines,
    by_tag: SortedLines,
    spill_lines: usize,
}

impl BlobIndex {
    pub(super) fn new(spill_lines: usize) -> Self {
        BlobIndex {
            by_id: SortedLines::new(spill_lines),
            by_tag: SortedLines::new(spill_lines),
            spill_lines,
        }
    }

    /// Note a listed blob (only published ones are owned).
    pub(super) async fn push(&mut self, b: &BlobEntry) -> Result<()> {
        if b.state != BlobState::Published || !joinable(&b.id) {
            return Ok(());
        }
        let entry = format!("{}\t{}\t{}", b.id, b.size, nanos(b.modified));
        for tag in tag_parts(&b.id) {
            self.by_tag.push(format!("{tag}\t{entry}")).await?;
        }
        self.by_id.push(entry).await
    }

    /// The blobs `rows` may own: those their refs name where rows were read, those carrying their
    /// key tags where rows were only listed. A superset: [`super::Ownership`] applies the rule itself.
    pub(super) async fn claimed_by(
        self,
        rows: &[RowEntry],
        listing_only: bool,
    ) -> Result<Vec<BlobEntry>> {
        let mut wanted = SortedLines::new(self.spill_lines);
        for r in rows {
            if listing_only {
                wanted.push(key_tag(&r.key)).await?;
            } else {
                for id in r.refs.iter().filter(|id| joinable(id)) {
                    wanted.push(id.clone()).await?;
                }
            }
        }
        let index = if listing_only {
            self.by_tag
        } else {
            self.by_id
        };
        tokio::task::spawn_blocking(move || semi_join(wanted, index, listing_only))
            .await
            .map_err(|e| spill_failed(std::io::Error::other(e)))?
            .map_err(spill_failed)
    }
}

/// The index's blobs whose key is among the `wanted` keys, each once.
fn semi_join(
    wanted: SortedLines,
    index: SortedLines,
    by_tag: bool,
) -> std::io::Result<Vec<BlobEntry>> {
    let mut found = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut index = index.into_sorted().peekable();
    let mut last: Option<String> = None;
    for key in wanted.into_sorted() {
        let key = key?;
        if last.as_deref() == Some(key.as_str()) {
            continue;
        }
        while let Some(next) = index.peek() {
            let line = match next {
                Ok(line) => line,
                Err(_) => {
                    return Err(index
                        .next()
                        .and_then(|r| r.err())
                        .unwrap_or_else(|| std::io::Error::other("a sorted run failed")));
                }
            };
            match join_key(line).cmp(key.as_str()) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => {
                    let entry = if by_tag {
                        line.split_once('\t').map(|(_, rest)| rest)
                    } else {
                        Some(line.as_str())
                    };
                    if let Some(b) = entry.and_then(parse_entry) {
                        if seen.insert(b.id.clone()) {
                            found.push(b);
                        }
                    }
                }
                std::cmp::Ordering::Greater => break,
            }
            index.next();
        }
        last = Some(key);
    }
    Ok(found)
}

/// `id TAB size TAB modified` as a published blob.
fn parse_entry(line: &str) -> Option<BlobEntry> {
    let mut parts = line.split('\t');
    let (id, size, modified) = (parts.next()?, parts.next()?, parts.next()?);
    Some(BlobEntry {
        id: id.to_owned(),
        state: BlobState::Published,
        size: size.parse().ok()?,
        modified: SystemTime::UNIX_EPOCH + Duration::from_nanos(modified.parse().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(id: &str, size: u64) -> BlobEntry {
        BlobEntry {
            id: id.to_owned(),
            state: BlobState::Published,
            size,
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn the_semi_join_finds_each_wanted_blob_once_kept_or_spilled() {
        for spill in [1, 1000] {
            let mut index = BlobIndex::new(spill);
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
            let found = semi_join(wanted, index.by_id, false).unwrap();
            let mut ids: Vec<(&str, u64)> = found.iter().map(|b| (b.id.as_str(), b.size)).collect();
            ids.sort();
            // A key that prefixes another finds only its own blob; a name with a control character
            // is never joined (its lines would sort apart from its key).
            assert_eq!(ids, [("ab", 1), ("abc", 3)], "spilling at {spill}");
        }
    }
}
