#!/usr/bin/env bash
# Install (once, cached) and run S3-compatible servers on 127.0.0.1 for the tests. No Docker needed:
#
#   moto 5.2.5 (PyPI, `moto[server]`)   the main target: fast to install (~45 s into a venv), supports
#                                       conditional puts, multipart upload and abort; state in memory.
#   s3s-fs 0.14.1 (crates.io)           the restart target: state on disk, so it survives a kill and
#                                       restart (the "server dies mid-upload" test starts it itself).
#
# Usage:
#   scripts/s3-server.sh install        install both into $OUTCACHE_TOOLS (default ~/.cache/outcache-tools)
#   scripts/s3-server.sh start          start moto, create the bucket, print `export …` lines to eval
#   scripts/s3-server.sh stop           stop the moto server started by `start` (by PID)
#
# The exported variables: dummy AWS credentials and region, OUTCACHE_S3_URL (an s3:// URL with the
# endpoint) for the S3 conformance tests, and OUTCACHE_S3S_FS (the s3s-fs binary) for the restart test.
set -euo pipefail

TOOLS="${OUTCACHE_TOOLS:-$HOME/.cache/outcache-tools}"
# Pid, log and data files: per checkout, so a test run in one clone never stops another's server.
RUN="${OUTCACHE_S3_RUN:-$(cd "$(dirname "$0")/.." && pwd)/target/outcache-run}"
BUCKET="${OUTCACHE_S3_BUCKET:-outcache-test}"
MOTO_VERSION="5.2.5"
S3S_VERSION="0.14.1"
mkdir -p "$TOOLS" "$RUN"

log() { echo "s3-server: $*" >&2; }

install_moto() {
  if [ -x "$TOOLS/moto-venv/bin/moto_server" ] && \
     "$TOOLS/moto-venv/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
    return
  fi
  log "installing moto[server]==$MOTO_VERSION into $TOOLS/moto-venv"
  python3 -m venv "$TOOLS/moto-venv"
  "$TOOLS/moto-venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
}

install_s3s() {
  if [ -x "$TOOLS/s3s/bin/s3s-fs" ] && "$TOOLS/s3s/bin/s3s-fs" --version 2>/dev/null | grep -q "$S3S_VERSION"; then
    return
  fi
  log "building s3s-fs $S3S_VERSION into $TOOLS/s3s (a few minutes, once)"
  cargo install s3s-fs --version "$S3S_VERSION" --features binary --locked --root "$TOOLS/s3s" >&2
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_ready() { # url, pid
  for _ in $(seq 1 200); do
    if curl -s -o /dev/null "$1"; then return 0; fi
    if ! kill -0 "$2" 2>/dev/null; then log "server exited before it was ready"; return 1; fi
    sleep 0.1
  done
  log "server not ready after 20 s"; return 1
}

start() {
  install_moto
  install_s3s
  stop_quietly
  local port; port=$(free_port)
  "$TOOLS/moto-venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$RUN/moto.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$RUN/moto.pid"
  wait_ready "http://127.0.0.1:$port/" "$pid"
  curl -sf -X PUT "http://127.0.0.1:$port/$BUCKET" -o /dev/null
  log "moto (pid $pid) on 127.0.0.1:$port, bucket $BUCKET"
  cat <<EOF
export AWS_ACCESS_KEY_ID=outcache-test
export AWS_SECRET_ACCESS_KEY=outcache-test
export AWS_REGION=us-east-1
export OUTCACHE_S3_URL='s3://$BUCKET/tests?endpoint=http://127.0.0.1:$port&allow_http=true'
export OUTCACHE_S3S_FS='$TOOLS/s3s/bin/s3s-fs'
EOF
}

stop_quietly() {
  if [ -f "$RUN/moto.pid" ]; then
    kill "$(cat "$RUN/moto.pid")" 2>/dev/null || true
    rm -f "$RUN/moto.pid"
  fi
}

case "${1:-}" in
  install) install_moto; install_s3s ;;
  start) start ;;
  stop) stop_quietly; log "stopped" ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
