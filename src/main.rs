//! The `outcache` command line: store and fetch task outputs, stream blobs, and run the conformance suite
//! against any cache URL. Exit codes: 0 success, 1 miss / unresolved ref / failure, 2 bad input or usage,
//! 3 integrity failure (a blob whose bytes do not match its recorded SHA-256).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use outcache::config::{Location, effective_url};
use outcache::conformance::{CaseOutcome, run_suite};
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
    /// The cache: fs:///abs/dir, file:///abs/dir or memory://. Default: $OUTCACHE_URL, else the fs
    /// backend under $XDG_CACHE_HOME/outcache (or ~/.cache/outcache).
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,

    /// Put every command behind the run-private wrapper of this run: rows and blobs only this run sees.
    #[arg(long, global = true, value_name = "ID")]
    run_id: Option<String>,

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
    /// Stream a blob to stdout. REF is a CacheRef's JSON (verified against its size and sha256) or its
    /// `$ref` string. Exit 1 if it does not resolve, 3 if its bytes fail verification.
    Cat {
        /// The CacheRef JSON or ref string.
        #[arg(value_name = "REF")]
        reference: String,
    },
    /// Run the conformance suite against the cache in an isolated child location (existing entries are
    /// never touched; everything created is removed). Exit 1 if any case fails.
    Conformance,
}

/// What ends a command early, mapped to an exit code.
enum Failure {
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
    serde_json::from_str(text).map_err(|e| Error::InvalidInput {
        what: format!("{what} JSON"),
        reason: e.to_string(),
    })
}

/// The backend named by `url` (or the environment / default), behind the run-private wrapper if a run
/// id was given.
fn open(url: Option<&str>, run_id: Option<&str>) -> Result<Cache, Error> {
    let backend = outcache::config::open_backend(&effective_url(url)?)?;
    Ok(Cache::new(wrap_run(backend, run_id)?))
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
    let url = cli.url.as_deref();
    let run_id = cli.run_id.as_deref();
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
            open(url, run_id)?.put(&task_type, &inputs, &output).await?;
        }
        Command::Get { task_type, inputs } => {
            let inputs = parse_json("--inputs", &inputs)?;
            match open(url, run_id)?.get(&task_type, &inputs).await? {
                Some(value) => println!("{value}"),
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
            let cache = open(url, run_id)?;
            let data = match file.filter(|f| f.as_os_str() != "-") {
                Some(path) => {
                    let f = tokio::fs::File::open(&path)
                        .await
                        .map_err(|e| Error::io("open", &path, e))?;
                    outcache::blob::reader_stream(f, READ_CHUNK)
                }
                None => outcache::blob::reader_stream(tokio::io::stdin(), READ_CHUNK),
            };
            let stored = cache
                .put_stream(&task_type, &inputs, data, BlobOptions { mime, port })
                .await?;
            println!("{stored}");
        }
        Command::Cat { reference } => {
            let cache_ref = CacheRef::parse_arg(&reference)?;
            let cache = open(url, run_id)?;
            let Some(mut stream) = cache.open_stream(&cache_ref).await? else {
                return Err(Failure::Miss(Some(format!(
                    "{} does not resolve in {}",
                    cache_ref.reference,
                    cache.backend()
                ))));
            };
            let mut stdout = tokio::io::stdout();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if let Err(e) = stdout.write_all(&chunk).await {
                    // A closed pipe (`| head`) is the reader's choice, not our failure.
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(Error::io("write", "<stdout>", e).into());
                }
            }
            stdout
                .flush()
                .await
                .map_err(|e| Error::io("flush", "<stdout>", e))?;
        }
        Command::Conformance => {
            let location = Location::parse(&effective_url(url)?)?;
            let report = |o: &CaseOutcome| {
                let ms = o.elapsed.as_millis();
                match &o.result {
                    Ok(()) => println!("ok    {} ({ms} ms)", o.name),
                    Err(f) => println!("FAIL  {} ({ms} ms): {f}", o.name),
                }
                let _ = std::io::stdout().flush();
            };
            let outcomes = run_suite(&location, |b| wrap_run(b, run_id), report).await?;
            let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
            println!("{} passed, {failed} failed", outcomes.len() - failed);
            if failed > 0 {
                return Err(Failure::Miss(None));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Ok(()) => ExitCode::SUCCESS,
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
