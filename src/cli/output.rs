//! Output that behaves on a terminal, in a pipe and on a full disk: progress bars on stderr, human sizes
//! and times.

use futures::StreamExt;

/// A progress bar on stderr for a transfer of `size` bytes (bytes, rate, ETA), or `None` when stderr is
/// not a terminal or `--quiet` was given. Never on stdout.
pub(crate) fn transfer_bar(quiet: bool, size: Option<u64>) -> Option<indicatif::ProgressBar> {
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
pub(crate) fn counted(
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

pub(crate) fn human_bytes(n: u64) -> String {
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

pub(crate) fn human_time(ms: Option<u64>) -> String {
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
