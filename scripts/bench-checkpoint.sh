#!/usr/bin/env bash
# Decode speed of a real checkpoint through a loopback swarm of separate node processes, against
# the same model in one process (`generate --local`), as a ratio from one run. Local and swarm
# generations alternate so machine noise hits both alike; each reports decode tokens/s (tokens
# after the first over their time), and the medians are compared.
# Usage: bench-checkpoint.sh BIN MODEL_DIR [NODES] [ROUNDS] [THREADS]
# (a random Qwen2-0.5B-shaped checkpoint: scripts/make-bench-checkpoint.py; or
# `neuroshard init-model DIR --size smol`). Both sides compute on THREADS threads (default: every
# core): the local run on rayon's pool of that size, each node with --cpu-threads; only one
# node of the chain computes at a time. PRECISION=bf16|f16|int8 holds the weights so on both
# sides (default f32).
set -euo pipefail
bin="$1" model="$2" nodes="${3:-3}" rounds="${4:-3}"
threads="${5:-$(nproc)}"
export RAYON_NUM_THREADS="$threads"
precision="${PRECISION:-f32}"
NODE_ARGS="--cpu-threads $threads --precision $precision ${NODE_ARGS:-}"
source "$(dirname "$0")/loopback-swarm.sh"
echo "compute threads: $threads for the local run and for each node; weights held as $precision"

start_split_swarm "$model" "$nodes"

prompt="$(python3 -c "print(','.join(str(100 + 7 * i) for i in range(32)))")"
for round in $(seq "$rounds"); do
  "$bin" generate --model "$model" --local --precision "$precision" --prompt-ids "$prompt" \
    --max-new-tokens 32 --json >"$work/local-$round.json"
  "$bin" generate --tracker "$tracker" --model "$model" --prompt-ids "$prompt" \
    --max-new-tokens 32 --json >"$work/swarm-$round.json"
done
python3 - "$work" "$rounds" "$nodes" <<'PY'
import json, statistics, sys
work, rounds, nodes = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def speeds(kind):
    return [json.load(open(f"{work}/{kind}-{r}.json"))["decode_tokens_per_s"] for r in range(1, rounds + 1)]
local, swarm = speeds("local"), speeds("swarm")
same = all(json.load(open(f"{work}/local-{r}.json"))["generated_ids"] == json.load(open(f"{work}/swarm-{r}.json"))["generated_ids"] for r in range(1, rounds + 1))
print(f"local decode tokens/s: {', '.join(f'{s:.2f}' for s in local)}")
print(f"swarm ({nodes} nodes) decode tokens/s: {', '.join(f'{s:.2f}' for s in swarm)}")
print(f"swarm/local: {statistics.median(swarm) / statistics.median(local):.3f} (medians); same tokens: {same}")
PY
