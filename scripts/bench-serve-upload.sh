#!/usr/bin/env bash
# A 256 MiB upload the way a deployment sees it: `curl -T FILE` (a process of its own) to `outcache
# serve` (another), against `outcache put-blob FILE` on the same disk, both durable fs caches, rounds
# alternating who goes first (this disk's durable-write rate swings between runs minutes apart). The
# in-process bench (`cargo bench --bench serve`) compares with a put from memory instead; this one gives
# both sides the same file to read. Prints each round and the ratio of the medians.
#
# Usage: scripts/bench-serve-upload.sh [ROUNDS] [MIB]   (builds the release binary; runs in $TMPDIR)
set -euo pipefail
ROUNDS="${1:-8}"
MIB="${2:-256}"
cd "$(dirname "$0")/.."
command -v curl >/dev/null || { echo "bench-serve-upload: curl is needed" >&2; exit 1; }
cargo build --quiet --release --features cli
BIN="$PWD/target/release/outcache"
WORK="$(mktemp -d)"
SERVER=""
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT
head -c "$((MIB << 20))" /dev/urandom >"$WORK/input"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN" --quiet --url "fs://$WORK/served" serve --listen "127.0.0.1:$PORT" --allow-anonymous-writes \
  >"$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 50); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.1
done
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
upload() { # round
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -T "$WORK/input" "http://127.0.0.1:$PORT/big$1")
  [ "$code" = 200 ] || { echo "upload $1: HTTP $code" >&2; exit 1; }
}
put_blob() { # round
  "$BIN" --quiet --url "fs://$WORK/cli" put-blob --inputs "{\"round\":$1}" bench/blob "$WORK/input"
}
cli_times=() served_times=()
for round in $(seq 1 "$ROUNDS"); do
  rm -rf "$WORK/cli"; curl -s -X DELETE "http://127.0.0.1:$PORT/big$((round - 1))" >/dev/null; sync
  if [ $((round % 2)) = 1 ]; then
    a=$(seconds put_blob "$round"); sleep 1; b=$(seconds upload "$round")
  else
    b=$(seconds upload "$round"); sleep 1; a=$(seconds put_blob "$round")
  fi
  cli_times+=("$a"); served_times+=("$b")
  printf 'round %d: put-blob %.3f s, curl to serve %.3f s\n' "$round" "$a" "$b"
done
medians put-blob "curl to serve" "${cli_times[*]}" "${served_times[*]}"
