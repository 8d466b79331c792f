//! The storage trait every backend implements, [`OutputCache`], with the data types that cross it.
//! Required methods are the row store and what the janitor needs; blob methods are optional capabilities
//! whose defaults return [`Error::Unsupported`], advertised up front in [`Capabilities`].

use std::fmt::{Debug, Display};
use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::wire::{CacheRef, RowKey};

/// A stream of byte chunks: what a producer hands to [`OutputCache::write_blob`] and what
/// [`OutputCache::open_blob`] yields. A producer's own failure is [`Error::Stream`].
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// Collect a whole stream into one buffer, failing with the stream's own error.
pub async fn collect(mut stream: ByteStream) -> Result<Bytes> {
    let mut first: Option<Bytes> = None;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let chunk = chunk?;
        match (&first, buf.is_empty()) {
            (None, true) => first = Some(chunk),
            _ => {
                if let Some(f) = first.take() {
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    Ok(if buf.is_empty() {
        first.unwrap_or_default()
    } else {
        buf.into()
    })
}

/// Largest chunk a streaming read yields.
pub const MAX_READ_CHUNK: usize = 1 << 20;

/// What a backend can do beyond the row store. Truthful both ways: a `true` flag means the method works, a
/// `false` flag means it returns [`Error::Unsupported`] (the conformance suite checks both).
///
/// **Valid sets.** Rows only; or blobs, which come as a set — `write_blob` needs `open_blob` and
/// `delete_blob` (the engine reads back and verifies what it writes, hydrates small refs, and deletes
/// the blob whose row failed to commit). `touch_rows` goes with either. [`Capabilities::check`] names
/// the first missing flag of an incoherent set, and the conformance suite refuses one up front. Build a
/// set with `Capabilities::rows_only().with_write_blob()…`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// [`OutputCache::write_blob`]: stream bytes into a sidecar blob.
    pub write_blob: bool,
    /// [`OutputCache::open_blob`]: stream a blob, or a range of it, by ref (and with it the provided
    /// [`OutputCache::read_blob`] and [`OutputCache::stat_blob`]).
    pub open_blob: bool,
    /// [`OutputCache::delete_blob`]: delete a blob by ref.
    pub delete_blob: bool,
    /// [`OutputCache::touch_rows`]: record when rows were last read (for size-budget eviction).
    pub touch_rows: bool,
}

impl Capabilities {
    /// The row store only: start here and add what the backend does.
    pub const fn rows_only() -> Self {
        Capabilities::ROWS_ONLY
    }

    /// Every capability.
    pub const fn all() -> Self {
        Capabilities::ALL
    }

    /// Add [`Capabilities::write_blob`].
    pub const fn with_write_blob(mut self) -> Self {
        self.write_blob = true;
        self
    }

    /// Add [`Capabilities::open_blob`].
    pub const fn with_open_blob(mut self) -> Self {
        self.open_blob = true;
        self
    }

    /// Add [`Capabilities::delete_blob`].
    pub const fn with_delete_blob(mut self) -> Self {
        self.delete_blob = true;
        self
    }

    /// Add [`Capabilities::touch_rows`].
    pub const fn with_touch_rows(mut self) -> Self {
        self.touch_rows = true;
        self
    }

    /// `Err` naming the first flag an incoherent set lacks (see the type's docs for the valid sets).
    pub fn check(&self) -> std::result::Result<(), String> {
        let needs = |flag: &str, have: bool, needed: &str| {
            if have {
                Ok(())
            } else {
                Err(format!(
                    "{flag} needs {needed} (blob capabilities come as a set)"
                ))
            }
        };
        if self.write_blob {
            needs("write_blob", self.open_blob, "open_blob")?;
            needs("write_blob", self.delete_blob, "delete_blob")?;
        }
        Ok(())
    }

    /// Every flag with its name, in declaration order (so tools iterate instead of re-declaring them).
    pub fn flags(&self) -> [(&'static str, bool); 4] {
        [
            ("write_blob", self.write_blob),
            ("open_blob", self.open_blob),
            ("delete_blob", self.delete_blob),
            ("touch_rows", self.touch_rows),
        ]
    }

    /// Every capability.
    pub const ALL: Capabilities = Capabilities {
        write_blob: true,
        open_blob: true,
        delete_blob: true,
        touch_rows: true,
    };
    /// The row store only.
    pub const ROWS_ONLY: Capabilities = Capabilities {
        write_blob: false,
        open_blob: false,
        delete_blob: false,
        touch_rows: false,
    };
}

/// A byte range of a blob, in the shape of object_store's `GetRange`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// Bytes `start..end`; an `end` past the blob is clamped to its size.
    Bounded(Range<u64>),
    /// Everything from an offset on.
    Offset(u64),
    /// The last `n` bytes (all of them if the blob is shorter).
    Suffix(u64),
}

impl std::fmt::Display for ByteRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ByteRange::Bounded(r) => write!(f, "bytes {}..{}", r.start, r.end),
            ByteRange::Offset(o) => write!(f, "bytes {o}.."),
            ByteRange::Suffix(n) => write!(f, "the last {n} bytes"),
        }
    }
}

