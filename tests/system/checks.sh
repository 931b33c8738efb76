# Shared by the scripts that run INSIDE the systemd sandbox (sandbox/inside.sh,
# package/inside.sh): TAP-like checks, bounded polling, and what systemd and ps
# say about echod's processes. Sourced, not run; the caller sets UNIT.

passed=0; failed=0
ok()     { echo "ok - $*"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $*"; failed=$((failed + 1)); }
check()  { local what=$1; shift; if "$@"; then ok "$what"; else not_ok "$what"; fi; }
poll() {  # poll SECONDS CMD...: true as soon as CMD succeeds; false after SECONDS.
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.1
  done
}
finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
  exit
}
main_pid() { systemctl show -p MainPID --value "$UNIT"; }
workers_of() { ps -o pid= --ppid "$1" | tr -d ' ' | sort -n | tr '\n' ' '; }
is_active() { systemctl is-active --quiet "$1"; }
is_inactive() { ! systemctl is-active --quiet "$1"; }
none_of_in() {  # true when no pid of the first list (space separated) is in the second
  local pid
  for pid in $1; do case " $2 " in *" $pid "*) return 1 ;; esac; done
  return 0
}
all_workers_replaced() {  # $1 = master pid, $2 = the old worker pids
  local now; now=$(workers_of "$1")
  [ -n "$now" ] && none_of_in "$2" "$now"
}
