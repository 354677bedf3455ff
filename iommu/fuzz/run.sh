#!/usr/bin/env bash
# Runs the dispatcher fuzz target. Usage: iommu/fuzz/run.sh [SECONDS] [extra libFuzzer flags]
# (vmbus/fuzz/run.sh runs VMBus's target through this script: FUZZ_DIR,
# FUZZ_TARGET and FUZZ_MAX_LEN name the fuzz crate, its target and the
# longest input.)
# SANITIZER=none (cargo-fuzz -s) trades AddressSanitizer for speed: the code
# the targets run has no unsafe code (the iommu crate's only unsafe code is
# the IOMMUFD backend, which its target does not reach; vmbus forbids
# unsafe code), so ASan only watches their dependencies.
# Needs `cargo install cargo-fuzz`. Uses the nightly toolchain when rustup has
# one, else RUSTC_BOOTSTRAP=1 with the stable compiler (cargo-fuzz needs
# nightly-only flags such as -Zsanitizer).
set -euo pipefail
cd "${FUZZ_DIR:-$(dirname "$0")}"
target="${FUZZ_TARGET:-dispatch}"
secs="${1:-60}"
shift || true
mkdir -p "corpus/$target"
cp -n seeds/* "corpus/$target/" 2>/dev/null || true
if rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    toolchain=()
    export RUSTC_BOOTSTRAP=1
fi
exec cargo "${toolchain[@]}" fuzz run -s "${SANITIZER:-address}" "$target" "corpus/$target" -- \
    -max_total_time="$secs" -max_len="${FUZZ_MAX_LEN:-8192}" -print_final_stats=1 "$@"
