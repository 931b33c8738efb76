#!/bin/bash
# Runs INSIDE the systemd sandbox (../shared/systemd-sandbox/run-in-systemd.sh),
# as root, with systemd 252 as PID 1 and the repository copied to /src (the cwd).
# Installs echod the way the units expect it and exercises the real units:
# start, echo over TCP and UDP, reload, upgrade in place, stop, socket activation.
# Prints "ok - ..." / "not ok - ..." per check, then "N passed, N failed".
#
# Network: the sandbox shares the host's network namespace, so everything here
# stays on 127.0.0.1. The shipped echod.socket listens on all interfaces; a
# drop-in below narrows it to loopback for this run.
set -u

SRC=${SRC:-/src}
UNIT=echod.service
POLL_SECONDS=60   # upper bound for every wait below

# ok/check/poll/finish and the process helpers
. "$SRC/tests/system/checks.sh"

# An echo client: byte-exact round trip of a binary payload over TCP or UDP.
cat > /tmp/echo_probe.py <<'PY'
import os, socket, sys, time
kind, host, port = sys.argv[1], "127.0.0.1", 7
payload = bytes(range(256)) * 4 + b"\0end" + os.urandom(512)
deadline = time.monotonic() + 30
if kind == "tcp":
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    conn.sendall(payload)
    conn.shutdown(socket.SHUT_WR)  # the server sends the rest, then closes
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
else:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, 0))  # an ephemeral source port: RFC 862 abuse filters drop low ones
    udp.settimeout(1)
    while True:
        udp.sendto(payload, (host, port))
        try:
            got, peer = udp.recvfrom(65536)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
    assert peer == (host, port), peer
sys.exit(0 if got == payload else f"{kind}: echoed {len(got)} bytes, not the {len(payload)} sent")
PY
echo_works() { python3 /tmp/echo_probe.py "$1"; }
has_workers() { [ -n "$(workers_of "$1")" ]; }
no_echod_left() {
  local found; found=$(pgrep -af echod | grep -v inside.sh)
  [ -z "$found" ] || { echo "$found" >&2; return 1; }
}
pidfile_names_main_pid() { [ "$(head -n1 /run/echod/echod.pid 2>/dev/null)" = "$(main_pid)" ]; }

echo "# systemd $(systemctl --version | head -n1 | cut -d' ' -f2) as PID 1 ($(ps -p 1 -o comm=))"

# ---------------------------------------------------------------- install --
check "install echod into /opt/echod, linked into /usr/local/bin (the units name a bare echod)" \
  bash -c "python3 -m venv /opt/echod && /opt/echod/bin/pip install -q --disable-pip-version-check '$SRC' && ln -s /opt/echod/bin/echod /opt/echod/bin/echoctl /usr/local/bin/"
check "install etc/echod.toml as /etc/echod/echod.toml" \
  install -D -m 0644 "$SRC/etc/echod.toml" /etc/echod/echod.toml
check "the shipped config is valid" /opt/echod/bin/echod --check-config --config /etc/echod/echod.toml
check "install the units" install -m 0644 "$SRC/systemd/echod.service" "$SRC/systemd/echod.socket" /etc/systemd/system/
mkdir -p /etc/systemd/system/echod.socket.d
cat > /etc/systemd/system/echod.socket.d/loopback.conf <<'EOF'
[Socket]
# One empty assignment resets every Listen*= line of the unit (not just this kind).
ListenStream=
ListenStream=127.0.0.1:7
ListenDatagram=127.0.0.1:7
EOF
# --man=no: this install has no man pages (the Debian package's test checks them)
check "systemd-analyze verify (in the sandbox, real paths)" \
  bash -c '[ -z "$(systemd-analyze verify --man=no /etc/systemd/system/echod.service /etc/systemd/system/echod.socket 2>&1)" ]'
systemctl daemon-reload
[ "$failed" = 0 ] || finish

# ------------------------------------------------------------------ start --
check "systemctl start echod" systemctl start "$UNIT"
check "echod is active" is_active "$UNIT"
systemctl status --no-pager "$UNIT" | head -n 12 | sed 's/^/# /'
master=$(main_pid)
check "MainPID is set ($master)" test "$master" -gt 0
check "pidfile /run/echod/echod.pid names MainPID" pidfile_names_main_pid
check "workers run" poll "$POLL_SECONDS" has_workers "$master"
check "TCP echo on 127.0.0.1:7" echo_works tcp
check "UDP echo on 127.0.0.1:7" echo_works udp

