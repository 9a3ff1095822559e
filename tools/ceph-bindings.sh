#!/bin/sh
# Make Debian's Ceph bindings (python3-rados, python3-rbd: librados' and
# librbd's bindings are not on PyPI) importable from a virtualenv: their
# two extension modules are linked into a directory of their own that a
# .pth file adds to the virtualenv's path (nothing else of the system's
# dist-packages becomes visible).
#
# Usage: tools/ceph-bindings.sh PYTHON   (tox: {envpython})
# Without the packages it says which to install and exits 0: the RBD
# tests then fail under CI and are skipped elsewhere, naming them.
set -eu
python=${1:?usage: $0 PYTHON}
dist=${IMAGEBACKEND_CEPH_DIST:-/usr/lib/python3/dist-packages}
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tag=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
links="$site/imagebackend-ceph-bindings"
mkdir -p "$links"
missing=""
for module in rados rbd; do
    so="$dist/$module$tag"
    if [ -e "$so" ]; then
        ln -sfn "$so" "$links/$module$tag"
    else
        missing="$missing python3-$module"
    fi
done
echo "$links" > "$site/imagebackend-ceph-bindings.pth"
if [ -n "$missing" ]; then
    echo "ceph-bindings: no $dist/*$tag for:$missing; install the" \
         "Debian packages$missing (same Python version as $python)" >&2
fi
exit 0
