#!/usr/bin/env bash
# What reading and checking a ChatKit request costs: the same POST body through a plain route
# and through a ChatKit-server route ([routes.chatkit_server]: body read, `type` and the rule
# fields parsed, the same bytes forwarded), to the same backend, over HTTPS with wrk.
# Loopback only.
#
#   bench/chatkit-route.sh [duration=10s] [connections=32]
#
# Needs: nginx, wrk, openssl. Builds the gate in release. GATE=<binary> skips the build.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10s}"
CONNS="${2:-32}"
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT

for bin in nginx wrk openssl; do command -v "$bin" >/dev/null || { echo "missing $bin"; exit 1; }; done
if [ -z "${GATE:-}" ]; then
    cargo build --release --quiet
    GATE="${CARGO_TARGET_DIR:-target}/release/chatkit-gate"
fi

openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 1 \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null

# Backend: nginx answering every POST with a small JSON body (it discards the request body).
cat > "$TMP/backend.conf" <<NGX
worker_processes 1; daemon off; pid $TMP/backend.pid; error_log $TMP/backend.err;
events { worker_connections 4096; }
http { access_log off; client_body_buffer_size 64k;
  server { listen 127.0.0.1:18180; keepalive_requests 100000;
    location / { default_type application/json; return 200 '{"data":[],"has_more":false}'; } } }
NGX
nginx -c "$TMP/backend.conf" -p "$TMP" & PIDS+=($!)

cat > "$TMP/gate.toml" <<TOML
[server]
listen = "127.0.0.1:19543"
[tls]
cert_file = "$TMP/cert.pem"
key_file = "$TMP/key.pem"
[upstream]
url = "http://127.0.0.1:18180"
[admin]
listen = "127.0.0.1:19190"
[[routes]]
name = "chatkit"
path = "/chatkit"
[routes.chatkit_server]
max_list_limit = 100
max_message_chars = 8000
max_attachments = 4
[[routes]]
name = "plain"
path = "/"
TOML

# A user message of about 1 KiB, as the widget sends it.
TEXT="$(head -c 900 /dev/zero | tr '\0' 'a')"
BODY="{\"type\":\"threads.add_user_message\",\"params\":{\"thread_id\":\"thr_4f1c2b9a\",\"input\":{\"content\":[{\"type\":\"input_text\",\"text\":\"$TEXT\"}],\"attachments\":[],\"quoted_text\":null,\"inference_options\":{\"model\":null,\"tool_choice\":null}}},\"metadata\":{}}"
cat > "$TMP/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
LUA
cat > "$TMP/list.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"type":"threads.list","params":{"limit":20,"order":"desc"}}'
wrk.headers["Content-Type"] = "application/json"
LUA

TOKIO_WORKER_THREADS=1 "$GATE" --config "$TMP/gate.toml" --log-level warn & PIDS+=($!)
sleep 1

run() {
    local name="$1" url="$2" script="$3"
    wrk -t1 -c"$CONNS" -d2s -s "$script" "$url" >/dev/null 2>&1 || true   # warm up
    echo "== $name ($url, $CONNS connections, $DURATION)"
    wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$script" "$url" | grep -E 'Requests/sec|Latency|50%|99%|Non-2xx'
}
echo "body: $(printf %s "$BODY" | wc -c) bytes (threads.add_user_message)"
run "plain route, message" "https://127.0.0.1:19543/plain" "$TMP/post.lua"
run "ChatKit route, message" "https://127.0.0.1:19543/chatkit" "$TMP/post.lua"
run "plain route, threads.list" "https://127.0.0.1:19543/plain" "$TMP/list.lua"
run "ChatKit route, threads.list" "https://127.0.0.1:19543/chatkit" "$TMP/list.lua"
