#!/bin/bash
# Runs INSIDE the systemd sandbox (../shared/systemd-sandbox/run-in-systemd.sh),
# as root, with systemd 252 as PID 1 and the repository copied to /src (the cwd).
# Builds the Debian package the way the README says (apt-get build-dep ./,
# make deb), lints it, installs it and checks what an operator gets: the running
# service, the files in their Debian places, the project's own integration tests
# against the installed echod on Debian's python3 packages, an in-place upgrade
# under load (apt-get install --reinstall), reload, remove and purge.
# Prints "ok - ..." / "not ok - ..." per check, then "N passed, N failed".
#
# Network: the sandbox shares the host's network namespace (apt reaches Debian's
# mirror); echod's shipped config binds 127.0.0.1:7 only.
set -u

SRC=${SRC:-/src}
UNIT=echod.service
POLL_SECONDS=60   # upper bound for every wait below
export DEBIAN_FRONTEND=noninteractive
# The integration tests run against Debian's packages (see "dependencies" below).
PACKAGE_TESTS=(
  tests/integration/test_daemon_mode.py
  tests/integration/test_metrics.py
  tests/integration/test_lifecycle.py
)

# ok/check/poll/finish and the process helpers
. "$SRC/tests/system/checks.sh"
quietly() {  # run CMD, show its output (as comments) only when it fails
  local out; out=$("$@" 2>&1) && return 0
  local rc=$?; printf '%s\n' "$out" | tail -n 40 | sed 's/^/# /'; return $rc
}
elapsed() { echo "# $1: $((SECONDS - phase_started)) s"; phase_started=$SECONDS; }
has_workers() { [ -n "$(workers_of "$1")" ]; }
no_echod_left() { ! pgrep -f echod >/dev/null; }  # "echod: master", "python3 -m echod"...

# Byte-exact round trip of a binary payload over TCP or UDP to 127.0.0.1:7.
cat > /tmp/echo_probe.py <<'PY'
import os, socket, sys, time
kind, address = sys.argv[1], ("127.0.0.1", 7)
payload = bytes(range(256)) * 4 + os.urandom(512)
deadline = time.monotonic() + 30
if kind == "tcp":
    conn = socket.create_connection(address, timeout=5)
    conn.sendall(payload)
    conn.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
else:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))  # an ephemeral source port: RFC 862 abuse filters drop low ones
    udp.settimeout(1)
    while True:
        udp.sendto(payload, address)
        try:
            got, peer = udp.recvfrom(65536)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
sys.exit(0 if got == payload else f"{kind}: echoed {len(got)} bytes, not the {len(payload)} sent")
PY
echo_works() { python3 /tmp/echo_probe.py "$1"; }

echo "# systemd $(systemctl --version | head -n1 | cut -d' ' -f2) as PID 1 ($(ps -p 1 -o comm=))"
phase_started=$SECONDS

# ------------------------------------------------------------------ build --
quietly apt-get update -qq
check "apt-get build-dep ./" quietly apt-get build-dep -y -qq ./
check "make deb" quietly make deb
deb=$(ls dist/echod_*_all.deb 2>/dev/null | head -n1)
check "make deb wrote dist/echod_<version>-<revision>_all.deb ($deb)" \
  bash -c "[[ '$deb' =~ ^dist/echod_[0-9.]+-[0-9]+_all\.deb$ ]]"
[ -n "$deb" ] || finish
elapsed "build"
check "lintian installs" quietly apt-get install -y -qq --no-install-recommends lintian
lint=$(lintian --fail-on error,warning --display-info "$deb" 2>&1); lint_status=$?
printf '%s\n' "$lint" | sed 's/^/# lintian: /'
check "lintian --fail-on error,warning passes" test "$lint_status" = 0
elapsed "lintian"

# ---------------------------------------------------------------- install --
check "apt-get install ./$deb" quietly apt-get install -y -qq "./$deb"
check "echod.service is active" poll "$POLL_SECONDS" is_active "$UNIT"
check "echod.service is enabled" systemctl is-enabled --quiet "$UNIT"
check "echod.socket is not enabled ($(systemctl is-enabled echod.socket))" \
  test "$(systemctl is-enabled echod.socket)" = disabled
