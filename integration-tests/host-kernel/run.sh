#!/usr/bin/env bash
# Runs hk-guest inside the harness's host kernel under QEMU (TCG, q35, emulated
# VT-d, edu device) and prints the guest's serial console on stdout.
#
#   integration-tests/host-kernel/run.sh [test|selftest|bench]
#
# test and bench boot with an emulated VT-d (intel-iommu); selftest boots
# without one, for IOMMUFD's selftest mock (see hk-guest's suite.rs).
#
# Steps: build-kernel.sh (cached), a static hk-guest (cargo, crt-static), an
# initramfs (busybox-static + init + hk-guest), then QEMU until the guest
# powers off or HK_QEMU_TIMEOUT seconds (default 300) pass.
# Exit status: QEMU's; 3 when a Debian package is missing (run .ci/setup);
# 124 on the time-out.
set -euo pipefail

mode=${1:-test}
case "$mode" in test | selftest | bench) ;; *)
    echo "usage: $0 [test|selftest|bench]" >&2
    exit 2
    ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/common.sh"

kernel=$("$here/build-kernel.sh")
require_packages qemu-system-x86 busybox-static cpio

# A static hk-guest, in a target dir of its own: other RUSTFLAGS, and no
# fight for the lock of the cargo that may be running this script.
target=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-$repo/target}/hk-static"
log "building a static hk-guest"
(cd "$repo" && env -u CARGO_ENCODED_RUSTFLAGS RUSTFLAGS="-C target-feature=+crt-static" \
    "${CARGO:-cargo}" build --release --locked -q -p hk-guest --bin hk-guest \
    --target "$target" --target-dir "$target_dir" >&2)
guest_bin="$target_dir/$target/release/hk-guest"
if readelf -l "$guest_bin" | grep -q 'Requesting program interpreter'; then
    log "$guest_bin is not statically linked"
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp /bin/busybox "$root/bin/busybox"
cp "$here/init" "$root/init"
cp "$guest_bin" "$root/bin/hk-guest"
(cd "$root" && find . | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >"$work/initramfs.cpio.gz"

# The bench pins up to 256 MiB of guest RAM on top of its own needs.
memory=512M
[ "$mode" = bench ] && memory=1G
iommu=(-device intel-iommu,intremap=on,caching-mode=on)
iommu_arg=intel_iommu=on
if [ "$mode" = selftest ]; then
    iommu=()
    iommu_arg=intel_iommu=off
fi
# no_timer_check: under TCG on a loaded host, the kernel's boot-time check
# that the timer interrupt arrives through the (interrupt-remapped) IO-APIC
# can miss its window and panic ("timer doesn't work through
# Interrupt-remapped IO-APIC"); QEMU's timer works, the check is too eager.
log "booting $kernel (hk_mode=$mode)"
status=0
timeout -k 5 "${HK_QEMU_TIMEOUT:-300}" qemu-system-x86_64 \
    -M q35,kernel-irqchip=split -accel tcg -cpu max -m "$memory" -smp 1 \
    "${iommu[@]}" -device edu -device virtio-rng-pci,disable-legacy=on \
    -kernel "$kernel" -initrd "$work/initramfs.cpio.gz" \
    -append "console=ttyS0 $iommu_arg loglevel=3 no_timer_check panic=-1 hk_mode=$mode" \
    -display none -monitor none -serial stdio -no-reboot </dev/null || status=$?
if [ "$status" -eq 124 ]; then
    log "QEMU timed out after ${HK_QEMU_TIMEOUT:-300} s"
fi
exit "$status"
