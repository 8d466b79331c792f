//! `outcache serve`: the cache as a remote cache server (see `outcache::serve` for the protocols).

use super::prelude::*;

/// The flags; each one not given falls back on the config file's `[serve]` table, then the default.
#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    /// Address to listen on, IP:PORT or HOST:PORT [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR", value_parser = outcache::config::parse_listen_addr)]
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// File of tokens, one per line: `rw TOKEN` (read and write) or `ro TOKEN` (read only). With any,
    /// every request but /healthz and /readyz needs one. Read again on SIGHUP. Also
    /// `OUTCACHE_SERVE_TOKENS_FILE`.
    #[arg(long, value_name = "PATH", env = "OUTCACHE_SERVE_TOKENS_FILE")]
    pub(crate) tokens_file: Option<std::path::PathBuf>,
    /// Accept writes without a token (only when no tokens are configured).
    #[arg(long)]
    pub(crate) allow_anonymous_writes: bool,
    /// Largest upload accepted (413 above it, nothing stored) [default: 4GiB].
    #[arg(long, value_name = "SIZE", value_parser = outcache::config::parse_size)]
    pub(crate) max_body: Option<u64>,
    /// Longest wait for a client to send the next bytes of an upload (else 408, nothing stored) or to
    /// take the next bytes of a download (else the connection is closed). 0 turns the limit off
    /// [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = outcache::config::parse_duration)]
    pub(crate) idle_timeout: Option<std::time::Duration>,
    /// Connections open at once; clients past it wait to be accepted until one closes. Lowered (with a
    /// warning) when the open-file limit could not hold that many connections and their files
    /// [default: 1024].
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) max_connections: Option<usize>,
    /// Run the janitor this often while serving (with --older-than, --max-size, --orphans).
    #[arg(long, value_name = "DURATION", value_parser = outcache::config::parse_duration)]
    pub(crate) prune_every: Option<std::time::Duration>,
    /// With --prune-every: remove rows committed longer ago than this.
    #[arg(long, value_name = "DURATION", value_parser = outcache::config::parse_duration)]
    pub(crate) older_than: Option<std::time::Duration>,
    /// With --prune-every: keep the cache under this size, least recently used rows first (as
    /// bazel-remote's LRU). Add --orphans: blobs left by re-uploaded keys count against it too.
    #[arg(long, value_name = "SIZE", value_parser = outcache::config::parse_size)]
    pub(crate) max_size: Option<u64>,
    /// With --prune-every: also remove orphan blobs and stale temps older than the configured grace.
    #[arg(long)]
    pub(crate) orphans: bool,
}

/// What the server runs with: each flag, else its `[serve]` key in the config file, else the default.
struct Settings {
    listen: std::net::SocketAddr,
    tokens_file: Option<std::path::PathBuf>,
    allow_anonymous_writes: bool,
    max_body: u64,
    idle_timeout: std::time::Duration,
    max_connections: usize,
    prune_every: Option<std::time::Duration>,
    older_than: Option<std::time::Duration>,
    max_size: Option<u64>,
    orphans: bool,
}

impl Settings {
    fn new(args: ServeArgs, file: &outcache::config::ServeSettings) -> Self {
        Settings {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or(outcache::serve::DEFAULT_LISTEN),
            tokens_file: args.tokens_file.or_else(|| file.tokens_file.clone()),
            allow_anonymous_writes: args.allow_anonymous_writes
                || file.allow_anonymous_writes == Some(true),
            max_body: args
                .max_body
                .or(file.max_body)
                .unwrap_or(outcache::serve::DEFAULT_MAX_BODY),
            idle_timeout: args
                .idle_timeout
                .or(file.idle_timeout)
                .unwrap_or(outcache::serve::DEFAULT_IDLE_TIMEOUT),
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(outcache::serve::DEFAULT_MAX_CONNECTIONS),
            prune_every: args.prune_every.or(file.prune_every),
            older_than: args.older_than.or(file.older_than),
            max_size: args.max_size.or(file.max_size),
            orphans: args.orphans || file.orphans == Some(true),
        }
    }
}

