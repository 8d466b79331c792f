//! Test-only wrappers over the real memory backend: one that offers only the row store (to exercise
//! capability gating and the engine's inline fallback), and deliberately broken ones that prove the
//! conformance suite catches the bugs it names.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use outcache::backends::memory::MemoryCache;
use outcache::{
    BlobEntry, BlobMeta, ByteStream, CacheRef, Capabilities, OutputCache, Result, Row, RowKey,
};
use serde_json::Value;

/// The value of `var`, naming a test server or client that the scripts under `scripts/` export (the test
/// command runs them). Without it:
/// `None` outside CI (the caller skips and says so), a failure under `CI=true`, where a missing server
/// must not pass as a skip.
pub fn server_env(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) => Some(value),
        Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "CI=true but {var} is not set: scripts/test.sh sets it (scripts/s3-server.sh, azurite.sh, clients.sh)"
            )
        }
        Err(_) => {
            eprintln!("SKIPPED: {var} is not set (scripts/test.sh sets it; see scripts/)");
            None
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server the test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An `s3://bucket/prefix?options` URL with `child` appended to its key prefix.
pub fn s3_child(url: &str, child: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    format!("{}/{child}?{query}", base.trim_end_matches('/'))
}

/// Run the `outcache` binary on cache `url` with `args`, feeding `stdin` if given; `OUTCACHE_URL` and
/// `OUTCACHE_CONFIG` from the test's environment are not passed on.
pub fn outcache(url: &str, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_outcache"))
        .arg("--url")
        .arg(url)
        .args(args)
        .env_remove("OUTCACHE_URL")
        .env_remove("OUTCACHE_CONFIG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run outcache");
    if let Some(input) = stdin {
        // A command that fails early closes its stdin; the test reads its exit status instead.
        let _ = child.stdin.take().expect("piped").write_all(input);
    }
    child.wait_with_output().expect("wait for outcache")
}

/// The memory backend with every blob capability withheld: the trait's default bodies answer
/// `Unsupported`.
#[derive(Debug, Default)]
pub struct RowsOnly(MemoryCache);

impl std::fmt::Display for RowsOnly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("rows-only(memory)")
    }
}

#[async_trait]
impl OutputCache for RowsOnly {
    fn capabilities(&self) -> Capabilities {
        Capabilities::ROWS_ONLY
    }
    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        self.0.save_row(key, output).await
    }
    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        self.0.get_row(key).await
    }
    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        self.0.delete_rows(keys).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.0.delete_prefix(prefix).await
    }
    async fn scan_rows(&self) -> Result<outcache::RowScan> {
        self.0.scan_rows().await
    }
    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        self.0.remove_corrupt(id).await
    }
    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        self.0.list_blobs().await
    }
    async fn remove_temp(&self, id: &str) -> Result<bool> {
        self.0.remove_temp(id).await
    }
}

/// One deliberate bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// Claims no blob capabilities but serves them anyway.
    LiesAboutCapabilities,
    /// Saves a row only if none exists (first writer wins).
    FirstWriterWins,
    /// Ignores the prefix and deletes every row.
    PrefixDeletesAll,
    /// Normalises `./` and `../` out of refs before resolving them.
    ResolvesDotSegments,
    /// Publishes what it received so far when the producer's stream fails.
    PublishesPartialBlobs,
    /// Loses the last chunk of every stream.
    DropsLastChunk,
    /// Keeps every chunk it was handed until the write ends (no bounded memory).
    HoardsChunks,
    /// Never lists a temp (a write in flight, or the remains of a dead one), though it claims everything.
    HidesTemps,
    /// Leaves a temp behind in its storage when a write fails, and leaves it out of its listing.
    LeaksHiddenTemps,
    /// Lists every entry of its storage as a blob, its own or someone else's (`Broken::storage_neighbours`),
    /// so the janitor sweeps other people's files as orphans.
    ListsForeignEntries,
}

/// The memory backend with one [`Bug`].
#[derive(Debug)]
pub struct Broken {
    inner: Arc<MemoryCache>,
    bug: Bug,
    /// What `LeaksHiddenTemps` left in its "storage" (seen only through the fixture's probe).
    pub leaked: Arc<std::sync::Mutex<Vec<String>>>,
    /// Entries someone else keeps in its "storage" (planted by a fixture's neighbours).
    pub storage_neighbours: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl Broken {
    pub fn new(bug: Bug) -> Self {
        Broken {
            inner: Arc::new(MemoryCache::new()),
            bug,
            leaked: Arc::default(),
            storage_neighbours: Arc::default(),
        }
    }

    fn fix_ref(&self, reference: &str) -> String {
        if self.bug == Bug::ResolvesDotSegments {
            reference.replace("../", "").replace("./", "")
        } else {
            reference.to_owned()
        }
    }
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "broken({:?})", self.bug)
    }
}

