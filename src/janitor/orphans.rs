//! The orphan sweep's streaming half: the refs the rows hold gathered page by page into a sorted spill,
//! one merged pass of the sorted blobs against them (what is unreferenced, and since when), and the
//! orphans read back a batch at a time for deleting. Memory stays bounded whatever the cache's size.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;

use super::{LEDGER_TASK_TYPE, PruneOptions, spill};
use crate::error::{Error, Result};
use crate::store::{BlobEntry, BlobState, CorruptEntry, CorruptKind, OutputCache};

/// Every ref the rows hold, page by page into a sorted spill; rows that cannot be read stop the sweep
/// (garbled ones unless `--corrupt` removes them in the same run).
pub(super) async fn referenced_refs(
    backend: &dyn OutputCache,
    options: &PruneOptions,
    spill_lines: usize,
) -> Result<spill::SortedLines> {
    let mut referenced = spill::SortedLines::new(spill_lines);
    // (count, first) of the rows of a newer format and of garbled ones.
    let mut newer: (u64, Option<CorruptEntry>) = (0, None);
    let mut garbled: (u64, Option<CorruptEntry>) = (0, None);
    let mut rows = 0u64;
    let mut pages = backend.row_ref_pages();
    while let Some(page) = pages.try_next().await? {
        for c in page.unreadable {
            let tally = match c.kind {
                CorruptKind::NewerFormat => &mut newer,
                CorruptKind::Garbled => &mut garbled,
                CorruptKind::Foreign => continue,
            };
            tally.0 += 1;
            tally.1.get_or_insert(c);
        }
        for r in page.rows {
            if r.key.task_type() == LEDGER_TASK_TYPE {
                continue;
            }
            rows += 1;
            for id in r.refs {
                // A ref no blob name can equal (no blob line holds a newline) needs no keeping.
                if !id.contains('\n') {
                    referenced.push(id).await?;
                }
            }
        }
    }
    tracing::debug!(
        target: "outcache::janitor",
        rows,
        refs = referenced.len(),
        runs_spilled = referenced.runs_spilled(),
        "refs listed"
    );
    if let (rows, Some(c)) = newer {
        return Err(Error::OrphanSweepBlocked {
            rows,
            first: format!("{}: {}", c.id, c.reason),
            why: "were written by a newer outcache",
            remedy: "Run the sweep with the newer version",
        });
    }
    if let (rows, Some(c)) = garbled {
        if !options.corrupt {
            return Err(Error::OrphanSweepBlocked {
                rows,
                first: format!("{}: {}", c.id, c.reason),
                why: "cannot be decoded",
                remedy: "Remove them with --corrupt (see them with --dry-run --corrupt)",
            });
        }
    }
    Ok(referenced)
}

pub(super) fn spill_failed(e: std::io::Error) -> Error {
    Error::io(
        "read back the janitor's sorted runs",
        std::env::temp_dir(),
        e,
    )
}

pub(super) fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A published blob as a line of the sweep's sorted spill: `id \t size \t modified (ns)`. Sorting
/// the lines sorts by id (a tab sorts before every character of a ref). `None` for an id no line can
/// hold: never a candidate, so never removed.
pub(super) fn blob_line(b: &BlobEntry) -> Option<String> {
    // Lines sort as `id TAB …`; an id holding a byte below TAB (a third-party backend's odd name)
    // would sort apart from the same id among the refs, and look unreferenced. Such a blob is left
    // out: never an orphan, never removed.
    if b.id.bytes().any(|c| c < b' ') {
        return None;
    }
    Some(format!("{}\t{}\t{}", b.id, b.size, nanos(b.modified)))
}

/// The blob a [`blob_line`] describes.
pub(super) fn parse_blob_line(line: &str) -> Option<BlobEntry> {
    let mut parts = line.split('\t');
    let (id, size, modified) = (parts.next()?, parts.next()?, parts.next()?);
    Some(BlobEntry {
        id: id.to_owned(),
        state: BlobState::Published,
        size: size.parse().ok()?,
        modified: SystemTime::UNIX_EPOCH + Duration::from_nanos(modified.parse().ok()?),
    })
}