impl ByteRange {
    /// The absolute `start..end` of this range in a blob of `size` bytes. A range that starts past the
    /// end, or a bounded one whose end is before its start, is [`Error::InvalidRange`].
    pub fn resolve(&self, reference: &str, size: u64) -> Result<Range<u64>> {
        let invalid = || Error::InvalidRange {
            reference: reference.to_owned(),
            range: self.to_string(),
            size,
        };
        match *self {
            ByteRange::Bounded(ref r) if r.start > r.end || r.start > size => Err(invalid()),
            ByteRange::Bounded(ref r) => Ok(r.start..r.end.min(size)),
            ByteRange::Offset(o) if o > size => Err(invalid()),
            ByteRange::Offset(o) => Ok(o..size),
            ByteRange::Suffix(n) => Ok(size.saturating_sub(n)..size),
        }
    }
}

/// A stored row: the task's output JSON and when it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The output value as stored (refs are not hydrated here; see [`crate::Cache::get`]).
    pub output: Value,
    /// When the row was committed.
    pub created_at: SystemTime,
}

/// What a streaming write should record about its blob, and what makes its name readable.
#[derive(Clone, Debug, Default)]
pub struct BlobMeta {
    /// The task type of the row the blob is written for: readable in its name, and with `fingerprint`
    /// the blob's owner (see [`crate::wire::ref_owned_by`]); never trusted for uniqueness.
    pub task_type: String,
    /// The owning row's input fingerprint.
    pub fingerprint: String,
    /// The output port.
    pub port: Option<String>,
    /// The media type to record in the ref.
    pub mime: Option<String>,
}

impl BlobMeta {
    /// Metadata for a blob written for `key`.
    pub fn for_key(key: &RowKey) -> Self {
        BlobMeta {
            task_type: key.task_type().to_owned(),
            fingerprint: key.fingerprint().to_owned(),
            port: None,
            mime: None,
        }
    }
}

/// One row as the janitor sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct RowEntry {
    /// The row's key.
    pub key: RowKey,
    /// When it was committed.
    pub created_at: SystemTime,
    /// Its stored size in bytes.
    pub size: u64,
    /// The branded ref strings its output holds.
    pub refs: Vec<String>,
    /// When it was last read, as far as the backend tracks it (coarse: the engine records reads in
    /// batches); for a row never read, its commit time. `None` where the backend keeps no access time.
    pub last_access: Option<SystemTime>,
    /// A token that changes whenever the row is rewritten, where the commit time alone may not (an
    /// object's ETag: object timestamps can be second-granular). Handed back in [`RowVersion`].
    pub version: Option<String>,
}

impl RowEntry {
    /// The version of this row to delete by ([`OutputCache::delete_rows_listed`]).
    pub fn listed_version(&self) -> RowVersion {
        RowVersion {
            key: self.key.clone(),
            created_at: self.created_at,
            version: self.version.clone(),
            owned_blobs: None,
        }
    }
}

/// What one pass over a backend's rows found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowScan {
    /// Rows that decode, with the refs they hold.
    pub rows: Vec<RowEntry>,
    /// Rows that cannot be used (the janitor reports them and removes only garbled ones, when asked).
    pub unreadable: Vec<CorruptEntry>,
    /// True if the rows were listed, not read ([`OutputCache::shallow_row_pages`] on a store where
    /// reading costs a request per row): every `refs` is empty, and `unreadable` holds only what the
    /// listing itself shows (names that are no row's).
    pub listing_only: bool,
}

/// Conveniences over [`OutputCache`] for every backend (nobody overrides them).
#[async_trait]
pub trait OutputCacheExt: OutputCache {
    /// Every row that decodes ([`OutputCache::scan_rows`] without the unreadable ones).
    async fn list_rows(&self) -> Result<Vec<RowEntry>> {
        Ok(self.scan_rows().await?.rows)
    }

