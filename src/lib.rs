//! # outcache
//!
//! A storage engine for the **outputs of cacheable tasks**: pipeline steps, build actions, AI
//! generations. A task's output is a JSON value stored as a *row* keyed by the task type and the
//! fingerprint of its inputs; large binary outputs are *streamed* into a sidecar *blob* and the row holds a
//! branded [`CacheRef`] instead of the bytes.
//!
//! ## API layout
//! - [`Cache`] — the engine applications use: `put` / `get` rows, `put_stream` binary outputs,
//!   `open_stream` / `read` blobs (verified against their SHA-256), `open_range`, `resolve` refs inside a
//!   value, and `writer` for producers that push bytes (with a high-water mark).
//! - [`OutputCache`] — the object-safe storage trait every backend implements, with optional blob
//!   capabilities advertised in [`Capabilities`].
//! - [`backends`] — `memory` (always), `fs`, `sqlite` and `object` (S3 and other object stores), each
//!   behind its feature, and the run-private wrapper [`RunPrivate`].
//! - [`wire`] — the stable formats: canonical fingerprints, [`CacheRef`], the inline binary envelope.
//! - [`config`] — cache URLs (`fs://`, `sqlite://`, `s3://`, `memory://`), the TOML config file, the
//!   redaction rule, and the embedded default.
//! - [`janitor`] — pruning by age, orphans (with the ownership rule and race rules), size budget; stats.
//! - [`metrics`] — the engine's counters ([`Cache::metrics`]).
//! - `conformance` (feature `conformance`) — the suite every backend passes, for backend authors; see
//!   `WRITING_A_BACKEND.md` for the guide.
//!
//! ## Example
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> outcache::Result<()> {
//! use outcache::{Cache, BlobOptions};
//! use serde_json::json;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let cache = Cache::open(&format!("fs://{}", dir.path().display()))?;
//! let inputs = json!({"prompt": "a cat", "size": 512});
//! cache.put("image/describe", &inputs, &json!({"text": "a cat"})).await?;
//! assert_eq!(cache.get("image/describe", &json!({"size": 512, "prompt": "a cat"})).await?,
//!            Some(json!({"text": "a cat"})));
//!
//! // A binary output: streamed into a blob (or inline when small).
//! let bytes = bytes::Bytes::from(vec![7u8; 100_000]);
//! let chunks = futures::stream::iter([Ok(bytes.clone())]);
//! let stored = cache.put_stream("image/render", &inputs, Box::pin(chunks), BlobOptions::default()).await?;
//! let r = outcache::CacheRef::from_value(&stored).expect("100 kB is above the 64 KiB threshold");
//! assert_eq!(cache.read(&r).await?, Some(bytes));
//! # Ok(()) }
//! ```
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
// Nothing reachable from disk data, the network or the command line may panic: every remaining
// `expect` carries an `allow` with the invariant that makes it unreachable.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bench;
pub mod blob;
pub mod config;
pub mod engine;
pub mod error;
pub mod janitor;
pub mod layout;
pub mod metrics;
pub mod options;
#[cfg(feature = "serve")]
pub mod serve;
pub mod store;
pub mod wire;
pub mod writer;

#[path = "../backends/mod.rs"]
pub mod backends;

#[cfg(feature = "conformance")]
#[path = "../conformance/mod.rs"]
pub mod conformance;

/// The attribute to implement [`OutputCache`] with (`#[outcache::async_trait]`), re-exported so a backend
/// crate needs no dependency of its own for it.
pub use async_trait::async_trait;
pub use backends::run_private::RunPrivate;
pub use engine::{BlobOptions, Cache, CacheOptions};
pub use error::{Error, Result};
pub use metrics::Metrics;
pub use store::{
    BlobEntry, BlobMeta, BlobStat, BlobState, ByteRange, ByteStream, Capabilities, CorruptEntry,
    CorruptKind, ListedBlobs, OutputCache, OutputCacheExt, Row, RowEntry, RowScan, RowVersion,
};
pub use wire::{CacheRef, InlineBinary, RowKey, fingerprint};

#[doc(hidden)]
#[cfg(feature = "conformance")]
pub mod __private {
    //! What `conformance_tests!` expands to, reached through this crate so its callers need nothing else.
    pub use tokio;
}
pub use writer::{BlobWriter, WriterAbortHandle};
