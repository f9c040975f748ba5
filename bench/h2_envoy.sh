#!/usr/bin/env bash
# HTTP/2 side by side: Envoy and `tether proxy` in front of one nginx h2c backend, the same h2load load on
# each, in one run. The shared harness runs its h2c test only for the proxy slot, so this gives the Envoy
# figure the issue's HTTP/2 target (>= 0.2x Envoy) is measured against.
#
#   VENV=~/peers bash bench/h2_envoy.sh            # prints a table; --json for one JSON object
#
# Both proxies speak h2c prior knowledge to the client and HTTP/2 to the backend (Envoy: http2_protocol_options
# on its cluster; tether: --to-h2c). Pinning as in the harness: h2load on CPU 0, backend and proxy on CPU 1.
# Environment: VENV (peers venv with envoy) [~/peers], DUR [10], H2_ARGS [-t1 -c4 -m4], ROUNDS [2].
set -euo pipefail
VENV=${VENV:-$HOME/peers}; DUR=${DUR:-10}; H2_ARGS=${H2_ARGS:--t1 -c4 -m4}; ROUNDS=${ROUNDS:-2}
JSON=0; [ "${1:-}" = "--json" ] && JSON=1
for tool in nginx h2load taskset; do command -v "$tool" >/dev/null || { echo "h2_envoy.sh: $tool is required" >&2; exit 1; }; done
ENVOY=${ENVOY:-$VENV/bin/envoy}; [ -x "$ENVOY" ] || { echo "h2_envoy.sh: no envoy at $ENVOY (set VENV or ENVOY)" >&2; exit 1; }
TETHER=${TETHER:-tether}
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; nginx -p "$work" -c "$work/nginx.conf" -s stop 2>/dev/null; rm -rf "$work"' EXIT
BACKEND=32081; ENVOY_PORT=32091; TETHER_PORT=32092
chmod 755 "$work"; mkdir -p "$work/www" "$work/logs"; printf 'hello world\n' >"$work/www/index.html"
cat >"$work/nginx.conf" <<EOF
worker_processes 1; pid $work/nginx.pid; error_log $work/logs/error.log warn;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$BACKEND http2; root $work/www; } }
EOF
taskset -c 1 nginx -p "$work" -c "$work/nginx.conf"
cat >"$work/envoy.yaml" <<EOF
static_resources:
  listeners:
  - address: { socket_address: { address: 127.0.0.1, port_value: $ENVOY_PORT } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: h2
          codec_type: AUTO
          route_config: { virtual_hosts: [{ name: all, domains: ["*"], routes: [{ match: { prefix: "/" }, route: { cluster: be } }] }] }
          http_filters: [{ name: envoy.filters.http.router, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } }]
  clusters:
  - name: be
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment: { cluster_name: be, endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $BACKEND } } } }] }] }
EOF
taskset -c 1 "$ENVOY" --concurrency 1 -l error -c "$work/envoy.yaml" >"$work/logs/envoy.log" 2>&1 &
taskset -c 1 $TETHER proxy --listen 127.0.0.1:$TETHER_PORT --to 127.0.0.1:$BACKEND --to-h2c 127.0.0.1:$BACKEND \
  --admin 127.0.0.1:0 >"$work/logs/tether.log" 2>&1 &
for port in $ENVOY_PORT $TETHER_PORT; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
measure() {  # port -> requests per second (h2load's "finished in ... req/s"), failures checked
  local out; out=$(taskset -c 0 h2load $H2_ARGS -D "$DUR" "http://127.0.0.1:$1/index.html" 2>&1)
  if ! grep -q " 0 failed" <<<"$out"; then echo "h2_envoy.sh: failures through :$1" >&2; grep "requests:" <<<"$out" >&2; fi
  awk '/finished in/{for(i=1;i<=NF;i++) if($i=="req/s,") print $(i-1)}' <<<"$out"
}
taskset -c 0 h2load -n 2000 $H2_ARGS "http://127.0.0.1:$ENVOY_PORT/index.html" >/dev/null 2>&1
taskset -c 0 h2load -n 2000 $H2_ARGS "http://127.0.0.1:$TETHER_PORT/index.html" >/dev/null 2>&1
envoy_runs=(); tether_runs=()
for _ in $(seq "$ROUNDS"); do  # alternate, so drift in the machine's load hits both
  envoy_runs+=("$(measure $ENVOY_PORT)"); tether_runs+=("$(measure $TETHER_PORT)")
done
best() { printf '%s\n' "$@" | sort -g | tail -1; }
envoy=$(best "${envoy_runs[@]}"); tether=$(best "${tether_runs[@]}")
ratio=$(awk -v t="$tether" -v e="$envoy" 'BEGIN { printf "%.2f", t / e }')
if [ "$JSON" = 1 ]; then
  printf '{"envoy_rps": %s, "tether_rps": %s, "ratio": %s, "h2load": "%s", "duration_s": %s}\n' \
    "$envoy" "$tether" "$ratio" "$H2_ARGS" "$DUR"
else
  printf '%-8s %12s\n' proxy "req/s (best of $ROUNDS)" envoy "$envoy" tether "$tether"
  printf 'tether / envoy = %sx (h2load %s, %ss)\n' "$ratio" "$H2_ARGS" "$DUR"
fi
