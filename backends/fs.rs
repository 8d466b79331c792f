//! The filesystem backend (`fs:///abs/dir`, `file:///abs/dir`): rows as JSON files, blobs as sidecar
//! files, everything written to a temp file in the cache's own `tmp/` and renamed into place, so a reader
//! sees a whole file or none.
//!
//! Layout under the root:
//! ```text
//! rows/<encoded task type>/<fingerprint>.json   one row: {"v":1,"task_type","fingerprint","created_at_ms","output"}
//! blobs/<name>.bin                               one published blob; ref "fsfolder://blobs/<name>.bin"
//! tmp/row-<uuid>.tmp, tmp/blob-<uuid>.tmp        writes in flight (or left by a crash: the janitor's)
//! ```
//! The task-type directory name is the lossless segment encoding of [`crate::layout`] (so prefix deletes
//! can work on names and no two task types share a directory); names that would be too long become
//! `=<sha256>` and the row files carry the exact task type. Durable writes are: write (looping on short writes), `fsync` the
//! file, `rename`, `fsync` the directory. [`FsOptions::durable`] = false skips the fsyncs for scratch caches.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::Value;
use uuid::Uuid;

use crate::blob::{BlobDigest, cascade_delete};
use crate::error::{Error, Result};
use crate::layout::{
    RowRecord, blob_name, corrupt_kind, decode_row_of_size, decode_task_segment, encode_row,
    encode_task_segment, segment_may_match,
};
use crate::store::{
    BlobEntry, BlobMeta, BlobStat, BlobState, ByteRange, ByteStream, Capabilities, CorruptEntry,
    CorruptKind, OutputCache, Row, RowEntry, RowScan,
};
use crate::wire::{CacheRef, RowKey, parse_ref_name, refs_in};

/// Prefix of every ref this backend hands out (the TypeScript file backend's form).
pub const REF_PREFIX: &str = "fsfolder://blobs/";
const REF_SUFFIX: &str = ".bin";
/// Writes smaller than this are gathered before they go to the writer thread.
const WRITE_BATCH: usize = 1 << 20;
/// Batches queued for the writer thread: bounds memory to about `(QUEUE + 1) * WRITE_BATCH`.
const WRITE_QUEUE: usize = 4;

/// Options for [`FsCache`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FsOptions {
    /// fsync files and directories on every write (default true). Off, a power loss can lose recent
    /// writes (never tear them: renames stay atomic).
    pub durable: bool,
    /// Read rows, stat blobs and read blobs of up to one chunk (1 MiB) on the calling thread instead of
    /// the blocking pool (default true): a hit then costs a page-cache read, not a thread hop, and a
    /// 1 MiB page-cache read (~20 µs here) far less than the SHA-256 the engine then computes on the same
    /// thread. Turn it off for a cache on a slow or remote file system, where such a call may stall the
    /// async runtime.
    pub inline_small_reads: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            durable: true,
            inline_small_reads: true,
        }
    }
}

impl FsOptions {
    /// Set [`FsOptions::durable`].
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Set [`FsOptions::inline_small_reads`].
    pub fn inline_small_reads(mut self, inline: bool) -> Self {
        self.inline_small_reads = inline;
        self
    }
}

/// A cache in a directory.
#[derive(Clone, Debug)]
pub struct FsCache {
    root: PathBuf,
    durable: bool,
    inline_small_reads: bool,
}

impl std::fmt::Display for FsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fs({})", self.root.display())
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::stream(format!("blocking task failed: {e}"))))
}

fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// fsync a directory so a rename or create inside it survives a crash. Some filesystems refuse to fsync
/// a directory; that is tolerated (there is nothing more the process can do).
fn sync_dir(path: &Path) -> io::Result<()> {
    match File::open(path).and_then(|d| d.sync_all()) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidInput
                    | io::ErrorKind::Unsupported
                    | io::ErrorKind::PermissionDenied
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// **The link policy.** Below its root the cache never follows a symbolic link and never opens anything
/// but a regular file or a real directory: anyone who can write into the cache directory could otherwise
/// point a janitor run (often root's) at files outside it, or hang it on a FIFO. Every directory the cache
/// works in is checked with `lstat` before use, every file is opened with `O_NOFOLLOW | O_NONBLOCK` and
/// checked to be regular, and listings report anything else as foreign, never touching it. The root
/// itself may be a link (it is the operator's choice).
fn real_dir(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(io::Error::other(if meta.file_type().is_symlink() {
            "is a symbolic link where the cache expects its own directory (links are never followed)"
        } else {
            "is not a directory"
        }))
    }
}

/// Open `path` for reading (or writing, to set times) only if it is a regular file; `Ok(None)` if it
/// does not exist. A link, FIFO, socket or device is an error, and opening one never blocks or follows.
fn open_regular(path: &Path, write: bool) -> io::Result<Option<File>> {
    Ok(open_regular_with_meta(path, write)?.map(|(file, _)| file))
}

/// [`open_regular`], with the metadata it checked (one `fstat` serves the check and the caller).
fn open_regular_with_meta(path: &Path, write: bool) -> io::Result<Option<(File, fs::Metadata)>> {
    let mut options = File::options();
    options.read(!write).write(write);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc_flags::NOFOLLOW | libc_flags::NONBLOCK);
    }
    let file = match options.open(path) {
        Ok(f) => f,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => {
            return Err(match fs::symlink_metadata(path) {
                Ok(m) if !m.is_file() => not_regular(&m),
                _ => e,
            });
        }
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    Ok(Some((file, meta)))
}

fn not_regular(meta: &fs::Metadata) -> io::Error {
    io::Error::other(if meta.file_type().is_symlink() {
        "is a symbolic link (links are never followed)"
    } else {
        "is not a regular file (a FIFO, socket, device or directory is never opened)"
    })
}

