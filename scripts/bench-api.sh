#!/usr/bin/env bash
# The API's cost over the direct client, from one run: three node processes serve a model,
# `neuroshard generate` (the client library) and `neuroshard serve` streamed through the official
# openai client take turns on the same chat, and the streamed tokens/s and time to first token
# are compared. Usage: bench-api.sh BIN [MODEL_DIR] [ROUNDS] (default: the shipped demo model)
set -euo pipefail
bin="$1"
root="$(cd "$(dirname "$0")/.." && pwd)"
rounds="${3:-5}"
source "$root/scripts/loopback-swarm.sh"

model="${2:-}"
if [ -z "$model" ]; then
  model="$work/demo"
  mkdir "$model"
  cp "$root"/models/demo/* "$model/"
  printf '%s' "{% for m in messages %}{{ m['content'] }}{% endfor %}" >"$model/chat_template.jinja"
fi
layers="$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$model/config.json")"
start_tracker
for i in 0 1 2; do start_node "$model" "$((layers * i / 3))..$((layers * (i + 1) / 3))" 300; done
"$bin" serve --tracker "$tracker" --no-lan --model "$model" --listen 127.0.0.1:0 \
  2>"$work/serve.log" & pids+=($!)
await_line "$work/serve.log" "OpenAI-compatible" 300
api="$(sed -n 's/.*at \(http:[^ ]*\) (OpenAI-compatible).*/\1/p' "$work/serve.log" | head -1)"
name="$(basename "$model")"
prompt="Four score and seven years ago"
for round in $(seq "$rounds"); do
  "$bin" generate --tracker "$tracker" --no-lan --model "$model" --chat "$prompt" \
    --max-new-tokens 64 --json >"$work/direct-$round.json" 2>/dev/null
done
python3 - "$api" "$name" "$prompt" "$work" "$rounds" <<'PY'
import json, statistics, sys, time
import openai
api, name, prompt, work, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
client = openai.OpenAI(base_url=api, api_key="none", max_retries=0, timeout=300)
ttft, speed = [], []
for _ in range(rounds):
    started = time.perf_counter()
    first = last = None
    pieces = 0
    usage = None
    for chunk in client.chat.completions.create(model=name, max_tokens=64, temperature=0, stream=True,
            stream_options={"include_usage": True}, messages=[{"role": "user", "content": prompt}]):
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
        if chunk.usage:
            usage = chunk.usage
    ttft.append((first - started) * 1000)
    speed.append((usage.completion_tokens - 1) / (last - first))
direct = [json.load(open(f"{work}/direct-{r}.json")) for r in range(1, rounds + 1)]
direct_speed = statistics.median(d["decode_tokens_per_s"] for d in direct)
direct_prefill = statistics.median(d["prefill_ms"] for d in direct)
print(f"direct client: decode {direct_speed:.1f} tokens/s, prefill {direct_prefill:.1f} ms (medians of {rounds})")
print(f"API streamed: {statistics.median(speed):.1f} tokens/s, time to first token {statistics.median(ttft):.1f} ms")
print(f"API/direct tokens per second: {statistics.median(speed) / direct_speed:.3f}")
PY
