#!/usr/bin/env bash
# `outcache put-blob` of a 256 MiB file against `dd bs=1M conv=fsync` of the same file on the same disk,
# rounds interleaved (this disk's durable-write rate swings between runs minutes apart): the CLI ratio
# of the hot-path issue. Prints each round and the ratio of the medians.
#
# Usage: scripts/bench-put-blob.sh [ROUNDS] [MIB]   (builds the release binary first; runs in $TMPDIR)
set -euo pipefail
ROUNDS="${1:-5}"
MIB="${2:-256}"
cd "$(dirname "$0")/.."
cargo build --quiet --release --features cli
BIN="$PWD/target/release/outcache"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
head -c "$((MIB << 20))" /dev/urandom >"$WORK/input"
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
dd_times=() ours_times=()
for round in $(seq 1 "$ROUNDS"); do
  rm -rf "$WORK/out" "$WORK/cache"; sync
  a=$(seconds dd if="$WORK/input" of="$WORK/out" bs=1M conv=fsync)
  b=$(seconds "$BIN" --quiet --url "fs://$WORK/cache" put-blob --inputs "{\"round\":$round}" bench/blob "$WORK/input")
  dd_times+=("$a"); ours_times+=("$b")
  printf 'round %d: dd %.3f s, put-blob %.3f s\n' "$round" "$a" "$b"
done
medians dd put-blob "${dd_times[*]}" "${ours_times[*]}"
