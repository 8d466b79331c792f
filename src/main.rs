//! The `outcache` command line: store and fetch task outputs, stream blobs, and run the conformance suite
//! against any cache URL. Exit codes: 0 success, 1 miss / unresolved ref / failure, 2 bad input or usage,
//! 3 integrity failure (a blob whose bytes do not match its recorded SHA-256).

#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use outcache::config::Config;
use outcache::conformance::{CaseOutcome, run_suite_in};
use std::sync::Arc;

use outcache::backends::run_private::RunPrivate;
use outcache::{BlobOptions, Cache, CacheRef, Error, OutputCache};

/// Read chunk size for `put-blob` (also the most a single chunk holds in memory).
const READ_CHUNK: usize = 1 << 20;

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
    Put {
        /// The task type, e.g. `image/resize`.
        task_type: String,
        /// The task's inputs as JSON (key order does not matter).
        #[arg(long, value_name = "JSON")]
        inputs: String,
        /// The output as JSON.
        #[arg(
            long,
            value_name = "JSON",
            conflicts_with = "output_file",
            required_unless_present = "output_file"
        )]
        output: Option<String>,
        /// Read the output JSON from this file.
        #[arg(long, value_name = "PATH")]
        output_file: Option<PathBuf>,
    },
    /// Print the stored output JSON; exit 1 (printing nothing) on a miss.
    Get {
        /// The task type.
        task_type: String,
        /// The task's inputs as JSON.
        #[arg(long, value_name = "JSON")]
        inputs: String,
    },
    /// Stream a file (or stdin) as the task's binary output and print the stored output JSON: a CacheRef
    /// with size and sha256, or an inline envelope below the reference threshold.
    PutBlob {
        /// The task type.
        task_type: String,
        /// The task's inputs as JSON.
        #[arg(long, value_name = "JSON")]
        inputs: String,
        /// Media type to record, e.g. `image/png`.
        #[arg(long, value_name = "MIME")]
        mime: Option<String>,
        /// Output port the bytes belong to.
        #[arg(long, value_name = "PORT")]
        port: Option<String>,
        /// The file to read; `-` or nothing for stdin.
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Write a blob to stdout or a file, verified. REF is a CacheRef's JSON or its bare `$ref` string
    /// (verified against the size and SHA-256 the store recorded, where it recorded one). To stdout, a
    /// blob up to --max-buffer is verified before its first byte is written; a larger one streams and
    /// a mismatch ends it with exit 3. With -o, bytes go to a temp file beside FILE, renamed into place
    /// only once verified. Exit 1 if it does not resolve, 3 if its bytes fail verification.
    Cat {
        /// The CacheRef JSON or ref string.
        #[arg(value_name = "REF")]
        reference: String,
        /// Write to FILE (atomically, only once verified) instead of stdout.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        /// Largest blob held in memory to verify before anything reaches stdout (e.g. 64MiB).
        #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = outcache::config::parse_size)]
        max_buffer: u64,
    },
    /// Count what the cache holds: rows, blobs, bytes, temp files, oldest and newest entry, and the task
    /// types with the most bytes.
    Stats {
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
        /// How many task types to list.
        #[arg(long, default_value_t = 10, value_name = "N")]
        top: usize,
    },
    /// Remove stale entries: rows past an age, orphan blobs and dead temp files, and least-recently-used
    /// rows beyond a size budget. Safe to run while writers write.
    Prune {
        /// Remove rows committed longer ago than this (e.g. 30d, 12h), with their blobs.
        #[arg(long, value_name = "DURATION", value_parser = outcache::config::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Remove blobs no row references and stale temp files, older than --grace.
        #[arg(long)]
        orphans: bool,
        /// How long an orphan or temp file must have been one before it is removed, so writes in flight
        /// and readers of replaced rows are spared (default: the config file's janitor.grace, else 1h;
        /// below 1m only with --force).
        #[arg(long, value_name = "DURATION", value_parser = outcache::config::parse_duration)]
        grace: Option<std::time::Duration>,
        /// Accept a --grace below one minute (on a live cache it sweeps the temps of writes in flight).
        #[arg(long)]
        force: bool,
        /// Evict least-recently-read rows (with their blobs) until the cache fits (e.g. 10GiB).
        #[arg(long, value_name = "SIZE", value_parser = outcache::config::parse_size)]
        max_size: Option<u64>,
        /// Only consider rows whose task type starts with this.
        #[arg(long, value_name = "TASK_PREFIX")]
        prefix: Option<String>,
        /// Remove rows that cannot be decoded (garbled files, foreign content). Without it their presence
        /// stops an orphan sweep, since their blobs cannot be told from orphans.
        #[arg(long)]
        corrupt: bool,
        /// Report what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print a JSON summary (rows_removed, blobs_removed, temps_removed, bytes_reclaimed, dry_run, …).
        #[arg(long)]
        json: bool,
    },
    /// Measure the cache: row put/get, blob write, verified and unverified blob read. Works in an
    /// isolated child location (like `conformance`) and removes what it wrote.
    Bench {
        /// Blob size to write and read (e.g. 64MiB).
        #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = outcache::config::parse_size)]
        size: u64,
        /// Rows to put and get.
        #[arg(long, value_name = "N", default_value_t = 200)]
        rows: usize,
        /// Blob runs to take the median of.
        #[arg(long, value_name = "N", default_value_t = 3)]
        runs: usize,
        /// Concurrent writers for the concurrent durable-put figure.
        #[arg(long, value_name = "N", default_value_t = 16)]
        writers: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration, each value with where it came from (secrets redacted).
    Config {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the conformance suite against the cache in an isolated child location (existing entries are
    /// never touched; everything created is removed): one line per case (ok, skip with the capabilities
    /// it needs, FAIL) and `N passed, N failed, N skipped`. Exit 1 if any case fails. Built-in schemes
    /// only: a third-party backend runs the suite with `outcache::conformance::run` from its own crate.
    Conformance,
}

/// Print one line to stdout through [`emit`]; returns early from the command on a closed pipe or a failed
/// write.
macro_rules! out {
    ($($arg:tt)*) => {
        emit(format_args!($($arg)*))?
    };
}

/// Write one line to stdout. A closed pipe (`| head`) is the reader's choice: the command ends quietly.
/// Any other failure (a full disk behind `> file`) is a one-line error, exit 1 — never a panic.
fn emit(line: std::fmt::Arguments<'_>) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::ClosedPipe),
        Err(e) => Err(Failure::Error(Error::io("write", "<stdout>", e))),
    }
}

/// What ends a command early, mapped to an exit code.
enum Failure {
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

fn parse_json(what: &str, text: &str) -> Result<Value, Error> {
    outcache::wire::parse_json(&format!("{what} JSON"), text)
}

/// The cache the flags, environment and config file name, behind the run-private wrapper if a run id
/// was given.
fn open(config: &Config, run_id: Option<&str>) -> Result<Cache, Error> {
    let backend = outcache::backends::open(&config.location()?)?;
    Ok(Cache::with_options(
        wrap_run(backend, run_id)?,
        config.options.clone(),
    ))
}

fn wrap_run(
    backend: Arc<dyn OutputCache>,
    run_id: Option<&str>,
) -> Result<Arc<dyn OutputCache>, Error> {
    Ok(match run_id {
        Some(id) => Arc::new(RunPrivate::new(backend, id)?),
        None => backend,
    })
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let run_id = cli.run_id.as_deref();
    let config = Config::load(cli.url.as_deref(), cli.config.as_deref())?;
    match cli.command {
        Command::Put {
            task_type,
            inputs,
            output,
            output_file,
        } => {
            let inputs = parse_json("--inputs", &inputs)?;
            let output = match (output, output_file) {
                (Some(text), _) => parse_json("--output", &text)?,
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| Error::io("read --output-file", &path, e))?;
                    parse_json("--output-file", &text)?
                }
                (None, None) => unreachable!("clap requires one of --output and --output-file"),
            };
            open(&config, run_id)?
                .put(&task_type, &inputs, &output)
                .await?;
        }
        Command::Get { task_type, inputs } => {
            let inputs = parse_json("--inputs", &inputs)?;
            let cache = open(&config, run_id)?;
            match cache.get(&task_type, &inputs).await? {
                Some(value) => {
                    out!("{value}");
                    // Best effort: a failed access-time update must not turn a hit into an error.
                    let _ = cache.flush_access().await;
                }
                None => return Err(Failure::Miss(None)),
            }
        }
        Command::PutBlob {
            task_type,
            inputs,
            mime,
            port,
            file,
        } => {
            let inputs = parse_json("--inputs", &inputs)?;
            let cache = open(&config, run_id)?;
            let (data, size) = match file.filter(|f| f.as_os_str() != "-") {
                Some(path) => {
                    let f = tokio::fs::File::open(&path)
                        .await
                        .map_err(|e| Error::io("open", &path, e))?;
                    let size = f.metadata().await.ok().map(|m| m.len());
                    (outcache::blob::reader_stream(f, READ_CHUNK), size)
                }
                None => (
                    outcache::blob::reader_stream(tokio::io::stdin(), READ_CHUNK),
                    None,
                ),
            };
            let bar = transfer_bar(cli.quiet, size);
            let stored = cache
                .put_stream(
                    &task_type,
                    &inputs,
                    counted(data, &bar),
                    BlobOptions { mime, port },
                )
                .await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            out!("{}", stored?);
        }
        Command::Cat {
            reference,
            output,
            max_buffer,
        } => {
            let cache_ref = CacheRef::parse_arg(&reference)?;
            let cache = open(&config, run_id)?;
            let unresolved = || {
                Failure::Miss(Some(format!(
                    "{} does not resolve in {}",
                    cache_ref.reference,
                    cache.backend()
                )))
            };
            let Some(full) = cache.stat(&cache_ref).await? else {
                return Err(unresolved());
            };
            let Some(stream) = cache.open_stream(&full).await? else {
                return Err(unresolved());
            };
            let bar = transfer_bar(cli.quiet, full.size);
            let stream = counted(stream, &bar);
            match output {
                Some(path) => cat_to_file(stream, &path).await?,
                None if full.size.is_some_and(|size| size <= max_buffer) => {
                    // Small enough to hold: verify all of it before stdout sees a byte.
                    let bytes = outcache::blob::collect(stream).await?;
                    write_stdout(&bytes)?;
                }
                None => cat_streaming(stream).await?,
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        }
        Command::Stats { json, top } => {
            let cache = open(&config, run_id)?;
            let inv = outcache::janitor::inventory(cache.backend().as_ref(), top).await?;
            if json {
                out!("{}", serde_json::to_string(&inv).unwrap_or_default());
            } else {
                print_inventory(&inv, &cache.backend().to_string())?;
            }
        }
        Command::Prune {
            older_than,
            orphans,
            grace,
            force,
            max_size,
            prefix,
            corrupt,
            dry_run,
            json,
        } => {
            if older_than.is_none() && !orphans && max_size.is_none() && !corrupt {
                return Err(Error::InvalidInput {
                    what: "prune".into(),
                    reason: "nothing to prune: give --older-than, --orphans and/or --max-size"
                        .into(),
                }
                .into());
            }
            let grace = grace.unwrap_or(config.janitor_grace);
            if orphans && grace < outcache::janitor::MIN_GRACE && !force {
                return Err(Error::InvalidInput {
                    what: "--grace".into(),
                    reason: format!(
                        "{} is below one minute: on a live cache it sweeps the temps of writes still \
                         in flight. Add --force if no writer is running",
                        humantime::format_duration(grace)
                    ),
                }
                .into());
            }
            let cache = open(&config, run_id)?;
            let mut options = outcache::janitor::PruneOptions::new();
            options.older_than = older_than;
            options.orphans = orphans;
            options.grace = grace;
            options.max_size = max_size;
            options.prefix = prefix;
            options.corrupt = corrupt;
            options.dry_run = dry_run;
            let bar = (!json && !cli.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .then(indicatif::ProgressBar::no_length);
            let report = outcache::janitor::prune(cache.backend().as_ref(), &options, |p| {
                if let Some(bar) = &bar {
                    bar.set_length(p.total);
                    bar.set_position(p.done);
                }
            })
            .await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if json {
                out!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print_report(&report)?;
            }
        }
        Command::Bench {
            size,
            rows,
            runs,
            writers,
            json,
        } => {
            let stop = stop_signals();
            let location = config.location()?;
            let tag = format!("outcache-bench-{}", uuid::Uuid::new_v4().simple());
            let fixture = outcache::conformance::isolated_fixture(&location, &tag, "bench")?
                .wrapped(|b| wrap_run(b, run_id))?;
            let mut options = outcache::bench::BenchOptions::default();
            options.blob_size = usize::try_from(size).unwrap_or(usize::MAX);
            options.rows = rows;
            options.blob_runs = runs;
            options.writers = writers;
            let result = tokio::select! {
                result = outcache::bench::run(fixture.cache(), &options) => result,
                signal = stop => {
                    drop(fixture); // removes the fixture's directory
                    outcache::conformance::remove_run_dir(&location, &tag);
                    return Err(Failure::Interrupted(signal));
                }
            };
            fixture.finish().await;
            outcache::conformance::remove_run_dir(&location, &tag);
            let report = result?;
            if json {
                out!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                out!("cache:                 {}", report.backend);
                out!("row put:               {:>10.0} /s", report.row_put_per_s);
                out!("row get:               {:>10.0} /s", report.row_get_per_s);
                out!("hit (Cache::get):      {:>10.0} /s", report.hits_per_s);
                out!(
                    "row put, {:>2} writers:   {:>10.0} /s",
                    report.writers,
                    report.row_put_concurrent_per_s
                );
                out!(
                    "blob write ({:>8}):  {:>10.0} MB/s",
                    human_bytes(report.blob_bytes),
                    report.blob_write_mb_s
                );
                out!(
                    "blob read, verified:   {:>10.0} MB/s",
                    report.blob_read_verified_mb_s
                );
                out!(
                    "blob read, unverified: {:>10.0} MB/s",
                    report.blob_read_mb_s
                );
            }
        }
        Command::Config { json } => {
            let lines = config.describe();
            if json {
                let map: serde_json::Map<String, Value> = lines
                    .into_iter()
                    .map(|(k, v, source)| (k, serde_json::json!({ "value": v, "source": source })))
                    .collect();
                out!("{}", Value::Object(map));
            } else {
                for (key, value, source) in lines {
                    out!("{key:<22} = {value:<50} ({source})");
                }
                for var in [
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "AWS_SESSION_TOKEN",
                ] {
                    if std::env::var_os(var).is_some() {
                        out!("{var:<22} = {:<50} (env {var})", "set (value hidden)");
                    }
                }
            }
        }
        Command::Conformance => {
            let location = config.location()?;
            // Each case's line as it finishes; the summary line below reports a closed or full stdout.
            let report = |o: &CaseOutcome| {
                let _ = emit(format_args!("{}", o.line()));
            };
            let stop = stop_signals();
            let tag = outcache::conformance::new_run_tag();
            let outcomes = tokio::select! {
                outcomes = run_suite_in(&location, &tag, |b| wrap_run(b, run_id), report) => outcomes?,
                signal = stop => {
                    // The running case's fixture was dropped with the suite's future: its directory
                    // is gone; the run's own directory goes now.
                    outcache::conformance::remove_run_dir(&location, &tag);
                    return Err(Failure::Interrupted(signal));
                }
            };
            let report = outcache::conformance::Report { outcomes };
            out!("{}", report.summary());
            if report.failed() > 0 {
                return Err(Failure::Miss(None));
            }
        }
    }
    Ok(())
}

/// A progress bar on stderr for a transfer of `size` bytes (bytes, rate, ETA), or `None` when stderr is
/// not a terminal or `--quiet` was given. Never on stdout.
fn transfer_bar(quiet: bool, size: Option<u64>) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = match size {
        Some(size) => indicatif::ProgressBar::new(size),
        None => indicatif::ProgressBar::no_length(),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let template = if size.is_some() {
        "{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} eta {eta}"
    } else {
        "{bytes} {bytes_per_sec} {elapsed}"
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    Some(bar)
}

/// `stream`, advancing `bar` by each chunk's length.
fn counted(
    stream: outcache::ByteStream,
    bar: &Option<indicatif::ProgressBar>,
) -> outcache::ByteStream {
    match bar.clone() {
        Some(bar) => stream
            .inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    bar.inc(chunk.len() as u64);
                }
            })
            .boxed(),
        None => stream,
    }
}

/// Write `bytes` to stdout; a closed pipe is the reader's choice and ends the command quietly.
fn write_stdout(bytes: &[u8]) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("write", "<stdout>", e))
        }
        _ => Ok(()),
    }
}