/// Remove `path` if it is a regular file (never a link or anything else). Returns whether it existed.
fn remove_regular(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => remove_if_exists(path),
        Ok(m) => Err(Error::io("remove", path, not_regular(&m))),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// `open(2)` flags the standard library does not name (Linux and the BSDs agree on neither value, so
/// they come from libc where it is a dependency).
#[cfg(unix)]
mod libc_flags {
    #[cfg(target_os = "linux")]
    pub(super) const NOFOLLOW: i32 = libc::O_NOFOLLOW;
    #[cfg(target_os = "linux")]
    pub(super) const NONBLOCK: i32 = libc::O_NONBLOCK;
    #[cfg(not(target_os = "linux"))]
    pub(super) const NOFOLLOW: i32 = 0x0100;
    #[cfg(not(target_os = "linux"))]
    pub(super) const NONBLOCK: i32 = 0x0004;
}

/// The SHA-256 a published blob's name records (`<name>.<sha256>.bin`), if it records one (names
/// written before it did, and the TypeScript original's, do not).
pub fn digest_in_name(reference: &str) -> Option<&str> {
    let name = parse_ref_name(reference, REF_PREFIX, REF_SUFFIX)?;
    let (_, digest) = name.rsplit_once('.')?;
    (digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    .then_some(digest)
}

/// Removes a temp file when dropped, unless disarmed after a successful rename.
struct TempFile {
    path: Option<PathBuf>,
    /// Set when dropped armed: a creation or publication still running on the blocking pool for a
    /// caller that is gone ([`TempFile::create`], [`TempFile::publish`]) then undoes itself.
    abandoned: Arc<AtomicBool>,
    /// Where [`TempFile::publish`] renames the file, and whether it has: dropped armed after that, the
    /// guard removes the published file (its writer never learnt of it).
    dest: Option<PathBuf>,
    published: Arc<AtomicBool>,
}

impl TempFile {
    fn new(path: PathBuf) -> Self {
        TempFile {
            path: Some(path),
            abandoned: Arc::new(AtomicBool::new(false)),
            dest: None,
            published: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Closes `file` and renames it to `name` in `root`'s `blobs/` on the blocking pool, then fsyncs the
    /// directory if `durable`. A caller dropped while this runs publishes nothing: the guard and the
    /// rename each set their own flag before they look at the other's, so whichever comes second
    /// removes the published file.
    async fn publish(
        &mut self,
        cache: &FsCache,
        file: File,
        name: String,
        durable: bool,
    ) -> Result<()> {
        let tmp = self
            .path
            .clone()
            .ok_or_else(|| Error::stream("the temp file was disarmed"))?;
        let dest = cache.root.join("blobs").join(name);
        self.dest = Some(dest.clone());
        let (abandoned, published) = (self.abandoned.clone(), self.published.clone());
        let cache = cache.clone();
        blocking(move || {
            drop(file); // closed before the rename (fsynced already by the writer when durable)
            cache.work_dir_for_write("blobs")?;
            fs::rename(&tmp, &dest).map_err(|e| Error::io("rename into place", &dest, e))?;
            published.store(true, Ordering::SeqCst);
            if abandoned.load(Ordering::SeqCst) {
                let _ = fs::remove_file(&dest);
                return Err(Error::stream("the write was dropped"));
            }
            if durable {
                let dir = dest.parent().unwrap_or(&cache.root);
                sync_dir(dir).map_err(|e| Error::io("fsync directory", dir, e))?;
            }
            Ok(())
        })
        .await
    }

    /// Creates the file on the blocking pool, in `root`'s `tmp/` (made again if missing). Guarded
    /// from before the creation starts: a caller dropped while it runs leaves no file behind, whether
    /// the creation finished before the drop (the guard removes the file) or after it (the creation
    /// sees the guard gone and removes it).
    async fn create(&self, cache: &FsCache) -> Result<File> {
        let (path, abandoned) = (self.path.clone(), self.abandoned.clone());
        let cache = cache.clone();
        blocking(move || {
            let path = path.ok_or_else(|| Error::stream("the temp file was disarmed"))?;
            cache.work_dir_for_write("tmp")?;
            let file =
                File::create_new(&path).map_err(|e| Error::io("create temp file", &path, e))?;
            if abandoned.load(Ordering::SeqCst) {
                let _ = fs::remove_file(&path);
                return Err(Error::stream("the write was dropped"));
            }
            Ok(file)
        })
        .await
    }

    fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            self.abandoned.store(true, Ordering::SeqCst);
            let _ = fs::remove_file(path);
            if let Some(dest) = &self.dest {
                if self.published.load(Ordering::SeqCst) {
                    let _ = fs::remove_file(dest);
                }
            }
        }
    }
}

impl FsCache {
    /// Open a cache rooted at `root`, creating the root if it is missing. Opening an existing cache writes
    /// nothing (a read-only mount or a restored CI cache can be read); its missing working directories
    /// are created when possible, and a write to a cache that cannot be written fails naming the path.
    ///
    /// The filesystem root (`/`, or a link to it) is refused: the janitor sweeps `tmp/`, and `/tmp` is
    /// everybody's. A cache needs a directory of its own.
    pub fn open(root: impl Into<PathBuf>, options: FsOptions) -> Result<Self> {
        let root = root.into();
        let not_own = |reason: &str| Error::InvalidInput {
            what: format!("cache directory {:?}", root.display().to_string()),
            reason: format!(
                "{reason}; a cache needs a directory of its own, e.g. /var/cache/outcache"
            ),
        };
        if root.as_os_str().is_empty() {
            return Err(not_own("is empty"));
        }
        if fs::canonicalize(&root).is_ok_and(|real| real.parent().is_none()) {
            return Err(not_own("is the filesystem root"));
        }
        let mut new = false;
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::io(
                    "open cache directory",
                    &root,
                    io::Error::other("is not a directory"),
                ));
            }
            Err(e) if is_not_found(&e) => {
                fs::create_dir_all(&root)
                    .map_err(|e| Error::io("create cache directory", &root, e))?;
                new = true;
            }
            Err(e) => return Err(Error::io("open cache directory", &root, e)),
        }
        // The layout goes into a new or empty directory at once. Anywhere else the working directories
        // are made by the first write that needs one, so reading (`stats`, `get`) writes nothing, even
        // in a directory that turns out not to be a cache.
        let empty = || fs::read_dir(&root).is_ok_and(|mut entries| entries.next().is_none());
        if new || empty() {
            for dir in ["rows", "blobs", "tmp"].map(|d| root.join(d)) {
                // Best effort: writes make them again if missing, and say why if they cannot.
                let _ = fs::create_dir(&dir);
            }
        }
        Ok(FsCache {
            root,
            durable: options.durable,
            inline_small_reads: options.inline_small_reads,
        })
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn rows_dir(&self) -> PathBuf {
        self.root.join("rows")
    }

    fn row_path(&self, key: &RowKey) -> PathBuf {
        self.rows_dir()
            .join(encode_task_segment(key.task_type()))
            .join(format!("{}.json", key.fingerprint()))
    }

    fn blob_path(&self, reference: &str) -> Option<PathBuf> {
        let name = parse_ref_name(reference, REF_PREFIX, REF_SUFFIX)?;
        Some(self.root.join("blobs").join(format!("{name}{REF_SUFFIX}")))
    }

    /// `<root>/<name>` after checking it is a real directory (the link policy).
    fn work_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        real_dir(&dir).map_err(|e| Error::io("use cache directory", &dir, e))?;
        Ok(dir)
    }

    /// [`Self::work_dir`] for a write: made again if it is missing, as [`FsCache::open`] made it, so a
    /// long-running writer (`outcache serve`) survives an operator emptying the cache. The root itself
    /// is never made again: a removed root stays removed (a blocking write still running for a dropped
    /// caller would otherwise bring back a scratch directory its owner just deleted), and writes fail
    /// naming it. A link or a file in a directory's place is still an error, never followed or replaced.
    fn work_dir_for_write(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        match real_dir(&dir) {
            Err(e) if is_not_found(&e) => {
                match fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::io("create cache directory", &dir, e)),
                }
                // Whatever won a race to the name must still be a real directory.
                real_dir(&dir).map_err(|e| Error::io("use cache directory", &dir, e))?;
            }
            checked => checked.map_err(|e| Error::io("use cache directory", &dir, e))?,
        }
        Ok(dir)
    }

    /// Whether `<root>/<name>` exists as a real directory: `false` if it is missing (a read-only cache
    /// that never held such entries reads as empty there), an error if it is a link or not a directory.
    fn existing_work_dir(&self, name: &str) -> Result<bool> {
        let dir = self.root.join(name);
        match real_dir(&dir) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(Error::io("use cache directory", &dir, e)),
        }
    }

    /// The row file of `key` after checking `rows/` and its task-type directory are real directories;
    /// `None` if the task-type directory does not exist (no such row).
    fn checked_row_path(&self, key: &RowKey) -> Result<Option<PathBuf>> {
        let path = self.row_path(key);
        let dir = path.parent().unwrap_or(&self.root);
        match real_dir(dir) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {
                self.existing_work_dir("rows")?; // a link in its place is an error, not a miss
                return Ok(None);
            }
            Err(e) => return Err(Error::io("use cache directory", dir, e)),
        }
        Ok(Some(path))
    }

    fn temp_path(&self, kind: &str) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{kind}-{}.tmp", Uuid::new_v4().simple()))
    }

    /// The blob file at `path`, stat'ed here and now (blocking); `None` unless a regular file.
    fn stat_blob_now(&self, path: &Path, sha256: Option<String>) -> Result<Option<BlobStat>> {
        if !self.existing_work_dir("blobs")? {
            return Ok(None);
        }
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_file() => Ok(Some(BlobStat {
                size: m.len(),
                sha256,
            })),
            Ok(_) => Ok(None), // not a blob the cache wrote: never resolves
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::io("stat blob", path, e)),
        }
    }

    /// The row under `key`, read here and now (blocking).
    fn get_row_now(&self, key: &RowKey) -> Result<Option<Row>> {
        let Some(path) = self.checked_row_path(key)? else {
            return Ok(None);
        };
        let Some(row) = self.read_row(&path, key.task_type(), key.fingerprint())? else {
            return Ok(None);
        };
        row.into_row_for(key, "file").map(Some)
    }

    /// Write `bytes` to `dest` atomically (temp file, fsync, rename, fsync dir).
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        self.work_dir_for_write("tmp")?;
        let tmp = self.temp_path("row");
        let mut file =
            File::create_new(&tmp).map_err(|e| Error::io("create temp file", &tmp, e))?;
        let mut guard = TempFile::new(tmp.clone());
        // write_all loops on short writes.
        file.write_all(bytes)
            .map_err(|e| Error::io("write temp file", &tmp, e))?;
        if self.durable {
            file.sync_all()
                .map_err(|e| Error::io("fsync temp file", &tmp, e))?;
        }
        drop(file);
        let dir = dest.parent().unwrap_or(&self.root);
        let rows = self.work_dir_for_write("rows")?;
        let mut created_dir = false;
        for attempt in 0..3 {
            match real_dir(dir) {
                Ok(()) => {}
                // The task-type directory is new, or a concurrent prefix delete just removed it.
                Err(e) if is_not_found(&e) && attempt < 2 => {
                    match fs::create_dir(dir) {
                        Ok(()) => created_dir = true,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(Error::io("create directory", dir, e)),
                    }
                    continue;
                }
                Err(e) => return Err(Error::io("write row into", dir, e)),
            }
            match fs::rename(&tmp, dest) {
                Ok(()) => break,
                Err(e) if is_not_found(&e) && attempt < 2 => {}
                Err(e) => return Err(Error::io("rename into place", dest, e)),
            }
        }
        guard.disarm();
        if self.durable {
            sync_dir(dir).map_err(|e| Error::io("fsync directory", dir, e))?;
            if created_dir {
                sync_dir(&rows).map_err(|e| Error::io("fsync directory", &rows, e))?;
            }
        }
        Ok(())
    }

    fn read_row(&self, path: &Path, task: &str, fp: &str) -> Result<Option<RowRecord>> {
        match read_row_file(path).map_err(|e| Error::io("read row", path, e))? {
            Some((bytes, size)) => decode_row_of_size(&bytes, size, task, fp).map(Some),
            None => Ok(None),
        }
    }

    /// A foreign entry (not a regular file or real directory where the cache expects one) at `path`.
    fn foreign(&self, path: &Path, meta: Option<&fs::Metadata>) -> CorruptEntry {
        let id = path.strip_prefix(&self.root).unwrap_or(path);
        let what = match meta.map(fs::Metadata::file_type) {
            Some(t) if t.is_symlink() => "a symbolic link",
            Some(t) if t.is_dir() => "a directory",
            Some(t) if t.is_file() => "a file",
            _ => "not a regular file (FIFO, socket or device)",
        };
        CorruptEntry {
            id: id.to_string_lossy().into_owned(),
            reason: format!("{what} the cache did not write; never followed, opened or removed"),
            size: 0,
            kind: CorruptKind::Foreign,
        }
    }

    /// Every task-type directory with the task type it holds (decoded, or read from a row for hashed
    /// names). Anything in `rows/` that is not a real directory goes to `foreign`, and so does `rows/`
    /// itself if it is a link.
    fn task_dirs(&self, foreign: &mut Vec<CorruptEntry>) -> Result<Vec<(PathBuf, Option<String>)>> {
        let rows = self.rows_dir();
        match real_dir(&rows) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(Vec::new()),
            Err(_) => {
                foreign.push(self.foreign(&rows, fs::symlink_metadata(&rows).ok().as_ref()));
                return Ok(Vec::new());
            }
        }
        let mut out = Vec::new();
        for entry in read_dir(&rows)? {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                foreign.push(self.foreign(&path, fs::symlink_metadata(&path).ok().as_ref()));
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let task = match decode_task_segment(&name) {
                Some(t) => Some(t),
                None => self
                    .row_files(&path, &mut Vec::new())?
                    .into_iter()
                    .find_map(|p| {
                        read_row_file(&p)
                            .ok()
                            .flatten()
                            .and_then(|(bytes, size)| {
                                decode_row_of_size(&bytes, size, "?", "?").ok()
                            })
                            .map(|r| r.key.task_type().to_owned())
                    }),
            };
            out.push((path, task));
        }
        Ok(out)
    }

    /// The row files (regular files named `<fingerprint>.json`) in a task-type directory; everything
    /// else goes to `foreign`.
    fn row_files(&self, dir: &Path, foreign: &mut Vec<CorruptEntry>) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in read_dir(dir)? {
            let path = entry.path();
            match entry.file_type() {
                // A file not named as a row is someone else's (the root may be a directory that
                // holds more than the cache): reported, never read as a row or removed as corrupt.
                Ok(t)
                    if t.is_file()
                        && crate::layout::is_row_file_name(
                            &entry.file_name().to_string_lossy(),
                        ) =>
                {
                    out.push(path);
                }
                _ => foreign.push(self.foreign(&path, fs::symlink_metadata(&path).ok().as_ref())),
            }
        }
        Ok(out)
    }

    /// Remove rows for which `pick` holds, in the task-type directories `dir_may_match` admits (given
    /// the directory's task type, if known), returning the removed outputs (for the blob cascade).
    fn remove_rows(
        &self,
        dir_may_match: impl Fn(Option<&str>) -> bool,
        pick: impl Fn(&RowRecord) -> bool,
    ) -> Result<Vec<(RowKey, Value)>> {
        let mut outputs = Vec::new();
        let mut foreign = Vec::new();
        for (dir, task) in self.task_dirs(&mut foreign)? {
            if !dir_may_match(task.as_deref()) {
                continue;
            }
            for path in self.row_files(&dir, &mut foreign)? {
                let Ok(Some(row)) = self.read_row(&path, "?", "?") else {
                    continue; // vanished meanwhile, or corrupt: left for the janitor to report
                };
                if pick(&row) {
                    remove_regular(&path)?;
                    outputs.push((row.key, row.output));
                }
            }
            let _ = fs::remove_dir(&dir); // only succeeds when empty
        }
        Ok(outputs)
    }

    async fn cascade(&self, outputs: Vec<(RowKey, Value)>) -> Result<u64> {
        for (key, output) in &outputs {
            cascade_delete(self, key, output).await?;
        }
        Ok(outputs.len() as u64)
    }
}

