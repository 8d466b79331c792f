//! The conformance suite must be able to fail: each deliberately broken backend below is caught by the
//! case that names its bug. (Every `Broken` here buffers whole streams, so it also fails the bounded
//! memory case; that is checked once, by `HoardsChunks`.)
#![cfg(feature = "conformance")]

mod common;

use std::sync::Arc;

use common::{Broken, Bug};
use outcache::conformance::{all_cases, cases};

async fn run_case(name: &str, bug: Bug) -> Result<(), String> {
    let case = all_cases()
        .into_iter()
        .find(|c| c.name == name)
        .expect("case exists");
    case.run(Arc::new(Broken::new(bug))).await.map_err(|f| f.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bug_is_caught_by_its_case() {
    let expectations = [
        (Bug::LiesAboutCapabilities, "capabilities_are_truthful"),
        (Bug::FirstWriterWins, "row_overwrite_last_writer_wins"),
        (Bug::PrefixDeletesAll, "delete_prefix_respects_boundaries"),
        (Bug::PrefixDeletesAll, "delete_prefix_cascades_to_blobs"),
        (Bug::ResolvesDotSegments, "malformed_refs_never_resolve"),
        (
            Bug::PublishesPartialBlobs,
            "failed_stream_publishes_nothing",
        ),
        (Bug::DropsLastChunk, "stream_multi_chunk"),
        (Bug::DropsLastChunk, "stream_one_byte"),
        (Bug::HoardsChunks, "stream_large_blob_bounded_memory"),
        (Bug::HidesTemps, "in_flight_write_is_listed_as_a_temp"),
    ];
    for (bug, case) in expectations {
        let result = run_case(case, bug).await;
        assert!(result.is_err(), "{case} did not catch {bug:?}");
        eprintln!("{bug:?} caught by {case}: {}", result.unwrap_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_backend_passes_the_same_cases() {
    let backend: Arc<dyn outcache::OutputCache> =
        Arc::new(outcache::backends::memory::MemoryCache::new());
    cases::stream_multi_chunk(backend.clone()).await.unwrap();
    cases::capabilities_are_truthful(backend).await.unwrap();
}

/// A rows-only backend's run reports its waivers: every case that needs blobs is `skip`ped with the
/// capabilities it needs, not counted as passed; stating the expected capabilities turns a backend that
/// claims fewer into failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waived_cases_are_reported_as_skipped_not_passed() {
    use outcache::conformance::{Fixture, RunOptions, Verdict, run};
    let rows_only = || async { Fixture::new(Arc::new(common::RowsOnly::default())) };
    let report = run(rows_only, RunOptions::default()).await;
    assert_eq!(report.failed(), 0, "{}", report.summary());
    assert!(report.skipped() >= 20, "{}", report.summary());
    assert!(report.passed() >= 8, "{}", report.summary());
    let waived = report
        .outcomes
        .iter()
        .find(|o| o.name == "stream_one_byte")
        .unwrap();
    assert_eq!(
        waived.verdict,
        Verdict::Waived {
            needs: vec!["write_blob", "open_blob", "delete_blob"]
        }
    );
    assert!(
        waived
            .line()
            .starts_with("skip  stream_one_byte (needs write_blob")
    );
    assert_eq!(
        report.summary(),
        format!(
            "{} passed, 0 failed, {} skipped",
            report.passed(),
            report.skipped()
        )
    );

    let expecting_all = || async {
        Fixture::new(Arc::new(common::RowsOnly::default())).expect(outcache::Capabilities::all())
    };
    let report = run(
        expecting_all,
        RunOptions::default().filter("row_round_trip"),
    )
    .await;
    assert_eq!(
        (report.failed(), report.passed()),
        (1, 0),
        "{}",
        report.summary()
    );
}

/// An incoherent capability set (streaming writes without reads) is refused up front by every case, with
/// one message naming the missing flag; valid sets pass `check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoherent_capabilities_are_refused_up_front() {
    use outcache::Capabilities;
    let write_only = Capabilities::rows_only().with_write_blob();
    assert_eq!(
        write_only.check(),
        Err("write_blob needs open_blob (blob capabilities come as a set)".into())
    );
    assert!(Capabilities::all().check().is_ok() && Capabilities::rows_only().check().is_ok());
    assert!(
        Capabilities::rows_only()
            .with_write_blob()
            .with_open_blob()
            .check()
            .is_err(),
        "write_blob without delete_blob"
    );
    let fixture =
        || async { outcache::conformance::Fixture::new(Arc::new(common::Claims::new(write_only))) };
    let report = outcache::conformance::run(fixture, Default::default()).await;
    assert_eq!(
        report.failed(),
        report.outcomes.len(),
        "{}",
        report.summary()
    );
    let line = report.outcomes[0].line();
    assert!(line.contains("write_blob needs open_blob"), "{line}");
}

/// A backend that leaks a temp into its storage on a failed write but leaves it out of its listing passes
/// a listing-only check; with the fixture's storage probe, the suite catches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temps_leaked_outside_the_listing_are_caught_by_the_storage_probe() {
    use outcache::conformance::{Fixture, Verdict, run_case};
    let broken = Arc::new(Broken::new(Bug::LeaksHiddenTemps));
    let leaked = broken.leaked.clone();
    let fixture = Fixture::new(broken.clone()).with_storage(move || leaked.lock().unwrap().clone());
    let verdict = run_case(
        &fixture,
        cases::failed_stream_publishes_nothing(fixture.cache()),
    )
    .await;
    match verdict {
        Verdict::Failed(f) => assert!(f.0.contains("left"), "{f}"),
        other => panic!("the leak was not caught: {other:?}"),
    }
    let blind = Fixture::new(Arc::new(Broken::new(Bug::LeaksHiddenTemps)));
    let verdict = run_case(
        &blind,
        cases::failed_stream_publishes_nothing(blind.cache()),
    )
    .await;
    assert_eq!(
        verdict,
        Verdict::Passed,
        "without a probe the listing is all the suite can see"
    );
}

/// Plants names in a `Broken` backend's "storage", beside its own blobs.
struct PlantedIn(Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>);

impl outcache::conformance::Neighbours for PlantedIn {
    fn plant(&self) -> futures::future::BoxFuture<'_, std::io::Result<Vec<String>>> {
        let names: Vec<String> = outcache::conformance::neighbours::FOREIGN_NAMES
            .iter()
            .map(|n| n.to_string())
            .collect();
        self.0.lock().unwrap().extend(names.iter().cloned());
        Box::pin(async move { Ok(names) })
    }
    fn missing<'a>(
        &'a self,
        planted: &'a [String],
    ) -> futures::future::BoxFuture<'a, std::io::Result<Vec<String>>> {
        let held = self.0.lock().unwrap().clone();
        let missing: Vec<String> = planted
            .iter()
            .filter(|n| !held.contains(*n))
            .cloned()
            .collect();
        Box::pin(async move { Ok(missing) })
    }
    fn clear<'a>(&'a self, planted: &'a [String]) -> futures::future::BoxFuture<'a, ()> {
        let mut held = self.0.lock().unwrap();
        planted.iter().for_each(|n| {
            held.remove(n);
        });
        Box::pin(async {})
    }
}