/// Stream a verified blob to stdout as it arrives (a blob too large to hold): a verification failure
/// ends the stream with an error, after the bytes before it were written.
async fn cat_streaming(mut stream: outcache::ByteStream) -> Result<(), Error> {
    let mut stdout = tokio::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if let Err(e) = stdout.write_all(&chunk).await {
            // A closed pipe (`| head`) is the reader's choice, not our failure.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(Error::io("write", "<stdout>", e));
        }
    }
    match stdout.flush().await {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("flush", "<stdout>", e))
        }
        _ => Ok(()),
    }
}

/// Write a verified blob to `path`: into a temp file beside it, renamed into place only once every byte
/// was verified and synced, so `path` never holds wrong or partial bytes. The temp goes on any failure.
async fn cat_to_file(
    mut stream: outcache::ByteStream,
    path: &std::path::Path,
) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".outcache-cat-")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| Error::io("create a temp file beside", path, e))?;
    let (file, tmp_path) = tmp.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?; // dropping `tmp_path` removes the temp file
        file.write_all(&chunk)
            .await
            .map_err(|e| Error::io("write", &*tmp_path, e))?;
    }
    file.sync_all()
        .await
        .map_err(|e| Error::io("fsync", &*tmp_path, e))?;
    drop(file);
    tmp_path
        .persist(path)
        .map_err(|e| Error::io("rename into place", path, e.error))?;
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn human_time(ms: Option<u64>) -> String {
    // RFC 3339 ends with the year 9999; a commit time beyond it is data on disk, not a reason to panic.
    const LAST_RFC3339_MS: u64 = 253_402_300_799_999;
    match ms {
        None => "-".into(),
        Some(ms) if ms > LAST_RFC3339_MS => {
            format!("{ms} ms after the epoch (beyond the year 9999)")
        }
        Some(ms) => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string(),
    }
}

