#!/usr/bin/env bash
# The built .deb as a volunteer gets it: installed with apt, started from its menu entry's Exec
# line under Xvfb by an ordinary user, driven through WebKitWebDriver (ui/tests/installed.test.js),
# with its tray read by a tray host on the session bus, then removed with apt again.
#
# The machine stays clean: everything happens in a throwaway root, an overlay over / whose
# writes go to a tmpfs, in mount, network and process namespaces of its own (loopback only, so
# the app listens on its default port and finds no one it should not; every process started
# inside ends with it). Needs root, or sudo.
# Usage: test-installed.sh DEB CLI_BIN. Screenshots land in ui/test-results/installed-*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
volunteer=volunteer
# Inside the throwaway root: the repository, read-only; the screenshots' folder; the CLI.
inside=/srv/neuroshard
results=/srv/results

case "${NEUROSHARD_INSTALLED_STAGE:-}" in
"")
  deb="$(realpath "$1")"
  bin="$(realpath "$2")"
  driver="$(realpath "${TAURI_DRIVER:-$(command -v tauri-driver || echo "$HOME/.cargo/bin/tauri-driver")}")"
  [ -f "$deb" ] && [ -x "$bin" ] && [ -x "$driver" ] || { echo "usage: $0 DEB CLI_BIN (and tauri-driver)"; exit 2; }
  # The volunteer reads the repository's tests through a read-only bind.
  [ "$(find ui/tests scripts/tray_host.py models/demo ! -perm -o+r -print -quit)" = "" ] ||
    { echo "the repository must be readable by other users (umask 022)"; exit 2; }
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  throwaway="$(mktemp -d)"
  mkdir -p ui/test-results
  status=0
  "${sudo_cmd[@]}" env NEUROSHARD_INSTALLED_STAGE=namespace PATH="$PATH" \
    unshare --mount --net --pid --fork --mount-proc -- "$repo/scripts/test-installed.sh" "$deb" "$bin" "$driver" "$throwaway" || status=$?
  rmdir "$throwaway"
  exit "$status"
  ;;
namespace)
  deb="$1" bin="$2" driver="$3" throwaway="$4"
  # Nothing mounted here reaches the machine's own mount table.
  mount --make-rprivate /
  mount -t tmpfs throwaway "$throwaway"
  mkdir "$throwaway"/{upper,work,root}
  root="$throwaway/root"
  mount -t overlay overlay -o "lowerdir=/,upperdir=$throwaway/upper,workdir=$throwaway/work" "$root"
  for dir in proc sys dev; do mount --rbind "/$dir" "$root/$dir"; done
  bind() { # SOURCE TARGET [ro]: a file or folder of the machine, seen inside the root
    if [ -d "$1" ]; then mkdir -p "$root$2"; else mkdir -p "$(dirname "$root$2")" && touch "$root$2"; fi
    mount --bind "$1" "$root$2"
    [ "${3:-}" != ro ] || mount -o remount,bind,ro "$root$2"
  }
  bind "$repo" "$inside" ro
  bind "$repo/ui/test-results" "$results"
  bind "$deb" /tmp/neuroshard.deb ro
  bind "$bin" /usr/local/bin/neuroshard ro
  bind "$driver" /usr/local/bin/tauri-driver ro
  ip link set lo up
  exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    NEUROSHARD_INSTALLED_STAGE=root "$inside/scripts/test-installed.sh"
  ;;
root)
  entry=/usr/share/applications/NeuroShard.desktop
  [ ! -e /usr/bin/neuroshard-desktop ] || { echo "the throwaway root already has the app"; exit 1; }
  echo "installing the package with apt"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends /tmp/neuroshard.deb >/tmp/apt.log 2>&1 ||
    { cat /tmp/apt.log; exit 1; }
  package="$(dpkg-deb --field /tmp/neuroshard.deb Package)"
  dpkg-query -W -f '${Status}\n' "$package" | grep -qx "install ok installed"
  # The menu entry's command, as a desktop's launcher runs it: field codes (%U, %f...) dropped.
  exec_line="$(sed -n 's/^Exec=//p' "$entry" | head -1)"
  read -ra command <<<"${exec_line//%[a-zA-Z]/}"
  app="$(command -v "${command[0]}")" || { echo "$entry runs ${command[0]}, which is not on PATH"; exit 1; }
  echo "the menu entry runs $exec_line ($app)"
  useradd --create-home --shell /bin/bash "$volunteer"
  runtime="/run/user/$(id -u "$volunteer")"
  install -d -m 700 -o "$volunteer" -g "$volunteer" "$runtime"
  # A display of our own: the first number from 90 that the machine's /tmp shows free.
  display=90
  while [ -e "/tmp/.X11-unix/X$display" ] || [ -e "/tmp/.X$display-lock" ]; do display=$((display + 1)); done
  Xvfb ":$display" -screen 0 1280x900x24 -nolisten tcp >/tmp/xvfb.log 2>&1 &
  xvfb=$!
  for _ in $(seq 100); do [ -e "/tmp/.X11-unix/X$display" ] && break; sleep 0.1; done
  status=0
  runuser -u "$volunteer" -- env -i PATH="$PATH" HOME="/home/$volunteer" USER="$volunteer" \
    XDG_RUNTIME_DIR="$runtime" DISPLAY=":$display" NEUROSHARD_INSTALLED_STAGE=session \
    NEUROSHARD_APP="$app" NEUROSHARD_APP_ARGS="$(/usr/bin/python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${command[@]:1}")" \
    dbus-run-session -- "$inside/scripts/test-installed.sh" 2>/tmp/session.log || status=$?
  # The session's own chatter (bus activations, portals) is shown only when something failed.
  [ "$status" -eq 0 ] || { echo "--- session bus, tauri-driver and app log"; tail -60 /tmp/session.log; }
  kill "$xvfb" 2>/dev/null || true
  cp "/home/$volunteer"/shots/*.png "$results/" 2>/dev/null || true
  echo "removing the package with apt"
  DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq "$package" >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }
  ! dpkg-query -W -f '${Status}\n' "$package" 2>/dev/null | grep -q "ok installed" || { echo "$package is still installed"; exit 1; }
  [ ! -e "$app" ] && [ ! -e "$entry" ] || { echo "apt remove left $app or $entry"; exit 1; }
  exit "$status"
  ;;
session)
  # The volunteer's session bus: tauri-driver, the app it starts and the tray host share it.
  export NEUROSHARD_BIN=/usr/local/bin/neuroshard NEUROSHARD_MODEL="$inside/models/demo"
  export TRAY_HOST="$inside/scripts/tray_host.py" NEUROSHARD_SHOTS="$HOME/shots"
  # WebKit's GPU paths are not there under Xvfb.
  export WEBKIT_DISABLE_COMPOSITING_MODE=1 WEBKIT_DISABLE_DMABUF_RENDERER=1 LIBGL_ALWAYS_SOFTWARE=1
  tauri-driver --port 4444 --native-port 4445 >&2 &
  driver=$!
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/4444) 2>/dev/null && break; sleep 0.1; done
  export TAURI_DRIVER_URL="http://127.0.0.1:4444/"
  status=0
  (cd "$inside/ui" && node --test --test-concurrency=1 tests/installed.test.js) || status=$?
  kill "$driver" 2>/dev/null || true
  exit "$status"
  ;;
esac
