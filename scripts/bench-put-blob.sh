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
seconds() { # command...: wall seconds of one run
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null 2>&1
  end=$(date +%s.%N)
  python3 -c "print($end - $start)"
}
dd_times=() ours_times=()
for round in $(seq 1 "$ROUNDS"); do
  rm -rf "$WORK/out" "$WORK/cache"; sync
  a=$(seconds dd if="$WORK/input" of="$WORK/out" bs=1M conv=fsync)
  b=$(seconds "$BIN" --quiet --url "fs://$WORK/cache" put-blob --inputs "{\"round\":$round}" bench/blob "$WORK/input")
  dd_times+=("$a"); ours_times+=("$b")
  printf 'round %d: dd %.3f s, put-blob %.3f s\n' "$round" "$a" "$b"
done
python3 - "${dd_times[*]}" "${ours_times[*]}" <<'PY'
import statistics, sys
dd, ours = (statistics.median(map(float, a.split())) for a in sys.argv[1:3])
print(f"medians: dd {dd:.3f} s, put-blob {ours:.3f} s; ratio (dd time / put-blob time) {dd / ours:.2f}")
PY
