#!/usr/bin/env bash
# End-to-end load scenarios against ringcast and, in the same run, the
# tokio-tungstenite baseline (benches/baseline), with the same load tool
# (`ringcast load`). Every server is a fresh process per run; every run is
# bounded in time. Output: each run's table and JSON line under $OUT, and a
# summary of the JSON lines on stdout.
#
#   benches/load.sh                 # every scenario below
#   benches/load.sh fanout ramp     # some of them
#   SHARDS="1 2" RUNS=2 benches/load.sh fanout
#
# Scenarios:
#   fanout   1,000 subscribers x 1,000 msg/s, 10 s: latency at a fixed load
#   ramp     1,000 and 10,000 subscribers, rising rates: max sustained deliveries/s
#            (p99 bound 100 ms at 1,000, 500 ms at 10,000)
#   idle     19,000 idle connections: server RSS per connection
#   connect  10,000 clients, 5 rounds: time to connect all
#   topics   10,000 subscribers on 1,000 topics, 10,000 msg/s in all
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/ringcast-load}
SHARDS=${SHARDS:-1}
RUNS=${RUNS:-1}
BASELINE=${BASELINE:-1}
PORT=${PORT:-18080}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"

cargo build --release --quiet
BIN=target/release/ringcast
if [ "$BASELINE" = 1 ]; then
  cargo build --release --quiet --manifest-path benches/baseline/Cargo.toml
  BASE=benches/baseline/target/release/ringcast-baseline
fi

SERVER_PID=
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}
trap stop_server EXIT

# start_server ringcast|baseline SHARDS
start_server() {
  local kind=$1 shards=$2
  if [ "$kind" = ringcast ]; then
    "$BIN" serve --allow-anonymous --listen "127.0.0.1:$PORT" --admin-listen off \
      --shards "$shards" --inbound-rate 0 --inbound-bytes-rate 0 --max-handshakes-per-ip 0 \
      --max-connections-per-ip 1000000 >"$OUT/server.log" 2>&1 &
  else
    "$BASE" "127.0.0.1:$PORT" >"$OUT/server.log" 2>&1 &
  fi
  SERVER_PID=$!
  for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "load.sh: $kind did not start; its log:" >&2
  cat "$OUT/server.log" >&2
  return 1
}

# run NAME KIND SHARDS -- LOAD ARGS...
run() {
  local name=$1 kind=$2 shards=$3
  shift 4
  for r in $(seq "$RUNS"); do
    start_server "$kind" "$shards"
    local file="$OUT/$name-$kind-s$shards-r$r.txt"
    echo "== $name $kind shards=$shards run $r loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
    "$BIN" load "$@" --target "127.0.0.1:$PORT" | sed "s/^/   /" | tee "$file" || true
    stop_server
  done
}

each_server() {
  local name=$1
  shift
  for s in $SHARDS; do
    run "$name" ringcast "$s" -- "$@"
  done
  if [ "$BASELINE" = 1 ]; then
    run "$name" baseline 2 -- "$@"
  fi
}

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(fanout ramp idle connect topics)
for sc in "${scenarios[@]}"; do
  case "$sc" in
    fanout) each_server fanout-1k fanout --connections 1000 --rate 1000 --duration 10s ;;
    ramp)
      # Start low enough that the baseline has a sustained step too.
      each_server ramp-1k ramp --connections 1000 --rate 100 --step 1.5 --duration 5s --settle 2s \
        --p99-bound 100 --timeout 400s
      # 10,000 subscribers: every message is 10,000 socket writes, so a round
      # takes tens of ms on one core and the bound is looser.
      each_server ramp-10k ramp --connections 10000 --rate 10 --step 1.5 --duration 5s --settle 2s \
        --p99-bound 500 --timeout 400s
      ;;
    idle)
      for s in $SHARDS; do
        for r in $(seq "$RUNS"); do
          start_server ringcast "$s"
          echo "== idle-19k ringcast shards=$s run $r"
          "$BIN" load idle --target "127.0.0.1:$PORT" --connections 19000 --server-pid "$SERVER_PID" \
            --duration 1s | sed "s/^/   /" | tee "$OUT/idle-ringcast-s$s-r$r.txt" || true
          stop_server
        done
      done
      if [ "$BASELINE" = 1 ]; then
        start_server baseline 2
        echo "== idle-19k baseline"
        "$BIN" load idle --target "127.0.0.1:$PORT" --connections 19000 --server-pid "$SERVER_PID" \
          --duration 1s | sed "s/^/   /" | tee "$OUT/idle-baseline.txt" || true
        stop_server
      fi
      ;;
    connect) each_server connect-10k connect --connections 10000 --rounds 5 ;;
    topics) each_server topics-10k topics --connections 10000 --topics 1000 --publishers 4 --rate 10000 --duration 10s ;;
    *) echo "load.sh: unknown scenario $sc" >&2; exit 2 ;;
  esac
done

echo
echo "== summary (JSON lines, $OUT)"
grep -h '^   {' "$OUT"/*.txt | sed 's/^   //' || true
