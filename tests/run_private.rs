//! Run isolation through the run-private wrapper: two runs on one backing store never see each other's
//! rows or blobs, the shared tier's refs never resolve through a run, `clear_run` removes exactly one run,
//! and no two run ids share a namespace (property-tested).

use std::sync::Arc;

use futures::StreamExt;
use outcache::OutputCacheExt as _;
use outcache::backends::memory::MemoryCache;
use outcache::backends::run_private::{RunPrivate, in_run_namespace, run_namespace};
use outcache::{BlobOptions, Cache, CacheOptions, CacheRef, OutputCache};
use proptest::prelude::*;
use serde_json::json;

fn engine(backend: Arc<dyn OutputCache>) -> Cache {
    Cache::with_options(backend, CacheOptions::default().reference_threshold(16))
}

fn bytes(n: usize, seed: u8) -> outcache::ByteStream {
    futures::stream::iter([Ok(bytes::Bytes::from(vec![seed; n]))]).boxed()
}

async fn put_blob(cache: &Cache, task: &str, seed: u8) -> CacheRef {
    let stored = cache
        .put_stream(
            task,
            &json!({"seed": seed}),
            bytes(1000, seed),
            BlobOptions::default(),
        )
        .await
        .unwrap();
    CacheRef::from_value(&stored).unwrap()
}

