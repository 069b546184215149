// Validates every manifest of the given directories against the control planes' published
// schemas, as compiled into the kubernetes-models packages (ajv validators): types, enums,
// required fields. Like a CRD schema, they do not refuse unknown fields (Kubernetes prunes them).
// - Istio's WasmPlugin and EnvoyFilter (the backstop): @kubernetes-models/istio, generated from Istio's CRD OpenAPI schemas.
// - Envoy Gateway's EnvoyExtensionPolicy: @kubernetes-models/envoy-gateway, generated from
//   Envoy Gateway's API types (Go package github.com/envoyproxy/gateway/api/v1alpha1, the
//   source its CRDs are generated from).
// Each valid manifest is also validated once more with a field broken (`broken` below): the
// schema must refuse that copy, so a validator that accepts anything fails here.
// The filter configuration the manifests carry is parsed by the filter's own parser in
// crates/ctl/tests/deploy_manifests.rs.
// Usage: node validate.mjs DIR... ; exits non-zero on the first invalid manifest.
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { parseAllDocuments } from "yaml";
import { WasmPlugin } from "@kubernetes-models/istio/extensions.istio.io/v1alpha1/WasmPlugin";
import { EnvoyFilter } from "@kubernetes-models/istio/networking.istio.io/v1alpha3/EnvoyFilter";
import { EnvoyExtensionPolicy } from "@kubernetes-models/envoy-gateway/gateway.envoyproxy.io/v1alpha1/EnvoyExtensionPolicy";

// The model of each kind, and a copy of a manifest with a value its schema forbids.
const models = {
  "extensions.istio.io/v1alpha1/WasmPlugin": {
    Model: WasmPlugin,
    broken: (obj) => ({ ...obj, spec: { ...obj.spec, failStrategy: "FAIL_SOMETIMES" } }),
  },
  "networking.istio.io/v1alpha3/EnvoyFilter": {
    Model: EnvoyFilter,
    broken: (obj) => ({
      ...obj,
      spec: {
        ...obj.spec,
        configPatches: (obj.spec?.configPatches ?? []).map((p) => ({ ...p, patch: { ...p.patch, operation: "INSERT_SOMEWHERE" } })),
      },
    }),
  },
  "gateway.envoyproxy.io/v1alpha1/EnvoyExtensionPolicy": {
    Model: EnvoyExtensionPolicy,
    broken: (obj) => ({
      ...obj,
      spec: { ...obj.spec, wasm: (obj.spec?.wasm ?? []).map((w) => ({ ...w, code: { ...w.code, type: "Tarball" } })) },
    }),
  },
};
let checked = 0;
let failed = 0;
for (const dir of process.argv.slice(2)) {
  for (const file of readdirSync(dir).filter((f) => f.endsWith(".yaml")).sort()) {
    const path = join(dir, file);
    for (const doc of parseAllDocuments(readFileSync(path, "utf8"))) {
      if (doc.errors.length) {
        console.error(`${path}: not YAML: ${doc.errors[0].message}`);
        failed++;
        continue;
      }
      const obj = doc.toJS();
      const kind = models[`${obj.apiVersion}/${obj.kind}`];
      if (!kind) {
        console.error(`${path}: no published schema here for ${obj.apiVersion} ${obj.kind}`);
        failed++;
        continue;
      }
      try {
        new kind.Model(obj).validate();
        console.log(`ok: ${path}: ${obj.kind} ${obj.metadata?.name} matches the ${obj.apiVersion} schema`);
        checked++;
      } catch (e) {
        console.error(`${path}: ${obj.kind} ${obj.metadata?.name} does not match the ${obj.apiVersion} schema: ${e.message}`);
        failed++;
        continue;
      }
      let refused = false;
      try {
        new kind.Model(kind.broken(obj)).validate();
      } catch {
        refused = true;
      }
      if (!refused) {
        console.error(`${path}: the ${obj.apiVersion} ${obj.kind} schema accepted a broken copy: it checks nothing`);
        failed++;
      }
    }
  }
}
if (failed || !checked) {
  console.error(`${failed} invalid, ${checked} valid`);
  process.exit(1);
}
