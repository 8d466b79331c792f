//! How the object-store backend scans and prunes a large bucket with listings instead of a GET per
//! row: a row's key is its object's name, its commit time the object's last-modified time and its
//! version the ETag; a row's blobs are found by the owner tag in their names. Only the orphan sweep
//! (which needs the refs every row holds) and rows whose task type is too long to be readable in a name
//! read row objects, concurrently with a bounded number of requests in flight.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{BoxStream, TryChunksError};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt};

use super::{FETCH_CONCURRENCY, ObjectCache};
use crate::error::{Error, Result};
use crate::layout::{RowRecord, corrupt_kind, decode_row, decode_task_segment};
use crate::store::{CorruptEntry, CorruptKind, RowEntry, RowScan, RowVersion};
use crate::wire::{RowKey, key_tag, refs_in};

/// A listed row object, fetched and decoded (`None`: gone since it was listed).
type Fetched = Option<(ObjectMeta, std::result::Result<RowRecord, CorruptEntry>)>;

/// Rows per page of the paged scans.
const PAGE: usize = 1000;

/// What a refs-index marker led to.
enum Marked {
    /// A row holding refs.
    Row(RowEntry),
    /// A row that cannot be decoded (it may hold refs).
    Unreadable(CorruptEntry),
    /// A marker whose row is gone or holds no refs: (marker, row).
    Stale(Path, Path),
    /// Something under the markers' prefix that is no marker this backend writes.
    NotAMarker,
}

/// `items` gathered into pages of [`PAGE`].
pub(super) fn paged<T>(
    items: impl futures::Stream<Item = Result<T>>,
) -> impl futures::Stream<Item = Result<Vec<T>>> {
    items.try_chunks(PAGE).map_err(|TryChunksError(_, e)| e)
}

/// Objects per bulk delete request (S3's DeleteObjects limit; object_store splits larger streams).
const DELETE_BATCH: usize = 1000;
/// Rows committed at least this long ago cascade by name; younger ones are read (see `delete_listed`).
const BY_NAME_MARGIN: Duration = Duration::from_secs(10);
/// How long a blob listing may be reused by the by-name cascade of a janitor's batched deletes. Safe at
/// any age: a blob missing from it is left for the orphan sweep, and one deleted since is a no-op.
const BLOB_LISTING_REUSE: Duration = Duration::from_secs(60);

/// A blob listing kept for the by-name cascade of a janitor run's successive delete batches.
#[derive(Debug, Default)]
pub(super) struct BlobListing(std::sync::Mutex<Option<(Instant, std::sync::Arc<Vec<ObjectMeta>>)>>);

impl BlobListing {
    fn fresh(&self) -> Option<std::sync::Arc<Vec<ObjectMeta>>> {
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|(at, _)| at.elapsed() < BLOB_LISTING_REUSE)
            .map(|(_, metas)| metas.clone())
    }

    fn store(&self, metas: Vec<ObjectMeta>) -> std::sync::Arc<Vec<ObjectMeta>> {
        let metas = std::sync::Arc::new(metas);
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), metas.clone()));
        metas
    }
}

/// A row listing sorted by what must be read ([`ObjectCache::sort_listing`]).
#[derive(Default)]
struct Sorted {
    listed: Vec<RowEntry>,
    to_read: Vec<ObjectMeta>,
    unreadable: Vec<CorruptEntry>,
}

/// What a row object's name says, before anything is read.
enum RowName {
    /// A readable name: the row's key.
    Key(RowKey),
    /// A hashed task-type segment: the key is only in the record.
    Hashed,
    /// Not a name this backend writes for a row.
    Foreign,
}

/// The version of an object a listing shows: the ETag where the store gives one, without quotes (Azure
/// quotes it in headers but not in listings).
fn version_of(meta: &ObjectMeta) -> Option<String> {
    meta.e_tag.as_deref().map(bare_etag)
}

fn bare_etag(tag: &str) -> String {
    tag.trim_start_matches("W/").trim_matches('"').to_owned()
}

/// A row's commit time as its listing shows it: the object's last-modified time. S3 (and moto) give it
/// in whole seconds, so an age cutoff is sharp to a second on those stores.
fn listed_time(meta: &ObjectMeta) -> SystemTime {
    meta.last_modified.into()
}

