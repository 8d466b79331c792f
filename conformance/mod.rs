//! The conformance suite: every invariant of the design (rows, streaming, atomic publish, ref safety,
//! cascades, orphan cleanup, concurrent writers, truthful capabilities) as a named case that any backend or
//! wrapper can run. Backend authors call it from their own tests through [`conformance_tests!`](crate::conformance_tests)
//! (one `#[tokio::test]` per case); operators run it against a live endpoint with `outcache conformance`.
//!
//! ```text
//! // tests/conformance_mybackend.rs (needs the `conformance` feature and tokio as dev-dependencies)
//! outcache::conformance_tests!(|| async {
//!     outcache::conformance::Fixture::new(std::sync::Arc::new(MyBackend::connect().await))
//! });
//! ```
//!
//! Each case gets a fresh, empty backend from the factory and may write anything into it. A case that needs
//! a capability the backend does not claim checks that the method returns [`crate::Error::Unsupported`]
//! instead, so capabilities are proven truthful both ways.

pub mod cases;
pub mod neighbours;
pub mod support;

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::config::Location;
use crate::error::Result;
use crate::store::OutputCache;

#[cfg(feature = "object-store")]
pub use neighbours::ObjectNeighbours;
pub use neighbours::{DirNeighbours, Neighbours};
pub use support::FailingRows;

/// Why a case failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<crate::Error> for Failure {
    fn from(e: crate::Error) -> Self {
        Failure(format!("unexpected error: {e}"))
    }
}

/// What a case function returns: `Ok(())` if it held (or was waived: see [`Verdict`]), or why not.
pub type CaseResult = std::result::Result<(), Failure>;

tokio::task_local! {
    /// The capabilities the running case found missing (and refused, as they must be).
    static WAIVERS: std::cell::RefCell<Vec<&'static str>>;
    /// The fixture's view of everything the backend stores, if it gave one ([`Fixture::with_storage`]).
    static STORAGE: Option<StorageProbe>;
    /// How the fixture plants entries the backend did not write, if it said ([`Fixture::with_neighbours`]).
    static NEIGHBOURS: Option<Arc<dyn Neighbours>>;
}

/// Lists everything a backend stores (files, objects, records: names the fixture chooses), so cases can
/// check that nothing was left behind that the backend's own listing hides.
pub type StorageProbe = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Everything the backend under test stores, if its fixture said how to see it.
pub(crate) fn stored_now() -> Option<Vec<String>> {
    STORAGE
        .try_with(|probe| probe.as_ref().map(|p| p()))
        .ok()
        .flatten()
}

/// How the running case's fixture plants neighbours, if it said.
pub(crate) fn neighbours_now() -> Option<Arc<dyn Neighbours>> {
    NEIGHBOURS.try_with(|n| n.clone()).ok().flatten()
}

/// Record that the running case was waived for want of `capability` (its gate calls this after checking
/// that the missing method refuses with `Unsupported`).
pub(crate) fn note_waiver(capability: &'static str) {
    let _ = WAIVERS.try_with(|w| w.borrow_mut().push(capability));
}

/// How one case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The case ran and its invariant held.
    Passed,
    /// The case needs capabilities the backend does not claim (it only checked that each refuses with
    /// `Unsupported`), or a fixture hook the fixture does not give (`neighbours`:
    /// [`Fixture::with_neighbours`]). Not a pass: nothing else was tested.
    Waived {
        /// What it needs: names of [`Capabilities`](crate::Capabilities) fields, or `neighbours`.
        needs: Vec<&'static str>,
    },
    /// The case failed (or the backend claims fewer capabilities than the fixture expects).
    Failed(Failure),
}

