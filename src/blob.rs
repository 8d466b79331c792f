//! Pieces every blob-storing backend shares: the running digest that turns a streamed write into a
//! [`CacheRef`] with `size` and `sha256`, splitting bytes into bounded read chunks, and the cascade that
//! deletes the blobs a removed row referenced.

use bytes::Bytes;
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
