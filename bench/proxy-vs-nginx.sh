#!/usr/bin/env bash
# chatkit-gate vs nginx on the same machine, same backend, same TLS cert, one worker each,
# loopback only; prints every row of the performance goals table (bench/README.md) with
# PASS/FAIL, and the gate beside the other peers a user would pick instead (HAProxy, Caddy:
# rows 1c, 1d, 2c, 2d), in one run of about 8 minutes at the defaults.
#
#   bench/proxy-vs-nginx.sh [duration=10s] [connections=64]
#
#   GATE_BIN=<binary>   use this gate binary instead of `cargo build --release`
#   BENCH_ROUNDS=N      rounds of the throughput rows (default 3): every round runs each row once,
#                       gate and nginx runs interleaved, and a row's value is the median of its
#                       rounds (each round's value is in the notes), so that one run disturbed
#                       by the machine does not decide a ratio
#   BENCH_WORKERS=N     worker processes of nginx and worker threads of the gate (default 1; the
#                       goals are for 1: on a 2-core machine the client and the backend share
#                       the cores with 2 workers)
#   BENCH_QUICK=1       wait 5 s instead of 60 s before the "RSS after the connections close" sample
#   BENCH_MEM_CONNS=N   idle TLS connections for the memory rows (default 1000)
#   BENCH_KEEP_TMP=1    keep the temp dir (configs, raw wrk/h2load output, logs)
#   BENCH_PEERS="haproxy caddy"   the peers to run besides nginx (default both; empty: none)
#
# Needs: nginx, wrk, h2load (nghttp2-client), openssl, curl, python3; redis-server for row 3;
# haproxy and caddy for the peer rows (each skipped, with the reason, when it is not installed).
# The plain rows have access logs off on both sides (the gate at --log-level warn); row 5 turns
# them on. Every load loop has a fixed duration; every process started is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

INVOKED="$(for v in GATE_BIN GATE BENCH_ROUNDS BENCH_WORKERS BENCH_QUICK BENCH_MEM_CONNS BENCH_PEERS; do [ -n "${!v:-}" ] && printf '%s=%q ' "$v" "${!v}"; done; printf '%q' "$0"; for a in "$@"; do printf ' %q' "$a"; done)"
DURATION="${1:-10s}"
CONNS="${2:-64}"
THREADS=1
H2_CLIENTS=50
H2_STREAMS=10
MEM_CONNS="${BENCH_MEM_CONNS:-1000}"
ROUNDS="${BENCH_ROUNDS:-3}"
WORKERS="${BENCH_WORKERS:-1}"
MEM_HOLD=4                                # seconds the idle connections are held (RSS sampled 1 s in)
if [ -n "${BENCH_QUICK:-}" ]; then SETTLE=5; else SETTLE=60; fi
COOKIE='Cookie: session=bench; other=x'
START_S=$SECONDS

case "$DURATION" in
    *[0-9]h) DUR_S=$(( ${DURATION%h} * 3600 )) ;;
    *[0-9]m) DUR_S=$(( ${DURATION%m} * 60 )) ;;
    *[0-9]s) DUR_S=${DURATION%s} ;;
    *) DUR_S=$DURATION ;;
esac
[[ "$DUR_S" =~ ^[0-9]+$ ]] && [ "$DUR_S" -ge 1 ] || { echo "duration: whole seconds, minutes or hours (10s, 1m)" >&2; exit 1; }
[[ "$CONNS" =~ ^[0-9]+$ ]] && [ "$CONNS" -ge 1 ] || { echo "connections: a positive number" >&2; exit 1; }
[[ "$WORKERS" =~ ^[0-9]+$ ]] && [ "$WORKERS" -ge 1 ] && [ "$WORKERS" -le 64 ] || { echo "BENCH_WORKERS: a number from 1 to 64" >&2; exit 1; }
[[ "$ROUNDS" =~ ^[0-9]+$ ]] && [ "$ROUNDS" -ge 1 ] && [ "$ROUNDS" -le 9 ] || { echo "BENCH_ROUNDS: a number from 1 to 9" >&2; exit 1; }

bench_need nginx wrk h2load openssl curl python3 awk ps
HAVE_REDIS=; command -v redis-server >/dev/null && HAVE_REDIS=1
# The peers (rows 1c, 1d, 2c, 2d): each one runs when BENCH_PEERS names it and it is installed;
# otherwise its rows say why they were skipped.
PEERS="${BENCH_PEERS-haproxy caddy}"; PEERS="${PEERS//,/ }"
for p in $PEERS; do case "$p" in haproxy|caddy) ;; *) echo "BENCH_PEERS: haproxy and/or caddy, not $p" >&2; exit 1 ;; esac; done
declare -A PEER_SKIP=()
for p in haproxy caddy; do
    if [[ " $PEERS " != *" $p "* ]]; then PEER_SKIP[$p]="skipped (not in BENCH_PEERS)"
    elif ! command -v "$p" >/dev/null; then
        PEER_SKIP[$p]="skipped ($p not installed)"
        echo "$p is not installed: its rows are skipped (Debian: apt-get install -y $p)" >&2
    fi
done
HAVE_HAPROXY=; [ -z "${PEER_SKIP[haproxy]:-}" ] && HAVE_HAPROXY=1
HAVE_CADDY=; [ -z "${PEER_SKIP[caddy]:-}" ] && HAVE_CADDY=1
need_fds=$(( MEM_CONNS * 2 + 1024 ))
if [ "$(ulimit -n)" -lt "$need_fds" ]; then ulimit -n "$need_fds" 2>/dev/null || ulimit -n "$(ulimit -Hn)"; fi
[ "$(ulimit -n)" -ge $(( MEM_CONNS + 256 )) ] || { echo "ulimit -n $(ulimit -n) is too low for $MEM_CONNS connections" >&2; exit 1; }

bench_port_free 18080 18443 18444 18445 18446 19443 19444 19445 19446 19447 19090 19091 19092 19093 19094 16379 \
    ${HAVE_HAPROXY:+18450} ${HAVE_CADDY:+18451 18452 18453}
bench_init
bench_gate_bin
bench_cert
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- processes
# The backend: lib.sh's default (the body on /, the introspection answer on /auth), plus what the
# peers need and the checks read. /auth also sends the user as a header, X-Auth-Request-User,
# which Caddy's forward_auth copies onto the proxied request (the gate reads the JSON body; nginx's
# auth_request here copies nothing). /bench/status: nginx's request and connection counters
# (stub_status), read around every measured run: how many backend requests and new backend
# connections each client request cost. /bench/user echoes the header the app received;
# /bench/deny is an introspection endpoint that refuses (only the checks below use these three).
# shellcheck disable=SC2016   # $http_x_auth_request_user is nginx's
BACKEND_LOCATIONS='location / { return 200 "hello from the backend\n"; }
    location = /auth { default_type application/json; add_header X-Auth-Request-User u1;
      return 200 '"'"'{"user":{"id":"u1","name":"Bench"}}'"'"'; }
    location = /bench/status { stub_status; }
    location = /bench/user { return 200 "user=$http_x_auth_request_user\n"; }
    location = /bench/deny { return 401 "denied\n"; }'
BODY="hello from the backend"
bench_backend 18080 "$BACKEND_LOCATIONS"

