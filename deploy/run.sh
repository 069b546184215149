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
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONFIG_DIR=$(cd "${CONFIG_DIR:-policies/example}" && pwd)
LISTEN_PORT=${LISTEN_PORT:-5000}
TOKEN_PORT=${TOKEN_PORT:-5001}
REGISTRY_PORT=${REGISTRY_PORT:-5002}
ADMIN_PORT=${ADMIN_PORT:-9901}
DEPENDENCY_PROXY_PORT=${DEPENDENCY_PROXY_PORT:-5003}
HUB_PORT=${HUB_PORT:-5004}
CONSUMER_PORT=${CONSUMER_PORT:-5005}
EVENTS_PORT=${EVENTS_PORT:-5006}
DEPENDENCY_PROXY_LISTEN_PORT=${DEPENDENCY_PROXY_LISTEN_PORT:-5007}
CONSUMER=$ROOT/target/release/registry-guard-consumer
RUN_DIR=$ROOT/.run/$(basename "$CONFIG_DIR")
RGCTL=$ROOT/target/release/rgctl
TOKEN_SERVICE=$ROOT/target/release/registry-guard-token-service
WASM=$ROOT/target/filter/registry_guard.wasm
ENVOY=$ROOT/.venv/bin/envoy

for f in principals.json token-service.json; do
  [ -f "$CONFIG_DIR/$f" ] || { echo "error: $CONFIG_DIR/$f is missing (CONFIG_DIR must hold principals.json and token-service.json)" >&2; exit 1; }
done
mkdir -p "$RUN_DIR/storage" "$RUN_DIR/hub-storage" "$RUN_DIR/cache-storage"
setting() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], sys.argv[3]))' "$CONFIG_DIR/token-service.json" "$1" "$2"; }
ISSUER=$(setting issuer registry-guard)
SERVICE=$(setting service container_registry)

ENVIRONMENT=$(setting environment "")
"$RGCTL" keygen --out "$CONFIG_DIR/keys"
"$RGCTL" keygen --out "$CONFIG_DIR/keys" --name operator
# The operator token authorises `rgctl push` to the token service (PUT /bundle).
"$RGCTL" operator-token --out "$CONFIG_DIR/keys"
# First run: sign bundle.json once; the token service takes it as its starting bundle and
# rewrites $CONFIG_DIR/bundle.jws on every push it accepts (its own state).
if [ ! -f "$CONFIG_DIR/bundle.jws" ] && [ -f "$CONFIG_DIR/bundle.json" ]; then
  "$RGCTL" sign "$CONFIG_DIR/bundle.json" --key "$CONFIG_DIR/keys/operator-key.pem" > "$CONFIG_DIR/bundle.jws"
fi
# Envoy boots only from what an operator delivered to it: the bundle in its own ECDS file
# (written by `rgctl push`), never from a file another component writes. With no ECDS file
# yet, the bundle signed above.
ECDS="$RUN_DIR/ecds/registry-guard.json"
if [ -f "$ECDS" ]; then
  python3 - "$ECDS" "$RUN_DIR/envoy-bundle.jws" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
config = json.loads(doc["resources"][0]["typed_config"]["config"]["configuration"]["value"])
bundle = config.get("bundle")
if bundle:
    open(sys.argv[2], "w").write(bundle)
PY
fi
if [ ! -f "$RUN_DIR/envoy-bundle.jws" ] && [ -f "$CONFIG_DIR/bundle.json" ]; then
  "$RGCTL" sign "$CONFIG_DIR/bundle.json" --key "$CONFIG_DIR/keys/operator-key.pem" > "$RUN_DIR/envoy-bundle.jws"
fi
bundle_args=()
[ -f "$RUN_DIR/envoy-bundle.jws" ] && bundle_args=(--bundle "$RUN_DIR/envoy-bundle.jws")
env_args=()
[ -n "$ENVIRONMENT" ] && env_args=(--environment "$ENVIRONMENT")
"$RGCTL" filter-config --realm "http://127.0.0.1:$TOKEN_PORT/jwt/auth" --service "$SERVICE" --issuer "$ISSUER" \
  --jwks "$CONFIG_DIR/keys/jwks.json" --bundle-keys "$CONFIG_DIR/keys/operator-jwks.json" "${bundle_args[@]}" \
  "${env_args[@]}" --client-address x-forwarded-for > "$RUN_DIR/filter.json"
"$RGCTL" filter-resource --config "$RUN_DIR/filter.json" --wasm "$WASM" --out "$RUN_DIR/ecds/registry-guard.json"
# The dependency-proxy endpoint: the same configuration with `"endpoint": "dependency-proxy"`.
"$RGCTL" filter-config --realm "http://127.0.0.1:$TOKEN_PORT/jwt/auth" --service "$SERVICE" --issuer "$ISSUER" \
  --jwks "$CONFIG_DIR/keys/jwks.json" --bundle-keys "$CONFIG_DIR/keys/operator-jwks.json" "${bundle_args[@]}" \
  "${env_args[@]}" --client-address x-forwarded-for --endpoint dependency-proxy > "$RUN_DIR/filter-dependency-proxy.json"
