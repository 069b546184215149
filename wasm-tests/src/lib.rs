//! Nothing here: the tests in `tests/` exercise `registry-guard-core` compiled to wasm.
