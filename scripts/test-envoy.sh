#!/usr/bin/env bash
# `make test-envoy`: the committed Envoy config as `make run` renders it (`rgctl stack render`
# with the example configuration: both filter endpoints' ECDS files, the registry, hub and
# cache configs) through `envoy --mode validate`, and the example bundle through `rgctl
# validate`. Renders into .run/validate (a copy of policies/example: its own keys).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/.run/validate
RGCTL=$ROOT/target/release/rgctl
ENVOY=$ROOT/.venv/bin/envoy
rm -rf "$OUT"; mkdir -p "$OUT/config"
cp policies/example/{principals.json,token-service.json,bundle.json} "$OUT/config/"
if ! log=$("$RGCTL" stack render --root "$ROOT" --config-dir "$OUT/config" --out "$OUT" --envoy "$ENVOY" 2>&1); then
  echo "$log" >&2; exit 1
fi
"$ENVOY" --mode validate -c "$OUT/envoy.yaml" --log-level error
echo "validated envoy/envoy.yaml (rendered: $OUT/envoy.yaml, with $OUT/ecds/*.json)"
# The same with TLS and the filter fetched by URL (`make run TLS=1`, docs/deploying.md).
for variant in "--tls" "--wasm-url http://127.0.0.1:8080/registry_guard.wasm"; do
  rm -rf "$OUT/variant"
  # shellcheck disable=SC2086
  if ! log=$("$RGCTL" stack render --root "$ROOT" --config-dir "$OUT/config" --out "$OUT/variant" --envoy "$ENVOY" $variant 2>&1); then
    echo "$log" >&2; exit 1
  fi
  "$ENVOY" --mode validate -c "$OUT/variant/envoy.yaml" --log-level error
  echo "validated envoy/envoy.yaml rendered with $variant"
done
"$RGCTL" validate policies/example/bundle.json
