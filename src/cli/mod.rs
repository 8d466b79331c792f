//! The `outcache` command line, one module per command (or pair of commands that belong together), and
//! what they share: the context, the exit-code mapping, stdout that survives closed pipes.

/// Print one line to stdout through [`emit`]; returns early from the command on a closed pipe or a failed
/// write.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::emit(format_args!($($arg)*))?
    };
}

/// One line to stderr that never panics ([`outcache::serve::say`]): a server's messages must not fail
/// it once its log reader has gone, and a command's last message must not turn its exit code into a
/// panic's.
macro_rules! say {
    ($($arg:tt)*) => {
        outcache::serve::say(format_args!($($arg)*))
    };
}

pub(crate) mod bench;
pub(crate) mod cat;
pub(crate) mod conformance;
pub(crate) mod janitor;
pub(crate) mod output;
pub(crate) mod rows;
pub(crate) mod serve;
pub(crate) mod show_config;
pub(crate) mod signals;

/// What the command modules share, in one import.
pub(crate) mod prelude {
    pub(crate) use std::path::PathBuf;

    pub(crate) use futures::StreamExt;
    pub(crate) use outcache::conformance::{CaseOutcome, run_suite_in};
    pub(crate) use outcache::{BlobOptions, CacheRef, Error};
    pub(crate) use serde_json::Value;
    pub(crate) use tokio::io::AsyncWriteExt;

    pub(crate) use super::output::*;
    pub(crate) use super::signals::*;
    pub(crate) use super::{Ctx, Failure, READ_CHUNK, emit, open, parse_json, wrap_run};
}

use std::io::Write as _;
use std::sync::Arc;

use outcache::config::Config;
use outcache::{Cache, Error, OutputCache, RunPrivate};

use serde_json::Value;
use signals::Signal;

/// Read chunk size for `put-blob` (also the most a single chunk holds in memory).
pub(crate) const READ_CHUNK: usize = 1 << 20;

/// What every command gets: the effective configuration, the run id, and whether to stay quiet.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) config: Config,
    pub(crate) run_id: Option<String>,
    pub(crate) quiet: bool,
}

/// Write one line to stdout. A closed pipe (`| head`) is the reader's choice: the command ends quietly.
/// Any other failure (a full disk behind `> file`) is a one-line error, exit 1 — never a panic.
pub(crate) fn emit(line: std::fmt::Arguments<'_>) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::ClosedPipe),
        Err(e) => Err(Failure::Error(Error::io("write", "<stdout>", e))),
    }
}

/// What ends a command early, mapped to an exit code.
pub(crate) enum Failure {
    /// Stdout was closed by its reader: stop quietly (exit 0).
    ClosedPipe,
    /// A signal stopped the command after it cleaned up (exit 128 + the signal's number).
    Interrupted(Signal),
    /// A miss or unresolved ref (exit 1, message optional).
    Miss(Option<String>),
    /// An error from the library.
    Error(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Error(e)
    }
}

pub(crate) fn parse_json(what: &str, text: &str) -> Result<Value, Error> {
    outcache::wire::parse_json(&format!("{what} JSON"), text)
}

/// The cache the flags, environment and config file name, behind the run-private wrapper if a run id
/// was given.
pub(crate) fn open(config: &Config, run_id: Option<&str>) -> Result<Cache, Error> {
    let backend = outcache::backends::open(&config.location()?)?;
    Ok(Cache::with_options(
        wrap_run(backend, run_id)?,
        config.options.clone(),
    ))
}

pub(crate) fn wrap_run(
    backend: Arc<dyn OutputCache>,
    run_id: Option<&str>,
) -> Result<Arc<dyn OutputCache>, Error> {
    Ok(match run_id {
        Some(id) => Arc::new(RunPrivate::new(backend, id)?),
        None => backend,
    })
}
