#!/usr/bin/env bash
# Runs the dispatcher fuzz target. Usage: iommu/fuzz/run.sh [SECONDS] [extra libFuzzer flags]
# SANITIZER=none (cargo-fuzz -s) trades AddressSanitizer for speed: the code
# the target runs (dispatcher, domains, software and recording backends) has
# no unsafe code (the crate's only unsafe code is the IOMMUFD backend, which
# the target does not reach), so ASan only watches its dependencies.
# Needs `cargo install cargo-fuzz`. Uses the nightly toolchain when rustup has
# one, else RUSTC_BOOTSTRAP=1 with the stable compiler (cargo-fuzz needs
# nightly-only flags such as -Zsanitizer).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
mkdir -p corpus/dispatch
cp -n seeds/* corpus/dispatch/ 2>/dev/null || true
if rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    toolchain=()
    export RUSTC_BOOTSTRAP=1
fi
exec cargo "${toolchain[@]}" fuzz run -s "${SANITIZER:-address}" dispatch corpus/dispatch -- \
    -max_total_time="$secs" -max_len=8192 -print_final_stats=1 "$@"
