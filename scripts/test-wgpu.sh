#!/usr/bin/env bash
# Runs the model's tests on the wgpu backend, and checks receipt fingerprints CPU against wgpu.
# Without a GPU it uses Mesa's software Vulkan driver (llvmpipe). Not part of .ci/run: building
# wgpu and CubeCL adds about 20 minutes cold.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/neuroshard/target}"
if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq mesa-vulkan-drivers
fi
BURN_DEVICE="${BURN_DEVICE:-wgpu}" cargo test --locked -p neuroshard-model --features wgpu -- --test-threads 1
# Receipt fingerprints of the same computation on the CPU and on wgpu must match.
cargo test --locked -p neuroshard-proof --features wgpu -- --test-threads 1 model_tests
