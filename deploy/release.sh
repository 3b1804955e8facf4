#!/usr/bin/env bash
# Builds the release binaries and splits their debug info off: each shipped binary
# has no DWARF and carries a .gnu_debuglink to <bin>.debug beside it, which gdb and
# perf load from the same directory or /usr/lib/debug. Keep the .debug files with the
# release; install only the binaries.
#
#   deploy/release.sh [out dir, default dist]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
target="${CARGO_TARGET_DIR:-target}/release"
bins=(oc-server oc-pitr oc-ctl oc)
cargo build --release --locked $(printf -- '--bin %s ' "${bins[@]}")
mkdir -p "$out"
for bin in "${bins[@]}"; do
  cp "$target/$bin" "$out/$bin"
  (
    cd "$out"
    objcopy --only-keep-debug "$bin" "$bin.debug"
    objcopy --strip-debug --add-gnu-debuglink="$bin.debug" "$bin"
  )
done
"$out/oc-server" --version
ls -l "$out"
