#!/usr/bin/env bash
# `make demo`: build a small base model, train two adapters and publish them to a local registry, push
# a third made outside training, list them, show a manifest, move an alias, pull a verified copy, then
# serve over gRPC and the OpenAI-compatible HTTP API, query two adapters concurrently, show their /metrics
# lines, ask the same adapters through the official openai client, and stop the server.
# Re-runnable: starts clean.
set -euo pipefail
D=demo
rm -rf "$D"
mkdir -p "$D"
export HOTSWAP_REGISTRY="$PWD/$D/registry"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "Build a tiny random-init Llama base with a real tokenizer (saved like any checkpoint)" \
  hotswap base build --preset tiny --seed 0 --tokenizer minilm --initializer-range 0.1 --out "$D/base"
step "Train a LoRA adapter on a built-in task and publish it as math@1, alias prod" \
  hotswap train --method lora --base "$D/base" --data builtin:mapping --steps 200 --push math --alias prod \
  --out "$D/runs/math" --quiet
step "Train a DoRA adapter for tenant acme on a small JSONL file (tenant adapters are private by default)" \
  hotswap train --method dora --base "$D/base" --data scripts/capitals.jsonl --steps 150 \
  --push acme/capitals --alias staging --out "$D/runs/capitals" --quiet
step "Train math again with another seed: version 2" \
  hotswap train --method lora --base "$D/base" --data builtin:mapping --steps 200 --seed 1 --push math \
  --out "$D/runs/math-s1" --quiet
step "Make a random LoRA adapter outside training (a PEFT directory naming its base)" \
  hotswap adapter random --base "$D/base" --out "$D/random" --rank 4
step "Publish it: push checks it against the base its adapter_config.json names (or --base DIR)" \
  hotswap push "$D/random" --name noise
step "List the registry" hotswap list
step "Versions of math" hotswap versions math
step "Show the manifest behind math:prod" hotswap show math:prod
step "Promote v2 to prod" hotswap alias math prod 2
step "Roll back: point prod at v1 again" hotswap alias math prod 1
step "Pull a verified copy (sha256 of every file checked)" hotswap pull math:prod --to "$D/pulled"
ls -l "$D/pulled"
step "In-process: both adapters and the base in ONE batch (unmerged, row by row); prompt ids = [bos] 'the capital of france is'" \
  hotswap compare --base "$D/base" --adapters "math:prod,acme/capitals:staging,-" \
  --prompt-ids 101,1996,3007,1997,2605,2003 --max-new-tokens 4
step "A bad reference is refused with one line and a non-zero exit" \
  bash -c 'hotswap show "../etc" ; echo "exit code $?"'

step "Start the server: gRPC and the OpenAI-compatible API (free ports; --no-auth for the demo, production uses --auth tokens.toml)" \
  bash -c "hotswap serve --base $D/base --port 0 --http-port 0 --metrics-port 0 --no-auth >$D/server.out 2>$D/server.log &
           echo \$! >$D/server.pid"
trap 'kill "$(cat $D/server.pid)" 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q "serving" "$D/server.out" 2>/dev/null && break; sleep 0.1; done
cat "$D/server.out"
ADDR=$(sed -n 's/.* on \([0-9.]*:[0-9]*\).*/\1/p' "$D/server.out")
METRICS=$(sed -n 's/.*metrics \(http[^ ]*\).*/\1/p' "$D/server.out")
API=$(sed -n 's/.*OpenAI API \(http[^ ,]*\).*/\1/p' "$D/server.out")
step "Health check (the gRPC health service)" hotswap health --server "$ADDR"
step "Ask acme/capitals:staging, math:prod and the base at the same time (one batch), over gRPC" \
  python scripts/demo_query.py "$ADDR" "$METRICS" "the capital of italy is" acme/capitals:staging math:prod -
step "Stream from the CLI (text as it is generated)" \
  hotswap generate --server "$ADDR" --adapter acme/capitals:staging --max-new-tokens 12 --stream "the capital of japan is"
step "The full response as JSON (token ids, usage, timings)" \
  hotswap generate --server "$ADDR" --adapter math:prod --max-new-tokens 6 --json "hello"
step "The same adapters through the official openai client: every adapter is a model (the base is \"base\")" \
  python scripts/demo_openai.py "$API" "the capital of italy is" acme/capitals:staging math:prod
step "Stop the server with SIGTERM (drains in-flight requests, exits 0)" \
  bash -c "kill -TERM \$(cat $D/server.pid); while kill -0 \$(cat $D/server.pid) 2>/dev/null; do sleep 0.1; done"
cat "$D/server.out"
printf '\nRequest log (one line per request):\n'
grep "adapter=" "$D/server.log"
printf '\nRegistry at %s\n' "$HOTSWAP_REGISTRY"