/// Run one case future (a `conformance::cases::*` function called with `fixture.cache()`) and tell
/// passed, waived and failed apart. A fixture that states what it expects ([`Fixture::expect`]) fails
/// every case when the backend claims less.
pub async fn run_case(
    fixture: &Fixture,
    case: impl std::future::Future<Output = CaseResult>,
) -> Verdict {
    if let Err(incoherent) = fixture.cache.capabilities().check() {
        return Verdict::Failed(Failure(format!(
            "the backend claims an incoherent capability set: {incoherent}"
        )));
    }
    if let Some(missing) = fixture.missing_expected() {
        return Verdict::Failed(Failure(format!(
            "the backend does not claim {missing}, which the fixture expects"
        )));
    }
    let waivers = std::cell::RefCell::new(Vec::new());
    let (result, waivers) = STORAGE
        .scope(
            fixture.storage.clone(),
            NEIGHBOURS.scope(
                fixture.neighbours.clone(),
                WAIVERS.scope(waivers, async {
                    let result = case.await;
                    (result, WAIVERS.with(|w| w.take()))
                }),
            ),
        )
        .await;
    match result {
        Err(failure) => Verdict::Failed(failure),
        Ok(()) if waivers.is_empty() => Verdict::Passed,
        Ok(()) => Verdict::Waived { needs: waivers },
    }
}

/// A backend under test, plus whatever must stay alive while it is used (a temp dir) and is cleaned up
/// when the fixture is dropped.
pub struct Fixture {
    cache: Arc<dyn OutputCache>,
    /// What `finish` empties: the backing store, also when `cache` is a wrapper over it.
    backing: Arc<dyn OutputCache>,
    _guard: Option<Box<dyn Any + Send + Sync>>,
    empty_afterwards: bool,
    skip: Option<String>,
    expected: Option<crate::Capabilities>,
    storage: Option<StorageProbe>,
    neighbours: Option<Arc<dyn Neighbours>>,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("cache", &self.cache)
            .finish()
    }
}

impl Fixture {
    /// A fixture for a backend that needs no cleanup.
    pub fn new(cache: Arc<dyn OutputCache>) -> Self {
        Fixture {
            backing: cache.clone(),
            cache,
            _guard: None,
            empty_afterwards: false,
            skip: None,
            expected: None,
            storage: None,
            neighbours: None,
        }
    }

    /// Say how to see everything the backend stores (file names under its directory, object keys …):
    /// the cases for failed and dropped writes then check that nothing was left behind on the medium,
    /// not only in the backend's own listing.
    pub fn with_storage(mut self, probe: impl Fn() -> Vec<String> + Send + Sync + 'static) -> Self {
        self.storage = Some(Arc::new(probe));
        self
    }

    /// Say how to plant entries the backend did not write among its own ([`DirNeighbours`] for a
    /// directory, `ObjectNeighbours` for a key prefix): the case for invariant 16 then checks that
    /// the janitor leaves them alone. Without it that case is waived (`needs neighbours`).
    pub fn with_neighbours(mut self, neighbours: impl Neighbours + 'static) -> Self {
        self.neighbours = Some(Arc::new(neighbours));
        self
    }

    /// State the capabilities the backend must claim: if it claims fewer, every case fails (instead of
    /// the cases that need them being waived), so a backend that loses a capability cannot pass quietly.
    pub fn expect(mut self, capabilities: crate::Capabilities) -> Self {
        self.expected = Some(capabilities);
        self
    }