# nginx as the TLS reverse proxy (pooled keep-alive upstream, as operators configure it):
# 18443 plain, 18444 authenticated the nginx way (auth_request on every request, nginx has no
# cache), 18445 plain with an access log (row 5). nginx-mem (18446) is the same plain proxy in a
# process of its own, fresh for the memory rows.
PROXY_LOC='proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https;'
TLS="ssl_certificate $TMP/cert.pem; ssl_certificate_key $TMP/key.pem; keepalive_requests 100000; keepalive_timeout 120s;"
nginx_conf() {   # FILE NAME SERVERS
    cat > "$1" <<NGX
worker_processes $WORKERS; daemon off; pid $TMP/$2.pid; error_log $TMP/$2.err; worker_rlimit_nofile 8192;
events { worker_connections 4096; }
http { access_log off;
  upstream app { server 127.0.0.1:18080; keepalive 64; }
  $3 }
NGX
}
nginx_conf "$TMP/proxy.conf" proxy "
  server { listen 127.0.0.1:18443 ssl http2; $TLS
    location / { $PROXY_LOC } }
  server { listen 127.0.0.1:18444 ssl http2; $TLS
    location = /_auth { internal; proxy_pass http://app/auth; proxy_pass_request_body off;
      proxy_set_header Content-Length \"\"; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_set_header X-Original-URI \$request_uri; }
    location / { auth_request /_auth; $PROXY_LOC } }
  server { listen 127.0.0.1:18445 ssl http2; $TLS access_log $TMP/nginx-access.log;
    location / { $PROXY_LOC } }"
nginx_conf "$TMP/nginx-mem.conf" nginx-mem "
  server { listen 127.0.0.1:18446 ssl http2; $TLS
    location / { $PROXY_LOC } }"
bench_nginx proxy "$TMP/proxy.conf" 18443 18444 18445
bench_nginx nginx-mem "$TMP/nginx-mem.conf" 18446

# Gates: idle_timeout above the memory rows' hold, max_connections above their connection count.
SERVER_LINES="idle_timeout = \"120s\"
max_connections = $(( MEM_CONNS + 1000 ))"
bench_gate_toml "$TMP/gate.toml" 19443 19090 18080 "$SERVER_LINES"
bench_gate_toml "$TMP/gate-log.toml" 19446 19093 18080 "$SERVER_LINES"
bench_gate_toml "$TMP/gate-mem.toml" 19447 19094 18080 "$SERVER_LINES"
bench_gate_toml "$TMP/gate-auth.toml" 19444 19091 18080 "$SERVER_LINES"
AUTH_TOML='[auth]
introspection_url = "http://127.0.0.1:18080/auth"
cookies = ["session"]
cache_ttl = "10m"                 # the decision stays warm for any run length'
echo "$AUTH_TOML" >> "$TMP/gate-auth.toml"
if [ -n "$HAVE_REDIS" ]; then
    # The authenticated gate plus a rate limit kept in Redis (high enough never to reject).
    bench_gate_toml "$TMP/gate-rl.toml" 19445 19092 18080 "$SERVER_LINES"
    cat >> "$TMP/gate-rl.toml" <<TOML
$AUTH_TOML
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
    redis-server --bind 127.0.0.1 --port 16379 --save "" --appendonly no --daemonize no \
        >"$TMP/redis.log" 2>&1 &
    BENCH_PID[redis]=$!; PIDS+=("$!")
    bench_wait_tcp 16379 "${BENCH_PID[redis]}" || { echo "redis did not start" >&2; tail -n 5 "$TMP/redis.log" >&2; exit 1; }
fi
bench_gate gate-mem "$TMP/gate-mem.toml" 19094
bench_gate gate "$TMP/gate.toml" 19090
bench_gate gate-auth "$TMP/gate-auth.toml" 19091
bench_gate gate-log "$TMP/gate-log.toml" 19093 info "$TMP/gate-access.log"   # access log: info, to a file
[ -n "$HAVE_REDIS" ] && bench_gate gate-rl "$TMP/gate-rl.toml" 19092

# The peers, configured as an operator tuning for throughput would, with the same CPU budget as
# nginx's worker processes and the gate's worker threads ($WORKERS), the same certificate, the same
# backend, keep-alive to the backend, access logs off (bench/README.md, "The peers").
if [ -n "$HAVE_HAPROXY" ]; then
    # HAProxy: one process, nbthread threads; TLS terminated on the frontend; idle backend
    # connections shared between client connections (http-reuse always); no log lines configured.
    # It has no forward auth of its own (row 2c): only the plain proxy.
    cat "$TMP/cert.pem" "$TMP/key.pem" > "$TMP/haproxy.pem"
    cat > "$TMP/haproxy.cfg" <<HAP
global
    nbthread $WORKERS
    maxconn 4096
    tune.ssl.default-dh-param 2048

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 120s
    timeout server 30s
    timeout http-request 30s
    timeout http-keep-alive 120s

frontend plain
    bind 127.0.0.1:18450 ssl crt $TMP/haproxy.pem alpn h2,http/1.1
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    default_backend app

backend app
    server backend 127.0.0.1:18080
HAP
    haproxy -c -q -f "$TMP/haproxy.cfg" || { echo "haproxy -c: $TMP/haproxy.cfg is not valid" >&2; exit 1; }
    bench_proc haproxy 18450 -- haproxy -db -f "$TMP/haproxy.cfg"   # -db: foreground, one process
fi
if [ -n "$HAVE_CADDY" ]; then
    # Caddy: GOMAXPROCS threads run Go code at once (Go's own knob, the fair equivalent of one
    # worker); offline on loopback: no admin API, no automatic HTTPS/ACME/OCSP, no HTTP/3 (UDP),
    # the given certificate, and its state (HOME, XDG dirs, storage) inside $TMP. The backend pool
    # keeps up to 64 idle connections, set explicitly like nginx's `keepalive 64`.
    # 18451 plain, 18452 forward_auth to the backend's /auth with the user header copied,
    # 18453 forward_auth to /bench/deny (only the deny check below uses it).
    mkdir -p "$TMP/caddy/data" "$TMP/caddy/config"
    cat > "$TMP/Caddyfile" <<CADDY
{
	admin off
	auto_https off
	ocsp_stapling off
	grace_period 1s
	storage file_system $TMP/caddy/data
	servers {
		protocols h1 h2
	}
	log {
		output stderr
		level WARN
	}
}
(pool) {
	transport http {
		keepalive 120s
		keepalive_idle_conns 64
		keepalive_idle_conns_per_host 64
	}
}
https://:18451 {
	bind 127.0.0.1
	tls $TMP/cert.pem $TMP/key.pem
	reverse_proxy 127.0.0.1:18080 {
		import pool
	}
}
https://:18452 {
	bind 127.0.0.1
	tls $TMP/cert.pem $TMP/key.pem
	forward_auth 127.0.0.1:18080 {
		uri /auth
		copy_headers X-Auth-Request-User
		import pool
	}
	reverse_proxy 127.0.0.1:18080 {
		import pool
	}
}
https://:18453 {
	bind 127.0.0.1
	tls $TMP/cert.pem $TMP/key.pem
	forward_auth 127.0.0.1:18080 {
		uri /bench/deny
		copy_headers X-Auth-Request-User
		import pool
	}
	reverse_proxy 127.0.0.1:18080 {
		import pool
	}
}
CADDY
    CADDY_ENV=(env HOME="$TMP/caddy" XDG_DATA_HOME="$TMP/caddy/data" XDG_CONFIG_HOME="$TMP/caddy/config" GOMAXPROCS="$WORKERS")
    "${CADDY_ENV[@]}" caddy validate --config "$TMP/Caddyfile" --adapter caddyfile >"$TMP/caddy-validate.log" 2>&1 || {
        echo "caddy validate: $TMP/Caddyfile is not valid:" >&2; tail -n 5 "$TMP/caddy-validate.log" >&2; exit 1; }
    bench_proc caddy 18451 18452 18453 -- "${CADDY_ENV[@]}" caddy run --config "$TMP/Caddyfile" --adapter caddyfile
fi

# Sanity: every endpoint answers 200 with the cookie, the gate's auth refuses without it.
for port in 18443 18444 18445 18446 19443 19444 19446 19447 ${HAVE_REDIS:+19445}; do
    code="$(curl -sk -o /dev/null -w '%{http_code}' --max-time 5 -H "$COOKIE" "https://127.0.0.1:$port/")"
    [ "$code" = 200 ] || { echo "https://127.0.0.1:$port/ answered $code, not 200" >&2; exit 1; }