/// A row file's bytes and its size; of one larger than any row ([`crate::layout::MAX_ROW_BYTES`])
/// only its head, which cannot decode: such a file is garbled, and never read whole into memory.
fn read_row_file(path: &Path) -> io::Result<Option<(Bytes, u64)>> {
    let Some((mut file, meta)) = open_regular_with_meta(path, false)? else {
        return Ok(None);
    };
    let len = match meta.len() {
        len if len > crate::layout::MAX_ROW_BYTES => crate::layout::OVERSIZED_ROW_HEAD,
        len => len as usize,
    };
    crate::blob::read_chunk(&mut file, len).map(|bytes| Some((bytes, meta.len())))
}

/// The bytes of the regular file at `path`, or `None` if it does not exist (the link policy applies).
fn read_regular(path: &Path) -> io::Result<Option<Bytes>> {
    let Some((mut file, meta)) = open_regular_with_meta(path, false)? else {
        return Ok(None);
    };
    // Rows and blobs are published by rename and never written in place: a read that fills the size
    // the open's fstat saw has the whole file, with no further read to find its end (a file that grew
    // meanwhile was not written by the cache, and fails to decode).
    crate::blob::read_chunk(&mut file, meta.len() as usize).map(Some)
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| Error::io("list directory", dir, e)),
        Err(e) if is_not_found(&e) => Ok(Vec::new()),
        Err(e) => Err(Error::io("list directory", dir, e)),
    }
}

