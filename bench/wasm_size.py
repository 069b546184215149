#!/usr/bin/env python3
"""Where the bytes of a .wasm go: code size per crate, from the module's `name` section.

    python3 bench/wasm_size.py target/wasm32-wasip1/release/registry_guard.wasm [--json]

Sections by size, then function bodies grouped by the crate their (demangled-enough) symbol
names start with. Generic code monomorphised into a caller crate is counted under the crate
that defines the function (the first path segment of the symbol), which is what a feature or
dependency change would remove.
"""

import json
import re
import sys

SECTION_NAMES = {0: "custom", 1: "type", 2: "import", 3: "function", 4: "table", 5: "memory", 6: "global",
                 7: "export", 8: "start", 9: "element", 10: "code", 11: "data", 12: "datacount"}


def leb(buf, i):
    result, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return result, i


def sections(buf):
    i = 8
    while i < len(buf):
        sid = buf[i]
        size, j = leb(buf, i + 1)
        yield sid, buf[j:j + size], j + size - i
        i = j + size


def imported_functions(payload):
    n, i = leb(payload, 0)
    count = 0
    for _ in range(n):
        for _ in range(2):  # module, field
            ln, i = leb(payload, i)
            i += ln
        kind = payload[i]
        i += 1
        if kind == 0:
            _, i = leb(payload, i)
            count += 1
        elif kind == 1:  # table: reftype + limits
            i += 1
            flags, i = leb(payload, i)
            _, i = leb(payload, i)
            if flags & 1:
                _, i = leb(payload, i)
        elif kind == 2:  # memory: limits
            flags, i = leb(payload, i)
            _, i = leb(payload, i)
            if flags & 1:
                _, i = leb(payload, i)
        elif kind == 3:  # global: valtype + mut
            i += 2
    return count


def function_names(payload):
    ln, i = leb(payload, 0)
    if payload[i:i + ln] != b"name":
        return None
    i += ln
    names = {}
    while i < len(payload):
        sub = payload[i]
        size, i = leb(payload, i + 1)
        end = i + size
        if sub == 1:
            n, j = leb(payload, i)
            for _ in range(n):
                idx, j = leb(payload, j)
                ln, j = leb(payload, j)
                names[idx] = payload[j:j + ln].decode("utf-8", "replace")
                j += ln
        i = end
    return names


def crate_of(name):
    # Rust v0/legacy mangling: _ZN<len><ident>…; or already readable `crate::path`.
    m = re.match(r"_ZN(\d+)", name)
    if m:
        ln = int(m.group(1))
        start = m.end()
        ident = name[start:start + ln]
        if ident.startswith("_$LT$"):  # <T as Trait>::f — use the implementing type's crate
            inner = re.search(r"_\$LT\$([a-z0-9_]+)\.\.", ident)
            return inner.group(1) if inner else "<impl>"
        return ident
    m = re.match(r"<?([a-z0-9_]+)::", name)
    if m:
        return m.group(1)
    return "(other: libc, wasi, compiler builtins)"


def analyse(path):
    buf = open(path, "rb").read()
    secs = list(sections(buf))
    imports = 0
    names = {}
    code = None
    by_section = {}
    for sid, payload, total in secs:
        label = SECTION_NAMES.get(sid, str(sid))
        if sid == 0:
            ln, i = leb(payload, 0)
            label = "custom:" + payload[i:i + ln].decode("utf-8", "replace")
            if label == "custom:name":
                names = function_names(payload) or {}
        if sid == 2:
            imports = imported_functions(payload)
        if sid == 10:
            code = payload
        by_section[label] = by_section.get(label, 0) + total
    crates = {}
    if code is not None:
        n, i = leb(code, 0)
        for k in range(n):
            size, j = leb(code, i)
            name = names.get(imports + k, "?")
            c = crate_of(name)
            crates[c] = crates.get(c, 0) + size + (j - i)
            i = j + size
    return {"file": path, "bytes": len(buf), "sections": by_section, "code_by_crate": crates}


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    r = analyse(sys.argv[1])
    if "--json" in sys.argv:
        print(json.dumps(r))
        return 0
    print(f"{r['file']}: {r['bytes']:,} bytes")
    for k, v in sorted(r["sections"].items(), key=lambda kv: -kv[1]):
        print(f"  section {k:<24} {v:>10,}")
    print("  code by crate:")
    for k, v in sorted(r["code_by_crate"].items(), key=lambda kv: -kv[1])[:25]:
        print(f"    {k:<40} {v:>10,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
