//! Pieces every blob-storing backend shares: the running digest that turns a streamed write into a
//! [`CacheRef`] with `size` and `sha256`, splitting bytes into bounded read chunks, reading a file as a
//! stream (the fs backend's blobs, the CLI's `put-blob` input), and the cascade that deletes the blobs a
//! removed row referenced.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::{BlobMeta, ByteStream, MAX_READ_CHUNK, OutputCache};
use crate::wire::{CacheRef, RowKey, hex, refs_in};

/// Size and SHA-256 of a blob, computed while its chunks stream past.
#[derive(Clone, Debug, Default)]
pub struct BlobDigest {
    hasher: Sha256,
    size: u64,
}

impl BlobDigest {
    /// A digest of nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Account for the next chunk.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
    }

    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The lowercase hex SHA-256 of everything seen.
    pub fn sha256_hex(self) -> String {
        hex(&self.hasher.finalize())
    }

    /// The CacheRef for a blob published as `reference` with these bytes and `meta`'s mime and port.
    pub fn into_ref(self, reference: String, meta: &BlobMeta) -> CacheRef {
        let size = self.size;
        let mut r = CacheRef::new(reference);
        r.size = Some(size);
        r.sha256 = Some(self.sha256_hex());
        r.mime = meta.mime.clone();
        r.port = meta.port.clone();
        r
    }
}

/// A stream over `bytes` in chunks of at most [`MAX_READ_CHUNK`] (zero-copy slices).
pub fn chunked(bytes: Bytes) -> ByteStream {
    let chunks: Vec<Result<Bytes>> = (0..bytes.len())
        .step_by(MAX_READ_CHUNK)
        .map(|start| Ok(bytes.slice(start..(start + MAX_READ_CHUNK).min(bytes.len()))))
        .collect();
    futures::stream::iter(chunks).boxed()
}

/// Collect a whole stream into one buffer (it lives with the trait, whose `read_blob` uses it).
pub use crate::store::collect;

/// A stream over everything `reader` yields, in chunks of up to `chunk` bytes. Read errors become
/// [`Error::Stream`].
pub fn reader_stream<R>(reader: R, chunk: usize) -> ByteStream
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    use tokio::io::AsyncReadExt;
    let chunk = chunk.max(1);
    futures::stream::try_unfold(reader, move |mut reader| async move {
        let mut buf = bytes::BytesMut::with_capacity(chunk);
        while buf.len() < chunk {
            if reader.read_buf(&mut buf).await.map_err(Error::stream)? == 0 {
                break;
            }
        }
        Ok((!buf.is_empty()).then(|| (buf.freeze(), reader)))
    })
    .boxed()
}

/// The next chunk of an open file (at most [`MAX_READ_CHUNK`], at most `remaining` bytes) and, if more
/// may follow, the file and what is left. Blocking: call it off the runtime. `op` and `path` name the
/// file in an error.
pub(crate) fn next_chunk(
    mut file: File,
    remaining: u64,
    op: &'static str,
    path: &Path,
) -> Result<(Bytes, Option<(File, u64)>)> {
    if remaining == 0 {
        return Ok((Bytes::new(), None));
    }
    let want = remaining.min(MAX_READ_CHUNK as u64) as usize;
    let chunk = read_chunk(&mut file, want).map_err(|e| Error::io(op, path, e))?;
    let rest =
        (chunk.len() == want && remaining > want as u64).then(|| (file, remaining - want as u64));
    Ok((chunk, rest))
}

/// The rest of a file as a stream, `state` being the file and the bytes left to read (`u64::MAX`: to its
/// end), read on the blocking pool **one chunk ahead**: the next chunk is read while the caller is busy
/// with this one (hashing it, sending it), so a verified read costs about the hashing alone. The first
/// read starts at once. Dropping the stream drops the read ahead and, with it, the file.
pub fn read_ahead(state: Option<(File, u64)>, op: &'static str, path: PathBuf) -> ByteStream {
    let start = move |state: Option<(File, u64)>, path: PathBuf| {
        state.map(|(file, left)| {
            tokio::task::spawn_blocking(move || next_chunk(file, left, op, &path))
        })
    };
    let first = start(state, path.clone());
    futures::stream::try_unfold(first, move |ahead| {
        let path = path.clone();
        async move {
            let Some(reading) = ahead else {
                return Ok(None);
            };
            let (chunk, next) = reading
                .await
                .unwrap_or_else(|e| Err(Error::stream(format!("blocking read failed: {e}"))))?;
            let following = start(next, path);
            Ok((!chunk.is_empty()).then_some((chunk, following)))
        }
    })
    .boxed()
}

/// Read buffers kept for reuse. A chunk handed out shares its buffer's allocation; the next read that
/// takes the buffer reclaims the allocation once the caller has dropped that chunk, so a stream of
/// chunks reads into memory already faulted in instead of fresh pages (which cost as much as the read).
static READ_BUFFERS: std::sync::Mutex<Vec<BytesMut>> = std::sync::Mutex::new(Vec::new());
/// Buffers kept: memory held between reads stays at a few MiB whatever the load.
const KEPT_READ_BUFFERS: usize = 8;

/// Chunks shorter than this get a buffer of their own size: a chunk keeps its whole buffer alive, and a
/// caller holding short chunks (a blob's last) must not pin a pooled 1 MiB for each.
const POOLED_READ_MIN: usize = MAX_READ_CHUNK / 2;

