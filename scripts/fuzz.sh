#!/usr/bin/env bash
# Runs every cargo-fuzz target in FUZZ_TARGETS for SECONDS each (`make fuzz`, `make fuzz-smoke`;
# docs/fuzzing.md). Each target starts from the committed seeds (fuzz/seeds/<target>) and keeps
# what it finds in fuzz/corpus/<target> (not committed); a crash stops the run and leaves its
# input in fuzz/artifacts/<target>/ — turn it into a core regression test.
#
# cargo-fuzz wants a nightly toolchain (sanitizers); none is downloaded here: NIGHTLY names an
# installed one (default `nightly`). Without it the stable toolchain builds the targets
# (RUSTC_BOOTSTRAP=1) with libFuzzer's coverage but no AddressSanitizer (its runtime ships with
# nightly only).
#
# usage: scripts/fuzz.sh SECONDS   (env: FUZZ_TARGETS, NIGHTLY, CARGO_FUZZ)
set -euo pipefail

seconds=${1:?usage: scripts/fuzz.sh SECONDS}
targets=${FUZZ_TARGETS:-token route bundle envelope}
nightly=${NIGHTLY:-nightly}
cargo_fuzz=${CARGO_FUZZ:-cargo-fuzz}

if rustup run "$nightly" rustc --version >/dev/null 2>&1; then
  toolchain=(env "RUSTUP_TOOLCHAIN=$nightly")
  flags=()
else
  toolchain=(env RUSTUP_TOOLCHAIN=stable RUSTC_BOOTSTRAP=1)
  flags=(--sanitizer none)
fi
echo "fuzz toolchain: ${toolchain[*]:1} ${flags[*]:-}"

for t in $targets; do
  mkdir -p "fuzz/corpus/$t"
  log="fuzz/corpus/$t.log"
  echo "fuzz: $t, $seconds s (log: $log)"
  if ! "${toolchain[@]}" "$cargo_fuzz" fuzz run "${flags[@]}" --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      "-max_total_time=$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED: the crashing input is in fuzz/artifacts/$t/"
    exit 1
  fi
  { grep -E "^(INFO: seed corpus|Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" || true; } | sed "s/^/  /"
done
