#!/usr/bin/env bash
# The complete local demo, from a fresh clone, as root:
#
#   sudo bash contrib/demo.sh [--keep]
#
# Builds dst, makes keys, serves a sparse 1 GiB image on 127.0.0.1, mounts it with
# dst-mount, attaches a loop device with direct I/O, makes ext4 on it, writes files of
# random data, remounts, reads them back and compares checksums. Everything is torn down
# at the end, unless --keep is given: then it prints how to tear it down yourself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

KEEP=0
[[ ${1:-} == --keep ]] && KEEP=1
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (sudo): it mounts FUSE, attaches a loop device and mounts ext4"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing: load the fuse module (modprobe fuse)"

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v losetup >/dev/null || missing+=(util-linux)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

say "building (cargo build --release)"
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-$(pwd)/target}/release

WORK=$(mktemp -d /tmp/dst-demo.XXXXXX)
mkdir -p "$WORK/remote" "$WORK/data"
SERVER_PID="" LOOP=""
teardown() {
    mountpoint -q "$WORK/data" && umount "$WORK/data"
    [[ -n $LOOP ]] && losetup -d "$LOOP"
    mountpoint -q "$WORK/remote" && umount "$WORK/remote"
    [[ -n $SERVER_PID ]] && kill "$SERVER_PID" && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
}
[[ $KEEP -eq 1 ]] || trap 'teardown || true' EXIT

say "keys: one pair for the server, one for the client"
"$BIN/dst-keygen" "$WORK/server.key" >/dev/null
"$BIN/dst-keygen" "$WORK/client.key" >/dev/null
echo "$(cat "$WORK/client.key.pub") exports=disk # the demo client" >"$WORK/authorized_keys"
echo "server public key: $(cat "$WORK/server.key.pub")"
echo "client public key: $(cat "$WORK/client.key.pub") (in $WORK/authorized_keys)"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "dst-server: export 'disk' = sparse 1 GiB image, on 127.0.0.1:$PORT"
"$BIN/dst-server" --key "$WORK/server.key" --authorized-keys "$WORK/authorized_keys" \
    --export "disk=$WORK/disk.img" --create-size 1G --listen "127.0.0.1:$PORT" 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/server.log" && break; sleep 0.1; done
grep -q "listening on" "$WORK/server.log" || { cat "$WORK/server.log"; die "the server did not start"; }

say "dst-mount: the export as a file under $WORK/remote"
"$BIN/dst-mount" --server "127.0.0.1:$PORT" --export disk --key "$WORK/client.key" \
    --server-key "$WORK/server.key.pub" "$WORK/remote"
ls -la "$WORK/remote"

say "losetup --direct-io=on, mkfs.ext4, mount"
LOOP=$(losetup --direct-io=on -f --show "$WORK/remote/disk")
echo "loop device: $LOOP"
mkfs.ext4 -q "$LOOP"
mount "$LOOP" "$WORK/data"

say "writing 4 files of random data (80 MiB)"
for i in 1 2 3 4; do head -c $((i * 8))M /dev/urandom >"$WORK/data/file$i"; done
(cd "$WORK/data" && sha256sum file*) >"$WORK/sums"
cat "$WORK/sums"
sync

say "remounting and reading back"
umount "$WORK/data"
echo 3 >/proc/sys/vm/drop_caches
mount "$LOOP" "$WORK/data"
(cd "$WORK/data" && sha256sum -c --quiet "$WORK/sums") && echo "all files read back intact"
df -h "$WORK/data"

say "live counters: $WORK/remote/.stats"
cat "$WORK/remote/.stats"
echo "image on the export node: $(du -h --apparent-size "$WORK/disk.img" | cut -f1) apparent, $(du -h "$WORK/disk.img" | cut -f1) allocated"

if [[ $KEEP -eq 1 ]]; then
    say "left running; to tear down:"
    echo "  umount $WORK/data; losetup -d $LOOP; umount $WORK/remote; kill $SERVER_PID; rm -rf $WORK"
else
    say "tearing down: umount, losetup -d, umount the FUSE mount, stop the server"
fi