/// Up to `len` bytes from `file`, fewer only at its end (a single read may return less than asked).
/// Chunk-sized reads use the pooled buffers; shorter and longer ones (a row, a whole blob) get a
/// buffer of their own, so the pool never keeps more than a chunk per buffer.
pub(crate) fn read_chunk(file: &mut File, len: usize) -> io::Result<Bytes> {
    if !(POOLED_READ_MIN..=MAX_READ_CHUNK).contains(&len) {
        let mut buf = BytesMut::with_capacity(len);
        fill(file, &mut buf, len)?;
        return Ok(buf.freeze());
    }
    let pool = || READ_BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
    let mut buf = pool().pop().unwrap_or_default();
    buf.clear();
    buf.reserve(len); // reuses the allocation if no chunk read into it is still alive
    let filled = fill(file, &mut buf, len);
    let chunk = buf.split().freeze();
    let mut kept = pool();
    if kept.len() < KEPT_READ_BUFFERS {
        kept.push(buf);
    }
    filled.map(|()| chunk)
}

/// Append up to `len` bytes from `file` to `buf` (which has room for them), stopping early only at the
/// end of the file.
fn fill(file: &mut File, buf: &mut BytesMut, len: usize) -> io::Result<()> {
    let end = buf.len() + len;
    while buf.len() < end {
        let want = end - buf.len();
        match read_uninit(file, &mut buf.spare_capacity_mut()[..want]) {
            Ok(0) => break,
            // SAFETY: `read_uninit` initialised the first `n` bytes of the spare capacity.
            Ok(n) => unsafe { buf.set_len(buf.len() + n) },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `read(2)` into memory not yet initialised: the kernel writes the bytes, so nothing need be zeroed
/// first (zeroing a 1 MiB chunk cost a tenth of a verified read). Returns how many bytes it wrote.
#[cfg(target_os = "linux")]
fn read_uninit(file: &File, spare: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `spare` is valid for writes of `spare.len()` bytes, and read(2) writes at most that many.
    let n = unsafe { libc::read(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(not(target_os = "linux"))]
fn read_uninit(mut file: &File, spare: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
    use std::io::Read;
    // Zero, then read: std has no portable read into uninitialised memory.
    for b in spare.iter_mut() {
        b.write(0);
    }
    // SAFETY: every byte was just initialised.
    let init = unsafe { &mut *(spare as *mut [std::mem::MaybeUninit<u8>] as *mut [u8]) };
    file.read(init)
}

/// Delete the blobs that the removed row `key` owned among the refs its `output` held: only those written
/// for `key` (the ownership rule, [`crate::wire::ref_owned_by`]); refs it merely cited are left to the
/// orphan sweep. Refs of other backends never resolve, so deleting them does nothing; a backend without
/// ref delete keeps its blobs (the janitor finds them).
pub async fn cascade_delete(backend: &dyn OutputCache, key: &RowKey, output: &Value) -> Result<()> {
    if !backend.capabilities().delete_blob {
        return Ok(());
    }
    let mut done = std::collections::HashSet::new();
    for r in refs_in(output) {
        if !backend.owns_ref(key, &r.reference) || !done.insert(r.reference.clone()) {
            continue;
        }
        match backend.delete_blob(&r.reference).await {
            Ok(()) | Err(Error::Unsupported { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes in flight in this process, for a backend whose store cannot list its unfinished writes (object
/// stores cannot list multipart uploads): each write registers here while it runs, and the backend lists
/// the entries as temps, so in-flight work is visible to `stats` and the janitor like everywhere else.
/// Removing one only hides it (a live future owns the write; its own guard cleans up).
#[derive(Clone, Debug, Default)]
pub struct InFlight(
    std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, (u64, std::time::SystemTime)>>,
    >,
);

impl InFlight {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (u64, std::time::SystemTime)>>
    {
        // Every update is one insert or remove: a poisoned lock is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register the write `id`; it stays listed until the returned guard is dropped.
    pub fn start(&self, id: &str) -> InFlightWrite {
        self.lock()
            .insert(id.to_owned(), (0, std::time::SystemTime::now()));
        InFlightWrite {
            registry: self.clone(),
            id: id.to_owned(),
        }
    }

    /// The writes in flight, as temp entries.
    pub fn entries(&self) -> Vec<crate::store::BlobEntry> {
        self.lock()
            .iter()
            .map(|(id, (size, modified))| crate::store::BlobEntry {
                id: id.clone(),
                state: crate::store::BlobState::Temp,
                size: *size,
                modified: *modified,
            })
            .collect()
    }

    /// Stop listing `id`. Returns whether it was listed.
    pub fn forget(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }
}

/// One registered write in flight (see [`InFlight`]); unlisted when dropped.
#[derive(Debug)]
pub struct InFlightWrite {
    registry: InFlight,
    id: String,
}

impl InFlightWrite {
    /// Record `n` more bytes taken in (and that the write is alive now).
    pub fn advance(&self, n: u64) {
        if let Some(entry) = self.registry.lock().get_mut(&self.id) {
            *entry = (entry.0 + n, std::time::SystemTime::now());
        }
    }
}

impl Drop for InFlightWrite {
    fn drop(&mut self) {
        self.registry.forget(&self.id);
    }
}

/// Reads `stream` to its end, keeping nothing: its error if it fails (a verified stream fails at its
/// end when the bytes do not hash to their ref).
pub(crate) async fn drain(stream: ByteStream) -> Result<()> {
    use futures::TryStreamExt as _;
    stream.try_for_each(|_| futures::future::ok(())).await
}
