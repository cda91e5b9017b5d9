#!/usr/bin/env bash
# Install the Debian packages that packaging/build.sh and the binary/systemd tests need, if
# missing: binutils (strip, objdump), systemd (systemd-analyze), systemd-container
# (systemd-nspawn, for packaging/prove-unit.sh), openssl (test certificates), python3-venv
# (build.sh makes build/venv). Idempotent; installs only as root, with apt-get.
set -euo pipefail

say() { echo "install-deps.sh: $*"; }
PYTHON=${PYTHON:-python3}
need=()
{ command -v strip && command -v objdump; } >/dev/null || need+=(binutils)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v openssl >/dev/null || need+=(openssl)
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)

if [ ${#need[@]} -eq 0 ]; then
    say "nothing to do: strip, objdump, systemd-analyze, systemd-nspawn, openssl, $PYTHON -m venv"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "missing ${need[*]} - install them as root (apt-get install ${need[*]})" >&2
    exit 1
fi
say "apt-get install ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
say "installed ${need[*]}"
