#!/usr/bin/env bash
# The built .deb as a volunteer gets it: installed with apt, started from its menu entry's Exec
# line under Xvfb by an ordinary user, driven through WebKitWebDriver (ui/tests/installed.test.js),
# with its tray read by a tray host on the session bus, then removed with apt again.
#
# The machine stays clean: everything happens in a throwaway root, an overlay over / whose
# writes go to a tmpfs, in mount, network and process namespaces of its own (loopback only, so
# the app listens on its default port and finds no one it should not; every process started
# inside ends with it). The overlay shows the root file system only: what the test runs
# from elsewhere (the CLI, tauri-driver, node) is bound in. The root holds this machine's
# packages, so apt finds the app's dependencies installed; that its Depends name every library
# the app loads is checked apart. Needs root, or sudo.
# Usage: test-installed.sh DEB CLI_BIN. Screenshots land in ui/test-results/installed-*.png.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
volunteer=volunteer
# Inside the throwaway root: the repository, read-only; the screenshots' folder.
inside=/srv/neuroshard
results=/srv/results
source "$repo/scripts/webdriver-env.sh"

case "${NEUROSHARD_INSTALLED_STAGE:-}" in
"")
  usage() { echo "usage: $0 DEB CLI_BIN (with tauri-driver and node on PATH)"; exit 2; }
  [ $# -eq 2 ] || usage
  deb="$(realpath "$1")" bin="$(realpath "$2")"
  driver="$(realpath "${TAURI_DRIVER:-$(command -v tauri-driver || echo "$HOME/.cargo/bin/tauri-driver")}")"
  node="$(realpath "$(command -v node)")" || usage
  [ -f "$deb" ] && [ -x "$bin" ] && [ -x "$driver" ] || usage
  cd "$repo"
  # The volunteer reads the repository's tests and their packages through a read-only bind.
  [ -z "$(find ui/tests ui/node_modules scripts models/demo \( \( -type d ! -perm -o+rx \) -o ! -perm -o+r \) -print -quit)" ] ||
    { echo "the repository must be readable by other users (umask 022)"; exit 2; }
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  throwaway="$(mktemp -d)"
  trap 'rmdir "$throwaway"' EXIT
  mkdir -p ui/test-results
  "${sudo_cmd[@]}" env NEUROSHARD_INSTALLED_STAGE=namespace PATH="$PATH" \
    unshare --mount --net --pid --fork --mount-proc -- "$repo/scripts/test-installed.sh" \
    "$deb" "$bin" "$driver" "$node" "$throwaway"
  ;;
namespace)
  deb="$1" bin="$2" driver="$3" node="$4" throwaway="$5"
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
  bind "$node" /usr/local/bin/node ro
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
  [ "$(dpkg-query -W -f '${Status}' "$package")" = "install ok installed" ]
  # The menu entry's command, as a desktop's launcher runs it: field codes (%U, %f...) dropped.
  exec_line="$(sed -n 's/^Exec=//p' "$entry" | head -1)"
  read -ra command <<<"${exec_line//%[a-zA-Z]/}"
  app="$(command -v "${command[0]}")" || { echo "$entry runs ${command[0]}, which is not on PATH"; exit 1; }
  echo "the menu entry runs $exec_line ($app)"
  # Every library the app loads comes from a package its Depends bring, directly or not.
  wanted="$(apt-cache depends --recurse --installed --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances "$package" | sed -n 's/:.*//; /^[a-z0-9]/p' | sort -u)"
  libraries="$(ldd "$app")"
  for soname in $(readelf -d "$app" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    # "libfoo.so.1 => /path (0x...)", or for the loader "/path/ld-linux-x86-64.so.2 (0x...)".
    path="$(awk -v so="$soname" '$1 == so && $2 == "=>" { print $3 } $1 ~ ("/" so "$") { print $1 }' <<<"$libraries")"
    path="$(realpath "$path")"
    from="$(dpkg-query -S "$path" 2>/dev/null || dpkg-query -S "${path#/usr}" 2>/dev/null)" ||
      { echo "no package holds $soname ($path)"; exit 1; }
    grep -qx "${from%%:*}" <<<"$wanted" || { echo "$package does not depend on ${from%%:*}, which has $soname"; exit 1; }
  done
  useradd --create-home --shell /bin/bash "$volunteer"
  runtime="/run/user/$(id -u "$volunteer")"
  install -d -m 700 -o "$volunteer" -g "$volunteer" "$runtime"
  # (The machine's /tmp shows through the overlay, so its displays count as taken.)
  start_xvfb /tmp/xvfb.log
  status=0
  # A bound on the whole session: a hang fails the test, and the package is still removed.
  timeout -k 10 900 runuser -u "$volunteer" -- env -i PATH="$PATH" HOME="/home/$volunteer" USER="$volunteer" \
    XDG_RUNTIME_DIR="$runtime" DISPLAY=":$display" NEUROSHARD_INSTALLED_STAGE=session \
    NEUROSHARD_APP="$app" NEUROSHARD_APP_ARGS="$(/usr/bin/python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${command[@]:1}")" \
    dbus-run-session -- "$inside/scripts/test-installed.sh" 2>/tmp/session.log || status=$?
  # The session's own chatter (bus activations, portals) is shown only when something failed.
  [ "$status" -eq 0 ] || { echo "--- session bus, tauri-driver and app log"; tail -60 /tmp/session.log; }
  kill "$xvfb_pid" 2>/dev/null || true
  for shot in "/home/$volunteer"/shots/*.png; do
    [ -e "$shot" ] && cp "$shot" "$results/" && chown --reference="$results" "$results/${shot##*/}"
  done
  echo "removing the package with apt"
  DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq "$package" >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }
  [ "$(dpkg-query -W -f '${Status}' "$package" 2>/dev/null)" != "install ok installed" ] || { echo "$package is still installed"; exit 1; }
  [ ! -e "$app" ] && [ ! -e "$entry" ] || { echo "apt remove left $app or $entry"; exit 1; }
  exit "$status"
  ;;
session)
  # The volunteer's session bus: tauri-driver, the app it starts and the tray host share it.
  export NEUROSHARD_BIN=/usr/local/bin/neuroshard NEUROSHARD_MODEL="$inside/models/demo"
  export TRAY_HOST="$inside/scripts/tray_host.py" NEUROSHARD_SHOTS="$HOME/shots"
  export "${webkit_env[@]}"
  tauri-driver --port 4444 --native-port 4445 >&2 &
  driver=$!
  await_driver 4444
  status=0
  (cd "$inside/ui" && node --test --test-concurrency=1 --test-timeout=300000 tests/installed.test.js) || status=$?
  kill "$driver" 2>/dev/null || true
  exit "$status"
  ;;
esac