    /// The first expected capability the backend does not claim, if any.
    fn missing_expected(&self) -> Option<&'static str> {
        let expected = self.expected?;
        let claimed = self.cache.capabilities();
        expected
            .flags()
            .into_iter()
            .zip(claimed.flags())
            .find(|((_, want), (_, have))| *want && !*have)
            .map(|((name, _), _)| name)
    }

    /// A fixture that tells the test to skip, with the reason printed (for suites that need a server the
    /// environment does not name). Use it only outside CI: under `CI=true` a missing server must fail.
    pub fn skip(reason: impl Into<String>) -> Self {
        let mut f = Fixture::new(Arc::new(crate::backends::memory::MemoryCache::new()));
        f.skip = Some(reason.into());
        f
    }

    /// Why the test should be skipped, if it should.
    pub fn skip_reason(&self) -> Option<&str> {
        self.skip.as_deref()
    }

    /// After the case, delete every row and blob through the trait (for stores where the fixture owns a
    /// key prefix rather than a directory).
    pub fn empty_afterwards(mut self) -> Self {
        self.empty_afterwards = true;
        self
    }

    /// The same fixture with its backend replaced by `wrap(backend)` (a wrapper under test); cleanup
    /// still empties the backing store.
    pub fn wrapped(
        mut self,
        wrap: impl FnOnce(Arc<dyn OutputCache>) -> Result<Arc<dyn OutputCache>>,
    ) -> Result<Self> {
        self.cache = wrap(self.cache)?;
        Ok(self)
    }

    /// Clean up after a case: empty the backing store if asked to, then drop the guard.
    pub async fn finish(self) {
        if self.empty_afterwards {
            let _ = self.backing.delete_prefix("").await;
            let _ =
                crate::janitor::sweep_orphans(self.backing.as_ref(), Duration::ZERO, false).await;
        }
    }

    /// A fixture that keeps `guard` alive as long as the backend and drops it afterwards (e.g. a
    /// `tempfile::TempDir` that removes the backend's directory).
    pub fn with_guard(cache: Arc<dyn OutputCache>, guard: impl Any + Send + Sync) -> Self {
        Fixture {
            _guard: Some(Box::new(guard)),
            ..Fixture::new(cache)
        }
    }

    /// The backend under test.
    pub fn cache(&self) -> Arc<dyn OutputCache> {
        self.cache.clone()
    }
}

/// Every file under `dir` (relative paths), for [`Fixture::with_storage`] of directory-backed stores.
pub fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap_or(&path);
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// Ready-made fixtures for the built-in backends.
pub mod fixtures {
    use super::*;

    /// A fresh in-memory backend.
    pub fn memory() -> Fixture {
        Fixture::new(Arc::new(crate::backends::memory::MemoryCache::new()))
    }

    /// A fresh fs backend in a temp directory that is removed afterwards. Panics if the temp directory
    /// cannot be made: it is a test fixture, and a test cannot go on without it.
    #[cfg(feature = "fs")]
    #[allow(clippy::expect_used)]
    pub fn fs_temp() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("outcache-conformance-")
            .tempdir()
            .expect("create a temp dir for the fs backend");
        let cache = crate::backends::fs::FsCache::open(dir.path(), Default::default())
            .expect("open the fs backend in a temp dir");
        let root = dir.path().to_path_buf();
        Fixture::with_guard(Arc::new(cache), dir)
            .with_neighbours(DirNeighbours::new(&root))
            .with_storage(move || files_under(&root))
    }

    /// A fresh SQLite backend in a temp directory that is removed afterwards. Panics if it cannot be
    /// made: it is a test fixture.
    #[cfg(feature = "sqlite")]
    #[allow(clippy::expect_used)]
    pub fn sqlite_temp() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("outcache-conformance-")
            .tempdir()
            .expect("create a temp dir for the sqlite backend");
        let cache = crate::backends::sqlite::SqliteCache::open(
            dir.path().join("cache.db"),
            Default::default(),
        )
        .expect("open the sqlite backend in a temp dir");
        let neighbours = DirNeighbours::new(dir.path());
        Fixture::with_guard(Arc::new(cache), dir).with_neighbours(neighbours)
    }
}

/// One named case of the suite.
#[derive(Clone, Copy)]
pub struct Case {
    /// The case's name (also its function name in [`cases`]).
    pub name: &'static str,
    run: fn(Arc<dyn OutputCache>) -> BoxFuture<'static, CaseResult>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl Case {
    /// Run the case against `cache`.
    pub fn run(&self, cache: Arc<dyn OutputCache>) -> BoxFuture<'static, CaseResult> {
        (self.run)(cache)
    }
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_registry {
    (; $($case:ident),* $(,)?) => {
        vec![$($crate::conformance::Case::__new(stringify!($case), |c| Box::pin($crate::conformance::cases::$case(c)))),*]
    };
}

