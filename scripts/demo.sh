#!/usr/bin/env bash
# `make demo`: build a small base model, create two adapters, publish them to a local registry,
# list them, show a manifest, move an alias, and pull a verified copy. Re-runnable: starts clean.
set -euo pipefail
D=demo
rm -rf "$D"
mkdir -p "$D"
export HOTSWAP_REGISTRY="$PWD/$D/registry"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "Build a tiny random-init Llama base (saved like any checkpoint)" \
  hotswap base build --preset tiny --seed 0 --out "$D/base"
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
printf '\nRegistry at %s\n' "$HOTSWAP_REGISTRY"
