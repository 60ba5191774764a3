#!/usr/bin/env bash
# The handler through cargo-lambda: `cargo lambda watch` serves the function (with the json
# transform), `cargo lambda invoke --data-file` sends each sample event, and each response
# must equal events/expected/<name>.json. Run by `make watch-check`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
port="${PORT:-9123}"
log=target/watch-check.log
mkdir -p target

cargo lambda watch --invoke-address 127.0.0.1 --invoke-port "$port" \
  --env-var DEAGG_TRANSFORM=json > "$log" 2>&1 &
watch_pid=$!
trap 'kill "$watch_pid" 2>/dev/null; wait "$watch_pid" 2>/dev/null || true' EXIT

for _ in $(seq 1 300); do
  (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  kill -0 "$watch_pid" 2>/dev/null || { cat "$log"; echo "cargo lambda watch exited"; exit 1; }
  sleep 1
done

failed=0
for expected in events/expected/*.json; do
  event="events/$(basename "$expected")"
  response=$(cargo lambda invoke kinesis-deagg --invoke-address 127.0.0.1 --invoke-port "$port" \
    --data-file "$event" | tail -n 1)
  if python3 -c 'import json,sys; sys.exit(json.loads(sys.argv[1]) != json.load(open(sys.argv[2])))' \
      "$response" "$expected"; then
    echo "ok   $event -> $response"
  else
    echo "FAIL $event -> $response (expected $(cat "$expected"))"
    failed=1
  fi
done
exit "$failed"
