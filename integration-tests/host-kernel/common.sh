# Helpers shared by build-kernel.sh and run.sh (sourced, not run).

log() { echo "${0##*/}: $*" >&2; }

# Checks that the Debian packages "$@" are installed; exits 3 naming the
# missing ones otherwise (.ci/setup installs them: no test installs anything).
require_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "missing Debian packages: ${missing[*]} (run .ci/setup, which installs them)"
    exit 3
}
