#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls exactly this).
# Formatting, lints as errors, then every test: unit, conformance on each backend (the S3 ones against a
# real S3-compatible server, the Azure ones against Azurite, both installed and started on 127.0.0.1 by
# this script), CLI, fault and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo's compiler probe reads /dev/null as an empty source file. A /dev/null that some tool replaced
# with a regular file (by renaming a temp file over it, as `outcache cat -o /dev/null` once did) holds
# whatever was last written to it, and every cargo command then fails parsing `<anon>`. Put the device
# back when we may, or say what is wrong.
if [ ! -c /dev/null ]; then
  if [ "$(id -u)" = 0 ] && rm -f /dev/null && mknod -m 666 /dev/null c 1 3; then
    echo "warning: /dev/null was a regular file (a tool renamed one over it); restored the device" >&2
  else
    echo "error: /dev/null is not a character device; as root: rm /dev/null; mknod -m 666 /dev/null c 1 3" >&2
    exit 1
  fi
fi

# A clean checkout (CI) gains nothing from incremental compilation, and its caches roughly double the
# size of the target directory: a CI disk once ran out mid-build.
if [ "${CI:-}" = true ]; then
  export CARGO_INCREMENTAL=0
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (all targets, all features, warnings are errors)"
cargo clippy --all-targets --all-features -- -D warnings

echo "== cargo doc (broken intra-doc links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps --all-features

echo "== feature subsets compile (users pick backends by feature)"
for features in "" "fs" "sqlite" "object-store" "conformance" "cloud" "s3" "gcs" "azure" "serve"; do
  cargo check --quiet --lib --no-default-features --features "$features"
done
# A contributor's plain `cargo test` (default features) must compile: each test file that needs more
# declares the feature it needs, and runs nothing without it.
cargo check --quiet --tests

echo "== S3-compatible servers (moto; s3s-fs for the restart test) and Azurite (Azure)"
trap 'bash scripts/s3-server.sh stop; bash scripts/azurite.sh stop' EXIT
eval "$(bash scripts/s3-server.sh start)"
eval "$(bash scripts/azurite.sh start)"

echo "== real clients of outcache serve (ccache, turbo, sccache)"
eval "$(bash scripts/clients.sh install)"

echo "== cargo test"
# Every test binary runs even after one fails, so a red run names every failure at once.
cargo test --all-features --no-fail-fast
