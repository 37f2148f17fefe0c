#!/usr/bin/env bash
# Plain-route GET through two gate binaries, interleaved A/B rounds, same nginx backend and
# TLS cert, one worker thread each (e.g. a branch against main). Loopback only.
#
#   bench/ab-plain-route.sh GATE_A GATE_B [duration=8s]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ $# -ge 2 ] || { echo "usage: $0 GATE_A GATE_B [duration=8s]" >&2; exit 1; }
A="$1"; B="$2"; DUR="${3:-8s}"
bench_need nginx wrk openssl curl
bench_port_free 18280 19643 19644 19290 19291
bench_init
bench_cert
bench_backend 18280
bench_gate_toml "$TMP/a.toml" 19643 19290 18280
bench_gate_toml "$TMP/b.toml" 19644 19291 18280
GATE="$A" bench_gate a "$TMP/a.toml" 19290
GATE="$B" bench_gate b "$TMP/b.toml" 19291
for round in 1 2 3; do
  for n in a b; do
    port=$([ $n = a ] && echo 19643 || echo 19644)
    wrk -t1 -c64 -d2s "https://127.0.0.1:$port/" >/dev/null 2>&1 || true
    echo "round $round $n: $(wrk -t1 -c64 -d"$DUR" --latency "https://127.0.0.1:$port/" | grep -E 'Requests/sec|50%|99%' | tr -s ' ' | paste -sd' ')"
  done
done