done
code="$(curl -sk -o /dev/null -w '%{http_code}' --max-time 5 "https://127.0.0.1:19444/")"
case "$code" in 200|000) echo "the auth gate answered $code without a cookie: auth is not enforced" >&2; exit 1 ;; esac
# backend_counts: "accepts requests", the backend's connections accepted and requests read so far
# (stub_status; reading it is one connection and one request more).
backend_counts() { curl -s --max-time 5 http://127.0.0.1:18080/bench/status | awk 'NR == 3 {print $1, $3; f = 1} END {if (!f) print "n/a n/a"}'; }
# peer_check PORT PATH CODE BODY WHAT: the status and the body (less its final newline) must be these.
peer_check() {
    local code body
    code="$(curl -sk -o "$TMP/check.body" -w '%{http_code}' --max-time 5 -H "$COOKIE" "https://127.0.0.1:$1$2" || true)"
    body="$(cat "$TMP/check.body" 2>/dev/null || true)"
    if [ "$code" != "$3" ] || [ "$body" != "$4" ]; then
        echo "$5: https://127.0.0.1:$1$2 answered $code \"$body\", not $3 \"$4\"" >&2; exit 1
    fi
}
# The peers answer 200 with the backend's body. Caddy's forward_auth asks /auth for every request
# (two backend requests for one), passes on the user header /auth sent, and refuses what the
# introspection endpoint refuses, with its answer, without reaching the app.
[ -n "$HAVE_HAPROXY" ] && peer_check 18450 / 200 "$BODY" "HAProxy"
if [ -n "$HAVE_CADDY" ]; then
    peer_check 18451 / 200 "$BODY" "Caddy reverse_proxy"
    read -r _ req0 < <(backend_counts)
    peer_check 18452 / 200 "$BODY" "Caddy forward_auth"
    read -r _ req1 < <(backend_counts)
    [ "$(( req1 - req0 - 1 ))" = 2 ] || { echo "Caddy forward_auth: one request made $(( req1 - req0 - 1 )) backend requests, not 2 (/auth, then /)" >&2; exit 1; }
    peer_check 18452 /bench/user 200 "user=u1" "Caddy forward_auth, the user header copied from /auth"
    peer_check 18451 /bench/user 200 "user=" "Caddy reverse_proxy, no user header without forward_auth"
    peer_check 18453 / 401 "denied" "Caddy forward_auth to an endpoint that refuses"
fi

# ---------------------------------------------------------------- helpers
nginx_pids() { echo "$1" $(ps -o pid= --ppid "$1"); }               # master + workers
# cpu_ticks PID...: "utime stime" summed over the processes, in clock ticks.
cpu_ticks() { local p; for p in "$@"; do cat "/proc/$p/stat" 2>/dev/null || true; done | awk '{sub(/^.*\) /, ""); u += $12; s += $13} END {print u + 0, s + 0}'; }
# host_ticks: "total steal busy" CPU time of the whole machine (the `cpu` line of /proc/stat), in
# clock ticks. Steal is time the hypervisor gave to others: a shared host's other tenants
# (bench/README.md). Busy is the rest, less idle and iowait.
host_ticks() { awk '$1 == "cpu" {for (i = 2; i <= 9; i++) t += $i; print t, $9, t - $5 - $6 - $9; exit}' /proc/stat; }
rss_kb() { local p; for p in "$@"; do cat "/proc/$p/status" 2>/dev/null || true; done | awk '/^VmRSS:/ {s += $2} END {print s + 0}'; }
metric() { awk -v re="$2" '$0 !~ /^#/ && $1 ~ re {s += $NF} END {print s + 0}' "$1"; }   # FILE NAME_REGEX: sum
scrape() { curl -s --max-time 5 "http://127.0.0.1:$1/metrics" > "$2" || : > "$2"; }
calc() { awk "BEGIN { x = $1; printf \"%.${2:-2}f\", x }" 2>/dev/null || echo n/a; }
has() { local v; for v in "$@"; do [ -n "$v" ] && [ "$v" != n/a ] || return 1; done; }
CLK_TCK="$(getconf CLK_TCK)"
per_req() { calc "($1) * 1000000 / $CLK_TCK / $2" "$3"; }   # TICKS REQUESTS DECIMALS: µs a request

declare -A RPS=() P99=() REQS=() CPU=() USR=() SYS=() BUSY=() VALID=() NOTE=() PROTO=()
# The rest of the machine during a wrk run: the client's (wrk's) and the backend's CPU per request
# in µs, and the whole machine's busy share in % of all its cores.
declare -A CLI=() BACK=() MBUSY=()
# Backend requests and new backend connections per client request (the backend's stub_status).
declare -A BREQ=() BCONN=()
NCPU="$(nproc)"
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000; printf "%.2f", n }'; }

# wrk_run KEY NAME URL ADMIN_PORT|- PID...: 2 s warm-up, then the measured run; CPU of the PIDs
# and the gate's metrics (ADMIN_PORT) are read right before and right after the measured run,
# and $WRK_HOOK (a function name, if set) is called with 0 before and 1 after it.
WRK_HOOK=
wrk_run() {
    local key="$1" name="$2" url="$3" admin="$4" out="$TMP/wrk-$1.out" u0 s0 u1 s1 n2xx sock p secs
    local bu0 bs0 bu1 bs1 ht0 hb0 ht1 hb1 wu ws ba0 br0 ba1 br1 TIMEFORMAT='%3U %3S'
    shift 4
    sync   # an access-log run's dirty pages are written back now, not during the next measured run
    wrk -t"$THREADS" -c"$CONNS" -d2s -H "$COOKIE" "$url" >/dev/null 2>&1 || true   # warm up
    [ -n "$WRK_HOOK" ] && "$WRK_HOOK" 0
    [ "$admin" != - ] && scrape "$admin" "$TMP/m-$key-0"
    read -r ba0 br0 < <(backend_counts)
    read -r bu0 bs0 < <(cpu_ticks $BACKEND_PIDS)
    read -r ht0 _ hb0 < <(host_ticks)
    read -r u0 s0 < <(cpu_ticks "$@")
    # bash's `time` gives wrk's own CPU time (its rusage as a child), written to the .time file.
    { time wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -H "$COOKIE" "$url" >"$out" 2>&1; } 2>"$out.time" || true
    read -r u1 s1 < <(cpu_ticks "$@")
    read -r ht1 _ hb1 < <(host_ticks)
    read -r bu1 bs1 < <(cpu_ticks $BACKEND_PIDS)
    read -r ba1 br1 < <(backend_counts)
    read -r wu ws < <(tail -n 1 "$out.time")
    [ "$admin" != - ] && scrape "$admin" "$TMP/m-$key-1"
    [ -n "$WRK_HOOK" ] && "$WRK_HOOK" 1
    echo "== $name ($url, $CONNS connections, $DURATION)"
    grep -E 'requests in|Requests/sec|Latency|50%|99%|Non-2xx|Socket errors' "$out" || cat "$out"
    REQS[$key]="$(awk '/ requests in / {print $1; exit}' "$out")"
    RPS[$key]="$(awk '/^Requests\/sec:/ {printf "%d", $2; exit}' "$out")"
    P99[$key]="$(to_ms "$(awk '$1 == "99%" {print $2; exit}' "$out")")"
    n2xx="$(awk -F: '/Non-2xx or 3xx/ {gsub(/ /, "", $2); print $2}' "$out")"
    sock="$(awk '/Socket errors/ {sub(/^ *Socket errors: */, ""); print}' "$out")"
    VALID[$key]=1; NOTE[$key]=""
    if ! has "${REQS[$key]}" || [ "${REQS[$key]}" -eq 0 ]; then
        VALID[$key]=; NOTE[$key]="wrk failed: $(tail -1 "$out")"; RPS[$key]=n/a; P99[$key]=n/a; CPU[$key]=n/a; USR[$key]=n/a; SYS[$key]=n/a; BUSY[$key]=n/a
        CLI[$key]=n/a; BACK[$key]=n/a; MBUSY[$key]=n/a; BREQ[$key]=n/a; BCONN[$key]=n/a; return
    fi
    [ -n "$n2xx" ] && [ "$n2xx" != 0 ] && { VALID[$key]=; NOTE[$key]+="$n2xx non-2xx answers; "; }
    [ -n "$sock" ] && NOTE[$key]+="socket errors: $sock; "
    case "$sock" in connect\ [1-9]*) VALID[$key]= ;; esac
    USR[$key]="$(per_req "$u1 - $u0" "${REQS[$key]}" 2)"
    SYS[$key]="$(per_req "$s1 - $s0" "${REQS[$key]}" 2)"
    CPU[$key]="$(per_req "$u1 - $u0 + $s1 - $s0" "${REQS[$key]}" 1)"
    # Busy: the process's CPU time over wrk's measured time, in % of one core.
    secs="$(awk '/ requests in / {sub(/s,?$/, "", $4); print $4 + 0; exit}' "$out")"
    BUSY[$key]="$(has "$secs" && [ "$secs" != 0 ] && calc "($u1 - $u0 + $s1 - $s0) * 100 / $CLK_TCK / $secs" 0 || echo n/a)"
    CLI[$key]="$(has "$wu" "$ws" && calc "($wu + $ws) * 1000000 / ${REQS[$key]}" 1 || echo n/a)"
    BACK[$key]="$(per_req "$bu1 - $bu0 + $bs1 - $bs0" "${REQS[$key]}" 1)"
    MBUSY[$key]="$([ "$ht1" -gt "$ht0" ] && calc "($hb1 - $hb0) * 100 / ($ht1 - $ht0)" 0 || echo n/a)"
    # Less the second stub_status read itself (its request and its connection).
    BREQ[$key]="$(has "$br0" "$br1" && calc "($br1 - $br0 - 1) / ${REQS[$key]}" 2 || echo n/a)"
    BCONN[$key]="$(has "$ba0" "$ba1" && calc "($ba1 - $ba0 - 1) / ${REQS[$key]}" 3 || echo n/a)"
    for p in "$@"; do bench_alive "$p" || { VALID[$key]=; NOTE[$key]+="process $p exited during the run; "; }; done
}

