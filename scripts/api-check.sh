#!/usr/bin/env bash
# The OpenAI-compatible API driven by the official `openai` Python client: a tracker, three node
# processes serving the shipped demo model, and `neuroshard serve` over them. Its answers,
# streamed and whole, must equal `neuroshard generate` with the same settings; usage,
# max_tokens and stop strings must give what OpenAI's API would.
# Usage: api-check.sh BIN
set -euo pipefail
bin="$1"
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/loopback-swarm.sh"

# The shipped demo model learned one text byte by byte; a template that passes the user's text
# through lets a chat continue it.
mkdir "$work/demo"
cp "$root"/models/demo/* "$work/demo/"
printf '%s' "{% for m in messages %}{{ m['content'] }}{% endfor %}" >"$work/demo/chat_template.jinja"

start_tracker
for layers in 0..2 2..4 4..6; do start_node "$work/demo" "$layers"; done
NEUROSHARD_API_KEY=sk-check "$bin" serve --tracker "$tracker" --no-lan --model "$work/demo" \
  --listen 127.0.0.1:0 2>"$work/serve.log" & pids+=($!)
await_line "$work/serve.log" "OpenAI-compatible"
api="$(sed -n 's/.*at \(http:[^ ]*\) (OpenAI-compatible).*/\1/p' "$work/serve.log" | head -1)"

prompt="Four score and seven years ago"
"$bin" generate --tracker "$tracker" --no-lan --model "$work/demo" --chat "$prompt" \
  --max-new-tokens 24 --json >"$work/greedy.json"
"$bin" generate --tracker "$tracker" --no-lan --model "$work/demo" --chat "$prompt" \
  --max-new-tokens 24 --temperature 0.8 --top-p 0.95 --seed 5 --json >"$work/sampled.json"
"$bin" generate --tracker "$tracker" --no-lan --model "$work/demo" --chat "$prompt" \
  --max-new-tokens 24 --stop " brought" --json >"$work/stopped.json"
python3 "$root/scripts/api_check.py" "$api" "$work" "$prompt"
