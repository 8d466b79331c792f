//! `outcache bench`: measure the configured cache in a scratch location.

#[allow(unused_imports)]
use super::prelude::*;

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Blob size to write and read (e.g. 64MiB).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = outcache::config::parse_size)]
    pub(crate) size: u64,
    /// Rows to put and get.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub(crate) rows: usize,
    /// Blob runs to take the median of.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub(crate) runs: usize,
    /// Concurrent writers for the concurrent durable-put figure.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub(crate) writers: usize,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) async fn bench(ctx: &Ctx, args: BenchArgs) -> Result<(), Failure> {
    let BenchArgs {
        size,
        rows,
        runs,
        writers,
        json,
    } = args;
    let (config, run_id) = (&ctx.config, ctx.run_id.as_deref());
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
    Ok(())
}