pub(crate) async fn serve(ctx: &Ctx, args: ServeArgs) -> Result<(), Failure> {
    let settings = Settings::new(args, &ctx.config.serve);
    let mut tokens = outcache::serve::Tokens::default();
    let mut exposed_tokens = None;
    if let Some(path) = &settings.tokens_file {
        tokens = read_tokens(path)?;
        exposed_tokens = readable_by_others(path);
    }
    if settings.prune_every.is_some()
        && settings.older_than.is_none()
        && settings.max_size.is_none()
        && !settings.orphans
    {
        return Err(outcache::Error::InvalidInput {
            what: "--prune-every".into(),
            reason: "says when, not what: add --older-than, --max-size or --orphans".into(),
        }
        .into());
    }
    if settings.prune_every.is_none() {
        // Each of these only shapes the scheduled janitor: without a schedule it would be taken and
        // silently do nothing, and the operator would believe the cache bounded.
        let given = [
            ("--older-than", settings.older_than.is_some()),
            ("--max-size", settings.max_size.is_some()),
            ("--orphans", settings.orphans),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, given)| *given) {
            return Err(outcache::Error::InvalidInput {
                what: flag.to_string(),
                reason: "says what to prune, not when: add --prune-every (e.g. 10m; prune_every in the [serve] table)"
                    .into(),
            }
            .into());
        }
    }
    if settings.prune_every.is_some_and(|every| every.is_zero()) {
        return Err(outcache::Error::InvalidInput {
            what: "--prune-every".into(),
            reason: "must be longer than zero (e.g. 10m)".into(),
        }
        .into());
    }
    let cache = open(&ctx.config, ctx.run_id.as_deref())?;
    // Handlers go in before the address is announced: a client (or a test) that reacts to the address
    // line with a SIGTERM must get the graceful stop, not the default death.
    let stop = super::signals::stop_signals();
    let hangups = settings.tokens_file.as_ref().and_then(|_| hangups());
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| outcache::Error::io("listen on", settings.listen.to_string(), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| outcache::Error::io("listen on", settings.listen.to_string(), e))?;
    let writes = if !tokens.is_empty() {
        tokens.describe()
    } else if settings.allow_anonymous_writes {
        "no tokens, anonymous writes allowed".into()
    } else {
        "no tokens: reads only".into()
    };
    say!(
        "outcache serve: {} on http://{bound} ({writes})",
        cache.backend()
    );
    if tokens.is_empty() && !bound.ip().is_loopback() {
        let who = if settings.allow_anonymous_writes {
            "read and write"
        } else {
            "read"
        };
        say!(
            "outcache serve: warning: {bound} is reachable beyond this machine and no tokens are \
             configured: anyone who reaches it can {who} the cache (add --tokens-file)"
        );
    }
    if let Some(warning) = exposed_tokens {
        say!("outcache serve: warning: {warning}");
    }
    let max_connections = connections_the_file_limit_allows(settings.max_connections);
    let janitor = settings.prune_every.map(|every| {
        let mut options = outcache::janitor::PruneOptions::new();
        options.older_than = settings.older_than;
        options.max_size = settings.max_size;
        options.orphans = settings.orphans;
        options.grace = ctx.config.janitor_grace;
        outcache::serve::JanitorSchedule { every, options }
    });
    if settings.prune_every.is_some() && !settings.orphans {
        say!(
            "outcache serve: warning: the janitor runs without --orphans: a key uploaded again leaves \
             its old blob behind, and an upload cut off by a crash its temp file; nothing removes \
             them{}",
            if settings.max_size.is_some() {
                ", and --max-size evicts live entries to make room for them"
            } else {
                ""
            }
        );
    }
    if let (Some(path), Some(hangups)) = (settings.tokens_file.clone(), hangups) {
        tokio::spawn(reload_tokens_on_hangup(hangups, path, tokens.clone()));
    }
    let options = outcache::serve::ServeOptions {
        tokens,
        allow_anonymous_writes: settings.allow_anonymous_writes,
        max_body: settings.max_body,
        idle_timeout: settings.idle_timeout,
        max_connections,
        access_log: !ctx.quiet,
        janitor,
    };
    let (first_signal, stopping) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        let signal = stop.await;
        say!(
            "outcache serve: {}: finishing requests in flight (send it again to stop now)",
            signal.name()
        );
        let _ = first_signal.send(());
    };
    // A second signal stops at once: requests still in flight (an upload whose client stalled) are
    // dropped, and a dropped upload publishes nothing and removes its temp file, as a cut-off one does.
    let second_signal = async move {
        match stopping.await {
            Ok(()) => super::signals::stop_signals().await,
            Err(_) => std::future::pending().await,
        }
    };
    let serving = outcache::serve::serve(listener, cache.clone(), options, shutdown);
    let (served, forced) = tokio::select! {
        served = serving => (Some(served), None),
        signal = second_signal => (None, Some(signal)),
    };
    cache.flush_access().await?;
    if let Some(signal) = forced {
        say!(
            "outcache serve: {} again: stopped; uploads still arriving were dropped and stored nothing",
            signal.name()
        );
        return Err(Failure::Interrupted(signal));
    }
    if let Some(served) = served {
        served?;
    }
    Ok(())
}

