#!/usr/bin/env bash
# Make the wheel folder the GPU check carries to a GPU machine that has no network (run here, with network):
#   bash bench/gpu_wheels.sh [DIR]        (default .whl, which git ignores)
# The GPU image already has torch, accelerate, tokenizers, safetensors, pyarrow, pandas, sacrebleu; it lacks (or has
# other versions of) what is fetched here, at the versions of constraints.txt: transformers, huggingface_hub and
# peft as tested, datasets (+ dill, multiprocess) for the project's data modules, bitsandbytes for the QLoRA step,
# liger-kernel for the Liger comparison. flash-attn has no wheel on PyPI (it builds from source against CUDA),
# so the check measures flash attention only where the image has it. The folder must stay within 60 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
mkdir -p "$dir"
pin() { grep -E "^$1==" constraints.txt | cut -d= -f3; }
packages=("transformers==$(pin transformers)" "huggingface_hub==$(pin huggingface_hub)" "peft==$(pin peft)"
          "datasets==$(pin datasets)" "dill==$(pin dill)" "multiprocess==$(pin multiprocess)"
          "bitsandbytes==$(pin bitsandbytes)" "liger-kernel==$(pin liger-kernel)")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dir" "${packages[@]}"
total=$(du -cb "$dir"/*.whl | tail -n 1 | cut -f1)
ls -l "$dir"
echo "$(( total / 1000000 )) MB in $dir"
if [ "$total" -gt 60000000 ]; then echo "error: over the 60 MB the GPU machine takes" >&2; exit 1; fi
