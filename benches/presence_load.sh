#!/usr/bin/env bash
# Presence cost on one node with Redis (issue 17): N subscribers, each with
# its own user (HS256 token, `ringcast load idle --subscribe
# --token-secret`), over T topics of a namespace, against the same load on
# a namespace without presence, interleaved, a fresh redis-server and node
# per run:
#
#   cargo build --release
#   benches/presence_load.sh                 # N=10000 T=100, 2 rounds
#   N=5000 T=10 ROUNDS=3 benches/presence_load.sh
#
# Namespaces: `plain` (no presence, the baseline), `quiet` (presence, no
# join/leave: what membership costs), `chat` (presence with join/leave:
# every user's join goes to the topic's other subscribers). Per run: the
# node-level members when the load tool was done, joins written, Redis
# round trips of the presence thread, server CPU seconds, the time the
# load tool took to connect and subscribe everyone, and when the node
# held every member (polled every 20 ms).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/ringcast}
N=${N:-10000}; T=${T:-100}; ROUNDS=${ROUNDS:-2}; SHARDS=${SHARDS:-1}
SECRET=presence-load-secret-0123456789abcdef0123
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run() {
  local ns=$1 dir rport wport aport spid lpid full="" start
  dir=$(mktemp -d)
  rport=$(free_port); wport=$(free_port); aport=$(free_port)
  redis-server --port "$rport" --save '' --appendonly no --daemonize yes \
    --logfile "$dir/redis.log" --dir "$dir" --pidfile "$dir/redis.pid" >/dev/null
  sleep 0.3
  cat > "$dir/ns.toml" <<T
[[namespaces]]
name = "chat"
presence = true
[[namespaces]]
name = "quiet"
presence = true
join_leave = false
[[namespaces]]
name = "plain"
T
  "$BIN" serve --listen "127.0.0.1:$wport" --admin-listen "127.0.0.1:$aport" --shards "$SHARDS" \
    --redis "redis://127.0.0.1:$rport" --config "$dir/ns.toml" --auth-hmac-secret "$SECRET" \
    --inbound-rate 0 --inbound-bytes-rate 0 --max-handshakes-per-ip 0 \
    --max-connections-per-ip 1000000 > "$dir/out" 2> "$dir/err" &
  spid=$!
  sleep 1
  metric() { curl -s "127.0.0.1:$aport/metrics" | awk -v m="$1" '$1==m {print $2}'; }
  start=$(date +%s.%N)
  "$BIN" load idle --target "127.0.0.1:$wport" --connections "$N" --subscribe \
    --token-secret "$SECRET" --topic "$ns:p" --topics "$T" --server-pid "$spid" \
    --duration 3s --json > "$dir/load.json" 2> "$dir/load.err" &
  lpid=$!
  while kill -0 "$lpid" 2>/dev/null; do
    u=$(metric ringcast_presence_users); u=${u:-0}
    if [ -z "$full" ] && [ "${u%.*}" -ge "$N" ]; then full=$(date +%s.%N); fi
    sleep 0.02
  done
  wait "$lpid" || cat "$dir/load.err"
  local calls joins users cpu connect
  calls=$(metric ringcast_presence_redis_calls_total)
  joins=$(curl -s "127.0.0.1:$aport/metrics" | awk '$1=="ringcast_presence_events_total{kind=\"join\"}" {print $2}')
  users=$(metric ringcast_presence_users)
  cpu=$(awk '{print ($14+$15)/100}' "/proc/$spid/stat")
  connect=$(grep -o '"connect_s":[0-9.]*' "$dir/load.json" | cut -d: -f2)
  kill -TERM "$spid"; wait "$spid" 2>/dev/null || true
  kill "$(cat "$dir/redis.pid")" 2>/dev/null || true
  printf 'ns=%-5s N=%s T=%s members=%s joins=%s redis_calls=%s server_cpu_s=%s connect_s=%s all_members_after_s=%s\n' \
    "$ns" "$N" "$T" "${users:-0}" "${joins:-0}" "${calls:-0}" "$cpu" "$connect" \
    "$([ -n "$full" ] && echo "$full - $start" | bc || echo never)"
  rm -rf "$dir"
}

for _ in $(seq "$ROUNDS"); do
  for ns in plain quiet chat; do run "$ns"; done
done
