#!/bin/bash
# Issue 21 recent rows: KLD and perplexity with the cache in the loop, recent blocks 2 against 0.
cd /work/bench-wt
export PATH=/work/main/.venv/bin:$PATH PYTHONPATH=/work/bench-wt/src
OUT=/work/main/benchmarks/results/kv_recent
run() {  # model tag args...
  local model=$1 tag=$2; shift 2
  tokenmill eval kld $model "$@" --context-len 2048 --stride 1024 --max-tokens 6144 \
    --save-result $OUT/kld_${model}_${tag}.json > $OUT/kld_${model}_${tag}.txt 2>/dev/null
  echo "$model $tag done $(date +%T)"
}
for m in smollm2-135m; do
  run $m int4_r2 --kv-cache-dtype int4
  run $m tq3.5_r2 --kv-cache-dtype turboquant --kv-cache-bits 3.5
  run $m int4_r0 --kv-cache-dtype int4 --kv-cache-recent-blocks 0
  run $m tq3.5_r0 --kv-cache-dtype turboquant --kv-cache-bits 3.5 --kv-cache-recent-blocks 0
done
run qwen2.5-coder-1.5b int4_r2 --kv-cache-dtype int4
run qwen2.5-coder-1.5b tq3.5_r2 --kv-cache-dtype turboquant --kv-cache-bits 3.5
run smollm2-135m int8_r0 --kv-cache-dtype int8
run smollm2-135m tq3_r2 --kv-cache-dtype turboquant --kv-cache-bits 3
run smollm2-135m tq2.5_r2 --kv-cache-dtype turboquant --kv-cache-bits 2.5
run qwen2.5-coder-1.5b tq3_r2 --kv-cache-dtype turboquant --kv-cache-bits 3
run qwen2.5-coder-1.5b tq2.5_r2 --kv-cache-dtype turboquant --kv-cache-bits 2.5
