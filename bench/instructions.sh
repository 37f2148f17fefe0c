#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: a measure that does not move with
# the machine's load (the req/s and CPU rows of proxy-vs-nginx.sh move by ±15% on a shared VM),
# for comparing two builds of the gate path by path. Kernel time (the TCP loopback, about half
# of the CPU per request) is not counted. Loopback only; fixed request counts.
#
#   GATE_BIN=target/release/chatkit-gate bench/instructions.sh [requests=10000]
#
# Rows: plain HTTPS/1.1 proxy, authenticated (warm decision cache), access log on (info, to a
# file), HTTP/2 (5 connections x 10 streams). Each row starts the gate under callgrind, sends
# 2,000 requests to warm it, then counts one load of N requests and one of 2N (each on new
# connections: h2load --h1 -c8 for HTTP/1.1): (count(2N) - count(N)) / N leaves the TLS
# handshakes and start-up out. Repeated runs of one build differ by about 1-3%.
#
# valgrind's CPU reports no SHA extensions, so the authenticated row's cache-key SHA-256 runs in
# software here (about 6,900 instructions a request) where natively it runs on SHA-NI: compare
# that row between builds, not with the plain row.
#
# Needs valgrind (callgrind_control, callgrind_annotate), h2load, nginx, openssl, curl.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
N="${1:-10000}"
bench_need valgrind callgrind_control callgrind_annotate h2load nginx openssl curl
bench_init
bench_gate_bin
bench_port_free 18280 19543 19190
bench_cert
bench_backend 18280

COOKIE="Cookie: session=bench-user"
AUTH='[auth]
introspection_url = "http://127.0.0.1:18280/auth"
cookies = ["session"]
cache_ttl = "10m"'

# row NAME LEVEL MODE HEADER [EXTRA_TOML]
row() {
    local name="$1" level="$2" mode="$3" header="$4" extra="${5:-}" pid i load out total
    bench_gate_toml "$TMP/$name.toml" 19543 19190 18280 'idle_timeout = "120s"'
    [ -n "$extra" ] && echo "$extra" >> "$TMP/$name.toml"
    out="$TMP/callgrind.$name"
    TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$GATE" --config "$TMP/$name.toml" --log-level "$level" >"$TMP/$name.log" 2>"$TMP/$name.stderr" &
    pid=$!; PIDS+=("$pid")
    for i in $(seq 300); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 http://127.0.0.1:19190/readyz)" = 200 ] && break
        bench_alive "$pid" || { tail -n 5 "$TMP/$name.stderr" >&2; exit 1; }
        sleep 0.1
    done
    if [ "$mode" = h1 ]; then load=(h2load --h1 -c 8); else load=(h2load -c 5 -m 10); fi
    "${load[@]}" -n 2000 -H "$header" https://127.0.0.1:19543/ >/dev/null
    local n part totals=()
    for part in 1 2; do
        n=$(( N * part ))
        callgrind_control -z "$pid" >/dev/null 2>&1
        "${load[@]}" -n "$n" -H "$header" https://127.0.0.1:19543/ >"$TMP/$name.$part.h2load"
        callgrind_control -d "$pid" >/dev/null 2>&1
        grep -q "$n succeeded" "$TMP/$name.$part.h2load" ||
            { echo "$name: not all $n requests succeeded" >&2; grep -E '^requests:|^status' "$TMP/$name.$part.h2load" >&2; exit 1; }
        totals+=("$(callgrind_annotate --inclusive=no "$out.$part" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')")
    done
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    printf '| %s | %s | %s |\n' "$name" "$N" "$(( (totals[1] - totals[0]) / N ))"
}

echo "Machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "Gate: $GATE"
echo
echo "| row | requests | instructions per request |"
echo "|---|---|---|"
row plain warn h1 "X-Bench: 1"
row authenticated warn h1 "$COOKIE" "$AUTH"
row access-log info h1 "X-Bench: 1"
row http2 warn h2 "X-Bench: 1"
