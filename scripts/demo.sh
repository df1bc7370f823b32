#!/usr/bin/env bash
# The main job: one inference on this machine, everything set up here.
# A queen with its embedded NATS bus, a local hive, a generated tiny model
# (no network needed), then tokens streamed to this terminal. What it
# starts, it stops again.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
rbee="$root/bin/rbee"
prompt="${*:-hello world, the bee is}"
export RBEE_LLAMA_LIB="${RBEE_LLAMA_LIB:-$root/.deps/llama}"

started_queen=0
cleanup() {
  "$rbee" -q hive stop local >/dev/null 2>&1 || true
  if [ "$started_queen" = 1 ]; then "$rbee" queen stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

if ! "$rbee" queen status >/dev/null 2>&1; then
  "$rbee" queen start
  started_queen=1
fi
"$rbee" hive get local >/dev/null 2>&1 || "$rbee" hive add local
"$rbee" hive start local
"$rbee" model get --hive local tiny >/dev/null 2>&1 || "$rbee" model synth --hive local tiny
"$rbee" infer -m tiny --temperature 0 --seed 42 --max-tokens 48 "$prompt"