/// Whether `meta` is still the version `listed` names.
fn same_version(meta: &ObjectMeta, listed: &RowVersion) -> bool {
    match (&listed.version, &meta.e_tag) {
        (Some(v), Some(e)) => *v == bare_etag(e),
        _ => listed_time(meta) == listed.created_at,
    }
}

impl ObjectCache {
    /// Every row object (one recursive listing: a page per thousand rows, however many task types)
    /// under the task-type segments `segment_ok` admits.
    pub(super) async fn row_objects(
        &self,
        segment_ok: impl Fn(Option<&str>) -> bool,
    ) -> Result<Vec<ObjectMeta>> {
        let objects: Vec<ObjectMeta> = self.listed(self.rows_root()).try_collect().await?;
        Ok(objects
            .into_iter()
            .filter(|m| self.is_row_object(m))
            .filter(|m| {
                let segment = self.segment_of(&m.location);
                segment.is_some_and(|s| segment_ok(decode_task_segment(s).as_deref()))
            })
            .collect())
    }

    /// The task-type segment of a row object's path (`rows/<segment>/<file>`), if it has that shape.
    fn segment_of<'a>(&self, path: &'a Path) -> Option<&'a str> {
        let root = self.rows_root();
        let text: &'a str = path.as_ref();
        let rest = text.strip_prefix(root.as_ref())?.strip_prefix('/')?;
        let (segment, file) = rest.split_once('/')?;
        (!file.contains('/')).then_some(segment)
    }

    fn row_name(&self, path: &Path) -> RowName {
        let Some(segment) = self.segment_of(path) else {
            return RowName::Foreign;
        };
        let Some(fingerprint) = path
            .filename()
            .filter(|f| crate::layout::is_row_file_name(f))
            .and_then(|f| f.strip_suffix(".json"))
        else {
            return RowName::Foreign;
        };
        match decode_task_segment(segment) {
            Some(task) => match RowKey::from_parts(&task, fingerprint) {
                Ok(key) if self.row_path(&key) == *path => RowName::Key(key),
                _ => RowName::Foreign,
            },
            None if segment.starts_with('=') => RowName::Hashed,
            None => RowName::Foreign,
        }
    }

    /// Fetch and decode the row objects `metas` (up to [`FETCH_CONCURRENCY`] at once): the decoded
    /// ones, and the ones that cannot be decoded as corrupt entries (id: the object path). Vanished ones
    /// are skipped.
    pub(super) async fn fetch_rows(
        &self,
        metas: Vec<ObjectMeta>,
    ) -> Result<(Vec<(ObjectMeta, RowRecord)>, Vec<CorruptEntry>)> {
        let fetched: Vec<Fetched> = futures::stream::iter(metas)
            .map(|meta| self.fetch_row(meta))
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        let (mut rows, mut corrupt) = (Vec::new(), Vec::new());
        for (meta, decoded) in fetched.into_iter().flatten() {
            match decoded {
                Ok(record) => rows.push((meta, record)),
                Err(entry) => corrupt.push(entry),
            }
        }
        Ok((rows, corrupt))
    }

    /// Fetch and decode one listed row object (`None`: gone since it was listed).
    async fn fetch_row(&self, meta: ObjectMeta) -> Result<Fetched> {
        let Some((bytes, size)) = self.fetch_record(&meta.location).await? else {
            return Ok(None);
        };
        let decoded = self.decode_listed(&meta, &bytes, size);
        Ok(Some((meta, decoded)))
    }

    /// Decode the row object `meta` names, or say why it cannot be used.
    fn decode_listed(
        &self,
        meta: &ObjectMeta,
        bytes: &[u8],
        size: u64,
    ) -> std::result::Result<RowRecord, CorruptEntry> {
        let fp = meta
            .location
            .filename()
            .unwrap_or("?")
            .trim_end_matches(".json");
        crate::layout::decode_row_of_size(bytes, size, "?", fp).map_err(|e| CorruptEntry {
            id: meta.location.to_string(),
            reason: match e {
                Error::CorruptRow { reason, .. } => reason,
                other => other.to_string(),
            },
            size,
            kind: corrupt_kind(bytes),
        })
    }

    /// Whether a listed object has a row object's name shape (`rows/<segment>/<fingerprint>.json`).
    /// Other objects under the prefix are someone else's: never read as rows, never removed.
    fn is_row_object(&self, meta: &ObjectMeta) -> bool {
        self.is_row_object_path(&meta.location)
    }

    fn is_row_object_path(&self, path: &Path) -> bool {
        path.filename().is_some_and(crate::layout::is_row_file_name)
            && self.segment_of(path).is_some()
    }

    /// The listing entry of a row: commit time and version from the object, not the record, so that
    /// a listing and a re-listing compare like with like.
    fn entry(meta: &ObjectMeta, key: RowKey, refs: Vec<String>) -> RowEntry {
        RowEntry {
            key,
            created_at: listed_time(meta),
            size: meta.size,
            refs,
            // Object stores have no cheap access time; eviction falls back to the write time.
            last_access: None,
            version: version_of(meta),
        }
    }

    /// Every row read: one listing, then a GET per row.
    pub(super) async fn deep_scan(&self) -> Result<RowScan> {
        let metas = self.row_objects(|_| true).await?;
        let (rows, unreadable) = self.fetch_rows(metas).await?;
        let rows = rows
            .into_iter()
            .map(|(meta, r)| {
                let refs = refs_in(&r.output).into_iter().map(|r| r.reference);
                Self::entry(&meta, r.key, refs.collect())
            })
            .collect();
        Ok(RowScan {
            rows,
            unreadable,
            listing_only: false,
        })
    }

    /// Every row as the listing shows it, a page at a time; only rows under hashed segments are read
    /// (for their key).
    pub(super) fn shallow_pages(&self) -> BoxStream<'_, Result<RowScan>> {
        paged(
            self.listed(self.rows_root())
                .try_filter(move |m| futures::future::ready(self.is_row_object(m))),
        )
        .and_then(move |metas| async move {
            let sorted = self.sort_listing(metas, |_| false);
            let (read, corrupt) = self.fetch_rows(sorted.to_read).await?;
            let (mut rows, mut unreadable) = (sorted.listed, sorted.unreadable);
            rows.extend(
                read.into_iter()
                    .map(|(meta, r)| Self::entry(&meta, r.key, Vec::new())),
            );
            unreadable.extend(corrupt);
            Ok(RowScan {
                rows,
                unreadable,
                listing_only: true,
            })
        })
        .boxed()
    }

    /// Sort a row listing into rows known from their names alone, objects to read (those `read`
    /// picks, and rows whose names hide their key) and names that are no row's.
    fn sort_listing(&self, metas: Vec<ObjectMeta>, read: impl Fn(&ObjectMeta) -> bool) -> Sorted {
        let mut sorted = Sorted::default();
        for meta in metas {
            if read(&meta) {
                sorted.to_read.push(meta);
                continue;
            }
            match self.row_name(&meta.location) {
                RowName::Key(key) => sorted.listed.push(Self::entry(&meta, key, Vec::new())),
                RowName::Hashed => sorted.to_read.push(meta),
                // Someone else's object under the prefix (a bucket shared with other data):
                // reported, never read as a row or removed as corrupt.
                RowName::Foreign => sorted.unreadable.push(CorruptEntry {
                    id: meta.location.to_string(),
                    reason: "an object the cache did not write (its name is not a row key); never \
                             removed"
                        .into(),
                    size: meta.size,
                    kind: CorruptKind::Foreign,
                }),
            }
        }
        sorted
    }

    /// The current listing of the row objects at `wanted`, from one listing of the key range they span
    /// (S3 starts it after the first key; it stops once every wanted object was seen).
    async fn relist(
        &self,
        wanted: &BTreeMap<Path, &RowVersion>,
    ) -> Result<HashMap<Path, ObjectMeta>> {
        let (Some(first), Some(last)) = (wanted.keys().next(), wanted.keys().next_back()) else {
            return Ok(HashMap::new());
        };
        // Just before the first key: `start-after` is exclusive.
        let text: &str = first.as_ref();
        let before_first =
            Path::parse(&text[..text.len() - 1]).map_err(|e| Error::InvalidInput {
                what: format!("row path {first}"),
                reason: e.to_string(),
            })?;
        let root = self.rows_root();
        let mut listing = self.store.list_with_offset(Some(&root), &before_first);
        let mut found = HashMap::new();
        while let Some(meta) = listing
            .try_next()
            .await
            .map_err(self.err(format!("list {root}")))?
        {
            if self.sorted_listing && meta.location > *last {
                break; // past the range: a wanted row not seen is gone (and is not deleted)
            }
            if wanted.contains_key(&meta.location) {
                found.insert(meta.location.clone(), meta);
                if found.len() == wanted.len() {
                    break;
                }
            }
        }
        Ok(found)
    }

    /// Delete every object in `paths` with bulk requests (absent ones are fine: deletes are idempotent).
    async fn delete_many(&self, paths: Vec<Path>) -> Result<()> {
        let mut rest = paths;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(DELETE_BATCH));
            let chunk = std::mem::replace(&mut rest, tail);
            let stream = futures::stream::iter(chunk.into_iter().map(Ok)).boxed();
            let mut results = self.store.delete_stream(stream);
            while let Some(result) = results.next().await {
                match result {
                    Ok(_) => {}
                    Err(e) if super::is_not_found(&e) => {}
                    Err(e) => return Err(self.err("bulk delete")(e)),
                }
            }
        }
        Ok(())
    }

    /// The published blob objects, from a listing at most [`BLOB_LISTING_REUSE`] old.
    async fn blob_objects(&self) -> Result<std::sync::Arc<Vec<ObjectMeta>>> {
        if let Some(metas) = self.blob_listing.fresh() {
            return Ok(metas);
        }
        let metas = self.list_blob_objects().await?;
        Ok(self.blob_listing.store(metas))
    }

    /// List the blob objects now (and keep the listing for the by-name cascade).
    pub(super) async fn list_blob_objects(&self) -> Result<Vec<ObjectMeta>> {
        let metas: Vec<ObjectMeta> = self.listed(self.blobs_root()).try_collect().await?;
        self.blob_listing.store(metas.clone());
        Ok(metas)
    }

    /// The janitor's delete by version, with no read of any row it can avoid: the rows still at their
    /// listed version (one re-listing of their key range; S3 has no conditional delete, so a rewrite
    /// landing between that listing and the delete request is the one race left), deleted in bulk,
    /// then the blobs each deleted row owns, also in bulk: those the janitor found in its own blob
    /// listing ([`RowVersion::owned_blobs`]) where that listing holds them all, else found by name (its
    /// key tag) among those written no later than the row in a listing of ours. S3's times are whole seconds, so a blob of a newer write of the same
    /// key cannot be told from the row's own when both fall in the row's second: rows with a
    /// whole-second time within [`BY_NAME_MARGIN`] of now are read instead and cascade by the refs
    /// they hold.
    pub(super) async fn delete_listed(&self, rows: &[RowVersion]) -> Result<Vec<RowKey>> {
        let wanted: BTreeMap<Path, &RowVersion> =
            rows.iter().map(|r| (self.row_path(&r.key), r)).collect();
        let current = self.relist(&wanted).await?;
        let settled = SystemTime::now()
            .checked_sub(BY_NAME_MARGIN)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let (mut by_name, mut young): (Vec<(Path, &RowVersion, SystemTime, bool)>, Vec<_>) =
            (Vec::new(), Vec::new());
        for (path, listed) in &wanted {
            let Some(meta) = current.get(path).filter(|m| same_version(m, listed)) else {
                continue; // rewritten or deleted since it was listed: not the row listed
            };
            let committed = listed_time(meta);
            // A time with a fraction comes from a store with fine timestamps: no same-second doubt.
            let fine = meta.last_modified.timestamp_subsec_nanos() != 0;
            if fine || committed < settled {
                by_name.push((path.clone(), *listed, committed, fine));
            } else {
                young.push(listed);
            }
        }
        // Their refs-index markers stay: deleting them here would cost a bulk request per batch (a
        // fifth more time on moto), while a stale marker costs the next orphan sweep one GET, after
        // which the sweep removes it. A marker left is always safe; a missing one never is.
        self.delete_many(by_name.iter().map(|(p, ..)| p.clone()).collect())
            .await?;
        // Their blobs: those the caller listed where its listing holds them all, else found by name.
        let (mut handed, mut look) = (Vec::new(), Vec::new());
        for (_, listed, committed, fine) in &by_name {
            match self.listed_blob_paths(listed, *committed, *fine) {
                Some(paths) => handed.extend(paths),
                None => look.push((&listed.key, *committed)),
            }
        }
        handed.sort();
        handed.dedup();
        self.delete_many(handed).await?;
        self.cascade_by_name(look.into_iter()).await?;
        let mut deleted: Vec<RowKey> = by_name.iter().map(|(_, l, ..)| l.key.clone()).collect();
        for listed in young {
            if self.delete_read_row(listed).await? {
                deleted.push(listed.key.clone());
            }
        }
        Ok(deleted)
    }

    /// The paths of the blobs the caller listed as the row's own ([`RowVersion::owned_blobs`]), if they
    /// can stand in for a listing of ours: the caller's listing began after the row committed (by
    /// [`BY_NAME_MARGIN`] where the store's times are whole seconds), and every id is a blob of this
    /// cache that the row owns by name. `None`: find them by name.
    fn listed_blob_paths(
        &self,
        listed: &RowVersion,
        committed: SystemTime,
        fine: bool,
    ) -> Option<Vec<Path>> {
        let blobs = listed.owned_blobs.as_ref()?;
        let margin = if fine { Duration::ZERO } else { BY_NAME_MARGIN };
        if committed + margin >= blobs.listing_began {
            return None;
        }
        blobs
            .ids
            .iter()
            .map(|id| {
                let path = self.blob_path(id)?;
                crate::wire::ref_owned_by(id, &listed.key).then_some(path)
            })
            .collect()
    }

    /// Read the row `listed` names, and if it is still that version delete it and the blobs it owns
    /// among its refs. Returns whether it was deleted.
    async fn delete_read_row(&self, listed: &RowVersion) -> Result<bool> {
        let path = self.row_path(&listed.key);
        let Some((bytes, meta)) = self.fetch_record_with_meta(&path).await? else {
            return Ok(false);
        };
        if !same_version(&meta, listed) {
            return Ok(false);
        }
        self.unmark_then_delete(&listed.key, &bytes).await?;
        let (task, fp) = (listed.key.task_type(), listed.key.fingerprint());
        if let Ok(record) = crate::layout::decode_row_of_size(&bytes, meta.size, task, fp) {
            crate::blob::cascade_delete(self, &listed.key, &record.output).await?;
        }
        Ok(true)
    }

    /// Delete the blobs the rows `deleted` (key, commit time) own by name, written no later than the row.
    async fn cascade_by_name<'a>(
        &self,
        deleted: impl Iterator<Item = (&'a RowKey, SystemTime)>,
    ) -> Result<()> {
        let mut committed: HashMap<String, SystemTime> = HashMap::new();
        for (key, at) in deleted {
            let t = committed.entry(key_tag(key)).or_insert(at);
            *t = (*t).max(at);
        }
        if committed.is_empty() {
            return Ok(());
        }
        let blobs = self.blob_objects().await?;
        let mut doomed = Vec::new();
        let mut seen = HashSet::new();
        for meta in blobs.iter() {
            // Only this cache's blobs: a copy kept deeper (`blobs/backup/<name>`) is someone else's.
            if self.blob_ref_at(&meta.location).is_none() {
                continue;
            }
            let Some(name) = meta.location.filename() else {
                continue;
            };
            let owner_committed =
                crate::wire::name_parts(name).find_map(|part| committed.get(part).copied());
            if owner_committed.is_some_and(|at| SystemTime::from(meta.last_modified) <= at)
                && seen.insert(meta.location.clone())
            {
                doomed.push(meta.location.clone());
            }
        }
        self.delete_many(doomed).await
    }
}

