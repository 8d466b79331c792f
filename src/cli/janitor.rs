//! `outcache stats` and `outcache prune`: the janitor from the command line.

#[allow(unused_imports)]
use super::prelude::*;

#[derive(clap::Args, Debug)]
pub(crate) struct StatsArgs {
    /// Print JSON instead of a summary.
    #[arg(long)]
    pub(crate) json: bool,
    /// How many task types to list.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub(crate) top: usize,
}

pub(crate) async fn stats(ctx: &Ctx, args: StatsArgs) -> Result<(), Failure> {
    let StatsArgs { json, top } = args;
    let (config, run_id) = (&ctx.config, ctx.run_id.as_deref());
    let cache = open(config, run_id)?;
    let inv = outcache::janitor::inventory(cache.backend().as_ref(), top).await?;
    if json {
        out!("{}", serde_json::to_string(&inv).unwrap_or_default());
    } else {
        print_inventory(&inv, &cache.backend().to_string())?;
    }
    Ok(())
}

pub(crate) async fn index_refs(ctx: &Ctx) -> Result<(), Failure> {
    if ctx.run_id.is_some() {
        return Err(outcache::Error::InvalidInput {
            what: "index-refs".into(),
            reason: "the refs index covers the whole cache: run it without --run-id".into(),
        }
        .into());
    }
    match ctx.config.location()? {
        outcache::config::Location::Cloud {
            cloud,
            bucket,
            prefix,
            options,
        } => {
            let store =
                outcache::backends::object::cloud::open(cloud, &bucket, &prefix, &options.0)?;
            let report = store.index_refs().await?;
            out!(
                "indexed {}: {} rows read, {} hold refs and are marked{}",
                store,
                report.rows,
                report.marked,
                if report.unreadable > 0 {
                    format!(
                        "; {} could not be read (see stats, prune --corrupt)",
                        report.unreadable
                    )
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        _ => {
            out!(
                "nothing to index: {} reads rows cheaply, so orphan sweeps need no refs index",
                outcache::config::redact_url(&ctx.config.url)
            );
            Ok(())
        }
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct PruneArgs {
    /// Remove rows committed longer ago than this (e.g. 30d, 12h), with their blobs.
    #[arg(long, value_name = "DURATION", value_parser = outcache::config::parse_duration)]
    pub(crate) older_than: Option<std::time::Duration>,
    /// Remove blobs no row references and stale temp files, older than --grace.
    #[arg(long)]
    pub(crate) orphans: bool,
    /// How long an orphan or temp file must have been one before it is removed, so writes in flight
    /// and readers of replaced rows are spared (default: the config file's janitor.grace, else 1h;
    /// below 1m only with --force).
    #[arg(long, value_name = "DURATION", value_parser = outcache::config::parse_duration)]
    pub(crate) grace: Option<std::time::Duration>,
    /// Accept a --grace below one minute (on a live cache it sweeps the temps of writes in flight).
    #[arg(long)]
    pub(crate) force: bool,
    /// Evict least-recently-read rows (with their blobs) until the cache fits (e.g. 10GiB). Blobs no
    /// row references (left by overwritten rows) count too and only --orphans removes them: add it, or
    /// live rows are evicted to make room for them.
    #[arg(long, value_name = "SIZE", value_parser = outcache::config::parse_size)]
    pub(crate) max_size: Option<u64>,
    /// Only consider rows whose task type starts with this.
    #[arg(long, value_name = "TASK_PREFIX")]
    pub(crate) prefix: Option<String>,
    /// Remove rows that cannot be decoded (garbled files, foreign content). Without it their presence
    /// stops an orphan sweep, since their blobs cannot be told from orphans.
    #[arg(long)]
    pub(crate) corrupt: bool,
    /// Report what would be removed; remove nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Print a JSON summary (rows_removed, blobs_removed, temps_removed, bytes_reclaimed, dry_run, …).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) async fn prune(ctx: &Ctx, args: PruneArgs) -> Result<(), Failure> {
    let PruneArgs {
        older_than,
        orphans,
        grace,
        force,
        max_size,
        prefix,
        corrupt,
        dry_run,
        json,
    } = args;
    let (config, run_id) = (&ctx.config, ctx.run_id.as_deref());
    if older_than.is_none() && !orphans && max_size.is_none() && !corrupt {
        return Err(Error::InvalidInput {
            what: "prune".into(),
            reason: "nothing to prune: give --older-than, --orphans and/or --max-size".into(),
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
    let cache = open(config, run_id)?;
    let mut options = outcache::janitor::PruneOptions::new();
    options.older_than = older_than;
    options.orphans = orphans;
    options.grace = grace;
    options.max_size = max_size;
    options.prefix = prefix;
    options.corrupt = corrupt;
    options.dry_run = dry_run;
    let bar = (!json && !ctx.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    Ok(())
}

pub(crate) fn print_inventory(
    inv: &outcache::janitor::Inventory,
    backend: &str,
) -> Result<(), Failure> {
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
            "foreign: {} entries the cache did not write (other files or objects, links, FIFOs; never touched)",
            inv.foreign_entries
        );
    }
    if !inv.rows_read {
        out!("checked: rows were listed, not read (prune --dry-run --corrupt reads them)");
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

pub(crate) fn print_report(r: &outcache::janitor::PruneReport) -> Result<(), Failure> {
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
    if let Some(size) = r.size_after {
        let verb = if r.dry_run { "would hold" } else { "holds" };
        out!(
            "  the cache {verb} {} (as --max-size counts it)",
            human_bytes(size)
        );
    }
    if r.rows_kept_rewritten > 0 {
        out!(
            "  left {} rows that changed after they were listed (rewritten, or removed by another prune)",
            r.rows_kept_rewritten
        );
    }
    Ok(())
}
