//! `outcache conformance`: the suite against the configured cache, in a scratch location.

#[allow(unused_imports)]
use super::prelude::*;

pub(crate) async fn conformance(ctx: &Ctx) -> Result<(), Failure> {
    let (config, run_id) = (&ctx.config, ctx.run_id.as_deref());
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
    Ok(())
}
