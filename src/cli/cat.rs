//! `outcache cat`: a blob to stdout or a file, verified, never a wrong byte in a file.

#[allow(unused_imports)]
use super::prelude::*;

#[derive(clap::Args, Debug)]
pub(crate) struct CatArgs {
    /// The CacheRef JSON or ref string.
    #[arg(value_name = "REF")]
    pub(crate) reference: String,
    /// Write to FILE (atomically, only once verified) instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Largest blob held in memory to verify before anything reaches stdout (e.g. 64MiB).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = outcache::config::parse_size)]
    pub(crate) max_buffer: u64,
}

pub(crate) async fn cat(ctx: &Ctx, args: CatArgs) -> Result<(), Failure> {
    let CatArgs {
        reference,
        output,
        max_buffer,
    } = args;
    let (config, run_id) = (&ctx.config, ctx.run_id.as_deref());
    let cache_ref = CacheRef::parse_arg(&reference)?;
    let cache = open(config, run_id)?;
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
    let bar = transfer_bar(ctx.quiet, full.size);
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
    Ok(())
}

/// Stream a verified blob to stdout as it arrives (a blob too large to hold): a verification failure
/// ends the stream with an error, after the bytes before it were written.
pub(crate) async fn cat_streaming(mut stream: outcache::ByteStream) -> Result<(), Error> {
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
pub(crate) async fn cat_to_file(
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
