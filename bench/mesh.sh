#!/usr/bin/env bash
# The "tethermesh" setup of bench/run.sh: the meshed path with mTLS, in the harness's proxy slot.
#
#   load generator -> outbound `tether proxy` ($LISTEN_PORT) =mTLS=> inbound `tether proxy` -> backend
#
# Both proxies get their certificates from a real `tether identity serve` started here (a mesh made with
# `tether identity init` in a temporary directory, tokens from `tether identity token`), so what is measured
# is what a meshed pair does in production: identity service, agents, TLS 1.3 between the proxies, HTTP/1.1
# riding HTTP/2 between them. The identity service is idle once both proxies are certified (24 h
# certificates); it stays in the process group, so its CPU counts as the proxy's.
#
# Environment: the harness's LISTEN_HOST, LISTEN_PORT, UPSTREAM_HOST, UPSTREAM_PORT; TETHER (the command,
# default `tether`); MESH_MTLS=0 for the same pair without identities (plaintext HTTP/2 between the proxies,
# setup "tethermeshplain"), to tell what mTLS costs from what the meshed hop costs. Ports used besides
# LISTEN_PORT: LISTEN_PORT+1 (inbound), +2 (identity), +3 and +4 (the proxies' admin).
# The harness stops the whole process group with SIGTERM; the temporary directory goes with it.
set -euo pipefail
TETHER=${TETHER:-tether}
INBOUND_PORT=$((LISTEN_PORT + 1))
IDENTITY_PORT=$((LISTEN_PORT + 2))
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait; rm -rf "$DIR"' EXIT
trap 'exit 0' TERM INT

wait_port() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "mesh.sh: nothing listens on port $1" >&2
  return 1
}
wait_ready() {
  for _ in $(seq 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/ready")" = 200 ] && return 0
    sleep 0.05
  done
  echo "mesh.sh: the proxy with admin port $1 got no certificate" >&2
  return 1
}

$TETHER identity init --out "$DIR/mesh" >/dev/null
$TETHER identity token --dir "$DIR/mesh" --namespace bench --serviceaccount client >"$DIR/client.token"
$TETHER identity token --dir "$DIR/mesh" --namespace bench --serviceaccount server >"$DIR/server.token"
SUFFIX=bench.serviceaccount.identity.linkerd.cluster.local

MESH_MTLS=${MESH_MTLS:-1}
identity() {  # identity SERVICEACCOUNT: the identity: block of a proxy's config file
  [ "$MESH_MTLS" = 1 ] || return 0
  printf 'identity:\n  local_name: %s.%s\n  svc_addr: 127.0.0.1:%s\n  trust_anchors: %s\n  token_file: %s\n' \
    "$1" "$SUFFIX" "$IDENTITY_PORT" "$DIR/mesh/trust-anchor.crt" "$DIR/$1.token"
}
cat >"$DIR/inbound.yaml" <<EOF
admin: 127.0.0.1:$((LISTEN_PORT + 3))
outbound: {listen: 127.0.0.1:0}
inbound: {listen: 127.0.0.1:$INBOUND_PORT, to: "$UPSTREAM_HOST:$UPSTREAM_PORT"}
$(identity server)
EOF
# The load generator's requests say Host: 127.0.0.1:LISTEN_PORT; that host is the meshed route.
cat >"$DIR/outbound.yaml" <<EOF
admin: 127.0.0.1:$((LISTEN_PORT + 4))
outbound:
  listen: $LISTEN_HOST:$LISTEN_PORT
  routes: {"$LISTEN_HOST": ["$UPSTREAM_HOST:$UPSTREAM_PORT"]}
  meshed: {"$LISTEN_HOST": {port: $INBOUND_PORT$([ "$MESH_MTLS" = 1 ] && echo ", identity: server.$SUFFIX")}}
$(identity client)
EOF

if [ "$MESH_MTLS" = 1 ]; then
  $TETHER identity serve --dir "$DIR/mesh" --listen "127.0.0.1:$IDENTITY_PORT" --workers 2 &
  wait_port "$IDENTITY_PORT"
fi
$TETHER proxy --config "$DIR/inbound.yaml" &
wait_ready $((LISTEN_PORT + 3))
$TETHER proxy --config "$DIR/outbound.yaml" &
wait_ready $((LISTEN_PORT + 4))
echo "mesh.sh: meshed pair ready (mTLS: $MESH_MTLS): $LISTEN_HOST:$LISTEN_PORT => 127.0.0.1:$INBOUND_PORT -> $UPSTREAM_HOST:$UPSTREAM_PORT" >&2
wait