# ------------------------------------------- fits the machine it lands on (25) --
# One OOM-killed worker must not stop the service; the OOM killer takes a worker
# before the master; the master raised its soft open-file limit above the unit's 1024.
unit_says() { [ "$(systemctl show -p "$1" --value "$UNIT")" = "$2" ]; }
oom_adj() { cat "/proc/$1/oom_score_adj"; }
first_worker() { workers_of "$master" | cut -d' ' -f1; }
workers_above_master() {
  local pid; for pid in $(workers_of "$master"); do
    [ "$(oom_adj "$pid")" -gt "$(oom_adj "$master")" ] || return 1
  done
}
soft_nofile() { awk '/^Max open files/ {print $4}' "/proc/$1/limits"; }
check "OOMPolicy=continue" unit_says OOMPolicy continue
# (a container without CAP_SYS_RESOURCE, this sandbox among them, leaves the
# master at 0: systemd ignores the failed write; the unit still asks for -500)
check "OOMScoreAdjust=-500 (the master runs at $(oom_adj "$master"))" unit_says OOMScoreAdjust -500
check "workers' oom_score_adj above the master's (worker: $(oom_adj "$(first_worker)"))" workers_above_master
check "master raised its soft RLIMIT_NOFILE above 1024 ($(soft_nofile "$master"))" test "$(soft_nofile "$master")" -gt 1024
check "the start-up log says how many workers and why" \
  bash -c "journalctl -u $UNIT --no-pager -o cat | grep -Eq '[0-9]+ worker\(s\): '"

# ------------------------------------------------------ echoctl drain (28) --
# the STATUS= line says so at once; the state holds across the reload and the
# upgrade below and ends with echoctl undrain after them
status_says() { systemctl show -p StatusText --value "$UNIT" | grep -q "$1"; }
check "echoctl drain" /opt/echod/bin/echoctl drain
check "systemd status line says draining" poll "$POLL_SECONDS" status_says '^draining: not ready'
check "TCP echo while draining" echo_works tcp

# ----------------------------------------------------------------- reload --
before=$(workers_of "$master")
check "systemctl reload echod" systemctl reload "$UNIT"
check "reload replaced every worker (was: $before)" poll "$POLL_SECONDS" all_workers_replaced "$master" "$before"
check "MainPID unchanged by reload" test "$(main_pid)" = "$master"
check "active after reload" is_active "$UNIT"
check "TCP echo after reload" echo_works tcp

# ---------------------------------------------------------- upgrade (USR2) --
before=$(workers_of "$master")
check "kill -USR2 MainPID" kill -USR2 "$master"
check "upgrade replaced every worker (was: $before)" poll "$POLL_SECONDS" all_workers_replaced "$master" "$before"
check "MainPID unchanged by upgrade" test "$(main_pid)" = "$master"
check "active after upgrade" is_active "$UNIT"
check "pidfile still names MainPID after upgrade" pidfile_names_main_pid
check "TCP echo after upgrade" echo_works tcp
check "UDP echo after upgrade" echo_works udp
check "still draining after reload and upgrade" status_says '^draining: not ready'
check "echoctl undrain" /opt/echod/bin/echoctl undrain
check "systemd status line no longer says draining" poll "$POLL_SECONDS" status_says '^[0-9]* worker(s) serving'

# ------------------------------------------------------------------- stop --
check "systemctl stop echod" systemctl stop "$UNIT"
check "inactive after stop" is_inactive "$UNIT"
status=$(systemctl show -p ExecMainStatus,Result "$UNIT" | sort | tr '\n' ' ')
check "clean exit after stop ($status)" test "$status" = "ExecMainStatus=0 Result=success "
check "no echod process left" no_echod_left
check "runtime dir and pidfile gone" test ! -e /run/echod/echod.pid
journalctl -u "$UNIT" --no-pager -o cat | tail -n 10 | sed 's/^/# /'

# ------------------------------------------------------ socket activation --
check "systemctl start echod.socket" systemctl start echod.socket
check "service not started yet" is_inactive "$UNIT"
check "TCP echo through socket activation" echo_works tcp
# Type=notify: active once READY=1 arrives, a moment after the first echo
check "socket activation started echod" poll "$POLL_SECONDS" is_active "$UNIT"
check "UDP echo through socket activation" echo_works udp
check "pidfile names the activated MainPID" pidfile_names_main_pid
systemctl status --no-pager echod.socket "$UNIT" | grep -E 'Active|Listen|Status|Triggers' | sed 's/^/# /'
check "systemctl stop echod.socket echod" systemctl stop echod.socket "$UNIT"
check "socket and service inactive" bash -c "! systemctl is-active --quiet echod.socket && ! systemctl is-active --quiet $UNIT"
status=$(systemctl show -p ExecMainStatus,Result "$UNIT" | sort | tr '\n' ' ')
check "clean exit of the activated service ($status)" test "$status" = "ExecMainStatus=0 Result=success "

finish
