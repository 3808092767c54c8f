#!/usr/bin/env bash
# Aggregate decode tokens/s of 1, 4 and 8 concurrent sessions through a loopback swarm of
# separate node processes, as ratios to one session, from one run. Each session is its own
# `generate` process; they start together, and the aggregate is the sum of their decode
# tokens/s (every session decodes the whole time the others do: same prompt length and
# token count). Nodes batch the decode steps that meet (--max-batch, default 16). ONE_CLIENT=1
# runs the sessions from one client process instead (`generate --sessions N`: concurrent users
# of one API server), so that N client processes do not share the nodes' cores.
# Usage: bench-sessions.sh BIN MODEL_DIR [NODES] [TOKENS] [THREADS]
set -euo pipefail
bin="$1" model="$2" nodes="${3:-3}" tokens="${4:-48}"
threads="${5:-$(nproc)}"
NODE_ARGS="--cpu-threads $threads ${NODE_ARGS:-}"
source "$(dirname "$0")/loopback-swarm.sh"
echo "compute threads: $threads for each node"

start_split_swarm "$model" "$nodes"

for sessions in 1 4 8; do
  if [ -n "${ONE_CLIENT:-}" ]; then
    prompt="$(python3 -c "print(','.join(str(100 + 7 * i) for i in range(16)))")"
    "$bin" generate --tracker "$tracker" --model "$model" --prompt-ids "$prompt" \
      --max-new-tokens "$tokens" --sessions "$sessions" --json >"$work/one-$sessions.json"
    continue
  fi
  run_pids=()
  for s in $(seq "$sessions"); do
    prompt="$(python3 -c "import sys; print(','.join(str(100 + 7 * i + int(sys.argv[1])) for i in range(16)))" "$s")"
    "$bin" generate --tracker "$tracker" --model "$model" --prompt-ids "$prompt" \
      --max-new-tokens "$tokens" --json >"$work/run-$sessions-$s.json" & run_pids+=($!)
  done
  wait "${run_pids[@]}"
done
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
def aggregate(n):
    try:
        report = json.load(open(f"{work}/one-{n}.json"))
        return report.get("aggregate_decode_tokens_per_s", report["decode_tokens_per_s"])
    except FileNotFoundError:
        return sum(json.load(open(f"{work}/run-{n}-{s}.json"))["decode_tokens_per_s"] for s in range(1, n + 1))
one = aggregate(1)
for n in (1, 4, 8):
    a = aggregate(n)
    print(f"{n} sessions: {a:.2f} decode tokens/s in all = {a / one:.2f}x one")
PY
