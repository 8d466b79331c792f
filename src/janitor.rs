//! The janitor's core: find and remove what no row needs any more (unreferenced blobs, dead temp
//! objects), sparing anything younger than a grace period so that writes in flight are never hit.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use crate::error::Result;
use crate::store::{BlobEntry, BlobState, OutputCache};

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
