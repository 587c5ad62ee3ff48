#!/usr/bin/env bash
# The GPU run of the any-decoder work, on a machine with CUDA, from the repository root:
#   make install TORCH=torch && PATH="$PWD/.venv/bin:$PATH" bash scripts/gpu_check.sh
# 1. agreement tests with the engine and its references on cuda: every family vs HF and PEFT (fp32), half
#    precision vs PEFT in that dtype, the attention vs its row-loop reference;
#    and the static decode captured as CUDA graphs (every method, buckets and layouts changing) vs the eager decode;
# 2. `hotswap bench mixed` on cuda in bf16 for W1 (SmolLM2-135M shape) and a 0.5B-class preset (Qwen2.5-0.5B
#    shape), 16 adapters, and `hotswap bench decode` (eager, static, compile, cuda-graphs side by side; base, 1 and
#    16 adapters), and `bench mixed --quantize nf4` (the NF4 base beside the float one): tables in
#    bench-results/gpu/*.md, JSON beside them.
# Tunables: HOTSWAP_GPU_PRESETS ("smollm2-135m qwen2.5-0.5b"), HOTSWAP_GPU_DTYPES ("bfloat16").
set -euo pipefail
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this script is for a GPU machine")'
export HOTSWAP_TEST_DEVICE=cuda
python -m pytest -q -p no:cacheprovider tests/serve/test_attention.py tests/serve/test_families.py tests/serve/test_dtypes.py \
  tests/serve/test_static_decode.py tests/serve/test_sinks.py tests/serve/test_moe.py tests/serve/test_embedding_lora.py
out=bench-results/gpu
for preset in ${HOTSWAP_GPU_PRESETS:-smollm2-135m qwen2.5-0.5b}; do
  for dtype in ${HOTSWAP_GPU_DTYPES:-bfloat16}; do
    hotswap bench mixed --device cuda --dtype "$dtype" --model "$preset" --adapters 16 --out "$out/$preset-$dtype"
    hotswap bench decode --device cuda --dtype "$dtype" --model "$preset" --out "$out/$preset-$dtype"
    hotswap bench mixed --device cuda --dtype "$dtype" --model "$preset" --adapters 16 --quantize nf4 \
      --out "$out/$preset-$dtype-nf4"
  done
done
python -c 'import torch; print("GPU:", torch.cuda.get_device_name())'