fn print_inventory(inv: &outcache::janitor::Inventory, backend: &str) -> Result<(), Failure> {
    out!("cache:   {backend}");
    out!("rows:    {} ({})", inv.rows, human_bytes(inv.row_bytes));
    out!("blobs:   {} ({})", inv.blobs, human_bytes(inv.blob_bytes));
    out!("temps:   {} ({})", inv.temps, human_bytes(inv.temp_bytes));
    if let Some(storage) = inv.storage_bytes {
        out!(
            "on disk: {} (the database file and its log)",
            human_bytes(storage)
        );
    }
    if inv.corrupt_rows > 0 {
        out!(
            "corrupt: {} rows that cannot be decoded (prune --corrupt removes them)",
            inv.corrupt_rows
        );
    }
    if inv.newer_format_rows > 0 {
        out!(
            "newer:   {} rows written by a newer outcache (never removed; they stop the orphan sweep)",
            inv.newer_format_rows
        );
    }
    if inv.foreign_entries > 0 {
        out!(
            "foreign: {} entries the cache did not write (links, FIFOs …; never touched)",
            inv.foreign_entries
        );
    }
    out!("oldest:  {}", human_time(inv.oldest_ms));
    out!("newest:  {}", human_time(inv.newest_ms));
    if !inv.top_task_types.is_empty() {
        out!("top task types by bytes:");
        for t in &inv.top_task_types {
            out!(
                "  {:>10}  {:>6} rows  {}",
                human_bytes(t.bytes),
                t.rows,
                t.task_type
            );
        }
    }
    Ok(())
}

