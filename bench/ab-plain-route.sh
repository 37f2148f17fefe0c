#!/usr/bin/env bash
# Plain-route GET through two gate binaries, interleaved A/B rounds, same nginx backend and
# TLS cert, one worker thread each (e.g. a branch against main). Loopback only.
#
#   bench/ab-plain-route.sh GATE_A GATE_B [duration=8s]
set -euo pipefail
A="$1"; B="$2"; DUR="${3:-8s}"
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 1 -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
cat > "$TMP/backend.conf" <<NGX
worker_processes 1; daemon off; pid $TMP/backend.pid; error_log $TMP/backend.err;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:18280; keepalive_requests 100000;
  location / { return 200 "hello from the backend\n"; } } }
NGX
nginx -c "$TMP/backend.conf" -p "$TMP" & PIDS+=($!)
for n in a b; do
  port=$([ $n = a ] && echo 19643 || echo 19644); admin=$([ $n = a ] && echo 19290 || echo 19291)
  printf '[server]\nlisten = "127.0.0.1:%s"\n[tls]\ncert_file = "%s"\nkey_file = "%s"\n[upstream]\nurl = "http://127.0.0.1:18280"\n[admin]\nlisten = "127.0.0.1:%s"\n' "$port" "$TMP/cert.pem" "$TMP/key.pem" "$admin" > "$TMP/$n.toml"
done
TOKIO_WORKER_THREADS=1 "$A" --config "$TMP/a.toml" --log-level warn & PIDS+=($!)
TOKIO_WORKER_THREADS=1 "$B" --config "$TMP/b.toml" --log-level warn & PIDS+=($!)
sleep 1
for round in 1 2 3; do
  for n in a b; do
    port=$([ $n = a ] && echo 19643 || echo 19644)
    wrk -t1 -c64 -d2s "https://127.0.0.1:$port/" >/dev/null 2>&1 || true
    echo "round $round $n: $(wrk -t1 -c64 -d"$DUR" --latency "https://127.0.0.1:$port/" | grep -E 'Requests/sec|50%|99%' | tr -s ' ' | paste -sd' ')"
  done
done
