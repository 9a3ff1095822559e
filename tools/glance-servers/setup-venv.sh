#!/usr/bin/env bash
# Install Keystone and Glance into a virtualenv of their own, for the
# functional tests that run both servers on 127.0.0.1.
#
# Idempotent: when the virtualenv already holds exactly what
# constraints.txt pins (recorded in a stamp file), it exits at once.
#
# Environment:
#   IMAGEBACKEND_SERVERS_VENV   where the virtualenv lives
#                               (default: ~/.cache/imagebackend/servers-venv)
#   IMAGEBACKEND_SERVERS_PYTHON the interpreter that creates it
#                               (default: python3)
#
# Exit status: 0 when the virtualenv is ready, non-zero otherwise (the
# functional tests then skip, quoting this script's output).

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
constraints="$here/constraints.txt"
# tox may run this without HOME: fall back to the user's home directory.
home="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
venv="${IMAGEBACKEND_SERVERS_VENV:-$home/.cache/imagebackend/servers-venv}"
python="${IMAGEBACKEND_SERVERS_PYTHON:-python3}"

# The top-level packages; constraints.txt pins them and everything below.
packages=(glance keystone gunicorn python-keystoneclient)

log() {
    echo "setup-venv: $*"
}

py_version="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
want_stamp="$(
    { echo "python=$py_version"; cat "$constraints"; } | sha256sum | cut -d' ' -f1
)"
stamp_file="$venv/.imagebackend-servers-stamp"

if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$want_stamp" ]] &&
   "$venv/bin/python" -c 'import glance, keystone, gunicorn' 2>/dev/null; then
    log "$venv is up to date (glance, keystone, gunicorn installed)"
    exit 0
fi

start=$SECONDS
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating virtualenv $venv with $python ($py_version)"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
else
    log "updating virtualenv $venv"
fi

# A stale stamp must not survive a failed install.
rm -f "$stamp_file"

log "installing ${packages[*]} with $constraints"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --constraint "$constraints" "${packages[@]}"

"$venv/bin/python" -c 'import glance, keystone, gunicorn'
echo "$want_stamp" > "$stamp_file"
log "done in $((SECONDS - start)) s:" \
    "$("$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
       grep -Ei '^(glance|keystone|gunicorn) ' | tr -s ' ' '=' | tr '\n' ' ')"
