#!/usr/bin/env bash
# Runs every fuzz target for a bounded time on its checked-in corpus (cargo-fuzz,
# libFuzzer with AddressSanitizer). Finds stay in fuzz/artifacts/TARGET/; make each a
# regression test before fixing it.
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET]      (default 60)
#
# cargo-fuzz wants nightly features; RUSTC_BOOTSTRAP lets the stable toolchain provide them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECS=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in $(cargo fuzz list); do
    echo "==> fuzz $target for ${SECS}s"
    if ! cargo fuzz run "$target" -- -max_total_time="$SECS" >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E "^Done" "$log"
done
