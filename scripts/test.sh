#!/usr/bin/env bash
# Runs every check and test of NeuroShard on a fresh machine: installs what is missing, then
# lints, runs the CLI demo with a node killed mid-generation, and runs the test suites.
set -euo pipefail
cd "$(dirname "$0")/.."

# Cargo's build folder lives outside the clone so repeated runs are incremental.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/neuroshard/target}"
export CARGO_TERM_COLOR=never
mkdir -p "$CARGO_TARGET_DIR"

# Debian packages the build needs (a C compiler for a few -sys crates, pkg-config).
missing=()
for tool in cc pkg-config; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: build-essential pkg-config"
  apt-get update -qq && apt-get install -y -qq build-essential pkg-config
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo is required (https://rustup.rs)"; exit 1; }
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt 2>/dev/null || true

echo "== format"
cargo fmt --all -- --check
echo "== clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== demo with failover"
cargo build --locked -q -p neuroshard-node --bin neuroshard
"$CARGO_TARGET_DIR/debug/neuroshard" demo --kill-one --max-new-tokens 16
echo "== separate processes: tracker, nodes, generate"
./scripts/cli-smoke.sh "$CARGO_TARGET_DIR/debug/neuroshard"
echo "== tests"
log="$(mktemp)"
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "workspace: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
