// Runs a wasm32-wasip1 command (rg-bench built for wasm) under Node's WASI and V8 — the engine
// family of Envoy's envoy.wasm.runtime.v8. Usage:
//   node bench/wasm/run.mjs target/wasm32-wasip1/release/rg-bench.wasm DATA_DIR ARGS…
// DATA_DIR is visible to the command as /data.
import { readFileSync } from 'node:fs';
import { WASI } from 'node:wasi';
import { argv, exit } from 'node:process';

const [wasmPath, dataDir, ...args] = argv.slice(2);
if (!wasmPath || !dataDir) {
  console.error('usage: run.mjs FILE.wasm DATA_DIR ARGS…');
  exit(2);
}
const wasi = new WASI({ version: 'preview1', args: ['rg-bench', ...args], env: {}, preopens: { '/data': dataDir }, returnOnExit: true });
const module = await WebAssembly.compile(readFileSync(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
// Note: Node 20 sometimes crashes (SIGSEGV) right after an instance that grew its linear memory
// to a few hundred MiB has returned; rg-bench therefore ends a successful run with the line
// {"bench":"done"}, which bench/run.py checks instead of Node's exit status.
process.exitCode = wasi.start(instance) ?? 0;
