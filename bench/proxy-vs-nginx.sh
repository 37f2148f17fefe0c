#!/usr/bin/env bash
# Plain-proxy throughput: chatkit-gate vs nginx, same machine, same backend, same TLS cert,
# same client (wrk over HTTPS, HTTP/1.1 keep-alive). Loopback only.
#
#   bench/proxy-vs-nginx.sh [duration=10s] [connections=64]
#
# Needs: nginx, wrk, openssl (apt-get install -y nginx wrk openssl); builds the gate in release.
# Access logs are off on both sides (the gate at --log-level warn) so the log sink is not measured.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10s}"
CONNS="${2:-64}"
THREADS=1
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT

for bin in nginx wrk openssl; do command -v "$bin" >/dev/null || { echo "missing $bin"; exit 1; }; done
cargo build --release --quiet
GATE="${CARGO_TARGET_DIR:-target}/release/chatkit-gate"

openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 1 \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null

# Backend: nginx answering a small body, shared by both proxies.
cat > "$TMP/backend.conf" <<NGX
worker_processes 1; daemon off; pid $TMP/backend.pid; error_log $TMP/backend.err;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:18080; keepalive_requests 100000;
    location / { return 200 "hello from the backend\n"; }
    location = /auth { default_type application/json; return 200 '{"user":{"id":"u1","name":"Bench"}}'; } } }
NGX
nginx -c "$TMP/backend.conf" -p "$TMP" & PIDS+=($!)

# nginx as the TLS reverse proxy (pooled keep-alive upstream, as operators configure it).
cat > "$TMP/proxy.conf" <<NGX
worker_processes 1; daemon off; pid $TMP/proxy.pid; error_log $TMP/proxy.err;
events { worker_connections 4096; }
http { access_log off;
  upstream app { server 127.0.0.1:18080; keepalive 64; }
  server { listen 127.0.0.1:18443 ssl http2; ssl_certificate $TMP/cert.pem; ssl_certificate_key $TMP/key.pem;
    keepalive_requests 100000;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https; } }
  # The same, authenticated the nginx way: auth_request on every request (nginx has no cache).
  server { listen 127.0.0.1:18444 ssl http2; ssl_certificate $TMP/cert.pem; ssl_certificate_key $TMP/key.pem;
    keepalive_requests 100000;
    location = /_auth { internal; proxy_pass http://app/auth; proxy_pass_request_body off;
      proxy_set_header Content-Length ""; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Original-URI \$request_uri; }
    location / { auth_request /_auth; proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https; } } }
NGX
nginx -c "$TMP/proxy.conf" -p "$TMP" & PIDS+=($!)

cat > "$TMP/gate.toml" <<TOML
[server]
listen = "127.0.0.1:19443"
[tls]
cert_file = "$TMP/cert.pem"
key_file = "$TMP/key.pem"
[upstream]
url = "http://127.0.0.1:18080"
[admin]
listen = "127.0.0.1:19090"
TOML
sed -e 's/19443/19444/; s/19090/19091/' "$TMP/gate.toml" > "$TMP/gate-auth.toml"
cat >> "$TMP/gate-auth.toml" <<TOML
[auth]
introspection_url = "http://127.0.0.1:18080/auth"
cookies = ["session"]
TOML
# The authenticated gate plus a rate limit kept in Redis (high enough never to reject).
RL=""
if command -v redis-server >/dev/null; then
    redis-server --port 16379 --save "" --appendonly no --daemonize no >/dev/null 2>&1 & PIDS+=($!)
    sed -e 's/19444/19445/; s/19091/19092/' "$TMP/gate-auth.toml" > "$TMP/gate-rl.toml"
    cat >> "$TMP/gate-rl.toml" <<TOML
[[routes]]
path = "/"
auth = "required"
rate_limit = ["api"]
[rate_limit]
redis_url = "redis://127.0.0.1:16379"
[rate_limit.policies.api]
algorithm = "gcra"
limit = 1000000
window = "1s"
key = "user"
TOML
    RL=1
fi
# One worker thread, like nginx's one worker process: the same CPU budget.
TOKIO_WORKER_THREADS=1 "$GATE" --config "$TMP/gate.toml" --log-level warn & PIDS+=($!)
TOKIO_WORKER_THREADS=1 "$GATE" --config "$TMP/gate-auth.toml" --log-level warn & PIDS+=($!)
[ -n "$RL" ] && { TOKIO_WORKER_THREADS=1 "$GATE" --config "$TMP/gate-rl.toml" --log-level warn & PIDS+=($!); }
sleep 1

run() {
    local name="$1" url="$2"
    wrk -t"$THREADS" -c"$CONNS" -d2s -H 'Cookie: session=bench; other=x' "$url" >/dev/null 2>&1 || true   # warm up
    echo "== $name ($url, $CONNS connections, $DURATION)"
    wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -H 'Cookie: session=bench; other=x' "$url" \
        | grep -E 'Requests/sec|Latency|50%|99%|Non-2xx'
}
run "nginx proxy" "https://127.0.0.1:18443/"
run "chatkit-gate proxy" "https://127.0.0.1:19443/"
run "nginx proxy + auth_request" "https://127.0.0.1:18444/"
run "chatkit-gate proxy + auth (cached)" "https://127.0.0.1:19444/"
[ -n "$RL" ] && run "chatkit-gate proxy + auth + Redis rate limit" "https://127.0.0.1:19445/"