impl Case {
    #[doc(hidden)]
    pub fn __new(
        name: &'static str,
        run: fn(Arc<dyn OutputCache>) -> BoxFuture<'static, CaseResult>,
    ) -> Self {
        Case { name, run }
    }
}

/// Every case of the suite, in a stable order.
pub fn all_cases() -> Vec<Case> {
    crate::__conformance_each_case!(__conformance_registry,)
}

/// Expand `$m!{ args ; case, case, … }` with the list of all cases: the one place that list is kept.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_each_case {
    ($m:ident, $($args:tt)*) => {
        $crate::$m! { $($args)* ;
            row_round_trip,
            row_miss_is_none,
            row_overwrite_last_writer_wins,
            row_delete_removes_only_that_row,
            row_keys_are_distinct,
            row_output_json_is_preserved,
            row_created_at_is_recent,
            stream_empty_blob,
            stream_one_byte,
            stream_multi_chunk,
            stream_large_blob_bounded_memory,
            stream_records_size_mime_port_sha256,
            stream_read_chunks_are_bounded,
            stream_names_are_unique,
            failed_stream_publishes_nothing,
            dropped_write_publishes_nothing,
            write_dropped_at_any_await_leaves_nothing,
            in_flight_write_is_not_published,
            unknown_ref_is_none,
            foreign_refs_never_resolve,
            malformed_refs_never_resolve,
            malformed_refs_never_delete,
            delete_blob_is_idempotent,
            delete_blob_touches_only_its_blob,
            dropped_read_stream_releases_blob,
            read_stream_outlives_the_blobs_deletion,
            range_reads_start_middle_end,
            open_blob_range_empty_and_past_the_end,
            delete_row_cascades_to_blobs,
            delete_rows_removes_each_with_blobs,
            read_stream_outlives_its_rows_delete,
            delete_prefix_cascades_to_blobs,
            delete_prefix_respects_boundaries,
            age_prune_cascades_and_spares_newer,
            a_delete_takes_only_its_rows_blobs_whatever_it_is_handed,
            row_commit_failure_removes_blob,
            janitor_sees_unreferenced_blob,
            janitor_sweep_keeps_referenced_blobs,
            concurrent_writers_same_key,
            concurrent_writers_different_keys,
            concurrent_cleanup_spares_other_writers,
            capabilities_are_truthful,
            stats_count_rows_and_blobs,
            touch_rows_moves_last_access,
            engine_small_output_goes_inline,
            engine_large_output_becomes_verified_ref,
            engine_resolve_hydrates_branded_refs_only,
            engine_refuses_task_types_in_a_run_namespace,
            engine_outputs_nest_to_the_limit_and_read_back,
            distinct_big_integers_are_distinct_rows,
            borrowed_refs_survive_the_borrowers_delete,
            hit_with_a_missing_blob_is_a_miss,
            stalled_write_swept_never_reports_an_unreadable_blob,
            janitor_keeps_rows_rewritten_after_its_listing,
            janitor_spares_the_blob_of_a_newer_write_in_flight,
            two_janitors_at_once_both_finish_and_leave_nothing_behind,
            an_age_prune_with_the_sweep_takes_an_overwritten_blob_once,
            orphan_grace_counts_from_when_it_became_one,
            in_flight_write_is_listed_as_a_temp,
            janitor_leaves_what_it_did_not_write,
        }
    };
}