# h2_run KEY NAME URL: h2load over TLS (ALPN h2), 2 s warm-up, then the measured run.
h2_run() {
    local key="$1" name="$2" url="$3" out="$TMP/h2-$1.out" failed codes
    sync
    h2load -c"$H2_CLIENTS" -m"$H2_STREAMS" -D 2 -H "$COOKIE" "$url" >/dev/null 2>&1 || true   # warm up
    h2load -c"$H2_CLIENTS" -m"$H2_STREAMS" -D "$DUR_S" -H "$COOKIE" "$url" >"$out" 2>&1 || true
    echo "== $name ($url, h2load -c$H2_CLIENTS -m$H2_STREAMS -D $DUR_S)"
    grep -E '^(Application protocol|finished in|requests:|status codes:)' "$out" || tail -3 "$out"
    PROTO[$key]="$(awk -F': ' '/^Application protocol:/ {print $2; exit}' "$out")"
    RPS[$key]="$(awk '/^finished in/ {printf "%d", $4; exit}' "$out")"
    failed="$(awk '/^requests:/ {for (i = 1; i < NF; i++) if ($(i + 1) ~ /^(failed|errored|timeout)/) s += $i; print s + 0}' "$out")"
    codes="$(awk '/^status codes:/ {print $5 + $7 + $9; exit}' "$out")"   # 3xx + 4xx + 5xx
    VALID[$key]=1; NOTE[$key]="protocol ${PROTO[$key]:-unknown}"
    has "${RPS[$key]}" || { RPS[$key]=n/a; VALID[$key]=; }
    [ "${PROTO[$key]}" = h2 ] || { VALID[$key]=; NOTE[$key]+=" (not h2!)"; }
    [ "${failed:-0}" = 0 ] || { VALID[$key]=; NOTE[$key]+=", $failed failed"; }
    [ "${codes:-0}" = 0 ] || { VALID[$key]=; NOTE[$key]+=", $codes non-2xx"; }
}

# mem_probe NAME PORT ADMIN|- PIDS_FN ARG: RSS idle (before), with MEM_CONNS idle connections,
# and (in the background, by PID) SETTLE seconds after they closed.
declare -A RSS_PRE=() RSS_LOAD=() RSS_AFTER_PID=() MEM_NOTE=()
mem_probe() {
    local name="$1" port="$2" admin="$3" pidfn="$4" arg="$5" ic i pids open
    pids="$($pidfn "$arg")"
    RSS_PRE[$name]="$(rss_kb $pids)"
    python3 bench/idle_conns.py --port "$port" -n "$MEM_CONNS" --hold "$MEM_HOLD" >"$TMP/idle-$name.out" 2>&1 &
    ic=$!; PIDS+=("$ic")
    for i in $(seq 1200); do   # up to 120 s for the handshakes
        grep -q '^ready' "$TMP/idle-$name.out" && break
        bench_alive "$ic" || break
        sleep 0.1
    done
    sleep 1
    pids="$($pidfn "$arg")"
    RSS_LOAD[$name]="$(rss_kb $pids)"
    open=""
    [ "$admin" != - ] && { scrape "$admin" "$TMP/m-mem-$name"; open=", gate reports $(metric "$TMP/m-mem-$name" '^chatkit_gate_connections_open$') open"; }
    for i in $(seq $(( (MEM_HOLD + 30) * 10 ))); do bench_alive "$ic" || break; sleep 0.1; done
    bench_alive "$ic" && kill -TERM "$ic"
    wait "$ic" 2>/dev/null || true
    MEM_NOTE[$name]="$(grep -E '^(ready|held|  error)' "$TMP/idle-$name.out" | paste -sd';' | sed 's/;/; /g' || true)$open"
    echo "== memory $name: VmRSS idle ${RSS_PRE[$name]} kB, with $MEM_CONNS idle TLS connections ${RSS_LOAD[$name]} kB (${MEM_NOTE[$name]})"
    ( trap - EXIT INT TERM; read -rt "$SETTLE" <> <(:) || :; rss_kb $($pidfn "$arg") > "$TMP/rss-after-$name" ) &
    RSS_AFTER_PID[$name]=$!; PIDS+=("$!")
}
one_pid() { echo "$1"; }

# ---------------------------------------------------------------- measurements
read -r HOST_T0 HOST_STEAL0 _ <<< "$(host_ticks)"
echo "Command: $INVOKED"
echo "gate $("$GATE" --version 2>/dev/null | head -1) ($GATE); $(nginx -v 2>&1 | sed 's/^nginx version: //'); wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'); $(h2load --version | head -1)"
PEER_VERSIONS=()
[ -n "$HAVE_HAPROXY" ] && PEER_VERSIONS+=("$(haproxy -v | awk '{print "HAProxy " $3; exit}')")
[ -n "$HAVE_CADDY" ] && PEER_VERSIONS+=("Caddy $(caddy version | awk '{print $1; exit}')")
for p in haproxy caddy; do [ -n "${PEER_SKIP[$p]:-}" ] && PEER_VERSIONS+=("$p ${PEER_SKIP[$p]}"); done
PEERS_LINE=; for v in "${PEER_VERSIONS[@]}"; do PEERS_LINE+="${PEERS_LINE:+; }$v"; done
echo "peers: $PEERS_LINE"

# 7. Memory first, on the two fresh processes nobody else touches; the after-close samples are
#    taken in the background while the throughput rows run on the other processes.
mem_probe gate 19447 19094 one_pid "${BENCH_PID[gate-mem]}"
mem_probe nginx 18446 - nginx_pids "${BENCH_PID[nginx-mem]}"

