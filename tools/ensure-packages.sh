#!/bin/sh
# Make sure the distribution packages listed in bindep.txt are installed.
# As root on Debian/Ubuntu they are installed with apt-get; otherwise the
# exact command to run is printed and the script fails.
#
# Usage: ensure-packages.sh [PROFILE ...].  A line of bindep.txt whose
# brackets name a profile besides the platform (e.g. "graphviz [doc
# platform:dpkg]") is installed only when that profile is given, as
# bindep does.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
profiles=" $* "
missing=""
wanted() {
    # $1: the bracket's words; true when no profile is named, or one given.
    named=0
    for word in $1; do
        case "$word" in
            platform:*) ;;
            *) named=1
               case "$profiles" in *" $word "*) return 0 ;; esac ;;
        esac
    done
    [ "$named" = 0 ]
}
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in $(sed -n 's/^\([a-z0-9.+-]*\) \[\(.*platform:dpkg.*\)\].*/\1:\2/p' \
                 "$here/bindep.txt" | tr ' ' ','); do
        words=$(echo "${pkg#*:}" | tr ',' ' ')
        pkg=${pkg%%:*}
        wanted "$words" || continue
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        case "$status" in
            *"install ok installed"*) ;;
            *) missing="$missing $pkg" ;;
        esac
    done
else
    command -v qemu-img >/dev/null 2>&1 || missing=" qemu-img"
    if [ -n "$missing" ]; then
        echo "imagebackend needs qemu-img; install it with your" \
             "distribution's package manager (e.g. dnf install qemu-img)." >&2
        exit 1
    fi
fi
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then
    echo "Installing missing packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
    echo "Missing packages:$missing" >&2
    echo "Install them with: sudo apt-get install -y$missing" >&2
    exit 1
fi
