//! `outcache cat`: a blob to stdout or a file, verified, never a wrong byte in a file.

#[allow(unused_imports)]
use super::prelude::*;
use std::path::Path;

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
    // Where the bytes go is settled before the first byte is fetched: a bad FILE fails fast.
    let sink = match output {
        Some(path) => Some(FileSink::for_path(&path).await?),
        None => None,
    };
    let bar = transfer_bar(ctx.quiet, full.size);
    let stream = counted(stream, &bar);
    let hold = full.size.is_some_and(|size| size <= max_buffer);
    match sink {
        Some(FileSink::Replace { path, mode }) => cat_to_file(stream, &path, mode).await?,
        Some(FileSink::Device { path, file }) if hold => {
            let bytes = outcache::blob::collect(stream).await?;
            write_all_to(file, &bytes, &path).await?;
        }
        Some(FileSink::Device { path, file }) => cat_streaming(stream, file, &path).await?,
        None if hold => {
            // Small enough to hold: verify all of it before stdout sees a byte.
            let bytes = outcache::blob::collect(stream).await?;
            write_all_to(tokio::io::stdout(), &bytes, Path::new("<stdout>")).await?;
        }
        None => cat_streaming(stream, tokio::io::stdout(), Path::new("<stdout>")).await?,
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

/// What `-o FILE` names, once symbolic links are followed.
enum FileSink {
    /// A regular file (or none yet): written beside and renamed over, keeping an existing file's mode.
    Replace { path: PathBuf, mode: Option<u32> },
    /// A device, FIFO or socket (`-o /dev/null` to verify and discard): written in place, since renaming
    /// a temp file over it would replace the device node itself with a regular file.
    Device {
        path: PathBuf,
        file: tokio::fs::File,
    },
}

impl FileSink {
    async fn for_path(path: &Path) -> Result<Self, Error> {
        use std::os::unix::fs::PermissionsExt as _;
        // Follow a link to what it names, so the rename replaces the target and keeps the link; a
        // link to nothing yet names the file to create, as `cp` reads it.
        let resolved = match tokio::fs::symlink_metadata(path).await {
            Ok(meta) if meta.file_type().is_symlink() => {
                match tokio::fs::canonicalize(path).await {
                    Ok(target) => target,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let target = tokio::fs::read_link(path)
                            .await
                            .map_err(|e| Error::io("read the symbolic link", path, e))?;
                        path.parent().unwrap_or(Path::new(".")).join(target)
                    }
                    Err(e) => return Err(Error::io("follow the symbolic link", path, e)),
                }
            }
            _ => path.to_path_buf(),
        };
        let meta = match tokio::fs::metadata(&resolved).await {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::Replace {
                    path: resolved,
                    mode: None,
                });
            }
            Err(e) => return Err(Error::io("inspect", path, e)),
        };
        if meta.is_file() {
            return Ok(Self::Replace {
                path: resolved,
                mode: Some(meta.permissions().mode() & 0o7777),
            });
        }
        if meta.is_dir() {
            return Err(Error::InvalidInput {
                what: "-o FILE".into(),
                reason: format!("{} is a directory", path.display()),
            });
        }
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&resolved)
            .await
            .map_err(|e| Error::io("open for writing", path, e))?;
        Ok(Self::Device {
            path: resolved,
            file,
        })
    }
}

/// Write `bytes` to `sink` and flush; a closed pipe is the reader's choice and ends the command quietly.
async fn write_all_to(
    mut sink: impl tokio::io::AsyncWrite + Unpin,
    bytes: &[u8],
    name: &Path,
) -> Result<(), Error> {
    // Flushed too: a tokio file finishes its last write in the background, and its error with it.
    let written = match sink.write_all(bytes).await {
        Ok(()) => sink.flush().await,
        Err(e) => Err(e),
    };
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("write", name, e)),
        _ => Ok(()),
    }
}

/// Stream a verified blob to stdout (or a device) as it arrives (a blob too large to hold): a verification
/// failure ends the stream with an error after the bytes before it went out, so the exit code tells.
async fn cat_streaming(
    mut stream: outcache::ByteStream,
    mut sink: impl tokio::io::AsyncWrite + Unpin,
    name: &Path,
) -> Result<(), Error> {
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if let Err(e) = sink.write_all(&chunk).await {
            // A closed pipe (`| head`) is the reader's choice, not our failure.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(Error::io("write", name, e));
        }
    }
    match sink.flush().await {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("flush", name, e)),
        _ => Ok(()),
    }
}

/// Write a verified blob to `path`: into a temp file beside it, renamed into place only once every byte
/// was verified and synced, so `path` never holds wrong or partial bytes. The temp goes on any failure.
/// A new file gets 0666 less the umask, as `cp` would give it; a replaced one keeps its mode.
async fn cat_to_file(
    mut stream: outcache::ByteStream,
    path: &Path,
    mode: Option<u32>,
) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".outcache-cat-")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o666))
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
    if let Some(mode) = mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .await
            .map_err(|e| Error::io("set the mode of", &*tmp_path, e))?;
    }
    file.sync_all()
        .await
        .map_err(|e| Error::io("fsync", &*tmp_path, e))?;
    drop(file);
    tmp_path
        .persist(path)
        .map_err(|e| Error::io("rename into place", path, e.error))?;
    // The rename is durable once its directory is; a failure here leaves the file in place, so say nothing.
    if let Ok(dir) = std::fs::File::open(&dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}