NGX_PROXY="$(nginx_pids "${BENCH_PID[proxy]}")"
BACKEND_PIDS="$(nginx_pids "${BENCH_PID[backend]}")"
# Access-log lines written during the measured runs, summed over the rounds (g: gate, n: nginx).
declare -A LOGLINES=([g]=0 [n]=0) LOGSTART=()
log_count() {   # WHICH PHASE COUNT
    if [ "$2" = 0 ]; then LOGSTART[$1]="$3"; else LOGLINES[$1]=$(( LOGLINES[$1] + $3 - LOGSTART[$1] )); fi
}
count_gate_log() { [ "$1" = 1 ] && sleep 0.5; log_count g "$1" "$(grep -c '"message":"request"' "$TMP/gate-access.log" || true)"; }
count_nginx_log() { log_count n "$1" "$(cat "$TMP/nginx-access.log" 2>/dev/null | wc -l)"; }

# median VALUE...: the middle value (the mean of the two middle ones for an even count); n/a if
# any value is n/a.
median() {
    local v; for v in "$@"; do has "$v" || { echo n/a; return; }; done
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) m = a[(NR + 1) / 2]; else m = (a[NR / 2] + a[NR / 2 + 1]) / 2;
        if (m == int(m)) printf "%d", m; else printf "%.6g", m }'
}
# combine KEY: the row's value from its rounds KEY_1..KEY_N: the median req/s, p99, CPU per
# request and busy share, valid only if every round was, the notes of every round.
combine() {
    local k="$1" r rps=() p99=() cpu=() usr=() sys=() busy=() cli=() back=() mbusy=() reqs=0 notes=""
    VALID[$k]=1
    for r in $(seq "$ROUNDS"); do
        rps+=("${RPS[${k}_$r]:-n/a}"); p99+=("${P99[${k}_$r]:-n/a}"); cpu+=("${CPU[${k}_$r]:-n/a}")
        usr+=("${USR[${k}_$r]:-n/a}"); sys+=("${SYS[${k}_$r]:-n/a}"); busy+=("${BUSY[${k}_$r]:-n/a}")
        cli+=("${CLI[${k}_$r]:-n/a}"); back+=("${BACK[${k}_$r]:-n/a}"); mbusy+=("${MBUSY[${k}_$r]:-n/a}")
        has "${REQS[${k}_$r]:-}" && reqs=$(( reqs + REQS[${k}_$r] ))
        [ -n "${VALID[${k}_$r]:-}" ] || VALID[$k]=
        [ -n "${NOTE[${k}_$r]:-}" ] && notes+="round $r: ${NOTE[${k}_$r]%; }; "
    done
    RPS[$k]="$(median "${rps[@]}")"; P99[$k]="$(median "${p99[@]}")"; CPU[$k]="$(median "${cpu[@]}")"
    USR[$k]="$(median "${usr[@]}")"; SYS[$k]="$(median "${sys[@]}")"; BUSY[$k]="$(median "${busy[@]}")"
    CLI[$k]="$(median "${cli[@]}")"; BACK[$k]="$(median "${back[@]}")"; MBUSY[$k]="$(median "${mbusy[@]}")"
    REQS[$k]=$reqs; PROTO[$k]="${PROTO[${k}_1]:-}"
    NOTE[$k]="median of $ROUNDS rounds: req/s ${rps[*]}"
    [ "${p99[0]}" != n/a ] && NOTE[$k]+=", p99 ms ${p99[*]}, CPU µs ${cpu[*]} (user ${usr[*]}; kernel ${sys[*]}), client µs ${cli[*]}, backend µs ${back[*]}, machine busy % ${mbusy[*]}"
    NOTE[$k]+="; ${notes}"
}

# 1, 2, 3, 5, 6, then 4, in each round. Runs compared in one row follow each other where they can
# (the machine drifts): nginx log on | HAProxy plain | Caddy plain | nginx plain | gate plain |
# gate log on | gate auth | nginx auth | Caddy forward_auth | gate auth + Redis | nginx HTTP/2 |
# gate HTTP/2. The peers' runs sit next to the nginx run of the same kind, so the runs of
# rows 1a, 2a and 5 stay back to back as they were before the peers.
for r in $(seq "$ROUNDS"); do
    echo "== round $r of $ROUNDS"
    WRK_HOOK=count_nginx_log
    wrk_run "nlog_$r" "nginx proxy, access_log to a file" "https://127.0.0.1:18445/" - $NGX_PROXY
    WRK_HOOK=
    [ -n "$HAVE_HAPROXY" ] && wrk_run "hplain_$r" "HAProxy (nbthread $WORKERS, http-reuse always)" "https://127.0.0.1:18450/" - "${BENCH_PID[haproxy]}"
    [ -n "$HAVE_CADDY" ] && wrk_run "cplain_$r" "Caddy reverse_proxy (GOMAXPROCS=$WORKERS)" "https://127.0.0.1:18451/" - "${BENCH_PID[caddy]}"
    wrk_run "nplain_$r" "nginx proxy" "https://127.0.0.1:18443/" - $NGX_PROXY
    wrk_run "gplain_$r" "chatkit-gate proxy" "https://127.0.0.1:19443/" 19090 "${BENCH_PID[gate]}"
    WRK_HOOK=count_gate_log
    wrk_run "glog_$r" "chatkit-gate proxy, --log-level info (access log to a file)" "https://127.0.0.1:19446/" 19093 "${BENCH_PID[gate-log]}"
    WRK_HOOK=
    wrk_run "gauth_$r" "chatkit-gate proxy + auth (cached)" "https://127.0.0.1:19444/" 19091 "${BENCH_PID[gate-auth]}"
    wrk_run "nauth_$r" "nginx proxy + auth_request" "https://127.0.0.1:18444/" - $NGX_PROXY
    [ -n "$HAVE_CADDY" ] && wrk_run "cauth_$r" "Caddy forward_auth to /auth + reverse_proxy (GOMAXPROCS=$WORKERS)" "https://127.0.0.1:18452/" - "${BENCH_PID[caddy]}"
    [ -n "$HAVE_REDIS" ] && wrk_run "grl_$r" "chatkit-gate proxy + auth + Redis rate limit" "https://127.0.0.1:19445/" 19092 "${BENCH_PID[gate-rl]}"
    # 4: HTTP/2 from the client.
    h2_run "nh2_$r" "nginx proxy, HTTP/2" "https://127.0.0.1:18443/"
    h2_run "gh2_$r" "chatkit-gate proxy, HTTP/2" "https://127.0.0.1:19443/"
done
for k in nlog nplain gplain glog gauth nauth nh2 gh2 ${HAVE_REDIS:+grl} ${HAVE_HAPROXY:+hplain} ${HAVE_CADDY:+cplain cauth}; do combine "$k"; done

for n in gate nginx; do
    p="${RSS_AFTER_PID[$n]}"
    bench_alive "$p" && echo "(waiting for the RSS sample $SETTLE s after close: $n)"
    wait "$p" 2>/dev/null || true
done
RSS_AFTER_gate="$(cat "$TMP/rss-after-gate" 2>/dev/null || echo n/a)"
RSS_AFTER_nginx="$(cat "$TMP/rss-after-nginx" 2>/dev/null || echo n/a)"
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
read -r HOST_T1 HOST_STEAL1 _ <<< "$(host_ticks)"
STEAL="$([ "$HOST_T1" -gt "$HOST_T0" ] && echo "$(calc "($HOST_STEAL1 - $HOST_STEAL0) * 100 / ($HOST_T1 - $HOST_T0)" 1)%" || echo n/a)"

# Checks from the gate's own metrics, over the measured runs only (summed over the rounds).
delta() { local r t=0; for r in $(seq "$ROUNDS"); do
    t=$(( t + $(metric "$TMP/m-$1_$r-1" "$2") - $(metric "$TMP/m-$1_$r-0" "$2") )); done; echo "$t"; }