/// The version of the refs index a cache's `layout.json` declares: every row that holds refs has a
/// marker `refs/<segment>/<fingerprint>` (written by this version's `save_row` before and after the row).
pub const REFS_INDEX_VERSION: u64 = 1;

/// What [`ObjectCache::index_refs`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexReport {
    /// Rows read.
    pub rows: u64,
    /// Rows holding refs, each now marked.
    pub marked: u64,
    /// Rows that could not be read (not indexed; they hold no ref this version can see).
    pub unreadable: u64,
}

impl ObjectCache {
    /// Delete the row `key`, whose stored bytes are `bytes`, and first its refs-index marker if it
    /// holds refs (a marker goes before its row, never after).
    pub(super) async fn unmark_then_delete(&self, key: &RowKey, bytes: &[u8]) -> Result<()> {
        let holds = decode_row(bytes, key.task_type(), key.fingerprint())
            .map_or(true, |r| !refs_in(&r.output).is_empty());
        if holds {
            self.delete_path(&self.marker_path(key)).await?;
        }
        self.delete_path(&self.row_path(key)).await
    }

    /// Mark the row `key` as one that holds refs (idempotent).
    pub(super) async fn mark_refs(&self, key: &RowKey) -> Result<()> {
        let marker = self.marker_path(key);
        self.store
            .put(&marker, object_store::PutPayload::default())
            .await
            .map_err(self.err(format!("mark {marker}")))?;
        Ok(())
    }

