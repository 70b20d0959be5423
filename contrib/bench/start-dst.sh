#!/usr/bin/env bash
# Starts dst for ../shared/bench/disk-bench.sh, per its contract:
#
#   contrib/bench/start-dst.sh IMAGE MOUNTPOINT
#
# runs dst-server (exporting IMAGE) and dst-mount (on MOUNTPOINT) in the background over
# 127.0.0.1 with the default encrypted channel, release build; prints their PIDs on the
# first line and the FUSE file's path on the second; returns once the file is usable.
# Both processes end on SIGTERM (dst-mount unmounts, waiting for in-flight writes).
# DST_EXPORT_SUFFIX is appended to the export (e.g. ":checksums" to measure their cost).
set -euo pipefail
IMG=$1 MNT=$2
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release --quiet >&2
BIN=${CARGO_TARGET_DIR:-$(pwd)/target}/release

KEYS=$(mktemp -d /tmp/dst-bench.XXXXXX)
trap 'rm -rf "$KEYS"' EXIT
"$BIN/dst-keygen" "$KEYS/server.key" >/dev/null 2>&1
"$BIN/dst-keygen" "$KEYS/client.key" >/dev/null 2>&1
cp "$KEYS/client.key.pub" "$KEYS/authorized_keys"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

LOG=$KEYS/server.log
"$BIN/dst-server" --key "$KEYS/server.key" --authorized-keys "$KEYS/authorized_keys" \
    --export "disk=$IMG${DST_EXPORT_SUFFIX:-}" --listen "127.0.0.1:$PORT" 2> >(tee "$LOG" >&2) &
SERVER=$!
for _ in $(seq 100); do grep -q "listening on" "$LOG" 2>/dev/null && break; sleep 0.1; done

"$BIN/dst-mount" --foreground --server "127.0.0.1:$PORT" --export disk --key "$KEYS/client.key" \
    --server-key "$KEYS/server.key.pub" "$MNT" >&2 &
MOUNT=$!
for _ in $(seq 100); do [ -e "$MNT/disk" ] && break; sleep 0.1; done
[ -e "$MNT/disk" ] || { echo "dst-mount did not come up" >&2; kill "$SERVER" "$MOUNT" 2>/dev/null; exit 1; }

echo "$SERVER $MOUNT"
echo "$MNT/disk"