intro="$(delta gauth 'chatkit_gate_auth_decisions_total[{].*source="introspection"')"
cached="$(delta gauth 'chatkit_gate_auth_decisions_total[{]result="allow",source="cache"')"
[ "$intro" -le "$ROUNDS" ] || { VALID[gauth]=; NOTE[gauth]+="cache not warm: $intro introspection calls; "; }
NOTE[gauth]+="$cached cache hits, $intro introspection calls"
if [ -n "$HAVE_REDIS" ] && [ -n "${VALID[grl]:-}" ]; then
    rl_redis="$(delta grl 'chatkit_gate_rate_limit_decisions_total[{].*source="redis"')"
    rl_err="$(delta grl '^chatkit_gate_redis_errors_total$')"
    NOTE[grl]+="$rl_redis decisions from Redis, $rl_err Redis errors"
    [ "$rl_err" = 0 ] && [ "$rl_redis" -gt 0 ] || VALID[grl]=
fi
dropped="$(delta glog '^chatkit_gate_log_lines_dropped_total$')"
NOTE[glog]+="${LOGLINES[g]} access-log lines for ${REQS[glog]:-?} requests, $dropped dropped"
[ "$dropped" = 0 ] || VALID[glog]=
NOTE[nlog]+="${LOGLINES[n]} access-log lines for ${REQS[nlog]:-?} requests"
# The peers' runs measured what their rows say: every client request reached the backend (plain:
# one backend request each), and Caddy's forward_auth asked /auth for every one (two each). The
# requests in flight when wrk stops reach the backend but are not counted by wrk, so a little more.
peer_backend() {   # KEY MIN WHAT
    local k="$1" r v reqs=() conns=() busy=()
    for r in $(seq "$ROUNDS"); do
        v="${BREQ[${k}_$r]:-n/a}"; reqs+=("$v"); conns+=("${BCONN[${k}_$r]:-n/a}"); busy+=("${BUSY[${k}_$r]:-n/a}")
        if ! has "$v" || awk "BEGIN { exit !($v < $2) }"; then
            VALID[$k]=; NOTE[$k]+="round $r: $v backend requests per request, fewer than $2 ($3); "
        fi
    done
    NOTE[$k]+="backend requests per request ${reqs[*]} ($3), new backend connections per request ${conns[*]}, the peer busy ${busy[*]} % of one core"
}
for k in nplain gplain nauth gauth; do   # the same counts for nginx's and the gate's runs, for reference
    b=(); c=(); for r in $(seq "$ROUNDS"); do b+=("${BREQ[${k}_$r]:-n/a}"); c+=("${BCONN[${k}_$r]:-n/a}"); done
    NOTE[$k]="${NOTE[$k]%; }; backend requests per request ${b[*]}, new backend connections per request ${c[*]}; "
done
[ -n "$HAVE_HAPROXY" ] && peer_backend hplain 0.99 "the proxied request"
if [ -n "$HAVE_CADDY" ]; then
    peer_backend cplain 0.99 "the proxied request"
    peer_backend cauth 1.98 "/auth, then the proxied request"
fi

# ---------------------------------------------------------------- table
fmt() { [ "$1" = n/a ] && { echo n/a; return; }; awk -v n="$1" 'BEGIN { s = sprintf("%d", n); o = "";
    while (length(s) > 3) { o = "," substr(s, length(s) - 2) o; s = substr(s, 1, length(s) - 3) } print s o }'; }
mib() { has "$1" && calc "$1 / 1024" 1 || echo n/a; }
ratio() { has "$1" "$2" && [ "$2" != 0 ] && echo "$(calc "$1 / $2")×" || echo n/a; }
# verdict CONDITION KEY...: PASS/FAIL on an awk condition; INVALID when a run it uses was not clean.
verdict() {
    local cond="$1" k; shift
    for k in "$@"; do [ -n "${VALID[$k]:-}" ] || { echo INVALID; return; }; done
    [[ "$cond" == *n/a* ]] && { echo n/a; return; }
    awk "BEGIN { exit !($cond) }" && echo PASS || echo FAIL
}
# info KEY...: the result of an informational row, INVALID when a run it uses was not clean.
info() { local k; for k in "$@"; do [ -n "${VALID[$k]:-}" ] || { echo INVALID; return; }; done; echo info; }
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 | $7 |"); }

# A ratio row is the median over the rounds of each round's own ratio (the two runs of a round
# are made close together, so the machine's drift between rounds cancels); the value columns
# are each side's median. pr ARRAY A B: the median of ARRAY[A_r] / ARRAY[B_r] (a plain number).
pr() {
    local -n arr="$1"; local r v=()
    for r in $(seq "$ROUNDS"); do
        has "${arr[${2}_$r]:-}" "${arr[${3}_$r]:-}" && [ "${arr[${3}_$r]}" != 0 ] || { echo n/a; return; }
        v+=("$(calc "${arr[${2}_$r]} / ${arr[${3}_$r]}" 4)")
    done
    median "${v[@]}"
}
x() { has "$1" && echo "$(calc "$1")×" || echo n/a; }   # a ratio for the table
declare -A R=(
    [1a]="$(pr RPS gplain nplain)" [1b]="$(pr P99 gplain nplain)" [2a]="$(pr RPS gauth nauth)"
    [2b]="$(pr RPS gauth gplain)" [2bn]="$(pr RPS nauth nplain)" [4]="$(pr RPS gh2 nh2)"
    [5]="$(pr RPS glog gplain)" [5n]="$(pr RPS nlog nplain)" [6a]="$(pr CPU gplain nplain)"
    [6b]="$(pr CPU gauth nauth)" [6c]="$(pr USR gplain nplain)" [6d]="$(pr SYS gplain nplain)")
[ -n "$HAVE_REDIS" ] && R[3]="$(pr RPS grl gauth)"

row 1a "plain HTTPS/1.1 keep-alive proxy, req/s (wrk -t1 -c$CONNS)" "$(fmt "${RPS[nplain]}")" "$(fmt "${RPS[gplain]}")" "$(x "${R[1a]}")" "gate ≥ 1.3× nginx" \
    "$(verdict "${R[1a]} >= 1.3" nplain gplain)"
row 1b "plain proxy, p99 latency" "${P99[nplain]} ms" "${P99[gplain]} ms" "$(x "${R[1b]}")" "gate ≤ nginx" \
    "$(verdict "${R[1b]} <= 1" nplain gplain)"
row 2a "authenticated, req/s (gate: warm decision cache; nginx: auth_request)" "$(fmt "${RPS[nauth]}")" "$(fmt "${RPS[gauth]}")" "$(x "${R[2a]}")" "gate ≥ 3× nginx" \
    "$(verdict "${R[2a]} >= 3" nauth gauth)"
row 2b "authenticated ÷ plain, same server" "$(x "${R[2bn]}")" "$(x "${R[2b]}")" "—" "gate auth ≥ 0.95× gate plain" \
    "$(verdict "${R[2b]} >= 0.95" gauth gplain)"
if [ -n "$HAVE_REDIS" ]; then
    row 3 "gate auth + Redis rate limit, req/s (ratio: ÷ gate auth)" "—" "$(fmt "${RPS[grl]}")" "$(x "${R[3]}")" "— (informational)" \
        "$(info grl)"
else
    row 3 "gate auth + Redis rate limit" "—" "skipped (no redis-server)" "—" "— (informational)" "—"
fi
row 4 "HTTP/2 over TLS, req/s (h2load -c$H2_CLIENTS -m$H2_STREAMS, ALPN ${PROTO[nh2]:-?}/${PROTO[gh2]:-?})" "$(fmt "${RPS[nh2]}")" "$(fmt "${RPS[gh2]}")" "$(x "${R[4]}")" "gate ≥ nginx" \
    "$(verdict "${R[4]} >= 1" nh2 gh2)"
