#!/usr/bin/env bash
# Builds, once, the one Linux kernel of the tests and prints the path of its
# bzImage on stdout (everything else goes to stderr). It serves three roles:
# - the host kernel of the VFIO/IOMMUFD harness (run.sh: QEMU TCG, emulated
#   VT-d, edu);
# - the L1 kernel of the nested-KVM harness (tests/nested.rs: kvm_amd under
#   QEMU TCG);
# - a Linux guest of pvmm with Linux's own Hyper-V pvIOMMU driver
#   (integration_tests::linux::hv_pviommu_kernel).
#
# Source: Debian sid's linux-source-7.2, which is not in Debian 12's archive:
# .ci/setup fetches it by name and sha256 into ~/.cache/pvmm/linux-hv-pviommu/.
# ../linux-hv-pviommu/build.sh applies the unmodified pvIOMMU series there,
# configures `make tinyconfig` + kernel.config beside this script +
# ../linux-hv-pviommu/kernel.config, checks the final .config and vmlinux,
# and builds. The result (bzImage, vmlinux, .config) is cached in
# ~/.cache/pvmm/kernel/<sha256 of the package, the patches, the fragments and
# both scripts>/, so a second run only checks the cache.
#
# Exit status: 0 built or cached; 3 the source package or a Debian package
# is missing (.ci/setup provides them): callers may skip outside CI; anything
# else is a real failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
hv=$(cd "$here/../linux-hv-pviommu" && pwd)
cache="${PVMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pvmm}"
deb="$cache/linux-hv-pviommu/linux-source-7.2_7.2.13-1_all.deb"
cache_root="$cache/kernel"

. "$here/common.sh"

require_packages make gcc binutils bc bison flex libelf-dev xz-utils patch
if [ ! -s "$deb" ]; then
    log "no $deb (run .ci/setup, which downloads it)"
    exit 3
fi

# --- cache ------------------------------------------------------------------
key=$( {
    sha256sum "$here/build-kernel.sh" "$here/kernel.config" "$hv"/000*.patch \
        "$hv/kernel.config" "$hv/build.sh" | cut -d' ' -f1
    sha256sum <"$deb"
} | sha256sum | cut -d' ' -f1)
out="$cache_root/$key"
mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9 # one build at a time; a waiting caller then finds the cache filled

if [ -s "$out/bzImage" ] && [ -s "$out/vmlinux" ]; then
    log "cached: $out/bzImage"
    echo "$out/bzImage"
    exit 0
fi

# --- build ------------------------------------------------------------------
rm -rf "$cache_root"/build.* # left by a run that was killed
work=$(mktemp -d "$cache_root/build.XXXXXX")
# The tree (~1.5 GB) goes in the background: the caller need not wait, so
# the removal keeps neither our output pipes nor the lock (fd 9).
cleanup() { rm -rf "$work" </dev/null >/dev/null 2>&1 9>&- & }
trap cleanup EXIT
start=$(date +%s)
log "unpacking $(basename "$deb")"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" ./usr/src/linux-source-7.2.tar.xz
tar -xJf "$work/usr/src/linux-source-7.2.tar.xz" -C "$work"
rm -f "$work/usr/src/linux-source-7.2.tar.xz"

log "applying the series, configuring and building (build.sh)"
JOBS=$(nproc) "$hv/build.sh" "$work/linux-source-7.2" "$work/build" >&2

mkdir -p "$out.tmp"
cp "$work/build/arch/x86/boot/bzImage" "$work/build/vmlinux" "$work/build/.config" "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
log "built $out/bzImage in $(($(date +%s) - start)) s"
echo "$out/bzImage"
