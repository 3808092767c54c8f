#!/usr/bin/env bash
# The real desktop app under Xvfb, driven through tauri-driver and WebKitWebDriver, with its
# embedded node on loopback. Usage: test-app.sh CLI_BIN APP_BIN. Screenshots land in
# ui/test-results/app-*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(realpath "$1")"
app="$(realpath "$2")"
driver="${TAURI_DRIVER:-$(command -v tauri-driver || echo "$HOME/.cargo/bin/tauri-driver")}"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  # dbus-run-session does not pass the signal on to the driver it started.
  [ -n "${port:-}" ] && pkill -f -- "--port $port --native-port" 2>/dev/null || true
  wait 2>/dev/null || true
  # The desktop portal may leave its document store mounted under the test's home.
  fusermount -uz "$work/home/.cache/doc" 2>/dev/null || umount -l "$work/home/.cache/doc" 2>/dev/null || true
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

source scripts/webdriver-env.sh
start_xvfb "$work/xvfb.log"
pids+=("$xvfb_pid")
export DISPLAY=":$display"

# The app's every path, passed down through tauri-driver and WebKitWebDriver to the app.
export NEUROSHARD_BIN="$bin" NEUROSHARD_APP="$app"
export NEUROSHARD_CONFIG="$work/config" NEUROSHARD_HOME="$work/data"
export NEUROSHARD_MODEL_DIR="$work/model" NEUROSHARD_LISTEN="127.0.0.1:0" NEUROSHARD_LAN=off
export HOME="$work/home" XDG_CONFIG_HOME="$work/home/.config" XDG_DATA_HOME="$work/home/.local/share"
mkdir -p "$HOME"
export "${webkit_env[@]}"

port=4444
while (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 2)); done
dbus-run-session -- "$driver" --port "$port" --native-port "$((port + 1))" >"$work/driver.log" 2>&1 & pids+=($!)
await_driver "$port"

status=0
(cd ui && node --test --test-concurrency=1 tests/app.test.js) || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- tauri-driver and app log"; tail -50 "$work/driver.log"
fi
exit "$status"