/// Expand to one `#[tokio::test]` per conformance case, each calling `$factory().await` for a fresh
/// [`Fixture`]. Tokio is reached through this crate: the caller needs no tokio dependency of its own. The
/// test functions are named after the cases, so give each call its own module (`mod memory {
/// outcache::conformance_tests!(…); }`) to run the suite on several backends from one file. A waived
/// case passes with a `WAIVED … needs …` line on stderr; [`run`] gives the table and the closing line.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::__conformance_each_case!(__conformance_test_fns, $factory);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test_fns {
    ($factory:expr ; $($case:ident),* $(,)?) => {
        $(
            #[$crate::__private::tokio::test(
                flavor = "multi_thread",
                worker_threads = 4,
                crate = "outcache::__private::tokio"
            )]
            async fn $case() {
                let fixture: $crate::conformance::Fixture = ($factory)().await;
                if let Some(reason) = fixture.skip_reason() {
                    eprintln!("SKIPPED conformance case {}: {}", stringify!($case), reason);
                    return;
                }
                let verdict = $crate::conformance::run_case(
                    &fixture,
                    $crate::conformance::cases::$case(fixture.cache()),
                )
                .await;
                fixture.finish().await;
                match verdict {
                    $crate::conformance::Verdict::Passed => {}
                    $crate::conformance::Verdict::Waived { needs } => eprintln!(
                        "WAIVED conformance case {}: needs {}",
                        stringify!($case),
                        needs.join(", ")
                    ),
                    $crate::conformance::Verdict::Failed(failure) => {
                        panic!("conformance case {} failed: {}", stringify!($case), failure)
                    }
                }
            }
        )*
    };
}

/// One case's outcome in a suite run.
#[derive(Debug, Clone)]
pub struct CaseOutcome {
    /// The case.
    pub name: &'static str,
    /// Passed, waived or failed.
    pub verdict: Verdict,
    /// How long it took.
    pub elapsed: Duration,
}

impl CaseOutcome {
    /// The report line for this case, as the CLI and [`run`] print it: `ok`, `skip` (with the
    /// capabilities it needs) or `FAIL` (with why).
    pub fn line(&self) -> String {
        let ms = self.elapsed.as_millis();
        match &self.verdict {
            Verdict::Passed => format!("ok    {} ({ms} ms)", self.name),
            Verdict::Waived { needs } => {
                format!("skip  {} (needs {})", self.name, needs.join(", "))
            }
            Verdict::Failed(f) => format!("FAIL  {} ({ms} ms): {f}", self.name),
        }
    }
}

/// The outcomes of a suite run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One per case, in the suite's order.
    pub outcomes: Vec<CaseOutcome>,
}

impl Report {
    fn count(&self, pick: impl Fn(&Verdict) -> bool) -> usize {
        self.outcomes.iter().filter(|o| pick(&o.verdict)).count()
    }

    /// Cases that ran and held.
    pub fn passed(&self) -> usize {
        self.count(|v| matches!(v, Verdict::Passed))
    }

    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.count(|v| matches!(v, Verdict::Failed(_)))
    }

    /// Cases waived for capabilities the backend does not claim.
    pub fn skipped(&self) -> usize {
        self.count(|v| matches!(v, Verdict::Waived { .. }))
    }

    /// The closing line CI reads: `N passed, N failed, N skipped`.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed(),
            self.failed(),
            self.skipped()
        )
    }
}

/// Options for [`run`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RunOptions {
    /// Run only the cases whose name contains this.
    pub filter: Option<String>,
    /// Print each case's line and the closing line to stdout as the run goes (as the CLI does).
    pub print: bool,
}

impl RunOptions {
    /// Set [`RunOptions::filter`].
    pub fn filter(mut self, filter: impl Into<String>) -> Self {
        self.filter = Some(filter.into());
        self
    }

    /// Set [`RunOptions::print`].
    pub fn print(mut self, print: bool) -> Self {
        self.print = print;
        self
    }
}

