//! The `outcache` command line: store and fetch task outputs, stream blobs, and run the conformance suite
//! against any cache URL. Exit codes: 0 success, 1 miss / unresolved ref / failure, 2 bad input or usage,
//! 3 integrity failure (a blob whose bytes do not match its recorded SHA-256).

#![deny(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cli::{Ctx, Failure, bench, cat, janitor, rows, show_config};
use outcache::Error;
use outcache::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "outcache",
    version,
    about = "A storage engine for the outputs of cacheable tasks"
)]
struct Cli {
    /// The cache: fs:///abs/dir, file:///abs/dir, sqlite:///abs/file.db, s3://bucket/prefix?… or
    /// memory://. Default: $OUTCACHE_URL, else the config file's url, else the fs backend under
    /// $XDG_CACHE_HOME/outcache (or ~/.cache/outcache).
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,

    /// A TOML config file (else $OUTCACHE_CONFIG, else ./outcache.toml if present). Flags beat the
    /// environment, which beats the file.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Put every command behind the run-private wrapper of this run: rows and blobs only this run sees.
    #[arg(long, global = true, value_name = "ID")]
    run_id: Option<String>,

    /// Log what the engine, backends and janitor do to stderr: -v for the janitor's summaries, -vv for
    /// every operation (task type, fingerprint prefix, bytes, duration, outcome; never values or
    /// secrets). RUST_LOG (e.g. `outcache=debug`) overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// No progress bars (they show on stderr for long transfers and prunes when it is a terminal).
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Store a row: the output JSON of TASK_TYPE run on the given inputs.
    Put(rows::PutArgs),
    /// Print the stored output JSON; exit 1 (printing nothing) on a miss.
    Get(rows::GetArgs),
    /// Stream a file (or stdin) as the task's binary output and print the stored output JSON.
    ///
    /// The output is a CacheRef with size and sha256, or an inline envelope below the reference
    /// threshold.
    PutBlob(rows::PutBlobArgs),
    /// Write a blob to stdout or a file, verified.
    ///
    /// REF is a CacheRef's JSON or its bare `$ref` string
    /// (verified against the size and SHA-256 the store recorded, where it recorded one). To stdout, a
    /// blob up to --max-buffer is verified before its first byte is written; a larger one streams and
    /// a mismatch ends it with exit 3. With -o, bytes go to a temp file beside FILE, renamed into place
    /// only once verified (a link's target is replaced, the link kept; a device or FIFO such as
    /// /dev/null is written in place, as stdout is). Exit 1 if it does not resolve, 3 if its bytes fail verification.
    Cat(cat::CatArgs),
    /// Count what the cache holds: rows, blobs, bytes, temp files, oldest and newest entry, and the task
    /// types with the most bytes.
    Stats(janitor::StatsArgs),
    /// Remove stale entries: rows past an age, orphan blobs and dead temp files, and least-recently-used
    /// rows beyond a size budget. Safe to run while writers write.
    Prune(janitor::PruneArgs),
    /// Index the rows of an object-store cache that hold refs, so orphan sweeps read only those.
    ///
    /// Reads every row once, marks each one holding refs, then declares the index in the cache's
    /// `layout.json`; from then on `prune --orphans` reads only the marked rows. Run it once per cache,
    /// after every host writing to it runs this version (older versions write no markers). Idempotent.
    /// fs and SQLite caches read rows cheaply and need no index.
    IndexRefs,
    /// Measure the cache: puts, gets, hits, concurrent puts, blob write and read.
    ///
    /// Works in an isolated child location (like `conformance`) and removes what it wrote.
    Bench(bench::BenchArgs),
    /// Serve the cache over HTTP to build tools: simple key/value (ccache's http storage), Bazel's
    /// HTTP cache (/ac/, /cas/ with digest check), Turborepo's remote cache (/v8/artifacts/),
    /// /healthz, /readyz and /metrics.
    ///
    /// Listens on 127.0.0.1:8080 unless told otherwise. With a tokens file every request but /healthz
    /// and /readyz needs a token (Bearer, or Basic with the token as password); without one, reads
    /// are open and writes need --allow-anonymous-writes. SIGTERM or SIGINT finishes requests in
    /// flight, then exits; a second one stops at once; SIGHUP reads the tokens file again. A flag not
    /// given is taken from the config file's [serve] table.
    Serve(cli::serve::ServeArgs),
    /// Print the effective configuration, each value with where it came from (secrets redacted).
    Config(show_config::ConfigArgs),
    /// Run the conformance suite against the cache in an isolated child location.
    ///
    /// Existing entries are never touched; everything created is removed. Prints one line per case (ok,
    /// skip with the capabilities it needs, FAIL) and `N passed, N failed, N skipped`. Exit 1 if any case fails. Built-in schemes
    /// only: a third-party backend runs the suite with `outcache::conformance::run` from its own crate.
    Conformance,
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let ctx = Ctx {
        config: Config::load(cli.url.as_deref(), cli.config.as_deref())?,
        run_id: cli.run_id.clone(),
        quiet: cli.quiet,
    };
    match cli.command {
        Command::Put(args) => cli::rows::put(&ctx, args).await,
        Command::Get(args) => cli::rows::get(&ctx, args).await,
        Command::PutBlob(args) => cli::rows::put_blob(&ctx, args).await,
        Command::Cat(args) => cli::cat::cat(&ctx, args).await,
        Command::Stats(args) => cli::janitor::stats(&ctx, args).await,
        Command::Prune(args) => cli::janitor::prune(&ctx, args).await,
        Command::IndexRefs => cli::janitor::index_refs(&ctx).await,
        Command::Bench(args) => cli::bench::bench(&ctx, args).await,
        Command::Serve(args) => cli::serve::serve(&ctx, args).await,
        Command::Config(args) => cli::show_config::config(&ctx, args).await,
        Command::Conformance => cli::conformance::conformance(&ctx).await,
    }
}

/// Logging to stderr: off unless asked for (`-v`, or `RUST_LOG`), so errors stay one line.
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::new(spec),
        _ => EnvFilter::new(match verbose {
            0 => "off",
            1 => "outcache=info",
            2 => "outcache=debug",
            _ => "outcache=trace",
        }),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print as clap does, exit 0.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Usage errors keep the one-line contract: the first line of clap's message, exit 2.
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let message = message.join(" ");
            let message = message.trim_start_matches("error: ");
            say!("outcache: error: {message} (see --help)");
            return ExitCode::from(2);
        }
    };
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say!("outcache: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) | Err(Failure::ClosedPipe) => ExitCode::SUCCESS,
        Err(Failure::Interrupted(signal)) => {
            say!(
                "outcache: interrupted by {}; its scratch space was removed",
                signal.name()
            );
            ExitCode::from(128 + signal.number())
        }
        Err(Failure::Miss(message)) => {
            if let Some(message) = message {
                say!("outcache: {message}");
            }
            ExitCode::from(1)
        }
        Err(Failure::Error(e)) => {
            say!("outcache: error: {e}");
            ExitCode::from(match e {
                Error::Integrity { .. } => 3,
                // Refused as asked, as bad input is: the operator must act (`--corrupt`) first.
                Error::OrphanSweepBlocked { .. } => 2,
                ref e if e.is_input_error() => 2,
                _ => 1,
            })
        }
    }
}