check "echod.socket is not active" is_inactive echod.socket
master=$(main_pid)
check "MainPID is set ($master)" test "$master" -gt 0
check "workers run" poll "$POLL_SECONDS" has_workers "$master"
check "echod and echoctl are /usr/bin's" \
  test "$(command -v echod) $(command -v echoctl)" = "/usr/bin/echod /usr/bin/echoctl"
check "the service runs Debian's python3 ($(readlink /proc/$master/exe))" \
  bash -c "readlink /proc/$master/exe | grep -q '^/usr/bin/python3'"
check "TCP echo on 127.0.0.1:7" echo_works tcp
check "UDP echo on 127.0.0.1:7" echo_works udp
status_out=$(echoctl status 2>&1); status_rc=$?
printf '%s\n' "$status_out" | head -n 8 | sed 's/^/# /'
check "echoctl status with no flags" test "$status_rc" = 0
for page in "8 echod" "1 echoctl" "5 echod.toml"; do
  set -- $page
  check "man -w $1 $2 finds $2($1)" bash -c "man -w $1 $2 | grep -q '/usr/share/man/man$1/$2.$1.gz'"
done
for file in /usr/share/bash-completion/completions/echod /usr/share/bash-completion/completions/echoctl \
            /usr/share/zsh/vendor-completions/_echod /usr/share/zsh/vendor-completions/_echoctl \
            /etc/logrotate.d/echod; do
  check "$file is installed" test -s "$file"
done
check "logrotate -d parses /etc/logrotate.d/echod" quietly logrotate -d /etc/logrotate.d/echod
check "/etc/echod/echod.toml is a conffile" \
  bash -c "dpkg-query -W -f='\${Conffiles}' echod | grep -q '^ /etc/echod/echod.toml '"
exposure=$(systemd-analyze security --no-pager "$UNIT" | sed -n 's/.*Overall exposure level for echod.service: \([0-9.]*\).*/\1/p')
check "systemd-analyze security $UNIT: $exposure <= 2.0" \
  python3 -c "import sys; sys.exit(not 0 < float('${exposure:-99}') <= 2.0)"
elapsed "install"

# ---------------------------------------------------------- dependencies --
# Debian's python3-daemon and python3-prometheus-client are older than PyPI's;
# the package's floors are these versions, so echod's own tests run on them.
for dep in python3-daemon python3-prometheus-client python3-psutil python3-setproctitle; do
  echo "# $dep $(dpkg-query -W -f='${Version}' "$dep")"
done
rm -rf /tmp/pkgtests && mkdir /tmp/pkgtests && cp -r "$SRC/tests" "$SRC/pyproject.toml" /tmp/pkgtests/
# From a copy without the source's echod/, `import echod` (the tests' and every
# `python3 -m echod` they start) is the installed package's.
check "the tests' echod is the installed one" \
  bash -c "cd /tmp/pkgtests && python3 -P -c 'import echod; print(echod.__file__)' | grep -q '^/usr/lib/python3/dist-packages/echod/'"
# promtool from Debian's prometheus package, unpacked, not installed: installing it
# would start a Prometheus server on the host's network (the sandbox shares it).
(cd /tmp && quietly apt-get download -qq prometheus && dpkg-deb -x prometheus_*.deb /tmp/prometheus)
tests_out=$(cd /tmp/pkgtests && PATH=/tmp/prometheus/usr/bin:$PATH timeout 600 python3 -P -m pytest -q -p no:cacheprovider -o addopts= \
  "${PACKAGE_TESTS[@]}" 2>&1); tests_rc=$?
printf '%s\n' "$tests_out" | tail -n 1 | sed 's/^/# pytest: /'
# on failure, pytest's own account of it (-rfE summary and the E lines)
[ "$tests_rc" = 0 ] || printf '%s\n' "$tests_out" | grep -E '^(E |FAILED|ERROR|_{5,})' | tail -n 60 | sed 's/^/# pytest: /'
check "integration tests (daemon mode, metrics + OpenMetrics, lifecycle) pass on Debian's packages" \
  test "$tests_rc" = 0