    /// The refs-index version `layout.json` declares, or `None` (a cache never indexed: every row
    /// must be read to find the refs).
    async fn refs_index(&self) -> Result<Option<u64>> {
        // Read as a row is: a small JSON object, never a giant one whole.
        let Some((bytes, _)) = self.fetch_record(&self.layout_path()).await? else {
            return Ok(None);
        };
        let version = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("refs_index").and_then(serde_json::Value::as_u64));
        match version {
            Some(v) if v > REFS_INDEX_VERSION => Err(Error::InvalidInput {
                what: format!("{}", self.layout_path()),
                reason: format!(
                    "the cache's refs index is version {v}, written by a newer outcache (this one \
                     knows {REFS_INDEX_VERSION}); the orphan sweep stops here: run it with the newer \
                     version"
                ),
            }),
            Some(v) => Ok(Some(v)),
            None => Err(Error::InvalidInput {
                what: format!("{}", self.layout_path()),
                reason: "not a layout this or any outcache wrote".into(),
            }),
        }
    }

    /// Index the rows that hold refs, so orphan sweeps read only those: read every row once, a page at a
    /// time, mark each one holding refs, then declare the index in `layout.json`. Run it once per cache,
    /// after every host writing to it runs a version that maintains the index (older ones write rows
    /// without markers, whose refs a sweep would then miss). Idempotent; stopped half-way (a row of a
    /// newer format, a failed request), it has declared nothing, and the markers it wrote are the ones
    /// a rerun writes again.
    pub async fn index_refs(&self) -> Result<IndexReport> {
        let mut report = IndexReport::default();
        let mut pages = self.read_row_pages();
        while let Some(page) = pages.try_next().await? {
            if let Some(c) = page
                .unreadable
                .iter()
                .find(|c| c.kind == CorruptKind::NewerFormat)
            {
                return Err(Error::InvalidInput {
                    what: "index refs".into(),
                    reason: format!(
                        "{} was written by a newer outcache; index with that version",
                        c.id
                    ),
                });
            }
            let holders: Vec<&RowKey> = page
                .rows
                .iter()
                .filter(|r| !r.refs.is_empty())
                .map(|r| &r.key)
                .collect();
            futures::stream::iter(holders.iter().map(|key| self.mark_refs(key)))
                .buffer_unordered(FETCH_CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await?;
            report.rows += page.rows.len() as u64;
            report.marked += holders.len() as u64;
            report.unreadable += page.unreadable.len() as u64;
        }
        let layout = serde_json::json!({ "refs_index": REFS_INDEX_VERSION });
        self.store
            .put(&self.layout_path(), layout.to_string().into_bytes().into())
            .await
            .map_err(self.err(format!("write {}", self.layout_path())))?;
        Ok(report)
    }

    /// The rows holding refs, page by page ([`crate::store::OutputCache::row_ref_pages`]). With a refs
    /// index, only the marked rows are read, found by listing the markers (the rows themselves are not
    /// listed); without one, every row is read. Either way one page of rows and [`FETCH_CONCURRENCY`]
    /// reads are in memory at a time. Markers left by rows deleted or rewritten without refs are removed
    /// on the way.
    pub(super) fn ref_pages(&self) -> BoxStream<'_, Result<RowScan>> {
        futures::stream::once(self.refs_index())
            .map_ok(move |index| match index {
                Some(_) => self.marked_row_pages(),
                None => self.read_row_pages(),
            })
            .try_flatten()
            .boxed()
    }

    /// The objects under `root` as the store lists them (a page per request), errors naming the listing.
    pub(super) fn listed(
        &self,
        root: Path,
    ) -> impl futures::Stream<Item = Result<ObjectMeta>> + Send + 'static {
        let listing = self.store.list(Some(&root));
        let this = self.clone();
        listing.map_err(move |e| this.err(format!("list {root}"))(e))
    }

    /// Every row read, a page at a time.
    fn read_row_pages(&self) -> BoxStream<'_, Result<RowScan>> {
        paged(
            self.listed(self.rows_root())
                .try_filter(move |m| futures::future::ready(self.is_row_object(m)))
                .map_ok(move |meta| self.fetch_row(meta))
                .try_buffer_unordered(FETCH_CONCURRENCY),
        )
        .map_ok(|fetched| {
            let mut page = RowScan::default();
            for (meta, decoded) in fetched.into_iter().flatten() {
                match decoded {
                    Ok(record) => {
                        let refs = refs_in(&record.output).into_iter().map(|r| r.reference);
                        page.rows
                            .push(Self::entry(&meta, record.key, refs.collect()));
                    }
                    Err(corrupt) => page.unreadable.push(corrupt),
                }
            }
            page
        })
        .boxed()
    }

    /// The marked rows read, a page of markers at a time; stale markers removed after each page.
    fn marked_row_pages(&self) -> BoxStream<'_, Result<RowScan>> {
        paged(
            self.listed(self.refs_root())
                .map_ok(move |marker| self.read_marked(marker.location))
                .try_buffer_unordered(FETCH_CONCURRENCY),
        )
        .and_then(move |marked| async move {
            let mut page = RowScan::default();
            let mut stale = Vec::new();
            for m in marked {
                match m {
                    Marked::Row(entry) => page.rows.push(entry),
                    Marked::Unreadable(corrupt) => page.unreadable.push(corrupt),
                    Marked::Stale(marker, row) => stale.push((marker, row)),
                    Marked::NotAMarker => {}
                }
            }
            self.unmark_stale(stale).await;
            Ok(page)
        })
        .boxed()
    }

    /// The row a marker names, read.
    async fn read_marked(&self, marker: Path) -> Result<Marked> {
        let rest = marker
            .as_ref()
            .strip_prefix(self.refs_root().as_ref())
            .unwrap_or_default();
        let Ok(row) = Path::parse(format!("{}{rest}.json", self.rows_root().as_ref())) else {
            return Ok(Marked::NotAMarker);
        };
        if rest.is_empty() || !self.is_row_object_path(&row) {
            return Ok(Marked::NotAMarker);
        }
        let Some((bytes, meta)) = self.fetch_record_with_meta(&row).await? else {
            return Ok(Marked::Stale(marker, row));
        };
        Ok(match self.decode_listed(&meta, &bytes, meta.size) {
            Ok(record) => {
                let refs: Vec<String> = refs_in(&record.output)
                    .into_iter()
                    .map(|r| r.reference)
                    .collect();
                if refs.is_empty() {
                    Marked::Stale(marker, row)
                } else {
                    Marked::Row(Self::entry(&meta, record.key, refs))
                }
            }
            Err(corrupt) => Marked::Unreadable(corrupt),
        })
    }

    /// Remove the markers of rows gone or holding no refs when read (marker, row), best effort: delete
    /// the marker, read the row again, and put the marker back if the row now holds refs — a writer
    /// that rewrote it meanwhile with refs then keeps its marker whatever the interleaving.
    async fn unmark_stale(&self, stale: Vec<(Path, Path)>) {
        futures::stream::iter(stale)
            .for_each_concurrent(FETCH_CONCURRENCY, |(marker, row)| async move {
                if self.store.delete(&marker).await.is_err() {
                    return;
                }
                let Ok(Some((bytes, _))) = self.fetch_record(&row).await else {
                    return;
                };
                let holds =
                    decode_row(&bytes, "?", "?").map_or(true, |r| !refs_in(&r.output).is_empty());
                if holds {
                    let _ = self
                        .store
                        .put(&marker, object_store::PutPayload::default())
                        .await;
                }
            })
            .await;
    }
}
