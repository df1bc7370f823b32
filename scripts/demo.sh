#!/usr/bin/env bash
# The main job: one inference on this machine, everything set up here.
# It builds the programs, starts a queen with its embedded NATS bus and a
# local hive, generates a tiny model (no network needed), then streams
# tokens to this terminal. What it starts, it stops again.
#
# stdout carries the generated tokens only; everything else (what the demo
# is doing, the narration of the queen, hive and worker) goes to stderr, so
# `go tool task demo > out.txt` holds exactly the model's answer.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
rbee="$root/bin/rbee"
prompt="${*:-hello world, the bee is}"
export RBEE_LLAMA_LIB="${RBEE_LLAMA_LIB:-$root/.deps/llama}"

say() { echo "demo: $*" >&2; }

# A first build downloads about 150 modules, one "go: downloading" line
# each; they are shown only if the build fails.
build_log="$(mktemp)"
trap 'rm -f "$build_log"' EXIT
say "building rbee, queen-rbee, rbee-hive and llm-worker-rbee into bin/ (a first build fetches Go modules: a minute or two)"
if ! (cd "$root" && go build -o "$root/bin/" ./cmd/rbee ./cmd/queen-rbee ./cmd/rbee-hive ./cmd/llm-worker-rbee) >"$build_log" 2>&1; then
  cat "$build_log" >&2
  say "the build failed (output above)"
  exit 1
fi

started_queen=0
cleanup() {
  "$rbee" -q hive stop local >/dev/null 2>&1 || true
  if [ "$started_queen" = 1 ]; then "$rbee" queen stop >/dev/null 2>&1 || true; fi
  rm -f "$build_log"
}
trap cleanup EXIT

if ! "$rbee" queen status >/dev/null 2>&1; then
  "$rbee" queen start >&2
  started_queen=1
fi
"$rbee" hive get local >/dev/null 2>&1 || "$rbee" hive add local >&2
"$rbee" hive start local >&2
"$rbee" model get --hive local tiny >/dev/null 2>&1 || "$rbee" model synth --hive local tiny >&2

cat >&2 <<'NOTE'
demo: the model "tiny" was generated here with random weights, so its text is
demo: gibberish by design: it shows the whole path (queen, hive, worker,
demo: llama.cpp, tokens streamed over the bus), not a language model's skill.
demo: For real text, download a GGUF model into the hive and ask it, e.g.:
demo:   bin/rbee model download --hive local hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf --name qwen
demo:   bin/rbee infer -m qwen "Why is the sky blue?"
demo: tokens follow on stdout:
NOTE
"$rbee" infer -m tiny --temperature 0 --seed 42 --max-tokens 48 "$prompt"