/// Run the suite against fixtures from `factory` (a fresh backend per case): the runner for a
/// third-party backend's own test or `conformance` binary. A panicking or hung case is a failure.
///
/// ```no_run
/// # async fn demo() {
/// use outcache::conformance::{Fixture, RunOptions, run};
/// let report = run(|| async { Fixture::new(std::sync::Arc::new(outcache::backends::memory::MemoryCache::new())) },
///                  RunOptions::default().print(true)).await;
/// assert_eq!(report.failed(), 0, "{}", report.summary());
/// # }
/// ```
pub async fn run<F, Fut>(factory: F, options: RunOptions) -> Report
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Fixture>,
{
    let mut report = Report::default();
    for case in all_cases() {
        if options
            .filter
            .as_deref()
            .is_some_and(|f| !case.name.contains(f))
        {
            continue;
        }
        let fixture = factory().await;
        let outcome = run_one(&case, fixture).await;
        if options.print {
            println!("{}", outcome.line());
        }
        report.outcomes.push(outcome);
    }
    if options.print {
        println!("{}", report.summary());
    }
    report
}

/// Run `case` on `fixture` with a timeout and panic capture, then clean the fixture up.
async fn run_one(case: &Case, fixture: Fixture) -> CaseOutcome {
    let started = Instant::now();
    let future =
        std::panic::AssertUnwindSafe(run_case(&fixture, case.run(fixture.cache()))).catch_unwind();
    let verdict = match tokio::time::timeout(CASE_TIMEOUT, future).await {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(panic)) => Verdict::Failed(Failure(format!("panicked: {}", panic_message(&panic)))),
        Err(_) => Verdict::Failed(Failure(format!("timed out after {CASE_TIMEOUT:?}"))),
    };
    fixture.finish().await;
    CaseOutcome {
        name: case.name,
        verdict,
        elapsed: started.elapsed(),
    }
}

/// Longest a single case may run before it counts as failed (hung).
pub const CASE_TIMEOUT: Duration = Duration::from_secs(300);

/// Run every case against isolated children of `location` (see [`isolated_fixture`]), each through
/// `wrap` (the identity, or a wrapper under test), calling `report` after each one. A panicking or hung
/// case is a failure, not a crash of the run.
pub async fn run_suite(
    location: &Location,
    wrap: impl Fn(Arc<dyn OutputCache>) -> Result<Arc<dyn OutputCache>>,
    report: impl FnMut(&CaseOutcome),
) -> Result<Vec<CaseOutcome>> {
    run_suite_in(location, &new_run_tag(), wrap, report).await
}

/// A fresh run tag, `outcache-conformance-<uuid>`: the scratch directory (or key prefix) of one run.
pub fn new_run_tag() -> String {
    format!("outcache-conformance-{}", uuid::Uuid::new_v4().simple())
}

/// [`run_suite`] under a run tag the caller chose (from [`new_run_tag`]), so that it can remove the
/// run's scratch space with [`remove_run_dir`] if it stops the run early (a signal).
pub async fn run_suite_in(
    location: &Location,
    run_tag: &str,
    wrap: impl Fn(Arc<dyn OutputCache>) -> Result<Arc<dyn OutputCache>>,
    mut report: impl FnMut(&CaseOutcome),
) -> Result<Vec<CaseOutcome>> {
    let mut outcomes = Vec::new();
    for case in all_cases() {
        let fixture = isolated_fixture(location, run_tag, case.name)?.wrapped(&wrap)?;
        let outcome = run_one(&case, fixture).await;
        report(&outcome);
        outcomes.push(outcome);
    }
    remove_run_dir(location, run_tag);
    Ok(outcomes)
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".into())
}

/// Removes a directory tree when dropped.
#[cfg(any(feature = "fs", feature = "sqlite"))]
struct RemoveDir(std::path::PathBuf);

#[cfg(any(feature = "fs", feature = "sqlite"))]
impl Drop for RemoveDir {
    fn drop(&mut self) {
        remove_tree(&self.0);
    }
}

/// Remove the tree at `path`, trying again for a moment if something recreates an entry in it
/// meanwhile: a blocking write still finishing for a cancelled case (a signal stopped the run) may
/// make its working directory again while the tree is being removed.
#[cfg(any(feature = "fs", feature = "sqlite"))]
fn remove_tree(path: &std::path::Path) {
    for _ in 0..50 {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            _ => return,
        }
    }
}

