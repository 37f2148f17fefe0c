# Shared set-up for the bench scripts; sourced, never run:  . "$(dirname "$0")/lib.sh"
#
#   bench_init                      temp dir $TMP, PID bookkeeping, cleanup trap (EXIT/INT/TERM)
#   bench_need TOOL...              exit 1 naming the first missing tool
#   bench_gate_bin                  $GATE: GATE_BIN=<binary> (or GATE=<binary>), else `cargo build --release`
#   bench_cert                      self-signed localhost cert: $TMP/cert.pem, $TMP/key.pem
#   bench_port_free PORT...         exit 1 if something already listens there (a stale run)
#   bench_backend PORT [LOCATIONS]  nginx backend on 127.0.0.1:PORT (default: "hello" and /auth JSON)
#   bench_nginx NAME CONF PORT...   start nginx -c CONF in the foreground, wait for PORTs
#   bench_proc NAME PORT... -- CMD...   start any other server CMD (output to $TMP/NAME.log), wait for PORTs
#   bench_gate_toml FILE PORT ADMIN UPSTREAM_PORT [SERVER_LINES]   a minimal gate config
#   bench_gate NAME CONF ADMIN [LEVEL [STDOUT]]   start the gate (one worker thread), wait for /readyz
#
# Every process started here is remembered by PID ($PIDS, $BENCH_PID[NAME]) and stopped by
# PID on exit: SIGTERM, up to 5 s to go, then SIGKILL (nginx workers included). Nothing is
# ever stopped by name.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$BENCH_DIR")"
PIDS=()           # started by us, stopped in this order
EXTRA_PIDS=()     # children of ours (nginx workers): SIGKILLed only if still there after the grace
declare -A BENCH_PID=()

bench_alive() {   # a live (non-zombie) process
    local s
    s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    s="${s##*) }"
    [ -n "$s" ] && [ "${s%% *}" != Z ]
}

bench_cleanup() {
    local rc=$? p i any
    set +e
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for i in $(seq 50); do
        any=
        for p in "${PIDS[@]}" "${EXTRA_PIDS[@]}"; do bench_alive "$p" && any=1; done
        [ -z "$any" ] && break
        sleep 0.1
    done
    for p in "${PIDS[@]}" "${EXTRA_PIDS[@]}"; do bench_alive "$p" && kill -KILL "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    [ -n "${TMP:-}" ] && [ -z "${BENCH_KEEP_TMP:-}" ] && rm -rf "$TMP"
    [ -n "${BENCH_KEEP_TMP:-}" ] && echo "kept $TMP" >&2
    exit "$rc"
}

bench_init() {
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/bench.XXXXXX")"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bench_need() {
    local bin
    for bin in "$@"; do command -v "$bin" >/dev/null || { echo "missing $bin" >&2; exit 1; }; done
}

bench_gate_bin() {
    GATE="${GATE_BIN:-${GATE:-}}"
    if [ -z "$GATE" ]; then
        (cd "$REPO_DIR" && cargo build --release --quiet)
        GATE="${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/chatkit-gate"
    fi
    [ -x "$GATE" ] || { echo "gate binary not executable: $GATE" >&2; exit 1; }
}

bench_cert() {
    openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 1 \
        -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
}

bench_port_free() {
    local port
    for port in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port 127.0.0.1:$port is already in use (a stale bench run?)" >&2; exit 1
        fi
    done
}

bench_wait_tcp() {   # PORT PID: up to 10 s for PORT to accept, while PID lives
    local port="$1" pid="$2" i
    for i in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        bench_alive "$pid" || return 1
        sleep 0.1
    done
    return 1
}

# bench_nginx NAME CONF PORT...: nginx in the foreground (daemon off in CONF), its workers noted.
bench_nginx() {
    local name="$1" conf="$2" port pid w i
    shift 2
    nginx -c "$conf" -p "$TMP" -e "$TMP/$name.err" >"$TMP/$name.out" 2>&1 &
    pid=$!; PIDS+=("$pid"); BENCH_PID[$name]=$pid
    for port in "$@"; do
        bench_wait_tcp "$port" "$pid" || {
            echo "nginx $name did not come up on $port:" >&2; tail -n 5 "$TMP/$name.err" "$TMP/$name.out" >&2; exit 1; }
    done
    for i in $(seq 50); do   # the workers are forked after the listeners open
        [ -n "$(ps -o pid= --ppid "$pid")" ] && break
        sleep 0.1
    done
    for w in $(ps -o pid= --ppid "$pid"); do EXTRA_PIDS+=("$w"); done
}

# bench_proc NAME PORT... -- COMMAND [ARG...]: a server that stays in the foreground (one process:
# HAProxy -db, caddy run), its output to $TMP/NAME.log; `env VAR=x cmd` keeps the PID (env execs).
bench_proc() {
    local name="$1" ports=() port pid
    shift
    while [ "$#" -gt 0 ] && [ "$1" != -- ]; do ports+=("$1"); shift; done
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    pid=$!; PIDS+=("$pid"); BENCH_PID[$name]=$pid
    for port in "${ports[@]}"; do
        bench_wait_tcp "$port" "$pid" || {
            echo "$name did not come up on $port:" >&2; tail -n 5 "$TMP/$name.log" >&2; exit 1; }
    done
}

# The default backend: a small body on /, a signed-in user on /auth (the introspection answer).
BENCH_BACKEND_LOCATIONS='location / { return 200 "hello from the backend\n"; }
    location = /auth { default_type application/json; return 200 '"'"'{"user":{"id":"u1","name":"Bench"}}'"'"'; }'

bench_backend() {
    local port="$1" locations="${2:-$BENCH_BACKEND_LOCATIONS}"
    cat > "$TMP/backend.conf" <<NGX
worker_processes 1; daemon off; pid $TMP/backend.pid; error_log $TMP/backend.err;
events { worker_connections 4096; }
http { access_log off; client_body_buffer_size 64k;
  server { listen 127.0.0.1:$port; keepalive_requests 100000;
    $locations } }
NGX
    bench_nginx backend "$TMP/backend.conf" "$port"
}

bench_gate_toml() {
    local file="$1" port="$2" admin="$3" upstream="$4" server_lines="${5:-}"
    cat > "$file" <<TOML
[server]
listen = "127.0.0.1:$port"
shutdown_delay = "0s"                # the bench's exit stops the gate at once
shutdown_grace = "1s"
$server_lines
[tls]
cert_file = "$TMP/cert.pem"
key_file = "$TMP/key.pem"
[upstream]
url = "http://127.0.0.1:$upstream"
[admin]
listen = "127.0.0.1:$admin"
TOML
}

# bench_gate NAME CONF ADMIN_PORT [LEVEL=warn [STDOUT=$TMP/NAME.log]]
# One worker thread (BENCH_WORKERS), like nginx's one worker process: the same CPU budget.
bench_gate() {
    local name="$1" conf="$2" admin="$3" level="${4:-warn}" out="${5:-$TMP/$1.log}" pid i
    TOKIO_WORKER_THREADS="${BENCH_WORKERS:-1}" "$GATE" --config "$conf" --log-level "$level" >"$out" 2>"$TMP/$name.stderr" &
    pid=$!; PIDS+=("$pid"); BENCH_PID[$name]=$pid
    for i in $(seq 100); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$admin/readyz")" = 200 ] && return 0
        bench_alive "$pid" || break
        sleep 0.1
    done
    echo "gate $name did not become ready (admin $admin):" >&2
    tail -n 5 "$out" "$TMP/$name.stderr" >&2
    exit 1
}