/// A backend that lists someone else's entries in its storage as its own blobs passes every other case;
/// with a fixture that plants neighbours, the suite catches the janitor sweeping them as orphans, and
/// the same backend without that bug passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_lists_foreign_entries_is_caught_by_its_neighbours() {
    use outcache::conformance::{Fixture, Verdict, run_case};
    let verdict_for = |bug| async move {
        let broken = Arc::new(Broken::new(bug));
        let planter = PlantedIn(broken.storage_neighbours.clone());
        let fixture = Fixture::new(broken).with_neighbours(planter);
        run_case(
            &fixture,
            cases::janitor_leaves_what_it_did_not_write(fixture.cache()),
        )
        .await
    };
    match verdict_for(Bug::ListsForeignEntries).await {
        Verdict::Failed(f) => assert!(f.0.contains("did not write"), "{f}"),
        other => panic!("the swept neighbours were not caught: {other:?}"),
    }
    assert_eq!(
        verdict_for(Bug::FirstWriterWins).await,
        Verdict::Passed,
        "a backend that keeps to its own entries passes the same case"
    );
}

/// A wrapper that forgets to forward one method (here `delete_blob`) silently loses the inner backend's
/// ability while still claiming it: the capability check catches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapper_that_forgets_a_method_is_caught() {
    let result =
        cases::capabilities_are_truthful(Arc::new(common::ForgetfulWrapper::default())).await;
    let failure = result.expect_err("the forgotten delete_blob was not caught");
    assert!(failure.0.contains("delete_blob"), "{failure}");
}