#[async_trait]
impl OutputCache for Broken {
    fn capabilities(&self) -> Capabilities {
        match self.bug {
            Bug::LiesAboutCapabilities => Capabilities::ROWS_ONLY,
            _ => Capabilities::ALL,
        }
    }
    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        if self.bug == Bug::FirstWriterWins && self.inner.get_row(key).await?.is_some() {
            return Ok(());
        }
        self.inner.save_row(key, output).await
    }
    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        self.inner.get_row(key).await
    }
    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        self.inner.delete_rows(keys).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let prefix = if self.bug == Bug::PrefixDeletesAll {
            ""
        } else {
            prefix
        };
        self.inner.delete_prefix(prefix).await
    }
    async fn scan_rows(&self) -> Result<outcache::RowScan> {
        self.inner.scan_rows().await
    }
    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        self.inner.remove_corrupt(id).await
    }
    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        let mut all = self.inner.list_blobs().await?;
        if self.bug == Bug::ListsForeignEntries {
            let neighbours = self.storage_neighbours.lock().unwrap();
            all.extend(neighbours.iter().map(|name| BlobEntry {
                id: format!("memory://blobs/{name}"),
                state: outcache::BlobState::Published,
                size: 1,
                modified: SystemTime::UNIX_EPOCH,
            }));
        }
        Ok(if self.bug == Bug::HidesTemps {
            all.into_iter()
                .filter(|b| b.state != outcache::BlobState::Temp)
                .collect()
        } else {
            all
        })
    }
    async fn remove_temp(&self, id: &str) -> Result<bool> {
        self.inner.remove_temp(id).await
    }
    async fn write_blob(&self, meta: &BlobMeta, mut data: ByteStream) -> Result<CacheRef> {
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut failure = None;
        while let Some(chunk) = data.next().await {
            match chunk {
                Ok(c) => chunks.push(c),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        match (self.bug, failure) {
            (Bug::PublishesPartialBlobs, Some(e)) => {
                let partial = futures::stream::iter(chunks.into_iter().map(Ok)).boxed();
                self.inner.write_blob(meta, partial).await?;
                Err(e)
            }
            (Bug::LeaksHiddenTemps, Some(e)) => {
                let mut leaked = self.leaked.lock().unwrap();
                let n = leaked.len();
                leaked.push(format!("tmp/blob-{n}.tmp"));
                Err(e)
            }
            (_, Some(e)) => Err(e),
            (bug, None) => {
                if bug == Bug::DropsLastChunk {
                    chunks.pop();
                }
                self.inner
                    .write_blob(
                        meta,
                        futures::stream::iter(chunks.into_iter().map(Ok)).boxed(),
                    )
                    .await
            }
        }
    }
    async fn touch_rows(&self, keys: &[RowKey], at: SystemTime) -> Result<()> {
        self.inner.touch_rows(keys, at).await
    }
    async fn read_blob(&self, reference: &str) -> Result<Option<Bytes>> {
        self.inner.read_blob(&self.fix_ref(reference)).await
    }
    async fn open_blob(
        &self,
        reference: &str,
        range: Option<outcache::ByteRange>,
    ) -> Result<Option<ByteStream>> {
        self.inner.open_blob(&self.fix_ref(reference), range).await
    }
    async fn delete_blob(&self, reference: &str) -> Result<()> {
        if let Some(name) = reference.strip_prefix("memory://blobs/") {
            self.storage_neighbours.lock().unwrap().remove(name);
        }
        self.inner.delete_blob(&self.fix_ref(reference)).await
    }
}

/// How [`Sink`] treats the streams handed to `write_blob`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkMode {
    /// Takes each chunk only after a pause (a slow disk or network).
    Slow(std::time::Duration),
    /// Never takes a chunk (a hung backend).
    Stall,
    /// Fails at once, before taking any chunk.
    FailFast,
}

/// The memory backend behind a sink that is slow, stalled or failing.
#[derive(Debug)]
pub struct Sink {
    inner: MemoryCache,
    mode: SinkMode,
}

impl Sink {
    pub fn new(mode: SinkMode) -> Self {
        Sink {
            inner: MemoryCache::new(),
            mode,
        }
    }
}

impl std::fmt::Display for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sink({:?})", self.mode)
    }
}