fn remove_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

fn modified(meta: &fs::Metadata) -> SystemTime {
    meta.modified().unwrap_or(UNIX_EPOCH)
}

/// What the writer thread of [`FsCache::write_blob`] is sent: bytes to append, then (durable, and only
/// when the stream ended whole) the order to fsync, so that a failed stream is never fsynced for nothing.
enum ToWriter {
    Bytes(Bytes),
    Sync,
}

/// Allocates a growing temp file's blocks ahead of its writes (Linux `fallocate`), so ext4 reserves
/// and maps them once per step instead of once per page as each write lands: a 256 MiB blob costs
/// ~20 CPU-ms less to write (BENCHMARKS.md). Starts after the first MiB (small blobs never pay the
/// extra calls), each step as large as what is written so far, at most 64 MiB, so a blob never holds
/// more than twice its size, or 64 MiB, of space it does not use. The file is cut back to what was
/// written before it is fsynced or published ([`Preallocation::trim`]); a temp left by a crash keeps
/// the slack until the janitor removes it. A file system that cannot preallocate, or has no room for
/// a step, is simply written as before (a full disk then fails the write itself).
#[derive(Default)]
struct Preallocation {
    allocated: u64,
    written: u64,
    off: bool,
}

/// Writes past this many bytes start preallocating.
const PREALLOCATE_FROM: u64 = 1 << 20;
/// The largest step.
const PREALLOCATE_MAX_STEP: u64 = 64 << 20;

