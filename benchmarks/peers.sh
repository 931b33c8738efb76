#!/bin/sh
# echod against refecho (C) and uvloop, the runs behind README "Performance":
#   (a) pinned, one worker: servers on CPU 0, echoload on CPU 1;
#   (b) unpinned, two workers: refecho -r (SO_REUSEPORT: each worker its own
#       listener, the fair two-worker peer) and uvloop with 2 workers.
# UDP scenarios included; echod runs with benchmarks/compare.toml (UDP rate
# limits off: echoload's 50 sockets share one source address).
#
#   benchmarks/peers.sh                 # both, --repeat 3 --duration 4 --warmup 1
#   PARTS=w1 REPEAT=5 benchmarks/peers.sh
#   BENCH_LOCK=/path/to/lockfile benchmarks/peers.sh   # serialize with other runs (flock)
#   BEFORE=/path/to/older/echod PARTS=w1 benchmarks/peers.sh
#       # adds echod-before-w1, that checkout's echod, to the pinned run: a
#       # before/after from one run (git worktree add /tmp/echod-before <commit>)
#
# Needs uvloop in the venv (.venv/bin/pip install uvloop); results in
# benchmarks/results/peers-<time>/{w1,w2}.md and the compare.py folders.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-$REPO/.venv/bin/python}
KIT=${BENCH_KIT:-$REPO/../shared/bench}
BUILD=$HERE/build/bench
CONF=$HERE/compare.toml
OUT=${OUT:-$HERE/results/peers-$(date -u +%Y%m%dT%H%M%SZ)}
PARTS=${PARTS:-w1 w2}
REPEAT=${REPEAT:-3}
SCENARIOS=${SCENARIOS:-rr-64B-c50,rr-1KiB-c50,rr-64B-c1,stream-64KiB-c8,connect-c50,udp-64B-c50,udp-1KiB-c50}

mkdir -p "$BUILD" "$OUT"
cp -r "$KIT"/. "$BUILD"/ && chmod -R u+w "$BUILD" && make -s -C "$BUILD"
"$PY" -c 'import uvloop' 2>/dev/null || { echo "peers.sh: uvloop is not installed in $PY's environment" >&2; exit 2; }

# {port} is compare.py's; the runtime dir per port keeps concurrent servers apart
echod() {  # workers [name suffix] [source tree]
    echo "echod${2:-}-w$1=env PYTHONPATH=${3:-$REPO} $PY -m echod -F -w $1 -c $CONF --runtime-dir /tmp/echod-bench-{port} -b 127.0.0.1:{port} -b udp://127.0.0.1:{port}"
}
uvloop() {
    echo "uvloop-w$1=$PY baselines/asyncio_proto.py --udp --loop uvloop --workers $1 --port {port}"
}
compare() {
    name=$1; shift
    set -- "$PY" ./compare.py --repeat "$REPEAT" --duration 4 --warmup 1 --scenarios "$SCENARIOS" \
        --out "$OUT/$name" --md "$OUT/$name.md" "$@"
    if [ -n "${BENCH_LOCK:-}" ]; then set -- flock "$BENCH_LOCK" "$@"; fi
    (cd "$BUILD" && "$@")
}
for part in $PARTS; do
    case $part in
    w1) set -- refecho-w1 refecho-w1-mmsg "$(uvloop 1)"
        if [ -n "${BEFORE:-}" ]; then set -- "$@" "$(echod 1 -before "$BEFORE")"; fi
        compare w1 --server-cpus 0 --load-cpus 1 "$@" "$(echod 1)" ;;
    w2) compare w2 refecho-w2-reuseport refecho-w2 "$(uvloop 2)" "$(echod 2)" ;;
    *) echo "peers.sh: unknown part $part (w1, w2)" >&2; exit 2 ;;
    esac
done
echo "results in $OUT"
