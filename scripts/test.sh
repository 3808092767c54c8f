#!/usr/bin/env bash
# Runs every check and test of NeuroShard on a fresh machine: installs what is missing, then
# lints, runs the CLI demo with a node killed mid-generation, and runs the test suites.
set -euo pipefail
cd "$(dirname "$0")/.."

# Cargo's build folder lives outside the clone so repeated runs are incremental.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/neuroshard/target}"
export CARGO_TERM_COLOR=never
# The folder is kept between runs, so it must not grow without bound: no incremental caches
# (tens of GB over many runs; every run builds from a fresh clone anyway), and test and app
# binaries not rebuilt for three days go (cargo relinks one that is still wanted).
export CARGO_INCREMENTAL=0
mkdir -p "$CARGO_TARGET_DIR"
rm -rf "$CARGO_TARGET_DIR/debug/incremental"
find "$CARGO_TARGET_DIR"/*/deps -maxdepth 1 -type f -perm -u+x ! -name "*.*" -mtime +3 -delete 2>/dev/null || true

# Debian packages: a C toolchain for -sys crates; the webview, tray and image libraries the
# desktop app links; Xvfb, WebKitWebDriver and D-Bus for the real-app test; Chromium for the
# page tests; GLib's Python bindings for the installed-app test's tray host; for the NAT lab,
# nftables, a UPnP IGD (miniupnpd), its client and coturn.
deb_packages=(build-essential pkg-config libwebkit2gtk-4.1-dev libayatana-appindicator3-dev
  librsvg2-dev libxdo-dev libxss-dev xvfb webkit2gtk-driver dbus chromium python3-gi
  iproute2 nftables miniupnpd-nftables miniupnpc coturn)
missing=()
for tool in cc pkg-config Xvfb WebKitWebDriver dbus-run-session chromium ip nft miniupnpd upnpc turnserver; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
pkg-config --exists webkit2gtk-4.1 ayatana-appindicator3-0.1 librsvg-2.0 xscrnsaver 2>/dev/null || missing+=(libs)
/usr/bin/python3 -c "import gi" 2>/dev/null || missing+=(python3-gi)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages (missing: ${missing[*]})"
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${deb_packages[@]}"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo is required (https://rustup.rs)"; exit 1; }
command -v npm >/dev/null 2>&1 || { echo "Node.js and npm are required for the app's page tests"; exit 1; }
# The official OpenAI Python client, which the API check drives.
python3 -c "import openai" 2>/dev/null || python3 -m pip install -q --disable-pip-version-check openai
[[ "$(rustup component list --installed 2>/dev/null)" == *clippy* ]] || rustup component add clippy rustfmt 2>/dev/null || true
# cargo-fuzz builds with the nightly toolchain (sanitizer flags); the machines carry one.
rustup toolchain list | grep -q '^nightly' || { echo "the nightly toolchain is required for cargo fuzz (rustup toolchain install nightly)"; exit 1; }
# npm packages of the front end's tests and the Tauri CLI, at the versions the lock file pins.
# `npm install --no-save` rather than `npm ci`: the lock file lacks the Tauri CLI's packages for
# other platforms (the registry reachable here does not serve them), which `npm ci` refuses.
if [ ! -d ui/node_modules/playwright-core ] || [ ui/package-lock.json -nt ui/node_modules/.package-lock.json ]; then
  (cd ui && npm install --no-save --no-audit --no-fund)
fi
# tauri-driver bridges WebDriver clients to WebKitWebDriver for the real-app test.
tauri_driver_version=2.1.0
if [[ "$(tauri-driver --version 2>/dev/null)" != *"$tauri_driver_version"* ]]; then
  cargo install tauri-driver --version "$tauri_driver_version" --locked
fi
# cargo-deny audits the dependencies' licenses, duplicate versions and sources (deny.toml).
deny_version=0.20.2
if [[ "$(cargo deny --version 2>/dev/null)" != *"$deny_version"* ]]; then
  cargo install cargo-deny --version "$deny_version" --locked
fi
export PATH="$HOME/.cargo/bin:$PATH"

echo "== format"
cargo fmt --all -- --check
echo "== clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== dependency audit: licenses, duplicate versions, sources (cargo deny; advisories need GitHub)"
# The audit reads every platform's crates from the lock file; the build fetched only this one's.
cargo fetch --locked -q
cargo deny --offline check bans licenses sources
echo "== demo with failover"
cargo build --locked -q -p neuroshard-cli --bin neuroshard
"$CARGO_TARGET_DIR/debug/neuroshard" demo --kill-one --max-new-tokens 48
echo "== separate processes: tracker, nodes, generate"
./scripts/cli-smoke.sh "$CARGO_TARGET_DIR/debug/neuroshard"
echo "== the OpenAI-compatible API through the official openai client"
./scripts/api-check.sh "$CARGO_TARGET_DIR/debug/neuroshard"
echo "== desktop package: debug .deb"
# The Tauri CLI works from the root (tauri.conf.json); `-p` picks the app out of the workspace.
ui/node_modules/.bin/tauri build --debug --bundles deb --ci -- -p neuroshard-desktop \
  >"$CARGO_TARGET_DIR/deb-build.log" 2>&1 || {
  tail -40 "$CARGO_TARGET_DIR/deb-build.log"; exit 1; }
deb="$(ls -t "$CARGO_TARGET_DIR"/debug/bundle/deb/*.deb | head -1)"
# List once into a variable: `dpkg-deb | grep -q` under pipefail fails at random when grep
# exits early and tar dies of SIGPIPE.
contents="$(dpkg-deb --contents "$deb")"
grep -q "usr/bin/neuroshard-desktop" <<<"$contents" || { echo "$deb lacks the binary"; exit 1; }
grep -q "usr/share/applications/NeuroShard.desktop" <<<"$contents" || { echo "$deb lacks the menu entry"; exit 1; }
echo "built $deb"
echo "== tests"
log="$(mktemp)"
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
echo "== fuzzing every decoder of remote bytes, 5 s each (scripts/fuzz.sh)"
./scripts/fuzz.sh 5 2>&1 | tee -a "$log" || status=$?
echo "== the app's pages in Chromium (IPC mocked)"
# The chat page's test bridges the page to a loopback swarm of the CLI's processes.
(cd ui && NEUROSHARD_BIN="$CARGO_TARGET_DIR/debug/neuroshard" npm test) 2>&1 | tee -a "$log" || status=$?
echo "== the real app under Xvfb through WebKitWebDriver"
./scripts/test-app.sh "$CARGO_TARGET_DIR/debug/neuroshard" "$CARGO_TARGET_DIR/debug/neuroshard-desktop" 2>&1 | tee -a "$log" || status=$?
echo "== the .deb installed with apt in a throwaway root, started from its menu entry, removed"
./scripts/test-installed.sh "$deb" "$CARGO_TARGET_DIR/debug/neuroshard" 2>&1 | tee -a "$log" || status=$?
# One closing line for the whole run (cargo prints one line per test binary, node one per file).
awk '/^test result:/ { p += $4; f += $6 } /^# pass / { p += $3 } /^# fail / { f += $3 }
  END { printf "workspace: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
