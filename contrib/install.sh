#!/bin/sh
# Builds dst and installs it, as root, from the top of a checkout:
#
#   sh contrib/install.sh [--no-build]
#
# Installs dst-server, dst-keygen and dst-mount into $BINDIR (/usr/local/bin) and the mount
# helper as $SBINDIR/mount.dst (/sbin/mount.dst), where mount(8) looks for it, so that
# `mount -t dst` and fstab lines of type dst work. The helper finds dst-mount in $BINDIR.
# systemd units and examples stay in contrib/ for you to copy (see docs/operations.md).
set -eu
cd "$(dirname "$0")/.."

BINDIR=${BINDIR:-/usr/local/bin}
SBINDIR=${SBINDIR:-/sbin}

if [ "${1:-}" != --no-build ]; then
    cargo build --release --locked
fi
install -d "$BINDIR" "$SBINDIR"
install -m 0755 target/release/dst-server target/release/dst-keygen target/release/dst-mount "$BINDIR/"
install -m 0755 mount-helper/mount.dst "$SBINDIR/mount.dst"
echo "installed dst-server, dst-keygen and dst-mount in $BINDIR, mount.dst in $SBINDIR"
