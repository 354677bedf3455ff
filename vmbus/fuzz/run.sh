#!/usr/bin/env bash
# Runs the VMBus fuzz target (the SynIC and the server's message handling).
# Usage: vmbus/fuzz/run.sh [SECONDS] [extra libFuzzer flags], as
# iommu/fuzz/run.sh, which it runs.
here="$(cd "$(dirname "$0")" && pwd)"
FUZZ_DIR="$here" FUZZ_TARGET=messages FUZZ_MAX_LEN=16384 exec "$here/../../iommu/fuzz/run.sh" "$@"