elapsed "integration tests on Debian's packages"

# -------------------------------------------- upgrade in place under load --
master=$(main_pid)
before=$(workers_of "$master")
rm -f /tmp/load.stop /tmp/load.ready
python3 "$SRC/tests/system/package/hold_and_connect.py" /tmp/load.stop /tmp/load.ready >/tmp/load.json 2>/tmp/load.err &
load_pid=$!
check "load is flowing" poll "$POLL_SECONDS" test -e /tmp/load.ready
reinstall=$(apt-get install -y -qq --reinstall "./$deb" 2>&1); reinstall_rc=$?
printf '%s\n' "$reinstall" | grep -iE 'upgrade|echod' | sed 's/^/# apt: /'
check "apt-get install --reinstall under load" test "$reinstall_rc" = 0
check "the postinst upgraded echod in place" bash -c "printf '%s' \"\$1\" | grep -q 'upgraded in place'" _ "$reinstall"
# `echoctl upgrade` (postinst) returned once the new generation serves; the old
# workers keep the held conversation (up to graceful_timeout) until it closes.
touch /tmp/load.stop
wait "$load_pid"
check "the upgrade replaced every worker (was: $before)" poll "$POLL_SECONDS" all_workers_replaced "$master" "$before"
load=$(cat /tmp/load.json)
echo "# upgrade under load: $load"
sed 's/^/# load stderr: /' /tmp/load.err
field() { python3 -c "import json, sys; print(json.load(open('/tmp/load.json'))[sys.argv[1]])" "$1" 2>/dev/null; }
check "MainPID unchanged by the reinstall ($(main_pid))" test "$(main_pid)" = "$master"
check "connections attempted during the upgrade ($(field attempted))" test "$(field attempted)" -gt 50
check "no connection refused ($(field refused)) or failed ($(field other_errors), $(field wrong_echo))" \
  test "$(field refused) $(field other_errors) $(field wrong_echo)" = "0 0 0"
check "the held conversation kept echoing ($(field held_lines) lines)" test "$(field held_kept)" = True
check "active after the upgrade" is_active "$UNIT"
elapsed "upgrade under load"

# ----------------------------------------------------------------- reload --
before=$(workers_of "$master")
check "systemctl reload echod" systemctl reload "$UNIT"
check "reload replaced every worker (was: $before)" poll "$POLL_SECONDS" all_workers_replaced "$master" "$before"
check "MainPID unchanged by reload" test "$(main_pid)" = "$master"
check "TCP echo after reload" echo_works tcp
elapsed "reload"

# ---------------------------------------------------------- measurements --
# Not checks: figures for the README. The master's RSS with the shipped unit and
# with LimitNOFILE=1048576 (a drop-in; the sandbox may clamp it to its own hard
# limit: the line says which limit the master got), then with getrlimit faked,
# which needs no privilege: Debian's python-daemon 2.3.2 builds a set of every
# possible descriptor when imported.
rss_of_master() {
  local pid; pid=$(main_pid)
  echo "$(ps -o rss= -p "$pid" | tr -d ' ') KiB (open files: $(awk '/open files/ {print $4"/"$5}' /proc/"$pid"/limits))"
}
echo "# measure: master RSS, shipped unit: $(rss_of_master)"
mkdir -p /etc/systemd/system/echod.service.d
printf '[Service]\nLimitNOFILE=1048576\n' > /etc/systemd/system/echod.service.d/nofile.conf
systemctl daemon-reload
if systemctl restart "$UNIT" && poll "$POLL_SECONDS" has_workers "$(main_pid)"; then
  echo "# measure: master RSS, LimitNOFILE=1048576: $(rss_of_master)"
else
  echo "# measure: LimitNOFILE=1048576 refused here: $(systemctl show -p Result --value "$UNIT")"
