#!/usr/bin/env bash
# The CUDA checks as one short run on a lent GPU machine (after deploy/gpu/prepare.sh here):
#   1. the test suite's CUDA-marked tests (tests/test_cuda.py, the paged attention's torch path);
#   2. the model runner alone on a random-weight Llama 3.2 1B shape in bfloat16: decode tokens/s
#      at batch 1-128 and context 128 and 1,024, with the GB/s read and its fraction of the GPU's
#      measured copy bandwidth (bench/runner_ceiling.py);
#   3. the server on that shape, 32 closed-loop streams (bench/load.py).
# Everything it prints also lands in $OUT (the device tool brings it back). DEVICE=cpu
# SHAPE_ARGS=... runs the same steps on the CPU, as a rehearsal.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/aserve-gpu-check}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
MODEL=${MODEL:-.gpu/llama-3.2-1b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ "$DEVICE" = cuda ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
status=0
{
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

echo "== 1. CUDA-marked tests" | tee "$OUT/tests.txt"
"$PY" -m pytest -q -ra -m cuda -p no:cacheprovider tests/test_cuda.py tests/test_paged_attention.py 2>&1 \
  | tee -a "$OUT/tests.txt" || status=1

echo "== 2. model runner, $MODEL, bfloat16" | tee "$OUT/runner.txt"
"$PY" bench/runner_ceiling.py --model "$MODEL" --random-weights --device "$DEVICE" --dtype bfloat16 \
  --batch ${BATCHES:-1 8 32 64 128} --context 128 1024 --steps ${STEPS:-20} --json "$OUT/runner.json" 2>&1 \
  | tee -a "$OUT/runner.txt" || status=1

echo "== 3. server, 32 streams" | tee "$OUT/server.txt"
"$PY" -m aserve serve --model "$MODEL" --load-format dummy --device "$DEVICE" --dtype bfloat16 --port 8477 \
  --max-model-len 4096 > "$OUT/server.log" 2>&1 &
server=$!
ready() { "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8477/health', timeout=2)" 2>/dev/null; }
for _ in $(seq 240); do ready && break; sleep 0.5; done
"$PY" bench/load.py --url http://127.0.0.1:8477 --concurrency ${STREAMS:-32} --requests ${REQUESTS:-96} \
  --max-tokens 128 --ignore-eos 2>&1 | tee -a "$OUT/server.txt" || status=1
kill -TERM $server; wait $server
tail -n 5 "$OUT/server.log"
exit $status
