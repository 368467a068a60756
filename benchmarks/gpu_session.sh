#!/usr/bin/env bash
# One GPU session's work in two calls of the `device` tool (its tree may carry 64 MiB a call and
# the default model's GGUF is 98 MB, so the GGUF travels in two halves):
#   stage1 (carry .gpu/a and .whl): stash GGUF half 1 + the training data, install the gguf wheel
#   stage2 (carry .gpu/b, within 30 s): join the GGUF, the model-step check of the engine on the
#     GPU (batched-skip kernels vs slicing, mixed vs full depth at batch 64), then stochastic-depth
#     training of the default model; the artifact comes back through $OUT as one tar.
# Prepare here:  split -b 49M -d <gguf> .gpu/gguf.part-  (part-00 -> .gpu/a, part-01 -> .gpu/b);
#                tar -czf .gpu/a/data.tgz -C ../shared data;  pip download gguf wheel into .whl/
set -uo pipefail
G=/tmp/adadepth-gpu
TRAIN_MINUTES=${TRAIN_MINUTES:-4}
case "${1:-}" in
stage1)
  mkdir -p "$G" && cp .gpu/a/* "$G/" || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$G/site" .whl/*.whl || exit 1
  tar -xzf "$G/data.tgz" -C "$G" && ls -la "$G" "$G/data"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
  ;;
stage2)
  cp .gpu/b/* "$G/" && cat "$G"/gguf.part-00 "$G"/gguf.part-01 > "$G/model.gguf" || exit 1
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G/model.gguf" | sha256sum -c || exit 1
  # adadepth.* without pip: the package-dir mapping (server/ -> adadepth.server, ...) as symlinks.
  rm -rf "$G/pkg" && mkdir -p "$G/pkg" && cp -r adadepth "$G/pkg/"
  for p in server router kernels benchmarks; do ln -s "$PWD/$p" "$G/pkg/adadepth/$p"; done
  export PYTHONPATH="$G/pkg:$G/site" ADADEPTH_CACHE_DIR="$G/cache" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  # Run from outside the repo: its top-level kernels/ folder would shadow the PyPI package
  # `kernels` that transformers probes for.
  R=$PWD; cd "$G"
  t0=$(date +%s)
  python3 -c "from adadepth.model.loader import resolve_model; print(resolve_model('$G/model.gguf', '$G/cache'))" || exit 1
  echo "converted in $(( $(date +%s) - t0 )) s"
  ADADEPTH_GPU_MODEL="$G/model.gguf" timeout 150 python3 -m adadepth.benchmarks.gpu_model_step --out "$OUT" 2>&1 | tee "$OUT/model_step.log"
  timeout $(( TRAIN_MINUTES * 60 + 150 )) python3 -m adadepth.cli train --model "$G/model.gguf" \
    --base-model-name default-base --cache-dir "$G/cache" --data-dir "$G/data" --output "$G/artifact" \
    --device cuda --dtype bfloat16 --batch-size 32 --max-seq-len 512 --max-steps 100000 \
    --max-minutes "$TRAIN_MINUTES" --lora-rank 24 --lora-save-dtype bfloat16 --log-every 20 \
    --no-progress-bar 2>&1 | tee "$OUT/train.log" | tail -40
  (cd "$G" && tar -cf "$OUT/artifact.tar" artifact --exclude='artifact/checkpoint*') && ls -la "$OUT"
  ;;
*) echo "usage: $0 stage1|stage2"; exit 2 ;;
esac