/// A fresh backend for `case` inside `location` that never sees existing entries: a new memory cache;
/// for fs a new directory `<root>/tmp/<run_tag>/<case>` (the janitor counts a scratch directory left
/// by an interrupted run as a temp and removes it past its grace), for SQLite a database in `<dir>/<run_tag>/<case>/`
/// beside the named file, both removed when the fixture is dropped; for an object store the key prefix
/// `<prefix>/<run_tag>/<case>`, emptied when the fixture finishes.
pub fn isolated_fixture(location: &Location, run_tag: &str, case: &str) -> Result<Fixture> {
    let _ = (run_tag, case); // unused when only the memory backend is compiled in
    match location {
        Location::Memory => Ok(fixtures::memory()),
        #[cfg(feature = "fs")]
        Location::Fs { root, durable } => {
            let dir = root.join("tmp").join(run_tag).join(case);
            let child = Location::Fs {
                root: dir.clone(),
                durable: *durable,
            };
            let cache = crate::backends::open(&child)?;
            Ok(Fixture::with_guard(cache, RemoveDir(dir.clone()))
                .with_neighbours(DirNeighbours::new(dir)))
        }
        #[cfg(feature = "sqlite")]
        Location::Sqlite { path, durable } => {
            let dir = run_dir(path, run_tag).join(case);
            let child = Location::Sqlite {
                path: dir.join("cache.db"),
                durable: *durable,
            };
            let cache = crate::backends::open(&child)?;
            Ok(Fixture::with_guard(cache, RemoveDir(dir.clone()))
                .with_neighbours(DirNeighbours::new(dir)))
        }
        #[cfg(feature = "cloud")]
        Location::Cloud { .. } => object_fixture(location, run_tag, case),
    }
}

/// The fixture for `case` under an object-store location: its own key prefix, emptied afterwards.
#[cfg(feature = "cloud")]
fn object_fixture(location: &Location, run_tag: &str, case: &str) -> Result<Fixture> {
    let Location::Cloud {
        cloud,
        bucket,
        prefix,
        options,
    } = location
    else {
        unreachable!("called for cloud locations only");
    };
    let child_prefix = [prefix.as_str(), run_tag, case]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    let cache = crate::backends::object::cloud::open(*cloud, bucket, &child_prefix, &options.0)?;
    let neighbours = ObjectNeighbours::new(cache.store().clone(), cache.prefix().clone());
    Ok(Fixture::new(Arc::new(cache))
        .with_neighbours(neighbours)
        .empty_afterwards())
}

/// For a database file, the run's directory beside it (never inside the database).
#[cfg(feature = "sqlite")]
fn run_dir(path: &std::path::Path, run_tag: &str) -> std::path::PathBuf {
    path.parent()
        .unwrap_or(std::path::Path::new("/"))
        .join(run_tag)
}

/// Remove what [`isolated_fixture`] created for the run `run_tag` beyond each fixture's own cleanup.
pub fn remove_run_dir(location: &Location, run_tag: &str) {
    let _ = run_tag; // unused when only the memory backend is compiled in
    match location {
        Location::Memory => {}
        #[cfg(feature = "fs")]
        Location::Fs { root, .. } => {
            let tmp = root.join("tmp");
            remove_tree(&tmp.join(run_tag));
            // Where the location is not (yet) a cache, the run made `tmp/` itself: leave no trace.
            if !root.join("rows").exists() {
                let _ = std::fs::remove_dir(&tmp);
            }
        }
        #[cfg(feature = "sqlite")]
        Location::Sqlite { path, .. } => {
            remove_tree(&run_dir(path, run_tag));
        }
        // Each case's prefix was emptied when its fixture finished.
        #[cfg(feature = "cloud")]
        Location::Cloud { .. } => {}
    }
}
