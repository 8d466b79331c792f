//! `outcache put`, `get` and `put-blob`: rows and binary outputs.

#[allow(unused_imports)]
use super::prelude::*;

#[derive(clap::Args, Debug)]
pub(crate) struct PutArgs {
    /// The task type, e.g. `image/resize`.
    pub(crate) task_type: String,
    /// The task's inputs as JSON (key order does not matter).
    #[arg(long, value_name = "JSON")]
    pub(crate) inputs: String,
    /// The output as JSON.
    #[arg(
        long,
        value_name = "JSON",
        conflicts_with = "output_file",
        required_unless_present = "output_file"
    )]
    pub(crate) output: Option<String>,
    /// Read the output JSON from this file.
    #[arg(long, value_name = "PATH")]
    pub(crate) output_file: Option<PathBuf>,
}

pub(crate) async fn put(ctx: &Ctx, args: PutArgs) -> Result<(), Failure> {
    let PutArgs {
        task_type,
        inputs,
        output,
        output_file,
    } = args;
    let (config, run_id) = (&ctx.config, ctx.run_id.as_deref());
    let inputs = parse_json("--inputs", &inputs)?;
    let output = match (output, output_file) {
        (Some(text), _) => parse_json("--output", &text)?,
        (None, Some(path)) => parse_json("--output-file", &read_output_file(&path)?)?,
        (None, None) => unreachable!("clap requires one of --output and --output-file"),
    };
    open(config, run_id)?
        .put(&task_type, &inputs, &output)
        .await?;
    Ok(())
}

/// The text of `--output-file`, read no further than the largest row a backend stores: a path that
/// never ends (`/dev/zero`, a FIFO whose writer keeps going) gets an error, not all of memory.
fn read_output_file(path: &std::path::Path) -> Result<String, Error> {
    let limit = outcache::layout::MAX_ROW_BYTES;
    outcache::config::read_text_file(path, limit).map_err(|e| match e.kind() {
        std::io::ErrorKind::FileTooLarge => Error::InvalidInput {
            what: "--output-file".into(),
            reason: format!(
                "larger than the largest row ({limit} bytes); store a big output with put-blob"
            ),
        },
        _ => Error::io("read --output-file", path, e),
    })
}

#[derive(clap::Args, Debug)]
pub(crate) struct GetArgs {
    /// The task type.
    pub(crate) task_type: String,
    /// The task's inputs as JSON.
    #[arg(long, value_name = "JSON")]
    pub(crate) inputs: String,
}

pub(crate) async fn get(ctx: &Ctx, args: GetArgs) -> Result<(), Failure> {
    let GetArgs { task_type, inputs } = args;
    let (config, run_id) = (&ctx.config, ctx.run_id.as_deref());
    let inputs = parse_json("--inputs", &inputs)?;
    let cache = open(config, run_id)?;
    match cache.get(&task_type, &inputs).await? {
        Some(value) => {
            out!("{value}");
            // Best effort: a failed access-time update must not turn a hit into an error.
            let _ = cache.flush_access().await;
        }
        None => return Err(Failure::Miss(None)),
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub(crate) struct PutBlobArgs {
    /// The task type.
    pub(crate) task_type: String,
    /// The task's inputs as JSON.
    #[arg(long, value_name = "JSON")]
    pub(crate) inputs: String,
    /// Media type to record, e.g. `image/png`.
    #[arg(long, value_name = "MIME")]
    pub(crate) mime: Option<String>,
    /// Output port the bytes belong to.
    #[arg(long, value_name = "PORT")]
    pub(crate) port: Option<String>,
    /// The file to read; `-` or nothing for stdin.
    #[arg(value_name = "FILE")]
    pub(crate) file: Option<PathBuf>,
}

pub(crate) async fn put_blob(ctx: &Ctx, args: PutBlobArgs) -> Result<(), Failure> {
    let PutBlobArgs {
        task_type,
        inputs,
        mime,
        port,
        file,
    } = args;
    let (config, run_id) = (&ctx.config, ctx.run_id.as_deref());
    let inputs = parse_json("--inputs", &inputs)?;
    let cache = open(config, run_id)?;
    let (data, size) = match file.filter(|f| f.as_os_str() != "-") {
        Some(path) => {
            let f = std::fs::File::open(&path).map_err(|e| Error::io("open", &path, e))?;
            let meta = f.metadata().ok();
            if meta.as_ref().is_some_and(std::fs::Metadata::is_dir) {
                let e = std::io::Error::from(std::io::ErrorKind::IsADirectory);
                return Err(Error::io("read", &path, e).into());
            }
            let size = meta.map(|m| m.len());
            // Read on the blocking pool one chunk ahead of the hashing, as the fs backend reads blobs
            // (tokio's file reads copied every chunk once more and never read ahead).
            let rest = Some((f, u64::MAX));
            (outcache::blob::read_ahead(rest, "read", path.clone()), size)
        }
        None => (
            outcache::blob::reader_stream(tokio::io::stdin(), READ_CHUNK),
            None,
        ),
    };
    let bar = transfer_bar(ctx.quiet, size);
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
    Ok(())
}