impl Preallocation {
    fn before_write(&mut self, file: &File, len: u64) {
        let end = self.written + len;
        if !self.off && self.written >= PREALLOCATE_FROM && end > self.allocated {
            let from = self.allocated.max(self.written);
            let step = self.written.clamp(len, PREALLOCATE_MAX_STEP.max(len));
            if preallocate(file, from, step).is_ok() {
                self.allocated = from + step;
            } else {
                // Undo whatever part of the step was allocated; the writes go on without.
                self.off = true;
                let _ = file.set_len(self.written);
                self.allocated = 0;
            }
        }
        self.written = end;
    }

    /// Cuts the file back to the bytes written, if a step reached past them.
    fn trim(&mut self, file: &File) -> io::Result<()> {
        if self.allocated > self.written {
            file.set_len(self.written)?;
            self.allocated = self.written;
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn preallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return Err(io::Error::other("past the largest file offset"));
    };
    // SAFETY: a plain syscall on a file descriptor we own; it reads no memory of ours.
    match unsafe { libc::fallocate64(file.as_raw_fd(), 0, offset, len) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn preallocate(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Starts the disk writeback of a temp file every [`WRITEBACK_EVERY`] bytes while the stream is still
/// arriving (Linux `sync_file_range`), so the final fsync only waits for the tail instead of the whole
/// blob: the flush overlaps with hashing and receiving. Elsewhere it does nothing and fsync does it all.
#[derive(Default)]
struct Writeback {
    flushed: u64,
    written: u64,
}

const WRITEBACK_EVERY: u64 = 8 << 20;

impl Writeback {
    fn wrote(&mut self, file: &File, len: u64) {
        self.written += len;
        if self.written - self.flushed >= WRITEBACK_EVERY {
            start_writeback(file, self.flushed, self.written - self.flushed);
            self.flushed = self.written;
        }
    }
}

#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a file descriptor we own; it reads no memory of ours. Failure only
    // means the final fsync does all the work, so the result is deliberately ignored.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

#[async_trait]
impl OutputCache for FsCache {
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        let bytes = encode_row(key, output, SystemTime::now())?;
        let this = self.clone();
        let dest = self.row_path(key);
        blocking(move || this.write_atomic(&dest, &bytes)).await
    }

    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        // A row is a small file, read on the calling thread: the hop to the blocking pool costs several
        // times a page-cache read of a few KiB (the SQLite backend's point reads do the same). A
        // cache on a slow or remote disk can turn this off (`FsOptions::inline_small_reads`).
        if self.inline_small_reads {
            return self.get_row_now(key);
        }
        let this = self.clone();
        let key = key.clone();
        blocking(move || this.get_row_now(&key)).await
    }

    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        let this = self.clone();
        let keys = keys.to_vec();
        // One trip to the blocking pool for the whole batch; a corrupt row is removed without a cascade
        // (its refs cannot be read).
        let (removed, outputs) = blocking(move || {
            let (mut removed, mut outputs) = (0, Vec::new());
            for key in keys {
                let Some(path) = this.checked_row_path(&key)? else {
                    continue;
                };
                let output = match this.read_row(&path, key.task_type(), key.fingerprint()) {
                    Ok(row) => row.map(|r| r.output),
                    Err(Error::CorruptRow { .. }) => None,
                    Err(e) => return Err(e),
                };
                if remove_regular(&path)? {
                    removed += 1;
                    outputs.extend(output.map(|o| (key, o)));
                }
            }
            Ok((removed, outputs))
        })
        .await?;
        self.cascade(outputs).await?;
        Ok(removed)
    }

    async fn delete_prefix(&self, task_type_prefix: &str) -> Result<u64> {
        let this = self.clone();
        let prefix = task_type_prefix.to_owned();
        let outputs = blocking(move || {
            this.remove_rows(
                |task| segment_may_match(task, &prefix),
                |r| r.key.task_type().starts_with(&prefix),
            )
        })
        .await?;
        self.cascade(outputs).await
    }

    async fn scan_rows(&self) -> Result<RowScan> {
        let this = self.clone();
        blocking(move || {
            let (rows, unreadable) = this.scan_rows()?;
            Ok(RowScan {
                rows,
                unreadable,
                listing_only: false,
            })
        })
        .await
    }

    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        // `rows/<segment>/<file>.json`, each part one clean name: nothing outside the rows directory.
        let parts: Vec<&str> = id.split('/').collect();
        let clean = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._=-".contains(&b))
        };
        if parts.len() != 3
            || parts[0] != "rows"
            || !crate::layout::is_row_file_name(parts[2])
            || !parts[1..].iter().all(|p| clean(p))
        {
            return Ok(false);
        }
        let path = self.root.join(id);
        let this = self.clone();
        blocking(move || {
            let dir = path.parent().unwrap_or(&this.root);
            if this.work_dir("rows").is_err() || real_dir(dir).is_err() {
                return Ok(false); // behind a link, or gone: never followed
            }
            let (bytes, size) = match read_row_file(&path) {
                Ok(Some(read)) => read,
                Ok(None) | Err(_) => return Ok(false), // gone, or not a regular file: never touched
            };
            if decode_row_of_size(&bytes, size, "?", "?").is_ok()
                || corrupt_kind(&bytes) != CorruptKind::Garbled
            {
                return Ok(false); // rewritten since it was listed, or a newer version's: keep it
            }
            remove_regular(&path)
        })
        .await
    }

    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        let this = self.clone();
        blocking(move || this.list_blob_files()).await
    }

    async fn remove_temp(&self, id: &str) -> Result<bool> {
        if id.starts_with(crate::layout::SCRATCH_ID_PREFIX) {
            let this = self.clone();
            let id = id.to_owned();
            return blocking(move || crate::layout::remove_scratch(&this.work_dir("tmp")?, &id))
                .await;
        }
        // Only a name this backend gives its temps: one segment, no traversal, nobody else's file.
        if !crate::layout::is_temp_file_name(id) {
            return Ok(false);
        }
        let this = self.clone();
        let id = id.to_owned();
        blocking(move || remove_regular(&this.work_dir("tmp")?.join(id))).await
    }

    async fn touch_rows(&self, keys: &[RowKey], at: SystemTime) -> Result<()> {
        // The access time is the row file's mtime: one metadata update per row, no data written.
        let this = self.clone();
        let keys = keys.to_vec();
        blocking(move || {
            for key in keys {
                let Some(path) = this.checked_row_path(&key)? else {
                    continue;
                };
                let Some(file) =
                    open_regular(&path, true).map_err(|e| Error::io("open row", &path, e))?
                else {
                    continue;
                };
                let newer = file
                    .metadata()
                    .and_then(|m| m.modified())
                    .map_or(true, |m| m < at);
                if newer {
                    file.set_modified(at)
                        .map_err(|e| Error::io("touch row", &path, e))?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn write_blob(&self, meta: &BlobMeta, mut data: ByteStream) -> Result<CacheRef> {
        let name = blob_name(meta);
        let tmp = self.temp_path("blob");

        // From here on, any way out of this function (error, stream failure, the future being dropped,
        // even while the file is being created) removes the temp file unless it was renamed into place.
        let mut guard = TempFile::new(tmp.clone());
        let file = guard.create(self).await?;

        // Hash on this task while a blocking thread writes: the two overlap, so a durable write runs at
        // disk speed rather than disk + SHA-256 speed. The writer also fsyncs, when told the stream
        // ended whole, so the fsync overlaps the hashing of the last chunk (hashed one chunk late, see
        // below): a one-chunk blob then costs its fsync, not its SHA-256 and then its fsync.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ToWriter>(WRITE_QUEUE);
        let tmp_for_writer = tmp.clone();
        let durable = self.durable;
        let writer = tokio::task::spawn_blocking(move || -> Result<File> {
            let mut file = file;
            let mut writeback = Writeback::default();
            let mut preallocation = Preallocation::default();
            let trim = |p: &mut Preallocation, file: &File| {
                p.trim(file)
                    .map_err(|e| Error::io("trim temp file", &tmp_for_writer, e))
            };
            while let Some(message) = rx.blocking_recv() {
                match message {
                    ToWriter::Bytes(chunk) => {
                        preallocation.before_write(&file, chunk.len() as u64);
                        file.write_all(&chunk)
                            .map_err(|e| Error::io("write temp file", &tmp_for_writer, e))?;
                        if durable {
                            writeback.wrote(&file, chunk.len() as u64);
                        }
                    }
                    ToWriter::Sync => {
                        trim(&mut preallocation, &file)?;
                        file.sync_all()
                            .map_err(|e| Error::io("fsync temp file", &tmp_for_writer, e))?;
                    }
                }
            }
            trim(&mut preallocation, &file)?;
            Ok(file)
        });

        let mut digest = BlobDigest::new();
        let mut batch = BytesMut::new();
        let mut stream_error = None;
        // Each chunk is hashed once the next one has arrived (or the stream has ended and the writer
        // has been told to fsync): the bytes hashed are the bytes sent, in the same order, one late.
        let mut unhashed: Option<Bytes> = None;
        while let Some(chunk) = data.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    stream_error = Some(e);
                    break;
                }
            };
            if let Some(previous) = unhashed.replace(chunk.clone()) {
                digest.update(&previous);
            }
            let to_send = if chunk.len() >= WRITE_BATCH / 4 && batch.is_empty() {
                Some(chunk)
            } else {
                batch.extend_from_slice(&chunk);
                (batch.len() >= WRITE_BATCH).then(|| batch.split().freeze())
            };
            if let Some(bytes) = to_send {
                if tx.send(ToWriter::Bytes(bytes)).await.is_err() {
                    break; // the writer failed; its error is collected below
                }
            }
        }
        if stream_error.is_none() {
            // A failed send means the writer failed; its error is collected below.
            if !batch.is_empty() {
                let _ = tx.send(ToWriter::Bytes(batch.freeze())).await;
            }
            if durable {
                let _ = tx.send(ToWriter::Sync).await;
            }
        }
        drop(tx);
        if let Some(last) = unhashed.take() {
            digest.update(&last);
        }
        let file = writer
            .await
            .map_err(|e| Error::stream(format!("writer thread failed: {e}")))?;
        if let Some(e) = stream_error {
            return Err(match e {
                e @ Error::Stream { .. } => e,
                other => Error::stream(other),
            });
        }
        let file = file?;

        // The published name is chosen now that the bytes are hashed: it records their SHA-256, so even a
        // bare ref string can be verified.
        let digest_hex = digest.clone().sha256_hex();
        let file_name = format!("{name}.{digest_hex}{REF_SUFFIX}");
        let reference = format!("{REF_PREFIX}{file_name}");
        guard.publish(self, file, file_name, durable).await?;
        guard.disarm();
        Ok(digest.into_ref(reference, meta))
    }

    async fn read_blob(&self, reference: &str) -> Result<Option<Bytes>> {
        let Some(path) = self.blob_path(reference) else {
            return Ok(None);
        };
        if self.inline_small_reads {
            match self.read_small_now(&path, reference, None)? {
                Small::Missing => return Ok(None),
                Small::Read(bytes) => return Ok(Some(bytes)),
                // Read on the blocking pool from the file already open, bounded by its size.
                Small::Large(mut file, size) => {
                    return blocking(move || {
                        crate::blob::read_chunk(&mut file, size as usize)
                            .map(Some)
                            .map_err(|e| Error::io("read blob", &path, e))
                    })
                    .await;
                }
            }
        }
        let this = self.clone();
        blocking(move || {
            if !this.existing_work_dir("blobs")? {
                return Ok(None);
            }
            read_regular(&path).map_err(|e| Error::io("read blob", &path, e))
        })
        .await
    }

    async fn stat_blob(&self, reference: &str) -> Result<Option<BlobStat>> {
        let Some(path) = self.blob_path(reference) else {
            return Ok(None);
        };
        let sha256 = digest_in_name(reference).map(str::to_owned);
        if self.inline_small_reads {
            return self.stat_blob_now(&path, sha256);
        }
        let this = self.clone();
        blocking(move || this.stat_blob_now(&path, sha256)).await
    }

    async fn delete_blob(&self, reference: &str) -> Result<()> {
        let Some(path) = self.blob_path(reference) else {
            return Ok(());
        };
        let this = self.clone();
        blocking(move || {
            if !this.existing_work_dir("blobs")? {
                return Ok(());
            }
            match remove_regular(&path) {
                Ok(_) => Ok(()),
                // Something the cache did not write sits under a blob's name: leave it alone.
                Err(Error::Io { .. })
                    if fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) =>
                {
                    Ok(())
                }
                Err(e) => Err(e),
            }
        })
        .await
    }
    /// All of the blob or `range` of it (a seek, then only those bytes).
    async fn open_blob(
        &self,
        reference: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        let Some(path) = self.blob_path(reference) else {
            return Ok(None);
        };
        // A larger blob found open here goes on to the blocking pool as it is, not opened again.
        let mut opened_here = None;
        if self.inline_small_reads {
            match self.read_small_now(&path, reference, range.as_ref())? {
                Small::Missing => return Ok(None),
                Small::Read(bytes) => return Ok(Some(crate::blob::chunked(bytes))),
                Small::Large(file, size) => opened_here = Some((file, size)),
            }
        }
        let (path_for_open, reference) = (path.clone(), reference.to_owned());
        let this = self.clone();
        let opened = blocking(move || {
            let (mut file, size) = match opened_here {
                Some(opened) => opened,
                None => {
                    if !this.existing_work_dir("blobs")? {
                        return Ok(None);
                    }
                    match open_regular_with_meta(&path_for_open, false) {
                        Ok(Some((f, meta))) => (f, meta.len()),
                        Ok(None) => return Ok(None),
                        Err(e) => return Err(Error::io("open blob", &path_for_open, e)),
                    }
                }
            };
            // The size the open's fstat saw bounds the read: a blob is published by rename and never
            // written in place, so the stream ends there without a last trip to find the end.
            let span = match range {
                None => 0..size,
                Some(range) => {
                    let span = range.resolve(&reference, size)?;
                    file.seek(SeekFrom::Start(span.start))
                        .map_err(|e| Error::io("seek blob", &path_for_open, e))?;
                    span
                }
            };
            // The first chunk comes with the open, in one trip to the blocking pool; the rest is read
            // ahead. (A shorter first chunk, the rest read ahead, gained a verified 1 MiB read 2 % and
            // cost an unverified one a third: not kept. Blobs of up to a chunk are now read inline.)
            crate::blob::next_chunk(file, span.end - span.start, "read blob", &path_for_open)
                .map(Some)
        })
        .await?;
        let Some((first, rest)) = opened else {
            return Ok(None);
        };
        let tail = crate::blob::read_ahead(rest, "read blob", path);
        let head = (!first.is_empty()).then_some(Ok(first));
        Ok(Some(futures::stream::iter(head).chain(tail).boxed()))
    }
}