fi
rm -r /etc/systemd/system/echod.service.d
systemctl daemon-reload
systemctl restart "$UNIT"
# A foreground master (as the unit runs it) whose getrlimit reports LIMIT, with
# this package's code, and with python-daemon imported up front as echod did
# before it imported it only where it daemonizes.
master_rss_at() {  # LIMIT EXTRA_PYTHON
  local dir=/tmp/measure-$1-${#2}
  mkdir -p "$dir/run"
  cat > "$dir/sitecustomize.py" <<PY
import resource
_real = resource.getrlimit
resource.getrlimit = lambda which: ($1, $1) if which == resource.RLIMIT_NOFILE else _real(which)
$2
PY
  (cd "$dir" && PYTHONPATH=$dir exec python3 -m echod -F -w 2 -b 127.0.0.1:0 --runtime-dir "$dir/run" >"$dir/log" 2>&1) &
  local pid=$!
  if poll 30 grep -q ' ready' "$dir/log"; then ps -o rss= -p "$pid" | tr -d ' '; else echo "?"; fi
  kill -TERM "$pid"; wait "$pid"
}
for limit in 65536 1048576; do
  echo "# measure: foreground master RSS at a descriptor limit of $limit (faked getrlimit): $(master_rss_at "$limit" "") KiB; with python-daemon imported at start-up: $(master_rss_at "$limit" "import daemon") KiB"
done

# ------------------------------------- upgrade with echod stopped, socket --
# The operator switched to socket activation: echod stopped, echod.socket
# enabled (narrowed to loopback: the sandbox shares the host's network). A
# reinstall leaves the socket alone (not stopped on upgrade); debhelper starts
# the enabled service, on the new code, so there is nothing to upgrade in place.
systemctl stop "$UNIT"
mkdir -p /etc/systemd/system/echod.socket.d
printf '[Socket]\nListenStream=\nListenStream=127.0.0.1:7\nListenDatagram=127.0.0.1:7\n' \
  > /etc/systemd/system/echod.socket.d/loopback.conf
systemctl daemon-reload
check "systemctl enable --now echod.socket" quietly systemctl enable --now echod.socket
check "echod.service is stopped" is_inactive "$UNIT"
reinstall=$(apt-get install -y -qq --reinstall "./$deb" 2>&1); reinstall_rc=$?
printf '%s\n' "$reinstall" | grep -iE 'upgrade|echod' | sed 's/^/# apt: /'
check "apt-get install --reinstall with echod stopped" test "$reinstall_rc" = 0
check "no in-place upgrade of a master that was not running" \
  bash -c "! printf '%s' \"\$1\" | grep -qiE 'upgraded in place|in-place upgrade failed|could not tell'" _ "$reinstall"
check "echod.socket still active and enabled" \
  bash -c "systemctl is-active --quiet echod.socket && systemctl is-enabled --quiet echod.socket"
check "the enabled service was started again" poll "$POLL_SECONDS" is_active "$UNIT"
check "TCP echo through the socket unit's sockets" echo_works tcp
check "UDP echo through the socket unit's sockets" echo_works udp

# ------------------------------------------------------- remove and purge --
echo "# edited by the operator" >> /etc/echod/echod.toml
mkdir -p /var/log/echod && echo "old" > /var/log/echod/echod.log
check "apt-get remove echod" quietly apt-get remove -y -qq echod
check "the service stopped" is_inactive "$UNIT"
check "the socket stopped (prerm)" is_inactive echod.socket
check "no echod process left" poll "$POLL_SECONDS" no_echod_left
check "nothing answers on port 7" bash -c "! python3 /tmp/echo_probe.py tcp 2>/dev/null"
check "the edited conffile is kept" grep -q "^# edited by the operator" /etc/echod/echod.toml
check "/usr/bin/echod is gone" test ! -e /usr/bin/echod
check "apt-get purge echod" quietly apt-get purge -y -qq echod
check "/etc/echod is gone" test ! -e /etc/echod
check "/var/log/echod is gone" test ! -e /var/log/echod
check "dpkg forgot echod" bash -c "! dpkg-query -W echod >/dev/null 2>&1"
elapsed "socket, remove, purge"

finish