fn print_report(r: &outcache::janitor::PruneReport) -> Result<(), Failure> {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    out!(
        "{verb}: {} rows, {} blobs, {} temp files; {} reclaimed{}",
        r.rows_removed,
        r.blobs_removed,
        r.temps_removed,
        human_bytes(r.bytes_reclaimed),
        if r.dry_run { " (dry run)" } else { "" }
    );
    for (label, part) in [
        ("by age", &r.by_age),
        ("orphans", &r.orphans),
        ("size budget", &r.by_size),
    ] {
        if part.rows + part.blobs + part.temps > 0 {
            out!(
                "  {label:<12} {} rows, {} blobs, {} temps, {}",
                part.rows,
                part.blobs,
                part.temps,
                human_bytes(part.bytes)
            );
        }
    }
    if r.rows_kept_rewritten > 0 {
        out!(
            "  kept {} rows rewritten since they were listed",
            r.rows_kept_rewritten
        );
    }
    Ok(())
}

/// A signal that stops a long command.
#[derive(Clone, Copy, Debug)]
enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }

    fn number(self) -> u8 {
        match self {
            Signal::Interrupt => 2,
            Signal::Terminate => 15,
        }
    }
}

/// Install SIGINT and SIGTERM handlers now, and return a future that resolves when either arrives
/// (never, if they cannot be installed). Installing before the work starts matters: until then a signal
/// would kill the process the default way, leaving its scratch space behind.
fn stop_signals() -> impl std::future::Future<Output = Signal> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        );
        async move {
            match handlers {
                (Ok(mut int), Ok(mut term)) => tokio::select! {
                    _ = int.recv() => Signal::Interrupt,
                    _ = term.recv() => Signal::Terminate,
                },
                _ => std::future::pending().await,
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            match tokio::signal::ctrl_c().await {
                Ok(()) => Signal::Interrupt,
                Err(_) => std::future::pending().await,
            }
        }
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
            eprintln!("outcache: error: {message} (see --help)");
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
            eprintln!("outcache: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) | Err(Failure::ClosedPipe) => ExitCode::SUCCESS,
        Err(Failure::Interrupted(signal)) => {
            eprintln!(
                "outcache: interrupted by {}; its scratch space was removed",
                signal.name()
            );
            ExitCode::from(128 + signal.number())
        }
        Err(Failure::Miss(message)) => {
            if let Some(message) = message {
                eprintln!("outcache: {message}");
            }
            ExitCode::from(1)
        }
        Err(Failure::Error(e)) => {
            eprintln!("outcache: error: {e}");
            ExitCode::from(match e {
                Error::Integrity { .. } => 3,
                ref e if e.is_input_error() => 2,
                _ => 1,
            })
        }
    }
}
