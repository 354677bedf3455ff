# Helpers shared by build-kernel.sh and run.sh (sourced, not run).

log() { echo "${0##*/}: $*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }

# Installs the Debian packages among "$@" that are missing; exits 3 when
# apt-get cannot (no network to Debian's mirror, or not root).
install_missing() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]}"
    if ! as_root apt-get update -qq >&2 ||
        ! as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
        log "cannot install ${missing[*]} with apt-get (no network to Debian's mirror, or not root)"
        exit 3
    fi
}