/// What [`FsCache::read_small_now`] found.
enum Small {
    Missing,
    Read(Bytes),
    /// Too large to read here: the file, open, and its size.
    Large(File, u64),
}

/// Blobs up to this size (one chunk) are read on the calling thread when `inline_small_reads` is on: a
/// read from the page cache is shorter than the hop to the blocking pool, and one from disk no longer
/// than hashing the chunk, which the engine does on this thread anyway. Larger blobs stream from the
/// blocking pool, a chunk read ahead.
const INLINE_READ_MAX: u64 = crate::store::MAX_READ_CHUNK as u64;

impl FsCache {
    /// A blob of at most [`INLINE_READ_MAX`] bytes (or `range` of it) read on the calling thread (see
    /// there), as rows are.
    fn read_small_now(
        &self,
        path: &Path,
        reference: &str,
        range: Option<&ByteRange>,
    ) -> Result<Small> {
        if !self.existing_work_dir("blobs")? {
            return Ok(Small::Missing);
        }
        let Some((mut file, meta)) =
            open_regular_with_meta(path, false).map_err(|e| Error::io("open blob", path, e))?
        else {
            return Ok(Small::Missing);
        };
        if meta.len() > INLINE_READ_MAX {
            return Ok(Small::Large(file, meta.len()));
        }
        let bytes = crate::blob::read_chunk(&mut file, meta.len() as usize)
            .map_err(|e| Error::io("read blob", path, e))?;
        Ok(Small::Read(match range {
            None => bytes,
            Some(range) => {
                let span = range.resolve(reference, bytes.len() as u64)?;
                bytes.slice(span.start as usize..span.end as usize)
            }
        }))
    }

