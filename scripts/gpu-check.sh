#!/usr/bin/env bash
# The wgpu path on a machine with a GPU, from a `neuroshard` binary built elsewhere with
#   cargo build -p neuroshard-cli --features wgpu --bin neuroshard
# (the GPU machine needs no Rust toolchain). Times local generation of the bench model on the
# CPU and on the GPU in one run; runs a swarm whose nodes compute on the GPU while the client
# spot-checks their receipts by re-executing hops on the CPU (fingerprints must agree across
# devices); and runs the demo, with a node killed, on the GPU.
# Usage: gpu-check.sh BIN (the binary, or BIN.xz)
set -uo pipefail
work="$(mktemp -d)"
bin="$work/neuroshard"
if [[ "$1" == *.xz ]]; then xz -dc "$1" >"$bin"; else cp "$1" "$bin"; fi
chmod +x "$bin"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done' EXIT
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$bin" init-model --size bench "$work/bench" >/dev/null

# A 480-token prompt (prefill) and 64 decoded tokens, greedy, on one device in this process.
prompt="$(python3 -c 'print(",".join(str(i % 250) for i in range(480)))')"
echo "== local generation, bench model (6 layers, width 1536): CPU, then GPU twice"
# The second GPU run shows whether compiled kernels outlive the process.
for device in flex wgpu wgpu2; do
  BURN_DEVICE=${device%2} "$bin" generate --local --model "$work/bench" --prompt-ids "$prompt" \
    --max-new-tokens 64 --json >"$work/$device.json" 2>"$work/$device.log" || {
    echo "$device failed:"; tail -20 "$work/$device.log"; continue; }
done
python3 - "$work" <<'PY'
import json, sys
runs = {d: json.load(open(f"{sys.argv[1]}/{d}.json")) for d in ("flex", "wgpu", "wgpu2")}
for d, r in runs.items():
    print(f"{d:>5}: prefill {r['prefill_ms']:.1f} ms for {len(r['prompt_ids'])} tokens, "
          f"decode {r['decode_tokens_per_s']:.1f} tokens/s")
cpu, gpu = runs["flex"], runs["wgpu2"]
same = sum(a == b for a, b in zip(cpu["generated_ids"], gpu["generated_ids"]))
print(f"tokens equal on both devices: {same}/{len(cpu['generated_ids'])}")
print(f"GPU/CPU: decode {gpu['decode_tokens_per_s'] / cpu['decode_tokens_per_s']:.2f}x, "
      f"prefill {cpu['prefill_ms'] / gpu['prefill_ms']:.2f}x faster")
PY

echo "== swarm on the GPU, receipts spot-checked on the CPU"
await_line() {
  for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for '$2' in $1:"; cat "$1"; return 1
}
"$bin" tracker --listen 127.0.0.1:0 --data-dir "$work/tracker" 2>"$work/tracker.log" & pids+=($!)
await_line "$work/tracker.log" "tracker URL: "
tracker="$(sed -n 's/.*tracker URL: \(http:[^ ]*\).*/\1/p' "$work/tracker.log" | head -1)"
for layers in 0..2 2..4 4..6; do
  "$bin" node --model "$work/bench" --layers "$layers" --tracker "$tracker" --host 127.0.0.1 \
    --device gpu --no-lan --data-dir "$work/data-$layers" 2>"$work/node-$layers.log" & pids+=($!)
  await_line "$work/node-$layers.log" "serving layers"
  grep -o "serving layers.*" "$work/node-$layers.log"
done
BURN_DEVICE=flex "$bin" generate --tracker "$tracker" --model "$work/bench" --prompt "hello swarm" \
  --max-new-tokens 24 --spot-check --json >"$work/swarm.json" 2>"$work/swarm.log" || tail -20 "$work/swarm.log"
grep receipts "$work/swarm.log"
for layers in 0..2 2..4 4..6; do
  "$bin" proofs --data-dir "$work/data-$layers" --json | python3 -c \
    "import json,sys; p=json.load(sys.stdin); print('$layers', p['counts'])"
done
python3 - "$work/swarm.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"swarm on GPU: decode {r['decode_tokens_per_s']:.1f} tokens/s over {len(r['hops'])} hops")
PY
for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; pids=()

echo "== the demo on the GPU (bench model, the middle node killed mid-generation)"
BURN_DEVICE=wgpu "$bin" demo --kill-one --model "$work/bench" --max-new-tokens 32 2>&1 | tail -14
