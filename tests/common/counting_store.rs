//! An `ObjectStore` wrapper that counts the requests a command makes (GET, HEAD, PUT, LIST calls,
//! objects deleted and bulk-delete calls), so a test or bench can say how many reads a command cost.
//! Shared by `tests/object_requests.rs` and `benches/prune.rs`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// Requests counted so far.
#[derive(Debug, Default)]
pub struct Requests {
    pub gets: AtomicU64,
    pub heads: AtomicU64,
    pub puts: AtomicU64,
    pub lists: AtomicU64,
    pub deleted: AtomicU64,
    pub delete_calls: AtomicU64,
    /// The prefix of every listing asked for, in order.
    pub listed: std::sync::Mutex<Vec<String>>,
}

/// A snapshot of [`Requests`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub gets: u64,
    pub heads: u64,
    pub puts: u64,
    pub lists: u64,
    pub deleted: u64,
    pub delete_calls: u64,
}

impl Requests {
    fn note_listing(&self, prefix: Option<&Path>) {
        let prefix = prefix.map_or_else(String::new, |p| p.to_string());
        self.listed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(prefix);
    }

    /// The prefixes listed since the last call.
    pub fn take_listed(&self) -> Vec<String> {
        std::mem::take(&mut *self.listed.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn take(&self) -> Counts {
        let take = |c: &AtomicU64| c.swap(0, Ordering::SeqCst);
        Counts {
            gets: take(&self.gets),
            heads: take(&self.heads),
            puts: take(&self.puts),
            lists: take(&self.lists),
            deleted: take(&self.deleted),
            delete_calls: take(&self.delete_calls),
        }
    }
}

/// `inner` with every request counted in `requests`.
#[derive(Debug)]
pub struct CountingStore {
    pub inner: Arc<dyn ObjectStore>,
    pub requests: Arc<Requests>,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        CountingStore {
            inner,
            requests: Arc::default(),
        }
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "counting({})", self.inner)
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::SeqCst);
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        bump(&self.requests.puts);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        bump(&self.requests.puts);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if options.head {
            bump(&self.requests.heads);
        } else {
            bump(&self.requests.gets);
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        bump(&self.requests.delete_calls);
        let requests = self.requests.clone();
        let counted = locations
            .inspect(move |p| {
                if p.is_ok() {
                    bump(&requests.deleted);
                }
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        bump(&self.requests.lists);
        self.requests.note_listing(prefix);
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        bump(&self.requests.lists);
        self.requests.note_listing(prefix);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        bump(&self.requests.lists);
        self.requests.note_listing(prefix);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
