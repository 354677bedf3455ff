#!/usr/bin/env bash
# Builds, once, the small host kernel of the VFIO/IOMMUFD harness and prints the
# path of its bzImage on stdout (everything else goes to stderr).
#
# Source: Debian's linux-source-6.12 (bookworm-security). Config: `make
# tinyconfig` plus kernel.config beside this script; every `=y` line of the
# fragment must survive into the final .config. The result is cached in
# ~/.cache/pvmm/host-kernel/<sha256 of fragment + source version>/bzImage, so
# a second run only checks the cache.
#
# Exit status: 0 built or cached; 3 a Debian package is missing (.ci/setup
# installs them): callers may skip outside CI; anything else is a real
# failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
fragment="$here/kernel.config"
src_pkg=linux-source-6.12
src_tarball=/usr/src/linux-source-6.12.tar.xz
cache_root="${PVMM_CACHE_DIR:-$HOME/.cache/pvmm}/host-kernel"
jobs=$(nproc)

. "$here/common.sh"

require_packages "$src_pkg" make gcc bc bison flex libelf-dev xz-utils
src_version=$(dpkg-query -W -f='${Version}' "$src_pkg")

# --- cache ------------------------------------------------------------------
key=$( { echo "$src_pkg $src_version"; cat "$fragment"; } | sha256sum | cut -d' ' -f1)
out="$cache_root/$key"
mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9 # one build at a time; a waiting caller then finds the cache filled

if [ -s "$out/bzImage" ]; then
    log "cached: $out/bzImage ($src_pkg $src_version)"
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
log "unpacking $src_tarball ($src_version)"
tar -xf "$src_tarball" -C "$work"
src="$work/linux-source-6.12"
kmake() { make -C "$src" ARCH=x86_64 -s "$@" >&2; }

kmake tinyconfig
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >/dev/null
kmake olddefconfig

missing=()
while IFS= read -r opt; do
    grep -qx "$opt" "$src/.config" || missing+=("$opt")
done < <(grep -E '^CONFIG_[A-Z0-9_]+=y$' "$fragment")
if [ "${#missing[@]}" -gt 0 ]; then
    log "these options of kernel.config are not set in the final .config (a dependency is missing):"
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi
# And what the fragment turns off must not come back through a `select`.
unwanted=()
while IFS= read -r opt; do
    grep -q "^$opt=y" "$src/.config" && unwanted+=("$opt")
done < <(sed -n 's/^# \(CONFIG_[A-Z0-9_]*\) is not set$/\1/p' "$fragment")
if [ "${#unwanted[@]}" -gt 0 ]; then
    log "these options are off in kernel.config but on in the final .config (selected by another):"
    printf '  %s\n' "${unwanted[@]}" >&2
    exit 1
fi

log "building bzImage with make -j$jobs"
kmake -j"$jobs" bzImage

mkdir -p "$out.tmp"
cp "$src/arch/x86/boot/bzImage" "$src/.config" "$out.tmp/"
echo "$src_pkg $src_version" >"$out.tmp/source-version"
rm -rf "$out"
mv "$out.tmp" "$out"
log "built $out/bzImage in $(($(date +%s) - start)) s"
echo "$out/bzImage"