"$RGCTL" filter-resource --config "$RUN_DIR/filter-dependency-proxy.json" --wasm "$WASM" \
  --out "$RUN_DIR/ecds/registry-guard-dependency-proxy.json" --name registry-guard-dependency-proxy
[ -f "$RUN_DIR/http-secret" ] || head -c 32 /dev/urandom | base64 | tr -d '/+=' > "$RUN_DIR/http-secret"
[ -f "$RUN_DIR/events-secret" ] || head -c 32 /dev/urandom | base64 | tr -d '/+=' > "$RUN_DIR/events-secret"
[ -f "$RUN_DIR/consumer-read-token" ] || head -c 32 /dev/urandom | base64 | tr -d '/+=' > "$RUN_DIR/consumer-read-token"
"$RGCTL" render deploy/registry.yml --set STORAGE_DIR="$RUN_DIR/storage" --set REGISTRY_PORT="$REGISTRY_PORT" \
  --set HTTP_SECRET="$(cat "$RUN_DIR/http-secret")" --set NOTIFICATIONS_DISABLED=false \
  --set EVENTS_URL="http://127.0.0.1:$EVENTS_PORT/events" --set EVENTS_SECRET="$(cat "$RUN_DIR/events-secret")" \
  > "$RUN_DIR/registry.yml"
"$RGCTL" render deploy/registry.yml --set STORAGE_DIR="$RUN_DIR/hub-storage" --set REGISTRY_PORT="$HUB_PORT" \
  --set HTTP_SECRET="$(cat "$RUN_DIR/http-secret")" --set NOTIFICATIONS_DISABLED=true \
  --set EVENTS_URL=http://127.0.0.1:1/unused --set EVENTS_SECRET=unused > "$RUN_DIR/hub.yml"
"$RGCTL" render deploy/dependency-proxy.yml --set STORAGE_DIR="$RUN_DIR/cache-storage" \
  --set DEPENDENCY_PROXY_PORT="$DEPENDENCY_PROXY_PORT" --set HUB_PORT="$HUB_PORT" \
  --set HTTP_SECRET="$(cat "$RUN_DIR/http-secret")" > "$RUN_DIR/dependency-proxy.yml"
"$RGCTL" render envoy/envoy.yaml --set ADMIN_PORT="$ADMIN_PORT" --set LISTEN_PORT="$LISTEN_PORT" \
  --set REGISTRY_PORT="$REGISTRY_PORT" --set DEPENDENCY_PROXY_PORT="$DEPENDENCY_PROXY_PORT" \
  --set EVENTS_PORT="$EVENTS_PORT" --set CONSUMER_PORT="$CONSUMER_PORT" --set WASM_PATH="$WASM" \
  --set ECDS_DIR="$RUN_DIR/ecds" --set DEPENDENCY_PROXY_LISTEN_PORT="$DEPENDENCY_PROXY_LISTEN_PORT" > "$RUN_DIR/envoy.yaml"

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

start registry docker-registry serve "$RUN_DIR/registry.yml"
wait_for "http://127.0.0.1:$REGISTRY_PORT/v2/" registry
start hub docker-registry serve "$RUN_DIR/hub.yml"
wait_for "http://127.0.0.1:$HUB_PORT/v2/" hub
if ! curl -sf -o /dev/null "http://127.0.0.1:$HUB_PORT/v2/alpine/manifests/latest" -H 'Accept: application/vnd.oci.image.manifest.v1+json'; then
  "$RGCTL" demo-image --out "$RUN_DIR/alpine-layout" --tag latest --salt "hub alpine" >/dev/null
  skopeo copy -q --dest-tls-verify=false "oci:$RUN_DIR/alpine-layout:latest" "docker://127.0.0.1:$HUB_PORT/alpine:latest"
  echo "seeded the hub with alpine:latest"
fi
start dependency-proxy docker-registry serve "$RUN_DIR/dependency-proxy.yml"
wait_for "http://127.0.0.1:$DEPENDENCY_PROXY_PORT/v2/" "dependency proxy"
start consumer "$CONSUMER" --listen "127.0.0.1:$CONSUMER_PORT" --database "$RUN_DIR/events.sqlite" \
  --jwks "$CONFIG_DIR/keys/jwks.json" --secret-file "$RUN_DIR/events-secret" \
  --read-token-file "$RUN_DIR/consumer-read-token" --retention-days "${CONSUMER_RETENTION_DAYS:-90}"
wait_for "http://127.0.0.1:$CONSUMER_PORT/healthz" "event consumer"
start token "$TOKEN_SERVICE" --config-dir "$CONFIG_DIR" --listen "127.0.0.1:$TOKEN_PORT"
wait_for "http://127.0.0.1:$TOKEN_PORT/healthz" "token service"
start envoy "$ENVOY" -c "$RUN_DIR/envoy.yaml" --concurrency 2 --log-level warn --component-log-level wasm:info
wait_for "http://127.0.0.1:$LISTEN_PORT/v2/" envoy

cat <<MSG

registry-guard is up (config: $CONFIG_DIR)
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
  target/release/rgctl status --envoy-admin http://127.0.0.1:$ADMIN_PORT --token-service http://127.0.0.1:$TOKEN_PORT
Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}" || true
echo "a component exited; stopping the rest" >&2
