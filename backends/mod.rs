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
