#!/bin/bash
# Warm ready time (start to /health 200, polled every 20 ms) of two tokenmill source trees and llama-server, taking
# turns, each tree with its own $TOKENMILL_CACHE_DIR (their tokenizer caches differ in format).
#   benchmarks/ready_interleaved.sh MODEL_NAME GGUF ROUNDS SRC_A SRC_B
# e.g. SRC_A a worktree's src/ at an older commit, SRC_B this checkout's src/. A first round fills the caches and is
# not printed; then "<label> <seconds>" per start.
set -u
model=$1 gguf=$2 rounds=$3 src_a=$4 src_b=$5
llama=$(dirname "$0")/../../shared/peers/llama.cpp/bin/llama-server
for round in $(seq 0 "$rounds"); do
  for v in a b llama; do
    port=$((20000 + RANDOM % 10000))
    start=$(date +%s.%N)
    if [ $v = llama ]; then
      "$llama" -m "$gguf" --port $port -t 2 -np 8 -c 16384 > /dev/null 2>&1 &
    else
      src=$([ $v = a ] && echo "$src_a" || echo "$src_b")
      PYTHONPATH=$src TOKENMILL_CACHE_DIR=/tmp/tokenmill_cache_$(echo "$src" | md5sum | cut -c1-8) \
        tokenmill serve "$model" --port $port > /dev/null 2>&1 &
    fi
    pid=$!
    until curl -sf http://127.0.0.1:$port/health > /dev/null; do sleep 0.02; done
    [ "$round" -gt 0 ] && echo "$v $(echo "$(date +%s.%N) - $start" | bc)"
    kill -INT $pid; wait $pid
  done
done