#[tokio::test]
async fn runs_on_one_backing_store_are_isolated_and_clear_run_removes_exactly_one() {
    let backing: Arc<dyn OutputCache> = Arc::new(MemoryCache::new());
    let shared = engine(backing.clone());
    let a = Arc::new(RunPrivate::new(backing.clone(), "session1").unwrap());
    let b = Arc::new(RunPrivate::new(backing.clone(), "session1-").unwrap());
    let (run_a, run_b) = (engine(a.clone()), engine(b.clone()));

    let ra = put_blob(&run_a, "render", 1).await;
    let rb = put_blob(&run_b, "render", 2).await;
    let rs = put_blob(&shared, "render", 3).await;

    // Rows: each run sees only its own.
    assert!(
        run_a
            .get("render", &json!({"seed": 1}))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        run_a
            .get("render", &json!({"seed": 2}))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        run_a
            .get("render", &json!({"seed": 3}))
            .await
            .unwrap()
            .is_none(),
        "the shared tier leaked in"
    );
    assert!(
        run_b
            .get("render", &json!({"seed": 1}))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(a.list_rows().await.unwrap().len(), 1);

    // Refs: another run's and the shared tier's never resolve and never delete.
    for foreign in [&rb, &rs] {
        assert_eq!(a.read_blob(&foreign.reference).await.unwrap(), None);
        assert!(
            a.open_blob(&foreign.reference, None)
                .await
                .unwrap()
                .is_none()
        );
        a.delete_blob(&foreign.reference).await.unwrap();
    }
    assert!(
        backing.read_blob(&rb.reference).await.unwrap().is_some(),
        "run A deleted run B's blob"
    );
    assert!(
        backing.read_blob(&rs.reference).await.unwrap().is_some(),
        "run A deleted a shared blob"
    );
    assert_eq!(run_a.read(&ra).await.unwrap().unwrap().len(), 1000);

    // The shared tier's janitor sees run blobs as referenced (by their markers), never as orphans.
    let orphans = outcache::janitor::find_orphans(backing.as_ref(), std::time::Duration::ZERO)
        .await
        .unwrap();
    assert!(orphans.blobs.is_empty(), "{:?}", orphans.blobs);

    // clear_run(A): A's rows and blobs go; B and the shared tier stay readable.
    assert!(a.clear_run().await.unwrap() >= 2);
    assert!(a.clear_run().await.is_ok(), "clear_run twice");
    assert!(
        run_a
            .get("render", &json!({"seed": 1}))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        backing.read_blob(&ra.reference).await.unwrap(),
        None,
        "run A's blob survived clear_run"
    );
    assert!(
        run_b
            .get("render", &json!({"seed": 2}))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(run_b.read(&rb).await.unwrap().unwrap().len(), 1000);
    assert_eq!(shared.read(&rs).await.unwrap().unwrap().len(), 1000);
    assert!(
        shared
            .get("render", &json!({"seed": 3}))
            .await
            .unwrap()
            .is_some()
    );

    let empty = RunPrivate::new(backing.clone(), "never-wrote").unwrap();
    assert_eq!(empty.clear_run().await.unwrap(), 0);
}

#[tokio::test]
async fn capabilities_mirror_the_backing_store() {
    let backing: Arc<dyn OutputCache> = Arc::new(MemoryCache::new());
    let run = RunPrivate::new(backing.clone(), "r").unwrap();
    assert_eq!(run.capabilities(), backing.capabilities());
}

/// The shared tier cannot plant a row in a run's namespace: through the engine, a task type spelled as
/// the wrapper spells a run's rows is refused, so the run never reads a row it did not write and its
/// `clear_run` never removes a row of the shared tier. Task types that only start with `run/` are
/// ordinary.
#[tokio::test]
async fn the_shared_tier_cannot_plant_rows_in_a_runs_namespace() {
    let backing: Arc<dyn OutputCache> = Arc::new(MemoryCache::new());
    let shared = engine(backing.clone());
    let run = Arc::new(RunPrivate::new(backing.clone(), "abc").unwrap());
    let private = engine(run.clone());
    let planted = format!("{}r/build", run_namespace("abc"));
    assert_eq!(planted, "run/3:abc/r/build");
    let inputs = json!({"a": 1});
    for refused in [
        shared
            .put(&planted, &inputs, &json!({"forged": true}))
            .await,
        shared
            .put_stream(&planted, &inputs, bytes(100, 1), BlobOptions::default())
            .await
            .map(drop),
        shared.get(&planted, &inputs).await.map(drop),
        shared.delete(&planted, &inputs).await.map(drop),
    ] {
        let e = refused.unwrap_err();
        assert!(
            matches!(e, outcache::Error::InvalidInput { .. })
                && e.to_string().contains("run-private"),
            "{e}"
        );
    }
    assert_eq!(private.get("build", &inputs).await.unwrap(), None);
    assert!(
        backing.list_rows().await.unwrap().is_empty(),
        "nothing stored"
    );

    // Ordinary task types that begin like a run's are the shared tier's to use, and a run's
    // clear_run leaves them.
    for task in ["run/lint", "run/:x", "run/3a:x", "running/3:abc/r/build"] {
        assert!(!in_run_namespace(task), "{task}");
        shared.put(task, &inputs, &json!(task)).await.unwrap();
    }
    private
        .put("build", &inputs, &json!("the run's"))
        .await
        .unwrap();
    assert_eq!(run.clear_run().await.unwrap(), 1);
    assert_eq!(backing.list_rows().await.unwrap().len(), 4);
    assert_eq!(
        shared.get("run/lint", &inputs).await.unwrap(),
        Some(json!("run/lint"))
    );
}

proptest! {
    #[test]
    fn no_run_namespace_is_a_prefix_of_another(a in "\\PC{1,24}", b in "\\PC{1,24}") {
        prop_assume!(a != b);
        prop_assert!(!run_namespace(&a).starts_with(&run_namespace(&b)));
        prop_assert!(!run_namespace(&b).starts_with(&run_namespace(&a)));
    }

    #[test]
    fn near_identical_run_ids_never_merge(base in "[a-z0-9]{1,12}", suffix in "[-_:/. ]{1,3}") {
        let longer = format!("{base}{suffix}");
        prop_assert_ne!(run_namespace(&base), run_namespace(&longer));
        prop_assert!(!run_namespace(&longer).starts_with(&run_namespace(&base)));
    }
}

/// Over an object store (rows only listed, blobs found by the key tags in their names), `stats`
/// through the run charges the run's blobs to its task types, and a prune removes them from the backing
/// store and counts them. The run's blobs carry the tag of the key the wrapper writes them under:
/// matched by the run's own key, the janitor found none, counted none, and handed the store an empty
/// list of blobs to delete with each row.
#[cfg(feature = "object-store")]
#[tokio::test]
async fn a_prune_through_a_run_over_an_object_store_removes_and_counts_the_runs_blobs() {
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use outcache::backends::object::ObjectCache;
    use outcache::janitor::{PruneOptions, prune};

    let inner: Arc<dyn OutputCache> = Arc::new(ObjectCache::new(
        Arc::new(InMemory::new()),
        Path::from("shared"),
        "memory",
    ));
    let run: Arc<dyn OutputCache> = Arc::new(RunPrivate::new(inner.clone(), "run-9").unwrap());
    let cache = engine(run.clone());
    for seed in 0..3 {
        put_blob(&cache, "build/out", seed).await;
    }
    assert_eq!(inner.list_blobs().await.unwrap().len(), 3);
    // `stats` through the run charges the blobs to the run's task type, by the same tag.
    let inv = outcache::janitor::inventory(run.as_ref(), 5).await.unwrap();
    let build = &inv.top_task_types[0];
    assert_eq!(build.task_type, "build/out");
    assert_eq!(build.bytes, inv.row_bytes + inv.blob_bytes, "{inv:?}");
    assert_eq!(inv.blob_bytes, 3000);

    let mut options = PruneOptions::new();
    options.older_than = Some(std::time::Duration::ZERO);
    let report = prune(run.as_ref(), &options, |_| {}).await.unwrap();
    assert_eq!(
        (report.rows_removed, report.blobs_removed),
        (3, 3),
        "{report:?}"
    );
    let left = inner.list_blobs().await.unwrap();
    assert!(
        left.is_empty(),
        "the run's blobs stayed in the backing store: {left:?}"
    );
}
