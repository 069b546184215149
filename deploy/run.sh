#!/usr/bin/env bash
# `make run`: the registry, the token service and Envoy with the registry-guard filter, in the
# foreground, on loopback. Ctrl-C stops everything this script started.
#
#   CONFIG_DIR   directory with principals.json and token-service.json (default policies/example)
#   LISTEN_PORT  Envoy, the registry endpoint for clients (5000)
#   TOKEN_PORT   token service (5001)
#   REGISTRY_PORT  the stock registry, reached only through Envoy (5002)
#   ADMIN_PORT   Envoy admin (9901)
#   DEPENDENCY_PROXY_PORT  the pull-through cache behind /v2/<group>/dependency_proxy/containers/ (5003)
#   HUB_PORT     the cache's upstream "hub", a local registry seeded with alpine:latest (5004)
#   CONSUMER_PORT  the reference event consumer (5005)
#   EVENTS_PORT  Envoy's notifications listener: registry → filter (events role) → consumer (5006)
#   CONSUMER_RETENTION_DAYS  days the consumer keeps raw event rows (90)
#   DEPENDENCY_PROXY_LISTEN_PORT  Envoy's dependency-proxy endpoint (the group dependency proxy on its own listener) (5007)
#   PORT_BASE    number every port from it instead (listen PORT_BASE … admin PORT_BASE+8; the
#                *_PORT above still override), so that several stacks run side by side
#   RUN_DIR      where the rendered files and state go (.run/<config>, or .run/<config>-PORT_BASE)
#   TLS=1        clients reach Envoy over TLS: a development CA and certificate in $RUN_DIR/tls/
#                (trust $RUN_DIR/tls/ca.pem), the realm https on Envoy (docs/deploying.md)
#   BUNDLE_SOURCE  how the filter follows the token service's bundle: long-poll (default), poll,
#                oci (the OCI artifact registry-guard/policy:prod in the stack's registry:
#                `rgctl push --oci`, docs/fleet.md), or none (bundles reach Envoy only through
#                its ECDS files, `rgctl push --envoy`)
#   KEYS_SOURCE  where the filter's trusted token keys come from: token-service (default: its
#                `/jwks`, fetched every KEYS_REFRESH_SECONDS, 30; the rendered keys are the boot
#                fallback) or none (only the configuration's keys, rotated with `rgctl push-keys`)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONFIG_DIR=$(cd "${CONFIG_DIR:-policies/example}" && pwd)
RGCTL=$ROOT/target/release/rgctl
# Every file is rendered by `rgctl stack render` (ports: PORT_BASE, then each *_PORT given);
# this script only starts what $RUN_DIR/stack.env lists.
port_args=()
[ -n "${PORT_BASE:-}" ] && port_args+=(--port-base "$PORT_BASE")
for p in listen:LISTEN_PORT token:TOKEN_PORT registry:REGISTRY_PORT admin:ADMIN_PORT \
         dependency-proxy:DEPENDENCY_PROXY_PORT hub:HUB_PORT consumer:CONSUMER_PORT events:EVENTS_PORT \
         dependency-proxy-listen:DEPENDENCY_PROXY_LISTEN_PORT; do
  var=${p#*:}
  [ -n "${!var:-}" ] && port_args+=(--ports "${p%%:*}=${!var}")
done
RUN_DIR=${RUN_DIR:-$ROOT/.run/$(basename "$CONFIG_DIR")${PORT_BASE:+-$PORT_BASE}}
[ "${TLS:-0}" = 1 ] && port_args+=(--tls)
"$RGCTL" stack render --root "$ROOT" --config-dir "$CONFIG_DIR" --out "$RUN_DIR" "${port_args[@]}" \
  --consumer-retention-days "${CONSUMER_RETENTION_DAYS:-90}" --bundle-source "${BUNDLE_SOURCE:-long-poll}" \
  --keys-source "${KEYS_SOURCE:-token-service}" --keys-refresh-seconds "${KEYS_REFRESH_SECONDS:-30}" > /dev/null
# shellcheck source=/dev/null
source "$RUN_DIR/stack.env"

pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping registry-guard (${pids[*]})"
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

# start NAME CMD...: run in the background, each output line prefixed with [NAME].
start() {
  local name=$1; shift
  "$@" > >(sed -u "s/^/[$name] /") 2>&1 &
  pids+=($!)   # the component itself, not a wrapper: `kill` reaches it
}
wait_for() { # URL NAME
  for _ in $(seq 1 100); do
    if curl -s -o /dev/null "$1"; then return 0; fi
    sleep 0.1
  done
  echo "error: $2 did not come up at $1" >&2; exit 1
}

# run NAME: start a process of stack.env (its command line) and wait until it answers.
run() {
  local var=${1//-/_}; var=${var^^}
  local -n cmd=STACK_CMD_$var
  local ready=STACK_READY_$var
  start "$1" "${cmd[@]}"
  wait_for "${!ready}" "$1"
}

run registry
run hub
if ! curl -sf -o /dev/null "http://127.0.0.1:$HUB_PORT/v2/alpine/manifests/latest" -H 'Accept: application/vnd.oci.image.manifest.v1+json'; then
  "$RGCTL" demo-image --out "$RUN_DIR/alpine-layout" --tag latest --salt "hub alpine" >/dev/null
  skopeo copy -q --dest-tls-verify=false "oci:$RUN_DIR/alpine-layout:latest" "docker://127.0.0.1:$HUB_PORT/alpine:latest"
  echo "seeded the hub with alpine:latest"
fi
run dependency-proxy
run consumer
run token-service
run_envoy() {
  if [ "${TLS:-0}" != 1 ]; then run envoy; return; fi
  start envoy "${STACK_CMD_ENVOY[@]}"
  for _ in $(seq 1 100); do
    if curl -s -o /dev/null --cacert "$STACK_FILE_TLS_CA" "https://127.0.0.1:$LISTEN_PORT/v2/"; then return 0; fi
    sleep 0.1
  done
  echo "error: envoy did not come up at https://127.0.0.1:$LISTEN_PORT" >&2; exit 1
}
run_envoy

if [ "${TLS:-0}" = 1 ]; then
  mkdir -p "$RUN_DIR/tls/certs.d" && cp "$STACK_FILE_TLS_CA" "$RUN_DIR/tls/certs.d/ca.crt"
  cat <<MSG

TLS (TLS=1): Envoy presents a certificate for 127.0.0.1 from the development CA $STACK_FILE_TLS_CA;
  realm: https://127.0.0.1:$LISTEN_PORT/jwt/auth (Envoy routes it to the token service)
  skopeo login --tls-verify=true --cert-dir $RUN_DIR/tls/certs.d 127.0.0.1:$LISTEN_PORT
  curl --cacert $STACK_FILE_TLS_CA https://127.0.0.1:$LISTEN_PORT/v2/
  (replace --tls-verify=false below with --tls-verify=true --cert-dir $RUN_DIR/tls/certs.d)
MSG
fi

cat <<MSG

registry-guard is up (config: $CONFIG_DIR; files: $RUN_DIR; Envoy base id $ENVOY_BASE_ID)
  registry endpoint (Envoy + filter): http://127.0.0.1:$LISTEN_PORT   e.g. skopeo login --tls-verify=false 127.0.0.1:$LISTEN_PORT
  token service:                      http://127.0.0.1:$TOKEN_PORT/jwt/auth
  stock registry (loopback only):     http://127.0.0.1:$REGISTRY_PORT
  dependency proxy endpoint:          http://127.0.0.1:$DEPENDENCY_PROXY_LISTEN_PORT   e.g. skopeo login --tls-verify=false 127.0.0.1:$DEPENDENCY_PROXY_LISTEN_PORT
                                      skopeo inspect --tls-verify=false docker://127.0.0.1:$DEPENDENCY_PROXY_LISTEN_PORT/acme/dependency_proxy/containers/alpine:latest
    (also on the registry endpoint:   127.0.0.1:$LISTEN_PORT/<group>/dependency_proxy/containers/alpine:latest; cache :$DEPENDENCY_PROXY_PORT, hub :$HUB_PORT)
  Envoy admin / stats:                http://127.0.0.1:$ADMIN_PORT/stats?filter=registry_guard
  event consumer (counts):            curl -H "Authorization: Bearer \$(cat $RUN_DIR/consumer-read-token)" 'http://127.0.0.1:$CONSUMER_PORT/counts?period=week'   (open: /metrics)

Push a policy bundle (edit $CONFIG_DIR/bundle.json, raise "revision"):
  target/release/rgctl sign $CONFIG_DIR/bundle.json --key $CONFIG_DIR/keys/operator-key.pem > /tmp/bundle.jws
  target/release/rgctl push /tmp/bundle.jws --operator-token-file $CONFIG_DIR/keys/operator-token \\
    --envoy $RUN_DIR/ecds/registry-guard.json=http://127.0.0.1:$ADMIN_PORT \\
    --envoy $RUN_DIR/ecds/registry-guard-dependency-proxy.json=http://127.0.0.1:$ADMIN_PORT --token-service http://127.0.0.1:$TOKEN_PORT
  (the filter follows the token service's bundle, BUNDLE_SOURCE=${BUNDLE_SOURCE:-long-poll}: --token-service alone
   reaches it; the --envoy targets also keep the bundle Envoy boots with current)
  target/release/rgctl status --envoy-admin http://127.0.0.1:$ADMIN_PORT --token-service http://127.0.0.1:$TOKEN_PORT
Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}" || true
echo "a component exited; stopping the rest" >&2