/// Descriptors kept back for the process itself (the cache's database, logs, the janitor).
const FILES_KEPT_BACK: u64 = 64;

/// `wanted`, or fewer if the open-file limit cannot hold that many connections with the file or two
/// each of their transfers opens (a connection past the limit would fail its transfers with EMFILE
/// instead of waiting its turn). The soft limit is raised to the hard one first, as Go's runtime and
/// most servers do: the soft default (often 1024) is a leftover of `select`.
fn connections_the_file_limit_allows(wanted: usize) -> usize {
    let Some(files) = raise_open_file_limit() else {
        return wanted;
    };
    let room = usize::try_from(files.saturating_sub(FILES_KEPT_BACK) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    if wanted > room {
        say!(
            "outcache serve: warning: the open-file limit ({files}) holds {room} connections, not \
             {wanted}: serving at most {room} at once (raise `ulimit -n` for more)"
        );
        return room;
    }
    wanted
}

/// The open-file limit after raising the soft limit to the hard one, if it can be read.
#[cfg(target_os = "linux")]
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Some(limit.rlim_cur)
}

#[cfg(not(target_os = "linux"))]
fn raise_open_file_limit() -> Option<u64> {
    None
}

/// The tokens in the file at `path`. Fails closed: a file whose every line is commented out would
/// otherwise serve the cache to anyone, which is not what naming a tokens file asks for.
fn read_tokens(path: &std::path::Path) -> Result<outcache::serve::Tokens, outcache::Error> {
    let invalid = |reason: String| outcache::Error::InvalidInput {
        what: format!("tokens file {}", path.display()),
        reason,
    };
    let text = outcache::config::read_text_file(path, outcache::config::MAX_SETTINGS_FILE)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::FileTooLarge => invalid(e.to_string()),
            _ => outcache::Error::io("read tokens file", path, e),
        })?;
    let tokens = outcache::serve::Tokens::parse(&text).map_err(invalid)?;
    if tokens.is_empty() {
        return Err(invalid(
            "holds no token (lines `rw TOKEN` or `ro TOKEN`)".into(),
        ));
    }
    Ok(tokens)
}

/// SIGHUP, caught from now on (before the address is announced, so an early one cannot kill the
/// server the default way).
#[cfg(unix)]
fn hangups() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangups() -> Option<std::convert::Infallible> {
    None
}

/// On each SIGHUP, reads the tokens file again and checks requests against what it now holds (a
/// token can be added or revoked without a restart). A file that cannot be read, does not parse or
/// holds no token is refused, and the tokens in use are kept.
#[cfg(unix)]
async fn reload_tokens_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    path: std::path::PathBuf,
    tokens: outcache::serve::Tokens,
) {
    while hangups.recv().await.is_some() {
        match read_tokens(&path) {
            Ok(new) => {
                tokens.replace_with(&new);
                say!(
                    "outcache serve: SIGHUP: reloaded tokens file {} ({})",
                    path.display(),
                    new.describe()
                );
                if let Some(warning) = readable_by_others(&path) {
                    say!("outcache serve: warning: {warning}");
                }
            }
            Err(e) => say!("outcache serve: SIGHUP: kept the tokens in use: {e}"),
        }
    }
}

#[cfg(not(unix))]
async fn reload_tokens_on_hangup(
    hangups: std::convert::Infallible,
    _path: std::path::PathBuf,
    _tokens: outcache::serve::Tokens,
) {
    match hangups {}
}

/// Why the tokens file at `path` is exposed, if users other than its owner may read it (as ssh says
/// of private keys).
#[cfg(unix)]
fn readable_by_others(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "tokens file {} is readable by others (mode {mode:o}): `chmod 600` it",
            path.display()
        )
    })
}

#[cfg(not(unix))]
fn readable_by_others(_path: &std::path::Path) -> Option<String> {
    None
}
