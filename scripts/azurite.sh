#!/usr/bin/env bash
# Install (once, cached) and run Azurite, Microsoft's Azure Storage emulator, on 127.0.0.1 for the Azure
# conformance tests. No Docker needed: Azurite installs from npm (~15 s) into $OUTCACHE_TOOLS.
#
# Usage:
#   scripts/azurite.sh install    install azurite into $OUTCACHE_TOOLS (default ~/.cache/outcache-tools)
#   scripts/azurite.sh start      start it, create the container, print `export …` lines to eval
#   scripts/azurite.sh stop       stop the Azurite started by `start` (by PID)
#
# The exported variables: AZURITE_BLOB_STORAGE_URL (where object_store's `use_emulator=true` goes) and
# OUTCACHE_AZURE_URL (an az:// URL for the Azure conformance tests). The emulator's account and key are
# the well-known public development ones, not secrets.
set -euo pipefail

TOOLS="${OUTCACHE_TOOLS:-$HOME/.cache/outcache-tools}"
# Pid, log and data files: per checkout, so a test run in one clone never stops another's server.
RUN="${OUTCACHE_AZURITE_RUN:-$(cd "$(dirname "$0")/.." && pwd)/target/outcache-run}"
CONTAINER="${OUTCACHE_AZURE_CONTAINER:-outcache-test}"
AZURITE_VERSION="3.35.0"
mkdir -p "$TOOLS" "$RUN"

log() { echo "azurite: $*" >&2; }

install() {
  local bin="$TOOLS/azurite/node_modules/.bin/azurite-blob"
  if [ -x "$bin" ] && grep -q "\"version\": \"$AZURITE_VERSION\"" "$TOOLS/azurite/node_modules/azurite/package.json" 2>/dev/null; then
    return
  fi
  if ! command -v npm >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      log "installing nodejs and npm from Debian (once)"
      apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
    else
      log "npm is needed to install Azurite (apt-get install npm)"; exit 1
    fi
  fi
  log "installing azurite@$AZURITE_VERSION into $TOOLS/azurite"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/azurite" "azurite@$AZURITE_VERSION" >&2
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Create the container with a SharedKey-signed request (the emulator's public development key).
create_container() { # port
  python3 - "$1" "$CONTAINER" <<'PY'
import base64, hashlib, hmac, http.client, sys
from email.utils import formatdate
acct = "devstoreaccount1"
key = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
port, container = int(sys.argv[1]), sys.argv[2]
date, version = formatdate(usegmt=True), "2021-08-06"
to_sign = ("PUT\n" + "\n" * 11 + f"x-ms-date:{date}\nx-ms-version:{version}\n"
           + f"/{acct}/{acct}/{container}\nrestype:container")
sig = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest()).decode()
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
conn.request("PUT", f"/{acct}/{container}?restype=container", headers={
    "x-ms-date": date, "x-ms-version": version, "Content-Length": "0",
    "Authorization": f"SharedKey {acct}:{sig}"})
status = conn.getresponse().status
sys.exit(0 if status in (201, 409) else f"creating the container answered HTTP {status}")
PY
}

start() {
  install
  stop_quietly
  local port; port=$(free_port)
  local data="$RUN/azurite-data"
  rm -rf "$data"; mkdir -p "$data"
  "$TOOLS/azurite/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$port" \
    --location "$data" --silent --skipApiVersionCheck >"$RUN/azurite.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$RUN/azurite.pid"
  for _ in $(seq 1 200); do
    if curl -s -o /dev/null "http://127.0.0.1:$port/"; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then log "azurite exited before it was ready"; cat "$RUN/azurite.log" >&2; exit 1; fi
    sleep 0.1
  done
  create_container "$port"
  log "azurite (pid $pid) on 127.0.0.1:$port, container $CONTAINER"
  cat <<EOF
export AZURITE_BLOB_STORAGE_URL='http://127.0.0.1:$port'
export OUTCACHE_AZURE_URL='az://$CONTAINER/tests?use_emulator=true'
EOF
}

stop_quietly() {
  if [ -f "$RUN/azurite.pid" ]; then
    kill "$(cat "$RUN/azurite.pid")" 2>/dev/null || true
    rm -f "$RUN/azurite.pid"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop_quietly; log "stopped" ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
