#!/usr/bin/env bash
# End-to-end check of the headless binary as separate processes on loopback: a tracker, three
# nodes and `generate`, whose tokens must equal `generate --local`; then, with the tracker
# killed, a node joining through a bootstrap peer and a generation found through the DHT.
# Usage: cli-smoke.sh BIN
set -euo pipefail
bin="$1"
source "$(dirname "$0")/loopback-swarm.sh"

"$bin" init-model "$work/model"
start_tracker
for layers in 0..2 2..4 4..6; do start_node "$work/model" "$layers"; done

"$bin" status --tracker "$tracker" >"$work/stats.json"
# The tracker's key vouches for the requester: the nodes, dialling the tracker by key, trust
# it, so the receipts the requester countersigns count as earned.
holder="$("$bin" identity --public-key --data-dir "$work/requester")"
"$bin" pass --data-dir "$work/tracker" --holder "$holder" >"$work/requester/credit.pass"
"$bin" generate --tracker "$tracker" --model "$work/model" --prompt "hello swarm" \
  --max-new-tokens 12 --spot-check --requester-dir "$work/requester" --json >"$work/swarm.json"
"$bin" generate --model "$work/model" --local --prompt "hello swarm" \
  --max-new-tokens 12 --json >"$work/local.json"
# Each node's ledger holds one verified receipt per generated token (receipts are delivered
# before `generate` exits); the CLI reads it while the node runs, and exports it.
for layers in 0..2 2..4 4..6; do
  "$bin" proofs --data-dir "$work/data-$layers" --json >"$work/proofs-$layers.json"
done
"$bin" proofs --data-dir "$work/data-0..2" --export "$work/receipts.csv" >/dev/null
id_node="$(sed -n 's/.*node \([0-9a-f]*\) serving.*/\1/p' "$work/node-0..2.log")"
id_cli="$("$bin" identity --data-dir "$work/data-0..2")"
[[ "$id_cli" == "$id_node"* ]] || { echo "identity $id_cli is not the node's $id_node"; exit 1; }
python3 - "$work" <<'PY'
import csv, json, sys
work = sys.argv[1]
for layers in ["0..2", "2..4", "4..6"]:
    proofs = json.load(open(f"{work}/proofs-{layers}.json"))
    assert proofs["counts"] == {"pending": 0, "verified": 12, "voided": 0}, (layers, proofs["counts"])
    lifetime = proofs["totals"][0]["lifetime"]
    assert lifetime["credit"] > 0 and lifetime["unvouched"] == 0, proofs["totals"]
    assert all(r["vouched"] for r in proofs["receipts"]), proofs["receipts"][:1]
rows = list(csv.DictReader(open(f"{work}/receipts.csv")))
assert len(rows) == 12 and all(r["status"] == "verified" for r in rows), rows[:2]
stats = json.load(open(f"{work}/stats.json"))
swarm = json.load(open(f"{work}/swarm.json"))
local = json.load(open(f"{work}/local.json"))
assert stats["nodes"] == 3, stats
assert list(stats["layers_covered"].values()) == [6], stats
assert len(swarm["generated_ids"]) == 12, swarm
assert swarm["generated_ids"] == local["generated_ids"], (swarm["generated_ids"], local["generated_ids"])
assert all(len(s["top5"]) == 5 for s in swarm["steps"])
assert len(swarm["hops"]) == 3, swarm["hops"]
print("cli smoke: tracker + 3 node processes generated", swarm["generated_ids"], "= local")
PY

# The tracker dies. A replica of 2..4 joins knowing only the first node; the original 2..4
# stops; a generation that knows only the first node finds the replica through the DHT.
kill "${pids[0]}"
entry="$(sed -n 's/.*serving layers 0\.\.2 of model [0-9a-f]* at \([0-9.:]*\) .*/\1/p' "$work/node-0..2.log")"
"$bin" node --model "$work/model" --layers 2..4 --bootstrap "$entry" --no-lan --host 127.0.0.1 \
  --data-dir "$work/data-replica" 2>"$work/node-replica.log" & pids+=($!)
await_line "$work/node-replica.log" "announced to the DHT"
kill "${pids[2]}"
"$bin" generate --bootstrap "$entry" --no-lan --model "$work/model" --prompt "hello swarm" \
  --max-new-tokens 12 --json >"$work/dht.json"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
dht = json.load(open(f"{work}/dht.json"))
local = json.load(open(f"{work}/local.json"))
assert dht["generated_ids"] == local["generated_ids"], (dht["generated_ids"], local["generated_ids"])
print("cli smoke: without the tracker, a replica joined through a bootstrap peer and served", dht["generated_ids"])
PY
