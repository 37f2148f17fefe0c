#!/usr/bin/env bash
# What reading and checking a ChatKit request costs: the same POST body through a plain route
# and through a ChatKit-server route ([routes.chatkit_server]: body read, `type` and the rule
# fields parsed, the same bytes forwarded), to the same backend, over HTTPS with wrk.
# Loopback only.
#
#   bench/chatkit-route.sh [duration=10s] [connections=32]
#
# Needs: nginx, wrk, openssl, curl. Builds the gate in release; GATE_BIN=<binary> (or GATE=) skips the build.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION="${1:-10s}"
CONNS="${2:-32}"
bench_need nginx wrk openssl curl
bench_port_free 18180 19543 19190
bench_init
bench_gate_bin
bench_cert

# Backend: nginx answering every POST with a small JSON body (it discards the request body).
bench_backend 18180 "location / { default_type application/json; return 200 '{\"data\":[],\"has_more\":false}'; }"

bench_gate_toml "$TMP/gate.toml" 19543 19190 18180
cat >> "$TMP/gate.toml" <<TOML
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
[log]
audit_file = "$TMP/audit.jsonl"      # one CHATKIT_REQUEST line per ChatKit request (part of the cost)
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

bench_gate gate "$TMP/gate.toml" 19190

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
