//! The whole conformance suite against Azure Blob Storage as Azurite emulates it (started by
//! `scripts/azurite.sh`, which the test command runs). Each case gets its own key prefix, emptied
//! afterwards. Without `OUTCACHE_AZURE_URL` the cases are skipped outside CI and fail under `CI=true`.

#![cfg(feature = "azure")]

mod common;

use outcache::config::Location;
use outcache::conformance::Fixture;

/// A fresh prefix under the configured `az://` URL, or a skip (a failure in CI) when none is configured.
pub async fn azure_fixture() -> Fixture {
    let Some(url) = common::server_env("OUTCACHE_AZURE_URL") else {
        return Fixture::skip("OUTCACHE_AZURE_URL is not set");
    };
    let location = Location::parse(&url).expect("OUTCACHE_AZURE_URL parses");
    let tag = format!("conformance-{}", uuid::Uuid::new_v4().simple());
    outcache::conformance::isolated_fixture(&location, &tag, "case").expect("open Azure")
}

outcache::conformance_tests!(azure_fixture);