    /// Every stored row that cannot be used ([`OutputCache::scan_rows`] without the readable ones).
    async fn list_corrupt(&self) -> Result<Vec<CorruptEntry>> {
        Ok(self.scan_rows().await?.unreadable)
    }
}

impl<T: OutputCache + ?Sized> OutputCacheExt for T {}

/// A stored row that cannot be used, and why: the janitor treats each kind differently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptEntry {
    /// A backend-specific name for [`OutputCache::remove_corrupt`].
    pub id: String,
    /// Why it cannot be decoded.
    pub reason: String,
    /// Bytes it holds.
    pub size: u64,
    /// What kind of unusable entry it is.
    pub kind: CorruptKind,
}

/// Kinds of [`CorruptEntry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorruptKind {
    /// Garbled: not a row this or any version wrote. `prune --corrupt` removes it.
    Garbled,
    /// A row of a newer format version: a newer outcache shares this cache. Never removed, and while one
    /// exists the orphan sweep stops (the blobs it references cannot be seen).
    NewerFormat,
    /// Not a regular file where a row belongs (a symlink, FIFO, device, directory): never opened,
    /// followed or removed by the cache; reported for the operator.
    Foreign,
}

/// Whether a stored blob object is published or still being written (or left by a crashed writer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobState {
    /// A whole, published blob: readable by its ref.
    Published,
    /// A temporary object: a write in flight, or the remains of one that died.
    Temp,
    /// Something in the blob area the cache did not write and never touches (a symlink, FIFO,
    /// directory): reported, never removed.
    Foreign,
}

/// What a backend knows about a stored blob without reading it (a stat, a manifest lookup, a HEAD).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobStat {
    /// Bytes stored.
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes, where the backend recorded it (a manifest, the blob's name).
    pub sha256: Option<String>,
}

/// A row as the janitor listed it: deleting by version spares a row rewritten since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowVersion {
    /// The row's key.
    pub key: RowKey,
    /// Its commit time when listed.
    pub created_at: SystemTime,
    /// Its [`RowEntry::version`] when listed.
    pub version: Option<String>,
    /// The blobs the row owns as the caller found them in a blob listing, if it did: a backend that
    /// would otherwise list its blobs to find them by name (an object store whose rows were only
    /// listed) may delete these instead. `None`: the backend finds them itself.
    pub owned_blobs: Option<ListedBlobs>,
}

/// The blobs a row owns, found in a blob listing ([`RowVersion::owned_blobs`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedBlobs {
    /// The ids of every published blob in the listing that the row owns by the backend's rule
    /// ([`OutputCache::owns_ref`]) and that was written no later than the row.
    pub ids: Vec<String>,
    /// When the listing began (this host's clock). It holds all of a row's blobs only if the row
    /// committed before then; a backend uses the ids only for such rows, and for others looks itself.
    pub listing_began: SystemTime,
}

/// One blob or temp object as the janitor sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct BlobEntry {
    /// For a published blob, its ref string; for a temp, a backend-specific name for
    /// [`OutputCache::remove_temp`].
    pub id: String,
    /// Published or temp.
    pub state: BlobState,
    /// Bytes stored so far.
    pub size: u64,
    /// Last modification (for a temp, the last write; the janitor's grace period counts from here).
    pub modified: SystemTime,
}

