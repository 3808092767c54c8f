# Sourced by the scripts that run the `neuroshard` binary as separate processes on loopback
# (cli-smoke.sh, api-check.sh, bench-checkpoint.sh, bench-sessions.sh): a scratch folder, processes ended on exit,
# a wait for a process's readiness line, and a tracker with nodes.
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Waits until FILE has a line matching PATTERN (the process announced readiness), up to
# SECONDS (default 60).
await_line() {
  local file="$1" pattern="$2" seconds="${3:-60}"
  for _ in $(seq $((seconds * 10))); do
    if grep -q "$pattern" "$file" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for '$pattern' in $file:"; cat "$file"; return 1
}

# Starts a tracker on a free loopback port; sets `tracker` to its URL.
start_tracker() {
  "$bin" tracker --listen 127.0.0.1:0 --data-dir "$work/tracker" 2>"$work/tracker.log" & pids+=($!)
  await_line "$work/tracker.log" "tracker URL: "
  tracker="$(sed -n 's/.*tracker URL: \(http:[^ ]*\).*/\1/p' "$work/tracker.log" | head -1)"
}

# Starts a node serving LAYERS of MODEL through the tracker, with its own data folder and log
# ($work/node-LAYERS.log); waits up to SECONDS for it to serve.
start_node() {
  local model="$1" layers="$2" seconds="${3:-60}"
  # shellcheck disable=SC2086 # NODE_ARGS: extra flags, split on spaces.
  "$bin" node --model "$model" --layers "$layers" --tracker "$tracker" --host 127.0.0.1 \
    --no-lan --data-dir "$work/data-$layers" ${NODE_ARGS:-} 2>"$work/node-$layers.log" & pids+=($!)
  await_line "$work/node-$layers.log" "serving layers" "$seconds"
}

# Starts a tracker and NODES nodes splitting MODEL's layers evenly, each given up to 300 s to
# load (a large checkpoint takes a while).
start_split_swarm() {
  local model="$1" nodes="$2" layers
  layers="$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$model/config.json")"
  start_tracker
  for i in $(seq 0 $((nodes - 1))); do
    start_node "$model" "$((layers * i / nodes))..$((layers * (i + 1) / nodes))" 300
  done
}
