#!/bin/bash
cd /work/bench-wt
export PATH=/work/main/.venv/bin:$PATH PYTHONPATH=/work/bench-wt/src
OUT=/work/main/benchmarks/results/kv_recent/dtypes
python benchmarks/kv_cache_dtypes.py --model smollm2-135m --cases 64x1024 --repeats 2 \
  --types float16 int4+r0 int4 tq3.5+r0 tq3.5 --no-peers --out $OUT > $OUT.log 2>&1
echo "speed done $(date +%T)"
cd /work/bench-wt && tokenmill eval passkey qwen2.5-coder-1.5b --kv-cache-dtype turboquant --kv-cache-bits 3.5 \
  --lengths 2048 4096 8192 --depths 0.1 0.5 0.9 --save-result /work/main/benchmarks/results/kv_recent/passkey_qwen_tq3.5_r2.json \
  > /work/main/benchmarks/results/kv_recent/passkey_qwen_tq3.5_r2.txt 2>/dev/null
echo "passkey done $(date +%T)"