/// The storage trait: a row store keyed by [`RowKey`], plus optional blob capabilities.
///
/// Writing one: see `WRITING_A_BACKEND.md` in the repository (a complete, tested skeleton backend is
/// `examples/skeleton_backend.rs`), and implement it with `#[outcache::async_trait]`.
///
/// Object safe: use it as `Arc<dyn OutputCache>`. Misses are `Ok(None)`. Every blob method takes the ref
/// *string*; a ref that does not match the backend's own strict pattern (another backend's, a traversal
/// attempt, garbage) never resolves: reads give `Ok(None)`, deletes do nothing and return `Ok(())`.
///
/// Wrappers must forward every method, including the optional ones (check with
/// `#[deny(clippy::missing_trait_methods)]` on the impl), or they silently lose the inner backend's abilities.
#[async_trait]
pub trait OutputCache: Debug + Display + Send + Sync + 'static {
    /// What this backend supports beyond rows.
    fn capabilities(&self) -> Capabilities;

    /// Whether the row `key` owns the blob `reference`, so that its delete cascades to it: the ownership
    /// rule, [`crate::wire::ref_owned_by`]. Backends keep the default; a wrapper that maps keys (the
    /// run-private one) answers for the key as the backing store sees it.
    fn owns_ref(&self, key: &RowKey, reference: &str) -> bool {
        crate::wire::ref_owned_by(reference, key)
    }

    /// The key tag the names of row `key`'s blobs carry ([`crate::wire::key_tag`]): where rows are only
    /// listed ([`RowScan::listing_only`]), the janitor finds a row's blobs by it. A wrapper that writes
    /// blobs under keys of its own (a namespace) answers with the tag of the key it writes them under.
    fn blob_tag(&self, key: &RowKey) -> String {
        crate::wire::key_tag(key)
    }

    /// Store `output` under `key`, atomically replacing any earlier row (last writer wins). The blobs a
    /// replaced row referenced are left for the janitor's orphan sweep: another reader may still hold
    /// the old row.
    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()>;

    /// The row under `key`, or `None`.
    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>>;

    /// Delete the rows under `keys`, each with the blobs it owns and references (the ownership rule,
    /// [`OutputCache::owns_ref`]; [`crate::blob::cascade_delete`] does it for one row), in as few commits
    /// as the backend can (the janitor deletes in batches). Returns how many existed.
    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64>;

    /// Delete the row under `key` with its blobs, as [`OutputCache::delete_rows`] does. Returns whether a
    /// row existed.
    async fn delete_row(&self, key: &RowKey) -> Result<bool> {
        Ok(self.delete_rows(std::slice::from_ref(key)).await? > 0)
    }

    /// Delete each listed row only if it is still the version listed (same commit time), with the blobs
    /// it owns; a row rewritten since it was listed is kept. This is how the janitor deletes, so a row
    /// committed during its run is never lost. Returns the keys deleted. The default checks each row
    /// with [`OutputCache::get_row`] just before deleting it; a backend that can make the check and the
    /// delete one step (a transaction, a lock) should.
    async fn delete_rows_listed(&self, rows: &[RowVersion]) -> Result<Vec<RowKey>> {
        let mut deleted = Vec::new();
        for listed in rows {
            let current = match self.get_row(&listed.key).await {
                Ok(row) => row,
                Err(Error::CorruptRow { .. }) => None, // replaced by garbage: not the row listed
                Err(e) => return Err(e),
            };
            if current.is_some_and(|r| r.created_at == listed.created_at)
                && self.delete_row(&listed.key).await?
            {
                deleted.push(listed.key.clone());
            }
        }
        Ok(deleted)
    }

    /// Delete every row whose task type starts with `task_type_prefix` (all rows for `""`), with their
    /// blobs. Returns the number of rows deleted.
    async fn delete_prefix(&self, task_type_prefix: &str) -> Result<u64>;

    /// Every row with the refs it holds, and every stored row that cannot be used (garbled, of a newer
    /// format, foreign), in **one pass** over the store: the janitor and `stats` scan once.
    async fn scan_rows(&self) -> Result<RowScan>;

    /// The rows as cheaply as the backend can list them, **page by page**: where reading a row costs a
    /// request (an object store), a listing of names, sizes, commit times and versions with no read of
    /// any row ([`RowScan::listing_only`]: refs not known, unreadable rows not told apart), a thousand
    /// rows a page. Enough for `stats` (which then holds one page at a time) and for age, size and
    /// prefix prunes, whose deletes then cascade by the blobs' names. The default is one page:
    /// [`OutputCache::scan_rows`], which backends that read rows cheaply keep.
    fn shallow_row_pages(&self) -> BoxStream<'_, Result<RowScan>> {
        futures::stream::once(self.scan_rows()).boxed()
    }

    /// The rows holding refs, with the refs they hold, for the orphan sweep, **page by page**, so a sweep
    /// holds one page at a time whatever the cache's size. Like [`OutputCache::scan_rows`], except that
    /// rows the backend *knows* hold no ref may be left out (an object store that indexes the rows
    /// holding refs reads only those), and unreadable rows are then found only among the rows read.
    /// The default is one page: [`OutputCache::scan_rows`].
    fn row_ref_pages(&self) -> BoxStream<'_, Result<RowScan>> {
        futures::stream::once(self.scan_rows()).boxed()
    }

    /// Remove the corrupt row named by a [`CorruptEntry::id`], if it is still corrupt (a row rewritten
    /// since it was listed is kept). Unknown or malformed ids do nothing. Returns whether one was removed.
    async fn remove_corrupt(&self, id: &str) -> Result<bool>;

    /// Every published blob and temp object (for the janitor).
    async fn list_blobs(&self) -> Result<Vec<BlobEntry>>;

    /// [`OutputCache::list_blobs`] page by page, for the orphan sweep of a store too large to list into
    /// memory (an object store lists a thousand at a time). The default is one page: `list_blobs`.
    fn blob_pages(&self) -> BoxStream<'_, Result<Vec<BlobEntry>>> {
        futures::stream::once(self.list_blobs()).boxed()
    }

    /// Remove a temp object named by a [`BlobEntry::id`] with state [`BlobState::Temp`]. The janitor calls it
    /// only for temps older than its grace period. Unknown names do nothing. Returns whether one was removed.
    async fn remove_temp(&self, id: &str) -> Result<bool>;

    /// Give space that deletes freed back to the operating system, where the backend holds on to it
    /// (SQLite's free pages and write-ahead log). The janitor calls it after every prune that removed
    /// something. The default has nothing to give back.
    async fn reclaim_space(&self) -> Result<()> {
        Ok(())
    }

    /// Bytes the store occupies on its medium (a database file with its log), where the backend can
    /// tell; `None` where it cannot or it equals the logical size. `stats` shows it beside the logical
    /// bytes.
    async fn storage_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Record that the rows `keys` were read at `at` (one batched update; keys without a row are
    /// ignored). Coarse by design: the engine calls it for batches of reads, not per read.
    async fn touch_rows(&self, keys: &[RowKey], at: SystemTime) -> Result<()> {
        let _ = (keys, at);
        Err(Error::unsupported("touch_rows", self))
    }

    /// Stream `data` into a new blob and return its ref (with `size`, `sha256` and the `mime`/`port` of
    /// `meta`). The blob's name must carry the [`crate::wire::key_tag_of`] `meta`'s task type and
    /// fingerprint (use [`crate::layout::blob_name`]): that is how the row it was written for owns it,
    /// and only the owner's delete cascades to it ([`crate::wire::ref_owned_by`]). Pulls chunks one at a time (memory bounded whatever the size); publishes atomically; on a
    /// stream error or if the future is dropped, publishes nothing and leaves no temp object behind. Every
    /// call gets a fresh unique name.
    async fn write_blob(&self, meta: &BlobMeta, data: ByteStream) -> Result<CacheRef> {
        let _ = (meta, data);
        Err(Error::unsupported("write_blob", self))
    }

    /// A stream over the blob behind `reference` — all of it for `range: None`, else only `range`, read
    /// without what precedes it where the backend can (seek, chunk index, ranged GET) — in chunks of at
    /// most [`MAX_READ_CHUNK`] bytes; `None` if the ref does not resolve (unknown, foreign, deleted or
    /// malformed); [`Error::InvalidRange`] for a range past the end ([`ByteRange::resolve`]). Dropping
    /// the stream releases its handle.
    async fn open_blob(
        &self,
        reference: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        let _ = (reference, range);
        Err(Error::unsupported("open_blob", self))
    }

    /// Size (and SHA-256 where recorded) of the blob behind `reference`, or `None` if it does not resolve;
    /// cheap (no read of the bytes). The engine calls it on every hit to turn a dangling ref into a miss,
    /// and before a whole read to bound it by the stored size. Supported wherever
    /// [`Capabilities::open_blob`] is. The default streams the blob to count it: correct, slow; override it.
    async fn stat_blob(&self, reference: &str) -> Result<Option<BlobStat>> {
        let Some(mut stream) = self.open_blob(reference, None).await? else {
            return Ok(None);
        };
        let mut size = 0u64;
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            size += chunk?.len() as u64;
        }
        Ok(Some(BlobStat { size, sha256: None }))
    }

    /// The whole blob behind `reference`, or `None`: [`OutputCache::open_blob`] collected. A backend may
    /// override it with a faster path for small blobs (one read call, no stream).
    async fn read_blob(&self, reference: &str) -> Result<Option<Bytes>> {
        match self.open_blob(reference, None).await? {
            Some(stream) => Ok(Some(collect(stream).await?)),
            None => Ok(None),
        }
    }

    /// Delete the blob behind `reference`. Idempotent and best effort; a ref that is not this backend's
    /// does nothing.
    async fn delete_blob(&self, reference: &str) -> Result<()> {
        let _ = reference;
        Err(Error::unsupported("delete_blob", self))
    }
}
