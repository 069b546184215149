// Validates every manifest of deploy/istio against Istio's published CRD schemas, as compiled
// into @kubernetes-models/istio (ajv validators generated from Istio's CRD OpenAPI schemas):
// types, enums, required fields. Like the CRD schema, it does not refuse unknown fields
// (Kubernetes prunes them). The filter configuration the manifests carry is parsed by the
// filter's own parser in crates/ctl/tests/deploy_manifests.rs.
// Usage: node validate.mjs DIR... ; exits non-zero on the first invalid manifest.
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { parseAllDocuments } from "yaml";
import { WasmPlugin } from "@kubernetes-models/istio/extensions.istio.io/v1alpha1/WasmPlugin";

const models = { "extensions.istio.io/v1alpha1/WasmPlugin": WasmPlugin };
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
      const Model = models[`${obj.apiVersion}/${obj.kind}`];
      if (!Model) {
        console.error(`${path}: no published schema here for ${obj.apiVersion} ${obj.kind}`);
        failed++;
        continue;
      }
      try {
        new Model(obj).validate();
        console.log(`ok: ${path}: ${obj.kind} ${obj.metadata?.name} matches the ${obj.apiVersion} CRD schema`);
        checked++;
      } catch (e) {
        console.error(`${path}: ${obj.kind} ${obj.metadata?.name} does not match the ${obj.apiVersion} CRD schema: ${e.message}`);
        failed++;
      }
    }
  }
}
if (failed || !checked) {
  console.error(`${failed} invalid, ${checked} valid`);
  process.exit(1);
}
