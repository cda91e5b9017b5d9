#!/bin/bash
# Runs as PID 1's only job inside the throwaway container (see ../prove-unit.sh): drives the real
# evomsgd.service with systemctl and checks what systemd saw. Exits non-zero on the first miss.
set -euo pipefail
exec > /proof/out/log 2>&1
. /etc/evomsgd/evomsgd.env  # EVOMSGD_PORT: a port free on the host, whose network we share
API=http://127.0.0.1:$EVOMSGD_PORT

fail() { echo "FAIL: $*"; journalctl -u evomsgd --no-pager -o short-monotonic | tail -40; exit 1; }
ok() { echo "ok: $*"; }
prop() { systemctl show evomsgd -P "$1"; }
post() {
    curl -sf -XPOST $API/messages -H 'content-type: application/json' \
        -d "{\"phone\":\"+5511988887777\",\"message\":\"$1\"}" | grep -o '"task_id":"[^"]*"' | cut -d'"' -f4
}
status_of() { curl -sf "$API/tasks/$1" | grep -o '"status":"[A-Z]*"' | head -1 | cut -d'"' -f4; }
sent() { [ "$(status_of "$1")" = SUCCESS ]; }
is() { [ "$(prop "$1")" = "$2" ]; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND... (COMMAND re-run until it succeeds)
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@"; do [ $SECONDS -lt $deadline ] || fail "timed out waiting for $what"; sleep 0.1; done
}
unpacked() { ls /run/evomsgd 2>/dev/null | grep -c '^_MEI' || true; }

# 0. The binary unpacks itself into /run/evomsgd: make /run noexec, as Ubuntu's initramfs mounts it.
mount -o remount,noexec /run || fail "cannot remount /run noexec"
grep -q ' /run tmpfs [^ ]*noexec' /proc/mounts || fail "/run is not noexec"
ok "/run is mounted noexec"

# 1. Type=notify: `systemctl start` returns once READY=1 came, with our STATUS=.
systemctl start evomsgd || fail "start"
[ "$(prop ActiveState)" = active ] || fail "not active"
[ "$(prop StatusText)" = "listening on $API" ] || fail "StatusText $(prop StatusText)"
main=$(prop MainPID)
child=$(cut -d' ' -f1 "/proc/$main/task/$main/children")  # (no awk: /etc/alternatives is empty)
[ "$(cut -d' ' -f4 "/proc/$child/stat")" = "$main" ] || fail "daemon is not the bootloader's child"
ok "READY=1 from the bootloader's child (main $main, daemon $child); $(prop StatusText)"
[ "$(unpacked)" = 1 ] || fail "expected one unpack dir in /run/evomsgd"
ok "unpacked into RuntimeDirectory /run/evomsgd; ledger in $(readlink -f /var/lib/evomsgd)"

# 2. Deliveries through Evolution (the fake on the host) under the whole sandbox.
ids=$(for i in 1 2 3; do post "proof $i"; done)
for id in $ids; do wait_for 20 "delivery of $id" sent "$id"; done
ok "3 messages delivered under DynamicUser=yes as uid $(stat -c %u /var/lib/private/evomsgd/evomsgd.db)"

# 3. The watchdog: systemd records every accepted WATCHDOG=1 (WatchdogSec=30s: one per 15 s).
mkdir -p /run/systemd/system/evomsgd.service.d
printf '[Service]\nWatchdogSec=2s\n' > /run/systemd/system/evomsgd.service.d/proof.conf
systemctl daemon-reload && systemctl restart evomsgd
first=$(prop WatchdogTimestampMonotonic)
sleep 3
[ "$(prop WatchdogTimestampMonotonic)" != "$first" ] || fail "no WATCHDOG=1 accepted"
[ "$(prop NRestarts)" = 0 ] && [ "$(prop ActiveState)" = active ] || fail "watchdog fired"
ok "WATCHDOG=1 accepted from the child (WatchdogSec=2s, 3 s later still active, no restart)"
rm /run/systemd/system/evomsgd.service.d/proof.conf && systemctl daemon-reload && systemctl restart evomsgd

# 4. kill -9 of the main PID (the bootloader): the daemon drains, systemd restarts, no leftovers.
systemctl kill --kill-whom=main -s KILL evomsgd
wait_for 20 "restart after kill -9 of main" is NRestarts 1
wait_for 20 "active again" is ActiveState active
drained() { journalctl -u evomsgd -o cat | grep -q "received SIGTERM: draining"; }
wait_for 10 "the orphan's drain in the journal" drained
[ "$(unpacked)" = 1 ] || fail "$(unpacked) unpack dirs after kill -9 of main"
ok "kill -9 of main: the orphaned daemon drained, Restart=on-failure, one unpack dir"

# 5. kill -9 of everything: systemd removes the RuntimeDirectory, the restart unpacks afresh.
systemctl kill -s KILL evomsgd
wait_for 20 "restart after kill -9 of all" is NRestarts 2
wait_for 20 "active again" is ActiveState active
[ "$(unpacked)" = 1 ] || fail "$(unpacked) unpack dirs after kill -9 of all"
ok "kill -9 of all: restarted, one unpack dir"