#[async_trait]
impl OutputCache for Sink {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        self.inner.save_row(key, output).await
    }
    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        self.inner.get_row(key).await
    }
    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        self.inner.delete_rows(keys).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.inner.delete_prefix(prefix).await
    }
    async fn scan_rows(&self) -> Result<outcache::RowScan> {
        self.inner.scan_rows().await
    }
    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        self.inner.remove_corrupt(id).await
    }
    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        self.inner.list_blobs().await
    }
    async fn remove_temp(&self, id: &str) -> Result<bool> {
        self.inner.remove_temp(id).await
    }
    async fn write_blob(&self, meta: &BlobMeta, data: ByteStream) -> Result<CacheRef> {
        match self.mode {
            SinkMode::Slow(pause) => {
                let slowed = data
                    .then(move |chunk| async move {
                        tokio::time::sleep(pause).await;
                        chunk
                    })
                    .boxed();
                self.inner.write_blob(meta, slowed).await
            }
            SinkMode::Stall => futures::future::pending().await,
            SinkMode::FailFast => Err(outcache::Error::Backend {
                backend: self.to_string(),
                context: "write blob".into(),
                source: "injected sink failure".into(),
            }),
        }
    }
    async fn touch_rows(&self, keys: &[RowKey], at: SystemTime) -> Result<()> {
        self.inner.touch_rows(keys, at).await
    }
    async fn read_blob(&self, reference: &str) -> Result<Option<Bytes>> {
        self.inner.read_blob(reference).await
    }
    async fn open_blob(
        &self,
        reference: &str,
        range: Option<outcache::ByteRange>,
    ) -> Result<Option<ByteStream>> {
        self.inner.open_blob(reference, range).await
    }
    async fn delete_blob(&self, reference: &str) -> Result<()> {
        self.inner.delete_blob(reference).await
    }
}

/// A rows-only backend that claims the capabilities it is given (to test how claims are checked).
#[derive(Debug)]
pub struct Claims(pub Capabilities, pub RowsOnly);

impl Claims {
    pub fn new(claimed: Capabilities) -> Self {
        Claims(claimed, RowsOnly::default())
    }
}

impl std::fmt::Display for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "claims({:?})", self.0)
    }
}

#[async_trait]
impl OutputCache for Claims {
    fn capabilities(&self) -> Capabilities {
        self.0
    }
    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        self.1.save_row(key, output).await
    }
    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        self.1.get_row(key).await
    }
    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        self.1.delete_rows(keys).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.1.delete_prefix(prefix).await
    }
    async fn scan_rows(&self) -> Result<outcache::RowScan> {
        self.1.scan_rows().await
    }
    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        self.1.remove_corrupt(id).await
    }
    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        self.1.list_blobs().await
    }
    async fn remove_temp(&self, id: &str) -> Result<bool> {
        self.1.remove_temp(id).await
    }
}

/// A wrapper that forwards every method but one (`delete_blob`, which falls back to the trait's default):
/// the despecialisation `#[deny(clippy::missing_trait_methods)]` guards the real wrappers against.
#[derive(Debug, Default)]
pub struct ForgetfulWrapper(MemoryCache);

impl std::fmt::Display for ForgetfulWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "forgetful({})", self.0)
    }
}

#[async_trait]
impl OutputCache for ForgetfulWrapper {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn save_row(&self, key: &RowKey, output: &Value) -> Result<()> {
        self.0.save_row(key, output).await
    }
    async fn get_row(&self, key: &RowKey) -> Result<Option<Row>> {
        self.0.get_row(key).await
    }
    async fn delete_rows(&self, keys: &[RowKey]) -> Result<u64> {
        self.0.delete_rows(keys).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.0.delete_prefix(prefix).await
    }
    async fn scan_rows(&self) -> Result<outcache::RowScan> {
        self.0.scan_rows().await
    }
    async fn remove_corrupt(&self, id: &str) -> Result<bool> {
        self.0.remove_corrupt(id).await
    }
    async fn list_blobs(&self) -> Result<Vec<BlobEntry>> {
        self.0.list_blobs().await
    }
    async fn remove_temp(&self, id: &str) -> Result<bool> {
        self.0.remove_temp(id).await
    }
    async fn write_blob(&self, meta: &BlobMeta, data: ByteStream) -> Result<CacheRef> {
        self.0.write_blob(meta, data).await
    }
    async fn stat_blob(&self, reference: &str) -> Result<Option<outcache::BlobStat>> {
        self.0.stat_blob(reference).await
    }
    async fn read_blob(&self, reference: &str) -> Result<Option<Bytes>> {
        self.0.read_blob(reference).await
    }
    async fn open_blob(
        &self,
        reference: &str,
        range: Option<outcache::ByteRange>,
    ) -> Result<Option<ByteStream>> {
        self.0.open_blob(reference, range).await
    }
    async fn touch_rows(&self, keys: &[RowKey], at: SystemTime) -> Result<()> {
        self.0.touch_rows(keys, at).await
    }
}

/// The one file in `dir` (a task's row directory in a test cache).
pub fn only_file_in(dir: &std::path::Path) -> std::path::PathBuf {
    let mut entries = std::fs::read_dir(dir).unwrap();
    let first = entries.next().unwrap().unwrap().path();
    assert!(
        entries.next().is_none(),
        "more than one file in {}",
        dir.display()
    );
    first
}
