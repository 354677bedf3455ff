#!/usr/bin/env bash
# Builds, once, the Linux guest kernel with Linux's own Hyper-V pvIOMMU
# driver (the unmodified v2 series beside this script, applied by its own
# build.sh to Debian sid's linux-source-7.2) and prints the directory that
# holds its bzImage and vmlinux on stdout (everything else goes to stderr).
#
# The source package is not in Debian 12's archive: .ci/setup fetches it by
# name and sha256 into ~/.cache/pvmm/linux-hv-pviommu/. The result is cached
# in ~/.cache/pvmm/linux-hv-pviommu/<sha256 of the package, the patches, the
# fragment and both scripts>/, so a second run only checks the cache.
#
# Exit status: 0 built or cached; 3 the source package or a Debian package
# is missing (.ci/setup provides them); anything else is a real failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root="${PVMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pvmm}/linux-hv-pviommu"
deb="$cache_root/linux-source-7.2_7.2.13-1_all.deb"

. "$here/../host-kernel/common.sh"

require_packages make gcc bc bison flex libelf-dev xz-utils patch
if [ ! -s "$deb" ]; then
    log "no $deb (run .ci/setup, which downloads it)"
    exit 3
fi

# --- cache ------------------------------------------------------------------
key=$( (cd "$here" && sha256sum 000*.patch kernel.config build.sh build-kernel.sh; sha256sum <"$deb") |
    sha256sum | cut -d' ' -f1)
out="$cache_root/$key"
exec 9>"$cache_root/.lock"
flock 9 # one build at a time; a waiting caller then finds the cache filled

if [ -s "$out/bzImage" ] && [ -s "$out/vmlinux" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

# --- build ------------------------------------------------------------------
rm -rf "$cache_root"/build.* # left by a run that was killed
work=$(mktemp -d "$cache_root/build.XXXXXX")
# The tree (~1.5 GB) goes in the background, without our pipes or the lock.
cleanup() { rm -rf "$work" </dev/null >/dev/null 2>&1 9>&- & }
trap cleanup EXIT
start=$(date +%s)
log "unpacking $(basename "$deb")"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" ./usr/src/linux-source-7.2.tar.xz
tar -xJf "$work/usr/src/linux-source-7.2.tar.xz" -C "$work"
rm -f "$work/usr/src/linux-source-7.2.tar.xz"

log "applying the series and building (build.sh)"
JOBS=$(nproc) "$here/build.sh" "$work/linux-source-7.2" "$work/build" >&2

mkdir -p "$out.tmp"
cp "$work/build/arch/x86/boot/bzImage" "$work/build/vmlinux" "$work/build/.config" "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
log "built $out in $(($(date +%s) - start)) s"
echo "$out"
