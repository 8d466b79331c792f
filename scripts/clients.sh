#!/usr/bin/env bash
# Install the real clients the `outcache serve` tests drive (no Docker; from the Debian archive):
#   ccache   (`remote_storage = http://…`: its flat, subdirs and bazel layouts)
#
# Usage: scripts/clients.sh install   (root, or ccache already on PATH)
set -euo pipefail

log() { echo "clients: $*" >&2; }

install() {
  if command -v ccache >/dev/null; then
    return
  fi
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing ccache from Debian (once)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ccache >&2 \
      || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ccache >&2; }
  else
    log "ccache is needed (apt-get install ccache)"; exit 1
  fi
}

case "${1:-}" in
  install) install ;;
  *) echo "usage: $0 install" >&2; exit 2 ;;
esac
