#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 5) on the nightly
# toolchain, starting from its committed seeds and the inputs of crashes found and fixed
# (fuzz/seeds/TARGET, fuzz/regressions/TARGET). What a run discovers goes to a scratch folder,
# so the committed corpus changes only by hand. A fixed seed keeps a run reproducible. A crash stops the run and leaves its input in
# fuzz/artifacts/TARGET: fix it, then add the input to fuzz/regressions/TARGET.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-5}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/neuroshard/fuzz-target}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --version 0.13.2 --locked
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
targets=$(cargo +nightly fuzz list)
# One build of every target, then each runs from it.
cargo +nightly fuzz build >"$scratch/build.log" 2>&1 || { tail -40 "$scratch/build.log"; exit 1; }
for target in $targets; do
  inputs=("seeds/$target")
  [ -d "regressions/$target" ] && inputs+=("regressions/$target")
  mkdir -p "$scratch/$target"
  if ! cargo +nightly fuzz run "$target" "$scratch/$target" "${inputs[@]}" -- \
      -seed=1 -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$scratch/$target.log" 2>&1; then
    tail -40 "$scratch/$target.log"
    echo "fuzz target $target failed; its input is in fuzz/artifacts/$target"
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$scratch/$target.log" | grep -o '[0-9]*$')
  echo "fuzz $target: ${runs:-?} runs in ${seconds}s, no crash"
done
