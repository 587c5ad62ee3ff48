#!/usr/bin/env bash
# `make demo`: build a small base model, create two adapters, publish them to a local registry,
# list them, show a manifest, move an alias, pull a verified copy, then serve both over gRPC, query
# them concurrently, show their /metrics lines and stop the server. Re-runnable: starts clean.
set -euo pipefail
D=demo
rm -rf "$D"
mkdir -p "$D"
export HOTSWAP_REGISTRY="$PWD/$D/registry"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "Build a tiny random-init Llama base with a real tokenizer (saved like any checkpoint)" \
  hotswap base build --preset tiny --seed 0 --tokenizer minilm --out "$D/base"
step "Create a LoRA adapter (PEFT format, random non-zero weights)" \
  hotswap adapter random --base "$D/base" --out "$D/math-lora" --rank 8 --seed 1 --init-std 0.3
step "Publish it as math@1, alias prod" \
  hotswap push "$D/math-lora" --name math --base "$D/base" --alias prod
step "Create a DoRA adapter for tenant acme" \
  hotswap adapter random --base "$D/base" --out "$D/tone-dora" --rank 4 --dora --seed 2 --init-std 0.3
step "Publish it (tenant adapters are private by default)" \
  hotswap push "$D/tone-dora" --name acme/tone --base "$D/base" --alias staging
step "Publish a second version of math" \
  hotswap push "$D/math-lora" --name math --base "$D/base" --description "same weights, v2"
step "List the registry" hotswap list
step "Versions of math" hotswap versions math
step "Show the manifest behind math:prod" hotswap show math:prod
step "Promote v2 to prod" hotswap alias math prod 2
step "Roll back: point prod at v1 again" hotswap alias math prod 1
step "Pull a verified copy (sha256 of every file checked)" hotswap pull math:prod --to "$D/pulled"
ls -l "$D/pulled"
step "Serve both adapters and the base in ONE batch (unmerged, row by row)" \
  hotswap compare --base "$D/base" --adapters "math:prod,acme/tone:staging,-" --prompt-ids 5,17,99,3 --max-new-tokens 8
step "A bad reference is refused with one line and a non-zero exit" \
  bash -c 'hotswap show "../etc" ; echo "exit code $?"'

step "Start the gRPC server (free ports; --no-auth for the demo, production uses --auth tokens.toml)" \
  bash -c "hotswap serve --base $D/base --port 0 --metrics-port 0 --no-auth >$D/server.out 2>$D/server.log &
           echo \$! >$D/server.pid"
trap 'kill "$(cat $D/server.pid)" 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q "serving" "$D/server.out" 2>/dev/null && break; sleep 0.1; done
cat "$D/server.out"
ADDR=$(sed -n 's/.* on \([0-9.]*:[0-9]*\).*/\1/p' "$D/server.out")
METRICS=$(sed -n 's/.*metrics \(http[^ ]*\).*/\1/p' "$D/server.out")
step "Health check (the gRPC health service)" hotswap health --server "$ADDR"
step "Query math:prod and acme/tone:staging at the same time (one batch), over gRPC" \
  python scripts/demo_query.py "$ADDR" "$METRICS" math:prod acme/tone:staging
step "Stream from the CLI (text as it is generated)" \
  hotswap generate --server "$ADDR" --adapter acme/tone:staging --max-new-tokens 12 --stream "hello"
step "The full response as JSON (token ids, usage, timings)" \
  hotswap generate --server "$ADDR" --adapter math:prod --max-new-tokens 6 --json "hello"
step "Stop the server with SIGTERM (drains in-flight requests, exits 0)" \
  bash -c "kill -TERM \$(cat $D/server.pid); while kill -0 \$(cat $D/server.pid) 2>/dev/null; do sleep 0.1; done"
cat "$D/server.out"
printf '\nRequest log (one line per request):\n'
grep "adapter=" "$D/server.log"
printf '\nRegistry at %s\n' "$HOTSWAP_REGISTRY"
