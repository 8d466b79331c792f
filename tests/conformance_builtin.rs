//! The whole conformance suite against every built-in backend, one `#[tokio::test]` per case, each on a
//! fresh backend (the fs ones in their own temp directory, removed afterwards).
#![cfg(feature = "conformance")]

mod common;

mod memory {
    outcache::conformance_tests!(|| async { outcache::conformance::fixtures::memory() });
}

mod fs {
    outcache::conformance_tests!(|| async { outcache::conformance::fixtures::fs_temp() });
}

mod fs_not_durable {
    use std::sync::Arc;

    use outcache::backends::fs::{FsCache, FsOptions};
    use outcache::conformance::{DirNeighbours, Fixture};

    outcache::conformance_tests!(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cache = FsCache::open(dir.path(), FsOptions::default().durable(false)).unwrap();
        let neighbours = DirNeighbours::new(dir.path());
        Fixture::with_guard(Arc::new(cache), dir).with_neighbours(neighbours)
    });
}

/// A backend with only the row store: every blob case must see `Unsupported`, and the engine must fall
/// back to inline envelopes.
mod rows_only {
    outcache::conformance_tests!(|| async {
        outcache::conformance::Fixture::new(std::sync::Arc::new(super::common::RowsOnly::default()))
    });
}

#[cfg(feature = "sqlite")]
mod sqlite {
    outcache::conformance_tests!(|| async { outcache::conformance::fixtures::sqlite_temp() });
}

#[cfg(feature = "sqlite")]
mod sqlite_not_durable {
    use std::sync::Arc;

    use outcache::backends::sqlite::{SqliteCache, SqliteOptions};
    use outcache::conformance::{DirNeighbours, Fixture};

    outcache::conformance_tests!(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cache = SqliteCache::open(
            dir.path().join("c.db"),
            SqliteOptions::default().durable(false),
        )
        .unwrap();
        let neighbours = DirNeighbours::new(dir.path());
        Fixture::with_guard(Arc::new(cache), dir).with_neighbours(neighbours)
    });
}

/// The object-store backend over object_store's own in-memory and local stores: most object-store
/// regressions show here, without a server.
#[cfg(feature = "object-store")]
mod object_memory {
    use std::sync::Arc;

    use object_store::memory::InMemory;
    use object_store::path::Path;
    use outcache::backends::object::ObjectCache;
    use outcache::conformance::{Fixture, ObjectNeighbours};

    outcache::conformance_tests!(|| async {
        let store = ObjectCache::new(
            Arc::new(InMemory::new()),
            Path::from("cache/prefix"),
            "memory",
        )
        .with_sorted_listing(true);
        let neighbours = ObjectNeighbours::new(store.store().clone(), store.prefix().clone());
        Fixture::new(Arc::new(store)).with_neighbours(neighbours)
    });
}

/// The object store with its refs index declared (as `outcache migrate` leaves a cache): orphan sweeps
/// then read only the rows marked as holding refs, and every case must hold all the same.
#[cfg(feature = "object-store")]
mod object_memory_indexed {
    use std::sync::Arc;

    use object_store::memory::InMemory;
    use object_store::path::Path;
    use outcache::backends::object::ObjectCache;
    use outcache::conformance::{Fixture, ObjectNeighbours};

    outcache::conformance_tests!(|| async {
        let store = ObjectCache::new(Arc::new(InMemory::new()), Path::from("indexed"), "memory")
            .with_sorted_listing(true);
        store.index_refs().await.unwrap();
        let neighbours = ObjectNeighbours::new(store.store().clone(), store.prefix().clone());
        Fixture::new(Arc::new(store)).with_neighbours(neighbours)
    });
}

#[cfg(feature = "object-store")]
mod object_local {
    use std::sync::Arc;

    use object_store::local::LocalFileSystem;
    use object_store::path::Path;
    use outcache::backends::object::ObjectCache;
    use outcache::conformance::{DirNeighbours, Fixture};

    outcache::conformance_tests!(|| async {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalFileSystem::new_with_prefix(dir.path())
            .unwrap()
            .with_fsync(true);
        let store = ObjectCache::new(Arc::new(local), Path::from("cache"), "local");
        let neighbours = DirNeighbours::new(dir.path().join("cache"));
        Fixture::with_guard(Arc::new(store), dir).with_neighbours(neighbours)
    });
}

/// The whole suite through the run-private wrapper, over each built-in backend.
mod run_private {
    use std::sync::Arc;

    use outcache::backends::run_private::RunPrivate;
    use outcache::conformance::{Fixture, fixtures};

    /// The fixture with its backend behind the wrapper (its guard, neighbours and cleanup kept).
    fn wrap(fixture: Fixture, run_id: &str) -> Fixture {
        fixture
            .wrapped(|inner| Ok(Arc::new(RunPrivate::new(inner, run_id)?)))
            .unwrap()
    }

    mod over_memory {
        outcache::conformance_tests!(|| async { super::wrap(super::fixtures::memory(), "run-1") });
    }

    mod over_fs {
        outcache::conformance_tests!(|| async {
            super::wrap(super::fixtures::fs_temp(), "session1-")
        });
    }

    #[cfg(feature = "sqlite")]
    mod over_sqlite {
        outcache::conformance_tests!(|| async {
            super::wrap(super::fixtures::sqlite_temp(), "ünï/cöde:run")
        });
    }

    /// Over a store whose rows are only listed: the janitor finds blobs by their names' key tags, which
    /// the run's blobs take from the inner keys, not the run's own.
    #[cfg(feature = "object-store")]
    mod over_object_memory {
        use std::sync::Arc;

        use object_store::memory::InMemory;
        use object_store::path::Path;
        use outcache::backends::object::ObjectCache;
        use outcache::conformance::{Fixture, ObjectNeighbours};

        outcache::conformance_tests!(|| async {
            let store = ObjectCache::new(Arc::new(InMemory::new()), Path::from("runs"), "memory");
            let neighbours = ObjectNeighbours::new(store.store().clone(), store.prefix().clone());
            super::wrap(
                Fixture::new(Arc::new(store)).with_neighbours(neighbours),
                "run-7",
            )
        });
    }
}