# 6. systemctl stop: SIGTERM reaches the daemon once (KillMode=mixed), it drains, exits 0.
curl -sf -XPOST $API/instances/main/pause -H 'content-type: application/json' -d '{}' >/dev/null
queued=$(post "queued over a stop")
invocation=$(prop InvocationID)
systemctl stop evomsgd
[ "$(prop Result)" = success ] && [ "$(prop ExecMainStatus)" = 0 ] || fail "stop: $(prop Result)"
log=$(journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID="$invocation")
grep -q "drained" <<<"$log" || fail "no drain in the stopped invocation's log"
[ "$(grep -c 'received SIGTERM' <<<"$log")" = 1 ] || fail "SIGTERM seen $(grep -c 'received SIGTERM' <<<"$log") times"
[ ! -e /run/evomsgd ] || fail "/run/evomsgd left after stop"
ok "stop: one SIGTERM, drained, exit 0, /run/evomsgd removed"
systemctl start evomsgd
curl -sf -XPOST $API/instances/main/resume -H 'content-type: application/json' -d '{}' >/dev/null
wait_for 20 "the queued message after the restart" sent "$queued"
ok "the message queued before the stop was delivered after the start"

# 7. Priorities reach the journal: the sandbox warning lands at priority 4 (warning), the
#    "listening" line at 6 (info), and no "<N>" prefix is left in the text.
printf '[Service]\nEnvironment=EVOMSGD_SANDBOX=1\n' > /run/systemd/system/evomsgd.service.d/proof.conf
systemctl daemon-reload && systemctl restart evomsgd
warnings() { journalctl -u evomsgd -p warning -o cat _SYSTEMD_INVOCATION_ID="$(prop InvocationID)"; }
sandbox_warned() { warnings | grep -q "SANDBOX MODE"; }
wait_for 10 "the sandbox warning at priority warning" sandbox_warned
journalctl -u evomsgd -o cat | grep -q "listening on" || fail "no info line"
! warnings | grep -q "listening on" || fail "an info line came out as a warning"
! journalctl -u evomsgd -o cat | grep -q '^<[0-7]>' || fail "a <N> prefix reached the journal text"
ok "journald: priorities kept (warning at 4, info at 6), no <N> in the text"
systemctl stop evomsgd

# 8. Without ExecPaths= the noexec /run breaks the binary: that line of the unit is needed.
printf '[Service]\nExecPaths=\n' > /run/systemd/system/evomsgd.service.d/proof.conf
systemctl daemon-reload
! systemctl start evomsgd 2>/dev/null || fail "started from a noexec /run without ExecPaths="
journalctl -u evomsgd -o cat | grep -q "failed to map segment from shared object" || fail "other error"
rm /run/systemd/system/evomsgd.service.d/proof.conf && systemctl daemon-reload
systemctl reset-failed evomsgd
systemctl start evomsgd || fail "no start with ExecPaths= back"
ok "without ExecPaths=/run/evomsgd the start fails; with it, it works"
systemctl stop evomsgd

# 9. Replication: Litestream, bound where the .deb puts it beside the binary (../lib/evomsgd/),
#    runs as the daemon's child under the whole sandbox (DynamicUser, seccomp filter,
#    MemoryDenyWriteExecute, its control socket in the RuntimeDirectory), is restarted when
#    killed, and its replica restores.
printf '[Service]\nEnvironment=EVOMSGD_REPLICA_URL=file:///var/lib/evomsgd/replica\n' \
    > /run/systemd/system/evomsgd.service.d/proof.conf
systemctl daemon-reload && systemctl start evomsgd || fail "start with a replica"
health() { curl -s $API/health; }
replicating() { health | grep -q '"state":"replicating"'; }
wait_for 30 "replicating under the unit" replicating
replicated=$(post "replicated")
wait_for 20 "delivery of $replicated" sent "$replicated"
in_sync() { health | grep -q '"lag_seconds":0.0'; }
wait_for 30 "the replica to catch up" in_sync
litestream=$(health | grep -o '"pid":[0-9]*' | cut -d: -f2)
[ "$(cut -d' ' -f4 "/proc/$litestream/stat")" = "$(cut -d' ' -f1 "/proc/$(prop MainPID)/task/$(prop MainPID)/children")" ] \
    || fail "litestream is not the daemon's child"
kill -9 "$litestream"
restarted() { health | grep -q '"restarts":1' && replicating; }
wait_for 30 "litestream restarted" restarted
journalctl -u evomsgd -o cat | grep -q "litestream exited with -9" || fail "its death was not logged"
systemctl stop evomsgd
/opt/evomsgd/evomsgd restore --from file:///var/lib/private/evomsgd/replica --data-dir /tmp/restored \
    | grep -q "integrity ok" || fail "restore from the replica"
ok "Litestream replicated under the sandbox as the daemon's child, restarted after kill -9; restored"
rm /run/systemd/system/evomsgd.service.d/proof.conf && systemctl daemon-reload

echo "ALL OK"
