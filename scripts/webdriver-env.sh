# Sourced by test-app.sh and test-installed.sh: what the real app needs to run under Xvfb and
# be driven through tauri-driver and WebKitWebDriver.

# WebKit's GPU paths are not there under Xvfb.
webkit_env=(WEBKIT_DISABLE_COMPOSITING_MODE=1 WEBKIT_DISABLE_DMABUF_RENDERER=1 LIBGL_ALWAYS_SOFTWARE=1)

# start_xvfb LOG: a display of our own, the first free number from 90; sets display and xvfb_pid
# once it takes connections.
start_xvfb() {
  display=90
  while [ -e "/tmp/.X11-unix/X$display" ] || [ -e "/tmp/.X$display-lock" ]; do display=$((display + 1)); done
  Xvfb ":$display" -screen 0 1280x900x24 -nolisten tcp >"$1" 2>&1 &
  xvfb_pid=$!
  for _ in $(seq 100); do [ -e "/tmp/.X11-unix/X$display" ] && break; sleep 0.1; done
}

# await_driver PORT: waits until tauri-driver takes connections on PORT, and points the tests at it.
await_driver() {
  for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && break; sleep 0.1; done
  export TAURI_DRIVER_URL="http://127.0.0.1:$1/"
}