/// When an unreferenced blob is an orphan to remove (see the module docs on the grace period).
pub(super) struct OrphanRule {
    pub(super) cutoff_nanos: u64,
    pub(super) cutoff_ms: u64,
    pub(super) now_ms: u64,
}

/// The orphans an [`OrphanRule`] found.
pub(super) struct Decided {
    pub(super) count: u64,
    pub(super) bytes: u64,
    /// Their blob lines, sorted.
    pub(super) orphans: spill::SortedLines,
    /// Their ids, where asked for (the size budget needs them).
    pub(super) ids: Vec<String>,
    /// The orphans among the blobs the row prunes claimed as their rows' (by key tag, where rows were
    /// only listed): unreferenced, so the sweep takes them and counts them, not the row's delete (which
    /// takes only the blobs a row refers to when it reads the row).
    pub(super) claimed: Vec<(String, u64)>,
    /// First sightings of the unreferenced blobs that are not orphans yet.
    pub(super) ledger: BTreeMap<String, u64>,
}

impl OrphanRule {
    /// One merged pass over the sorted blobs and the sorted refs (blocking: spilled runs are read).
    pub(super) fn decide(
        &self,
        published: spill::SortedLines,
        referenced: spill::SortedLines,
        claimed: &HashSet<String>,
        seen: &BTreeMap<String, u64>,
        keep_ids: bool,
        spill_lines: usize,
    ) -> std::io::Result<Decided> {
        let mut decided = Decided {
            count: 0,
            bytes: 0,
            orphans: spill::SortedLines::new(spill_lines),
            ids: Vec::new(),
            claimed: Vec::new(),
            ledger: BTreeMap::new(),
        };
        let mut refs = referenced.into_sorted().peekable();
        for line in published.into_sorted() {
            let line = line?;
            let Some(b) = parse_blob_line(&line) else {
                continue;
            };
            let mut is_referenced = false;
            while let Some(next) = refs.peek() {
                match next {
                    Err(_) => {
                        return Err(refs
                            .next()
                            .and_then(|r| r.err())
                            .unwrap_or_else(|| std::io::Error::other("a sorted run failed")));
                    }
                    Ok(r) => match r.as_str().cmp(b.id.as_str()) {
                        std::cmp::Ordering::Less => {
                            refs.next();
                        }
                        std::cmp::Ordering::Equal => {
                            is_referenced = true;
                            break;
                        }
                        std::cmp::Ordering::Greater => break,
                    },
                }
            }
            if is_referenced {
                continue;
            }
            let first_seen = seen.get(&b.id).copied().unwrap_or(self.now_ms);
            if nanos(b.modified) <= self.cutoff_nanos && first_seen <= self.cutoff_ms {
                decided.count += 1;
                decided.bytes += b.size;
                if claimed.contains(&b.id) {
                    decided.claimed.push((b.id.clone(), b.size));
                }
                decided.orphans.push_blocking(line)?;
                if keep_ids {
                    decided.ids.push(b.id);
                }
            } else {
                decided.ledger.insert(b.id, first_seen);
            }
        }
        Ok(decided)
    }
}

/// An orphan list read back `n` blobs at a time (off the runtime: spilled runs are files).
pub(super) struct OrphanReader(Option<spill::Merged>);

impl OrphanReader {
    pub(super) fn new(orphans: spill::SortedLines) -> Self {
        OrphanReader(Some(orphans.into_sorted()))
    }

    /// The next `n` blobs; empty at the end.
    pub(super) async fn next_chunk(&mut self, n: usize) -> Result<Vec<BlobEntry>> {
        let Some(mut lines) = self.0.take() else {
            return Ok(Vec::new());
        };
        let (lines, batch) = tokio::task::spawn_blocking(move || {
            let batch: std::io::Result<Vec<String>> = lines.by_ref().take(n).collect();
            (lines, batch)
        })
        .await
        .map_err(|e| spill_failed(std::io::Error::other(e)))?;
        let batch = batch.map_err(spill_failed)?;
        if !batch.is_empty() {
            self.0 = Some(lines);
        }
        Ok(batch.iter().filter_map(|l| parse_blob_line(l)).collect())
    }
}
