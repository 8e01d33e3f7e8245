G=/root/.cache/tokenmill/assembled/gemma3-270m-60d3944d96e5/gemma-3-270m-q4_k_m.gguf
L=/work/shared/peers/llama.cpp/bin/llama-server
for r in 1 2 3; do
 sync; echo 3 > /proc/sys/vm/drop_caches
 /usr/bin/time -f "torch-import cold %e s" python -c "import torch"
 /usr/bin/time -f "torch-import warm %e s" python -c "import torch"
 for mode in cold warm; do
  [ $mode = cold ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
  start=$(date +%s.%N); $L -m $G --port 18082 -t 2 -np 8 -c 16384 >/dev/null 2>&1 & pid=$!
  until curl -sf http://127.0.0.1:18082/health >/dev/null; do sleep 0.02; done
  echo "llama-server gemma $mode $(echo "$(date +%s.%N) - $start" | bc)"; kill -INT $pid; wait $pid
  [ $mode = cold ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
  start=$(date +%s.%N); tokenmill serve gemma3-270m --port 18082 >/dev/null 2>&1 & pid=$!
  until curl -sf http://127.0.0.1:18082/health >/dev/null; do sleep 0.02; done
  echo "tokenmill gemma $mode $(echo "$(date +%s.%N) - $start" | bc)"; kill -INT $pid; wait $pid
 done
done
