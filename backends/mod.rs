//! The storage backends, one module each, behind Cargo features where they pull in dependencies.
//! Each implements [`crate::OutputCache`] and passes the conformance suite.

#[cfg(feature = "fs")]
pub mod fs;
pub mod memory;
#[cfg(feature = "object-store")]
pub mod object;
pub mod run_private;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::sync::Arc;

use crate::config::Location;
use crate::error::Result;
use crate::store::OutputCache;

/// **The backend factory**: open the backend a parsed cache URL names. Adding a backend touches its
/// module, this match (and the URL parser in [`crate::config`]), and one `conformance_tests!` line.
pub fn open(location: &Location) -> Result<Arc<dyn OutputCache>> {
    Ok(match location {
        Location::Memory => Arc::new(memory::MemoryCache::new()),
        #[cfg(feature = "fs")]
        Location::Fs { root, durable } => Arc::new(fs::FsCache::open(
            root,
            fs::FsOptions::default().durable(*durable),
        )?),
        #[cfg(feature = "sqlite")]
        Location::Sqlite { path, durable } => Arc::new(sqlite::SqliteCache::open(
            path,
            sqlite::SqliteOptions::default().durable(*durable),
        )?),
        #[cfg(feature = "cloud")]
        Location::Cloud {
            cloud,
            bucket,
            prefix,
            options,
        } => Arc::new(object::cloud::open(*cloud, bucket, prefix, &options.0)?),
    })
}

/// Open the backend named by `url` (`fs:///…`, `sqlite:///…`, `s3://…`, `memory://`).
pub fn open_url(url: &str) -> Result<Arc<dyn OutputCache>> {
    open(&Location::parse(url)?)
}