row 5 "access log on ÷ off, req/s (gate: info vs warn; nginx: access_log file vs off, reference)" \
    "$(x "${R[5n]}") ($(fmt "${RPS[nlog]}") / $(fmt "${RPS[nplain]}"))" \
    "$(x "${R[5]}") ($(fmt "${RPS[glog]}") / $(fmt "${RPS[gplain]}"))" "—" "gate on ≥ 0.9× off" \
    "$(verdict "${R[5]} >= 0.9" glog gplain)"
row 6a "CPU per request, plain (µs, utime+stime ÷ requests)" "${CPU[nplain]}" "${CPU[gplain]}" "$(x "${R[6a]}")" "gate ≤ nginx" \
    "$(verdict "${R[6a]} <= 1" nplain gplain)"
row 6b "CPU per request, authenticated (µs)" "${CPU[nauth]}" "${CPU[gauth]}" "$(x "${R[6b]}")" "gate ≤ nginx" \
    "$(verdict "${R[6b]} <= 1" nauth gauth)"
row 6c "CPU per request, plain, user space (µs, utime ÷ requests): TLS, HTTP, the proxy's own work" "${USR[nplain]}" "${USR[gplain]}" "$(x "${R[6c]}")" "— (informational)" \
    "$(info gplain nplain)"
row 6d "CPU per request, plain, kernel (µs, stime ÷ requests): loopback TCP and system calls" "${SYS[nplain]}" "${SYS[gplain]}" "$(x "${R[6d]}")" "— (informational)" \
    "$(info gplain nplain)"
# The kernel's share is a floor that no user-space work removes. Both proxies are bound by their
# one core here, so with no user-space work at all the gate's plain req/s would be at most nginx's
# times (nginx's CPU per request ÷ the gate's kernel CPU per request).
has "${CPU[nplain]}" "${SYS[gplain]}" && R[6e]="$(calc "${CPU[nplain]} / ${SYS[gplain]}" 2)"
row 6e "bound on the plain req/s ratio from kernel time alone (nginx CPU ÷ gate kernel CPU, per request)" "—" "—" "$(x "${R[6e]:-n/a}")" "— (informational)" \
    "$(info gplain nplain)"
# Whether that holds in this run: each proxy's CPU time over the run's time. Near 100% on both
# sides, the proxy's one core is what limits it, and row 1a is about the inverse of row 6a: the
# gate reaches 1.3× nginx's req/s only with at most 1/1.3 of nginx's CPU per request.
pct_core() { has "${1:-}" && echo "$1%" || echo n/a; }
row 6f "proxy busy during the plain run (% of one core: CPU time ÷ run time)" "$(pct_core "${BUSY[nplain]:-}")" "$(pct_core "${BUSY[gplain]:-}")" "—" "— (informational)" \
    "$(info gplain nplain)"
# The rest of the machine. On a machine this size the client and the backend run beside the proxy,
# and the machine is as busy in the gate's run as in nginx's (row 6h), so a round's req/s ratio
# is about (nginx's CPU + client + backend per request) ÷ (the gate's CPU + client + backend):
# what the gate saves per request buys only its share of that sum. 6i puts the gate's kernel time
# alone in the gate's sum (no user-space work at all); 6j is the user-space time per request left
# to the gate for 1.3× (nginx's sum ÷ 1.3 − the gate's kernel − client − backend), next to what it
# spent. Both from each round's two runs, then the median.
row 6g "client (wrk) + backend CPU per request during the plain run (µs)" \
    "$(has "${CLI[nplain]}" "${BACK[nplain]}" && echo "${CLI[nplain]} + ${BACK[nplain]}" || echo n/a)" \
    "$(has "${CLI[gplain]}" "${BACK[gplain]}" && echo "${CLI[gplain]} + ${BACK[gplain]}" || echo n/a)" "—" "— (informational)" \
    "$(info gplain nplain)"
row 6h "machine busy during the plain run (% of all $NCPU cores; idle, iowait and steal left out)" \
    "$(pct_core "${MBUSY[nplain]:-}")" "$(pct_core "${MBUSY[gplain]:-}")" "—" "— (informational)" "$(info gplain nplain)"
sysbound() {   # ROUND: "bound budget" (6i, 6j) from the round's nginx plain and gate plain runs
    local r="$1" ngx rest
    has "${CPU[nplain_$r]:-}" "${CLI[nplain_$r]:-}" "${BACK[nplain_$r]:-}" \
        "${SYS[gplain_$r]:-}" "${CLI[gplain_$r]:-}" "${BACK[gplain_$r]:-}" || { echo n/a n/a; return; }
    ngx="(${CPU[nplain_$r]} + ${CLI[nplain_$r]} + ${BACK[nplain_$r]})"
    rest="(${SYS[gplain_$r]} + ${CLI[gplain_$r]} + ${BACK[gplain_$r]})"
    echo "$(calc "$ngx / $rest" 4) $(calc "$ngx / 1.3 - $rest" 2)"
}
b6i=(); b6j=()
for r in $(seq "$ROUNDS"); do read -r bi bj <<< "$(sysbound "$r")"; b6i+=("$bi"); b6j+=("$bj"); done
R[6i]="$(median "${b6i[@]}")"; R[6j]="$(median "${b6j[@]}")"
row 6i "bound on the plain req/s ratio from the whole machine: (nginx + client + backend CPU per request) ÷ (gate kernel + client + backend)" \
    "—" "—" "$(x "${R[6i]}")" "— (informational)" "$(info gplain nplain)"
row 6j "gate user space left for 1.3×: (nginx + client + backend) ÷ 1.3 − (gate kernel + client + backend), µs per request, vs spent (nginx: its own user space)" \
    "${USR[nplain]} spent" "$(has "${R[6j]}" && echo "left ${R[6j]}, spent ${USR[gplain]}" || echo n/a)" "—" "— (informational)" "$(info gplain nplain)"
NOTE[gplain]+="rounds' 6i bounds ${b6i[*]}, 6j user space left for 1.3× ${b6j[*]} µs"
VALID[mem]=1
grep -q "^held open=$MEM_CONNS of $MEM_CONNS" "$TMP/idle-gate.out" || VALID[mem]=
VALID[nmem]=1
grep -q "^held open=$MEM_CONNS of $MEM_CONNS" "$TMP/idle-nginx.out" || VALID[nmem]=
g="${RSS_PRE[gate]}"; n="${RSS_PRE[nginx]}"
row 7a "RSS idle right after start (MiB; nginx: master+worker)" "$(mib "$n")" "$(mib "$g")" "$(ratio "$g" "$n")" "gate ≤ 12 MiB" \
    "$(verdict "$g <= 12 * 1024" mem)"
g="${RSS_LOAD[gate]}"; n="${RSS_LOAD[nginx]}"
row 7b "RSS with $MEM_CONNS idle TLS keep-alive connections (MiB)" "$(mib "$n")" "$(mib "$g")" "$(ratio "$g" "$n")" "gate ≤ 32 MiB" \
    "$(verdict "$g <= 32 * 1024" mem)"
gk="$(calc "(${RSS_LOAD[gate]} - ${RSS_PRE[gate]}) / $MEM_CONNS" 1)"; nk="$(calc "(${RSS_LOAD[nginx]} - ${RSS_PRE[nginx]}) / $MEM_CONNS" 1)"
row 7c "memory per idle connection (KiB, (RSS_$MEM_CONNS − RSS_idle) ÷ $MEM_CONNS)" "$nk" "$gk" "$(ratio "$gk" "$nk")" "— (informational)" \
    "$(info mem)"
g="$RSS_AFTER_gate"; n="$RSS_AFTER_nginx"
pct() { has "$1" "$2" && echo "$(calc "($1 - $2) * 100 / $2" 0)%" || echo n/a; }
row 7d "RSS $SETTLE s after the connections closed (MiB; % vs idle before)$([ -n "${BENCH_QUICK:-}" ] && echo ' — BENCH_QUICK: 5 s, not 60 s')" \
    "$(mib "$n") ($(pct "$n" "${RSS_PRE[nginx]}"))" "$(mib "$g") ($(pct "$g" "${RSS_PRE[gate]}"))" "$(ratio "$g" "$n")" "gate within 20% of before" \
    "$(verdict "$g <= 1.2 * ${RSS_PRE[gate]} && $g >= 0.8 * ${RSS_PRE[gate]}" mem)"