    /// Every row file, decoded into a listing entry or, if it cannot be, into a corrupt entry.
    fn scan_rows(&self) -> Result<(Vec<RowEntry>, Vec<CorruptEntry>)> {
        let (mut rows, mut corrupt) = (Vec::new(), Vec::new());
        for (dir, task) in self.task_dirs(&mut corrupt)? {
            let task = task.unwrap_or_else(|| "?".into());
            for path in self.row_files(&dir, &mut corrupt)? {
                let fp = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                let (bytes, size) = match read_row_file(&path) {
                    Ok(Some(read)) => read,
                    Ok(None) => continue, // removed meanwhile
                    // Replaced by something that is not a regular file since the listing.
                    Err(_) if fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) => {
                        corrupt
                            .push(self.foreign(&path, fs::symlink_metadata(&path).ok().as_ref()));
                        continue;
                    }
                    Err(e) => return Err(Error::io("read row", &path, e)),
                };
                let row =
                    match decode_row_of_size(&bytes, size, &task, fp.as_deref().unwrap_or("?")) {
                        Ok(row) => row,
                        Err(Error::CorruptRow { reason, .. }) => {
                            let id = path.strip_prefix(&self.root).unwrap_or(&path);
                            corrupt.push(CorruptEntry {
                                id: id.to_string_lossy().into_owned(),
                                reason,
                                size,
                                kind: corrupt_kind(&bytes),
                            });
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                rows.push(RowEntry {
                    refs: refs_in(&row.output)
                        .into_iter()
                        .map(|r| r.reference)
                        .collect(),
                    key: row.key,
                    created_at: row.created_at,
                    size: row.size,
                    // The row file's mtime: set at commit, moved forward by touch_rows.
                    last_access: fs::symlink_metadata(&path).and_then(|m| m.modified()).ok(),
                    version: None,
                });
            }
        }
        Ok((rows, corrupt))
    }

    /// Published blobs and temps; anything else in `blobs/` and `tmp/` (links, FIFOs, directories, or
    /// the directories themselves if they are links) is listed as [`BlobState::Foreign`].
    fn list_blob_files(&self) -> Result<Vec<BlobEntry>> {
        let mut out = Vec::new();
        let foreign = |path: &Path, meta: Option<&fs::Metadata>| BlobEntry {
            id: path
                .strip_prefix(&self.root)
                .unwrap_or(path)
                .to_string_lossy()
                .into_owned(),
            state: BlobState::Foreign,
            size: meta.map_or(0, fs::Metadata::len),
            modified: meta.map_or(UNIX_EPOCH, modified),
        };
        for (dir, state) in [("blobs", BlobState::Published), ("tmp", BlobState::Temp)] {
            let dir = self.root.join(dir);
            match real_dir(&dir) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => continue,
                Err(_) => {
                    out.push(foreign(&dir, fs::symlink_metadata(&dir).ok().as_ref()));
                    continue;
                }
            }
            if state == BlobState::Temp {
                out.extend(crate::layout::scratch_dirs(&dir));
            }
            for entry in read_dir(&dir)? {
                // DirEntry::metadata does not follow links.
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir()
                    && crate::layout::is_scratch_name(&entry.file_name().to_string_lossy())
                {
                    continue; // listed above
                }
                if !meta.is_file() {
                    out.push(foreign(&entry.path(), Some(&meta)));
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                // A file not named as this backend names its blobs and temps is someone else's:
                // reported, never swept as an orphan or a stale temp.
                let (id, ours) = match state {
                    BlobState::Published => {
                        let id = format!("{REF_PREFIX}{name}");
                        let ours = parse_ref_name(&id, REF_PREFIX, REF_SUFFIX)
                            .is_some_and(crate::layout::is_blob_name);
                        (id, ours)
                    }
                    _ => {
                        let ours = crate::layout::is_temp_file_name(&name);
                        (name, ours)
                    }
                };
                if !ours {
                    out.push(foreign(&entry.path(), Some(&meta)));
                    continue;
                }
                out.push(BlobEntry {
                    id,
                    state,
                    size: meta.len(),
                    modified: modified(&meta),
                });
            }
        }
        Ok(out)
    }
}
