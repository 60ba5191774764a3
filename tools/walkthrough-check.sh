#!/usr/bin/env bash
# Follows docs/your-own-function.md as a new user would, in a fresh directory: cargo new, the
# page's Cargo.toml and src/main.rs (the blocks after each `<!-- walkthrough: FILE -->`), its
# test, its runs on the sample events, and its template. The path dependency points at this
# checkout, and the build shares this checkout's target directory and lock file so that
# nothing is compiled twice. Steps 4 and 5 (cargo lambda build, sam deploy) need the network
# or an AWS account: the template it makes is linted instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
page=$root/docs/your-own-function.md
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CARGO_TARGET_DIR=$root/target

cd "$work"
cargo new --quiet readings
cd readings
python3 - "$page" "$root" <<'PY'
import re, sys
page, root = sys.argv[1], sys.argv[2]
text = open(page).read()
blocks = dict(re.findall(r"<!-- walkthrough: (\S+) -->\n```\w*\n(.*?)```", text, re.S))
assert set(blocks) == {"Cargo.toml", "src/main.rs"}, blocks.keys()
manifest = open("Cargo.toml").read()
assert manifest.rstrip().endswith("[dependencies]"), manifest
# Without the sinks: the page does not use them, and the AWS SDK would be built once more
# (without the tests' tokio features), for minutes.
deps = blocks["Cargo.toml"].replace('kinesis-deagg = { path = "../kinesis-deagg" }', f'kinesis-deagg = {{ path = "{root}", default-features = false }}')
assert root in deps, "the page's kinesis-deagg dependency line changed"
open("Cargo.toml", "w").write(manifest.rstrip()[: -len("[dependencies]")] + deps)
open("src/main.rs", "w").write(blocks["src/main.rs"])
PY
cp "$root/Cargo.lock" .

cargo test --quiet 2>&1 | tail -3
cargo build --quiet
bin=$CARGO_TARGET_DIR/debug/readings
last() { tail -n 1; }
check() { # expected-last-line, command...
  local want=$1; shift
  local got
  got=$("$@" 2>/dev/null | last)
  [ "$got" = "$want" ] || { echo "walkthrough: $* gave '$got', not '$want'"; exit 1; }
}
check '{"batchItemFailures":[]}' "$bin" "$root/events/aggregated.json"
check '{"batchItemFailures":[]}' "$bin" invoke "$root/events/aggregated.json"
first_mixed=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['Records'][0]['kinesis']['sequenceNumber'])" "$root/events/mixed.json")
check "{\"batchItemFailures\":[{\"itemIdentifier\":\"$first_mixed\"}]}" sh -c "\"$bin\" - < \"$root/events/mixed.json\""
first_plain=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['Records'][0]['kinesis']['sequenceNumber'])" "$root/events/plain.json")
check "{\"batchItemFailures\":[{\"itemIdentifier\":\"$first_plain\"}]}" "$bin" --remaining-time-ms 0 "$root/events/plain.json"
"$bin" --help | grep -q -- "--deadline-margin-ms" || { echo "walkthrough: --help lists no settings"; exit 1; }
# A reason in the log for a failed record, and the exit statuses the page promises.
log=$("$bin" "$root/events/mixed.json" 2>&1 >/dev/null)
grep -q "is not a valid Reading: missing field" <<<"$log" \
  || { echo "walkthrough: no reason logged for the failed record: $log"; exit 1; }
status=0; "$bin" /nonexistent.json 2>/dev/null || status=$?
[ "$status" = 2 ] || { echo "walkthrough: a missing file exited $status, not 2"; exit 1; }
# A setting of the built-in transforms is not this consumer's: it does not stop it.
check '{"batchItemFailures":[]}' env DEAGG_TRANSFORM=bogus "$bin" "$root/events/aggregated.json"
status=0; DEAGG_MODE=fast "$bin" "$root/events/plain.json" 2>/dev/null || status=$?
[ "$status" = 2 ] || { echo "walkthrough: a bad setting exited $status, not 2"; exit 1; }

# Step 5's template.
sed 's/Binary: kinesis-deagg/Binary: readings/' "$root/template.yaml" > template.yaml
grep -q "Binary: readings" template.yaml
if [ -x "$root/.venv/bin/cfn-lint" ]; then
  "$root/.venv/bin/cfn-lint" template.yaml
else
  echo "walkthrough: $root/.venv/bin/cfn-lint is missing (make deps installs it); the template was not linted"
  exit 1
fi
echo "walkthrough: every step checked"
