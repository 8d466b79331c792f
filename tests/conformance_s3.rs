//! The whole conformance suite against a real S3-compatible server (moto, started by
//! `scripts/s3-server.sh`, which the test command runs). Each case gets its own key prefix, emptied
//! afterwards. Without `OUTCACHE_S3_URL` the cases are skipped outside CI and fail under `CI=true`.

#![cfg(feature = "s3")]

mod common;

use outcache::config::Location;
use outcache::conformance::Fixture;

/// A fresh prefix under the configured S3 URL, or a skip (a failure in CI) when none is configured.
pub async fn s3_fixture() -> Fixture {
    let Some(url) = common::server_env("OUTCACHE_S3_URL") else {
        return Fixture::skip("OUTCACHE_S3_URL is not set");
    };
    let location = Location::parse(&url).expect("OUTCACHE_S3_URL parses");
    let tag = format!("conformance-{}", uuid::Uuid::new_v4().simple());
    outcache::conformance::isolated_fixture(&location, &tag, "case").expect("open S3")
}

outcache::conformance_tests!(s3_fixture);