echo
echo "## chatkit-gate vs nginx"
echo
echo "Machine: nproc $(nproc), $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r); load average $LOAD_START at start, $LOAD_END at end; CPU time stolen by the hypervisor during the measurements: $STEAL"
echo "Command: \`$INVOKED\` (duration $DURATION, $ROUNDS rounds, median per row; $CONNS connections, wrk -t$THREADS; $WORKERS nginx worker(s), TOKIO_WORKER_THREADS=$WORKERS; $(( SECONDS - START_S )) s)"
echo
echo "Values are each side's median over the $ROUNDS rounds; a ratio (and its verdict) is the median of the rounds' own ratios, each from two runs made close together."
echo
echo "| # | row | nginx | gate | ratio (gate ÷ nginx) | goal | result |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "Notes (INVALID = a run the row uses was not clean; see the raw output above):"
declare -A LABEL=([nplain]="1 nginx plain" [gplain]="1 gate plain" [nauth]="2 nginx auth_request"
    [gauth]="2 gate auth" [grl]="3 gate auth + Redis" [nh2]="4 nginx HTTP/2" [gh2]="4 gate HTTP/2"
    [glog]="5 gate access log on" [nlog]="5 nginx access log on"
    [hplain]="1c HAProxy plain (port 18450)" [cplain]="1d Caddy reverse_proxy (port 18451)" [cauth]="2d Caddy forward_auth (port 18452)")
for k in nplain gplain nauth gauth grl nh2 gh2 glog nlog; do
    [ -n "${NOTE[$k]:-}" ] && echo "- ${LABEL[$k]}: ${NOTE[$k]%; }"
done
echo "- 7 gate (fresh process, port 19447): ${MEM_NOTE[gate]}"
echo "- 7 nginx (fresh process, port 18446): ${MEM_NOTE[nginx]}"

# ---------------------------------------------------------------- the peers
# Each cell: the median over the rounds, then [lowest–highest round]. A ratio is the median of the
# rounds' own ratios (gate ÷ peer, each from runs of the same round), with their spread.
vals() { local -n va="$1"; local r o=(); for r in $(seq "$ROUNDS"); do o+=("${va[${2}_$r]:-n/a}"); done; echo "${o[*]}"; }
rvals() {   # ARRAY A B: each round's A ÷ B
    local -n ra="$1"; local r o=()
    for r in $(seq "$ROUNDS"); do
        if has "${ra[${2}_$r]:-}" "${ra[${3}_$r]:-}" && [ "${ra[${3}_$r]}" != 0 ]; then o+=("$(calc "${ra[${2}_$r]} / ${ra[${3}_$r]}" 4)"); else o+=(n/a); fi
    done
    echo "${o[*]}"
}
us() { has "$1" && calc "$1" 1 || echo n/a; }
r2() { calc "$1" 2; }
spread() {   # FORMAT VALUE...: "[lowest–highest]" in FORMAT (fmt, us, r2)
    local f="$1" v lo hi; shift
    for v in "$@"; do has "$v" || { echo "[n/a]"; return; }; done
    read -r lo hi < <(printf '%s\n' "$@" | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {print lo, hi}')
    echo "[$("$f" "$lo")–$("$f" "$hi")]"
}
PROWS=()
prow() {   # NUM LABEL PEER_KEY GATE_KEY
    local rr cr
    read -ra rr <<< "$(rvals RPS "$4" "$3")"; read -ra cr <<< "$(rvals CPU "$4" "$3")"
    # shellcheck disable=SC2046   # the per-round values, one word each
    PROWS+=("| $1 | $2 | $(fmt "${RPS[$3]}") $(spread fmt $(vals RPS "$3")) | $(fmt "${RPS[$4]}") $(spread fmt $(vals RPS "$4")) | $(x "$(median "${rr[@]}")") $(spread r2 "${rr[@]}") | $(us "${CPU[$3]}") $(spread us $(vals CPU "$3")) | $(us "${CPU[$4]}") $(spread us $(vals CPU "$4")) | $(x "$(median "${cr[@]}")") $(spread r2 "${cr[@]}") | $(info "$3" "$4") |")
}
pskip() { PROWS+=("| $1 | $2 | $3 | — | — | — | — | — | — |"); }   # NUM LABEL WHY
prow "1a (ref.)" "plain: nginx (row 1a's runs)" nplain gplain
if [ -n "$HAVE_HAPROXY" ]; then prow 1c "plain: HAProxy, nbthread $WORKERS, http-reuse always" hplain gplain
else pskip 1c "plain: HAProxy" "${PEER_SKIP[haproxy]}"; fi
if [ -n "$HAVE_CADDY" ]; then prow 1d "plain: Caddy reverse_proxy, GOMAXPROCS=$WORKERS" cplain gplain
else pskip 1d "plain: Caddy" "${PEER_SKIP[caddy]}"; fi
prow "2a (ref.)" "authenticated: nginx auth_request (row 2a's runs; gate: warm decision cache)" nauth gauth
if [ -n "$HAVE_HAPROXY" ]; then pskip 2c "authenticated: HAProxy" "n/a: no forward auth built in (the usual add-on, a Lua auth-request script, is not packaged in Debian; bench/README.md)"
else pskip 2c "authenticated: HAProxy" "${PEER_SKIP[haproxy]}"; fi
if [ -n "$HAVE_CADDY" ]; then prow 2d "authenticated: Caddy forward_auth to /auth, user header copied (gate: warm decision cache)" cauth gauth
else pskip 2d "authenticated: Caddy" "${PEER_SKIP[caddy]}"; fi

# What each proxy negotiates with an OpenSSL client that sends no SNI, as wrk (the same library) does.
tls_of() { openssl s_client -connect "127.0.0.1:$1" -noservername </dev/null 2>/dev/null | awk '/^New, / {print $2 " " $NF; exit}' | sed 's/,//'; }
TLS_NOTE="nginx $(tls_of 18443), gate $(tls_of 19443)"
[ -n "$HAVE_HAPROXY" ] && TLS_NOTE+=", HAProxy $(tls_of 18450)"
[ -n "$HAVE_CADDY" ] && TLS_NOTE+=", Caddy $(tls_of 18451)"

echo
echo "## chatkit-gate vs the peers: HAProxy, Caddy (nginx for reference)"
echo
echo "Same backend, certificate, client (wrk -t$THREADS -c$CONNS, $DURATION after a 2 s warm-up) and CPU budget ($WORKERS: nginx worker_processes, HAProxy nbthread, Caddy GOMAXPROCS, the gate's TOKIO_WORKER_THREADS), the runs interleaved in each of the $ROUNDS rounds."
echo "Each cell: the median over the rounds, then [lowest–highest round]; a ratio is the median of the rounds' own ratios (gate ÷ peer, same round). Higher req/s and lower CPU per request (utime+stime from /proc/PID/stat ÷ requests) are better; no goals, so the result is info, INVALID (a run not clean) or why the row did not run."
echo
echo "| # | row | peer req/s | gate req/s | gate ÷ peer, req/s | peer CPU µs/req | gate CPU µs/req | gate ÷ peer, CPU | result |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${PROWS[@]}"
echo
echo "Notes:"
echo "- TLS negotiated (OpenSSL client, no SNI, like wrk): $TLS_NOTE"
for k in hplain cplain cauth; do
    [ -n "${NOTE[$k]:-}" ] && echo "- ${LABEL[$k]}: ${NOTE[$k]%; }"
done
echo "- nginx's and the gate's runs: the notes of rows 1 and 2 above"
