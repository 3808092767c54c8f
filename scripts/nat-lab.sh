#!/usr/bin/env bash
# The NAT lab: three network namespaces joined by veth pairs.
#
#   $LAB-pub     "the internet": 11.77.0.10 and .11 (two addresses, for two STUN servers)
#        | pub0 ── wan0
#   $LAB-router  a home router: WAN 11.77.0.1, LAN 192.168.77.1; nftables masquerades the
#        |       LAN behind the WAN address, and miniupnpd answers UPnP IGD (and NAT-PMP) on
#        |       the LAN, adding port forwards to its own nftables chains
#        | lan0 ── eth0
#   $LAB-home    a home PC: 192.168.77.10, default route through the router
#
# Usage: nat-lab.sh up | down | check
#   up     builds the lab (tearing down a stale one first) and starts miniupnpd in the router;
#          MINIUPNPD=off leaves it stopped ("UPnP off on the router"), NAT_MAPPING=dependent
#          maps each destination to its own port
#   down   stops miniupnpd and removes the namespaces
#   check  exits 0 if this machine can build the lab (root, ip netns, nft, miniupnpd), else
#          prints why and exits 1
# LAB (default nslab) prefixes every name, so labs of concurrent runs do not meet. State (the
# miniupnpd config, pid and lease file) lives in /run/$LAB.
set -euo pipefail

LAB="${LAB:-nslab}"
PUB="$LAB-pub" ROUTER="$LAB-router" HOME_NS="$LAB-home"
STATE="/run/$LAB"
# "Public" addresses: the lab's namespaces reach nothing outside, and miniupnpd refuses a WAN
# address in a reserved block (documentation ranges included) as its external address.
WAN_IP=11.77.0.1 PUB_IP=11.77.0.10 PUB_IP2=11.77.0.11
LAN_IP=192.168.77.1 HOME_IP=192.168.77.10

in_ns() { local ns="$1"; shift; ip netns exec "$ns" "$@"; }

check() {
  [ "$(id -u)" = 0 ] || { echo "the NAT lab needs root (to make network namespaces)"; return 1; }
  for tool in ip nft miniupnpd; do
    command -v "$tool" >/dev/null || { echo "the NAT lab needs $tool (Debian: iproute2, nftables, miniupnpd-nftables)"; return 1; }
  done
  local probe="$LAB-probe"
  ip netns add "$probe" 2>/dev/null || { echo "cannot make network namespaces here (ip netns add failed)"; return 1; }
  if ! in_ns "$probe" nft add table ip labprobe 2>/dev/null; then
    ip netns del "$probe"
    echo "nftables does not work inside a network namespace here"
    return 1
  fi
  ip netns del "$probe"
}

down() {
  if [ -f "$STATE/miniupnpd.pid" ]; then
    kill "$(cat "$STATE/miniupnpd.pid")" 2>/dev/null || true
  fi
  for ns in "$HOME_NS" "$ROUTER" "$PUB"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$STATE"
}

start_miniupnpd() {
  cat >"$STATE/miniupnpd.conf" <<EOF
ext_ifname=wan0
listening_ip=lan0
http_port=5000
enable_upnp=yes
enable_natpmp=yes
secure_mode=yes
system_uptime=yes
lease_file=$STATE/upnp.leases
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
allow 1024-65535 192.168.77.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
EOF
  # The chains miniupnpd adds its forwards to (its own table, so the lab's stay apart).
  in_ns "$ROUTER" nft -f - <<EOF
table inet miniupnpd {
  chain forward {
    type filter hook forward priority 0; policy accept;
    jump miniupnpd
  }
  chain miniupnpd {
  }
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting_miniupnpd {
  }
}
EOF
  # -d stays in the foreground (so the namespace's pid list holds it); -P writes its pid.
  in_ns "$ROUTER" miniupnpd -d -f "$STATE/miniupnpd.conf" -P "$STATE/miniupnpd.pid" \
    >"$STATE/miniupnpd.log" 2>&1 &
  for _ in $(seq 50); do
    in_ns "$ROUTER" bash -c "exec 3<>/dev/tcp/$LAN_IP/5000" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "miniupnpd did not start:"; cat "$STATE/miniupnpd.log"; return 1
}

up() {
  down
  mkdir -p "$STATE"
  for ns in "$PUB" "$ROUTER" "$HOME_NS"; do
    ip netns add "$ns"
    in_ns "$ns" ip link set lo up
  done
  ip link add "$LAB-w" type veth peer name "$LAB-p"
  ip link set "$LAB-w" netns "$ROUTER" name wan0
  ip link set "$LAB-p" netns "$PUB" name pub0
  ip link add "$LAB-l" type veth peer name "$LAB-h"
  ip link set "$LAB-l" netns "$ROUTER" name lan0
  ip link set "$LAB-h" netns "$HOME_NS" name eth0

  in_ns "$PUB" ip addr add "$PUB_IP/24" dev pub0
  in_ns "$PUB" ip addr add "$PUB_IP2/24" dev pub0
  in_ns "$PUB" ip link set pub0 up
  in_ns "$ROUTER" ip addr add "$WAN_IP/24" dev wan0
  in_ns "$ROUTER" ip addr add "$LAN_IP/24" dev lan0
  in_ns "$ROUTER" ip link set wan0 up
  in_ns "$ROUTER" ip link set lan0 up
  in_ns "$ROUTER" sysctl -qw net.ipv4.ip_forward=1
  in_ns "$HOME_NS" ip addr add "$HOME_IP/24" dev eth0
  in_ns "$HOME_NS" ip link set eth0 up
  in_ns "$HOME_NS" ip route add default via "$LAN_IP"

  # The router: masquerade the LAN behind the WAN address; forward LAN → WAN and replies.
  # NAT_MAPPING=dependent picks a fresh port per destination (endpoint-dependent mapping,
  # as symmetric NATs do); by default a socket keeps its port to every destination.
  local masquerade=""
  if [ "${NAT_MAPPING:-independent}" = dependent ]; then masquerade=random; fi
  in_ns "$ROUTER" nft -f - <<EOF
table ip lab {
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    oifname "wan0" masquerade $masquerade
  }
}
EOF
  if [ "${MINIUPNPD:-on}" != off ]; then
    start_miniupnpd
  fi
  echo "lab $LAB up: pub $PUB_IP/$PUB_IP2, router WAN $WAN_IP LAN $LAN_IP, home $HOME_IP"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  check) check ;;
  *) echo "usage: $0 up|down|check" >&2; exit 2 ;;
esac
