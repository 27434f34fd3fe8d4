#!/usr/bin/env bash
# XADD -> subscriber latency and ingest through Redis Streams, against the
# embedded broker in the same session (issue 5 item 9).
#
#   cargo build --release
#   benches/redis_load.sh latency   # 1k and 10k subscribers at 1k msg/s
#   SHARDS=1 SUBS=10000 RATE=100 benches/redis_load.sh latency
#   benches/redis_load.sh cluster   # one redis-server vs a 3-master cluster
#   benches/redis_load.sh ingest    # rising rates (RATES=...), 10 subscribers (INGEST_SUBS=...)
#
# Every configuration runs twice (the machine is shared and noisy). Each run
# gets a fresh server (and a fresh redis-server for Redis runs), started
# here on free loopback ports and killed by PID at the end of the run.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/ringcast}
OUT=${OUT:-/tmp/ringcast-redis-load}
mkdir -p "$OUT"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

REDIS_PID=
SERVER_PID=
CLUSTER_PIDS=()
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null || true
  for pid in "${CLUSTER_PIDS[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  SERVER_PID= REDIS_PID= CLUSTER_PIDS=()
}

# A 3-master cluster on free ports (each port + 10000 must be free too);
# sets CLUSTER_URL, PIDs in CLUSTER_PIDS.
start_cluster() {
  local dir nodes=() port
  dir=$(mktemp -d)
  for _ in 1 2 3; do
    port=$(free_port)
    while [ "$port" -ge 55000 ]; do port=$(free_port); done
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$dir/nodes-$port.conf" --save '' --appendonly no --dir "$dir" >/dev/null 2>&1 &
    CLUSTER_PIDS+=($!)
    wait_port "$port"
    nodes+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
  for n in "${nodes[@]}"; do
    until redis-cli -h 127.0.0.1 -p "${n##*:}" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.1; done
  done
  CLUSTER_URL="redis+cluster://$(IFS=,; echo "${nodes[*]}")"
}
trap cleanup EXIT

wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

# run NAME BROKER(embedded|redis|cluster) SHARDS SUBSCRIBERS RATE [SOURCE_IPS]
run() {
  local name=$1 broker=$2 shards=$3 subs=$4 rate=$5 ips=${6:-1}
  local port admin redis_args=() load_args=()
  port=$(free_port); admin=$(free_port)
  if [ "$broker" = cluster ]; then
    start_cluster
    redis_args=(--redis "$CLUSTER_URL")
    load_args=(--redis "$CLUSTER_URL")
  elif [ "$broker" = redis ]; then
    local rport rdir
    rport=$(free_port); rdir=$(mktemp -d)
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$rdir" >/dev/null 2>&1 &
    REDIS_PID=$!
    wait_port "$rport"
    redis_args=(--redis "redis://127.0.0.1:$rport/0")
    load_args=(--redis "redis://127.0.0.1:$rport/0")
  fi
  $BIN serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --allow-anonymous \
    --inbound-rate 0 --max-connections-per-ip 1000000 --max-handshakes-per-ip 0 --shards "$shards" "${redis_args[@]}" \
    >"$OUT/$name.server.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$port"
  echo "== $name: broker=$broker shards=$shards subscribers=$subs rate=$rate loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
  $BIN load fanout --target "127.0.0.1:$port" --connections "$subs" --rate "$rate" \
    --duration 10s --source-ips "$ips" --timeout 90s "${load_args[@]}" | tee "$OUT/$name.txt" || true
  cleanup
}

case ${1:-latency} in
  latency)
    for round in 1 2; do
      for shards in ${SHARDS:-1 2}; do
        for subs in ${SUBS:-1000 10000}; do
          for broker in embedded redis; do
            run "lat-$broker-s$shards-$subs-${RATE:-1000}-r$round" "$broker" "$shards" "$subs" "${RATE:-1000}" 2
          done
        done
      done
    done
    ;;
  ingest)
    for round in 1 2; do
      for rate in ${RATES:-10000 20000 40000 80000}; do
        for broker in embedded redis; do
          run "ing-$broker-$rate-n${INGEST_SUBS:-10}-r$round" "$broker" 1 "${INGEST_SUBS:-10}" "$rate"
        done
      done
    done
    ;;
  cluster)
    # One server vs a 3-master cluster on the same machine, 1 shard.
    for round in 1 2; do
      for broker in redis cluster; do
        run "clu-$broker-${SUBS:-1000}-${RATE:-1000}-r$round" "$broker" 1 "${SUBS:-1000}" "${RATE:-1000}" 2
      done
    done
    ;;
  *) echo "usage: $0 latency|ingest|cluster" >&2; exit 2 ;;
esac
