#!/usr/bin/env bash
# Build dist/evomsgd: one stripped, reproducible, single-file executable (PyInstaller onefile).
#
#   packaging/build.sh            build dist/evomsgd, print its size, sha256 and glibc floor
#   packaging/build.sh --measure  also time 5 starts to /health 200 (median) and check targets
#   packaging/build.sh --deb      also build dist/evomsgd_VERSION_ARCH.deb with nFPM
#
# The toolchain and every runtime dependency come from packaging/requirements-build.txt, installed
# into build/venv (recreated when that file changes). The binary carries the build host's
# libpython, OpenSSL and SQLite, and needs a glibc at least as new as the newest symbol they use
# (printed below; 2.35 when built on Debian 12): build on the oldest distribution you support.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=build/venv
REQS=packaging/requirements-build.txt
MEASURE=0 DEB=0
for arg in "$@"; do
    case $arg in
        --measure) MEASURE=1 ;;
        --deb) DEB=1 ;;
        *) echo "usage: $0 [--measure] [--deb]" >&2; exit 2 ;;
    esac
done

say() { echo "build.sh: $*" >&2; }

command -v strip >/dev/null || { say "strip not found - install binutils (packaging/install-deps.sh)"; exit 1; }

if ! cmp -s "$REQS" "$VENV/.requirements-build.txt" 2>/dev/null; then
    say "creating $VENV from $REQS"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$REQS"
    "$VENV/bin/pip" check
    cp "$REQS" "$VENV/.requirements-build.txt"
fi

# Reproducibility: hash randomisation and timestamps are the two sources of drift.
export PYTHONHASHSEED=0
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 315532800)
fi
export SOURCE_DATE_EPOCH

# A real (non-editable) install: PyInstaller reads evomsgd and its metadata from site-packages.
# The wheel is built in a scratch dir so setuptools' build/lib never shadows a newer source.
say "installing evomsgd into $VENV"
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
"$VENV/bin/pip" wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --wheel-dir "$WHEELS" . 2>&1 | grep -v '^WARNING: Location' >&2 || true
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-compile --force-reinstall \
    "$WHEELS"/evomsgd-*.whl
rm -rf build/lib build/bdist.*  # setuptools builds in-tree
# The binary carries this dist-info. Drop what depends on where the checkout lives: the wheel's
# temporary path (direct_url.json) and the venv's console script, whose shebang names the venv.
DIST_INFO=$(echo "$VENV"/lib/python3*/site-packages/evomsgd-*.dist-info)
rm -f "$DIST_INFO/direct_url.json"
sed -i -e '/direct_url\.json/d' -e '/^\.\.\//d' "$DIST_INFO/RECORD"

say "freezing (PYTHONHASHSEED=0 SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
"$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
    --workpath build/pyinstaller --distpath dist packaging/evomsgd.spec

BIN=dist/evomsgd
size=$(stat -c %s "$BIN")
# The glibc floor: the newest GLIBC_x.y symbol version any bundled library or the bootloader uses.
glibc=$(grep -oE "'/[^']+\.so[.0-9]*'" build/pyinstaller/evomsgd/PKG-00.toc | tr -d "'" | sort -u \
    | xargs objdump -T "$BIN" 2>/dev/null | grep -oE 'GLIBC_[0-9]+\.[0-9]+' | sort -uV | tail -1)
say "built $BIN: $((size / 1024 / 1024)).$(( (size % (1024 * 1024)) * 10 / 1024 / 1024 )) MiB ($size bytes)"
say "sha256 $(sha256sum "$BIN" | cut -d' ' -f1)"
say "needs glibc >= ${glibc#GLIBC_} (built on glibc $(ldd --version | head -1 | grep -o '[0-9.]*$'))"
"$BIN" --version

if [ "$MEASURE" = 1 ]; then
    "$VENV/bin/python" packaging/measure.py "$BIN"
fi
if [ "$DEB" = 1 ]; then
    packaging/build-deb.sh
fi
