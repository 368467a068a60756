#!/usr/bin/env bash
# Prepares, on the development machine, what a GPU machine's training run carries, and prints
# the `device` calls that run it. The device tool copies at most 64 MiB a call (tracked files
# included) and the default model's GGUF is 98 MB, so it travels xz-compressed (90 MB) in
# chunks: each call but the last stashes one chunk (the first also the data); the last, within
# the 30 s the machine stays warm, brings the last chunk and runs benchmarks/gpu_train.sh.
#
#   bash benchmarks/gpu_prepare.sh          # ~3 min (xz -9e), cached under ~/.cache/adadepth/gpu
#
# Writes .whl/gguf-*.whl and .gpu/NN/gguf.xz.part-NN (+ .gpu/00/data.tar.xz), all ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
CACHE=${ADADEPTH_CACHE_DIR:-$HOME/.cache/adadepth}/gpu
LIMIT=$((64 * 1024 * 1024)); MARGIN=$((1024 * 1024))
mkdir -p "$CACHE" .whl
ls .whl/gguf-*.whl >/dev/null 2>&1 || "$PY" -m pip download -q --no-deps -d .whl "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
gguf=$("$PY" -c 'from adadepth.model.loader import _default_gguf_path as p; print(p())')
[ -f "$CACHE/model.gguf.xz" ] || xz -9e -T0 -c "$gguf" > "$CACHE/model.gguf.xz"
[ -f "$CACHE/data.tar.xz" ] || tar -cJf "$CACHE/data.tar.xz" -C "$(dirname "$DATA")" "$(basename "$DATA")"
tracked=$(git ls-files -z | xargs -0 stat -c %s | awk '{s+=$1} END {print s}')
whl=$(stat -c %s .whl/gguf-*.whl | head -n 1)
data=$(stat -c %s "$CACHE/data.tar.xz"); total=$(stat -c %s "$CACHE/model.gguf.xz")
room=$((LIMIT - MARGIN - tracked - whl))   # model bytes one call can carry (next to the wheel)
[ $room -gt $((data + 1024 * 1024)) ] || { echo "tracked files ($tracked B) leave no room under 64 MiB"; exit 1; }
rm -rf .gpu
# Chunk 0 travels with the data; chunks are named so that `sort` restores their order.
offset=0; n=0
while [ $offset -lt $total ]; do
  size=$room; [ $n -eq 0 ] && size=$((room - data))
  dir=.gpu/$(printf "%02d" $n); mkdir -p "$dir"
  dd if="$CACHE/model.gguf.xz" of="$dir/gguf.xz.part-$(printf "%02d" $n)" bs=1M iflag=skip_bytes,count_bytes skip=$offset count=$size status=none
  offset=$((offset + size)); n=$((n + 1))
done
cp "$CACHE/data.tar.xz" .gpu/00/
last=$(printf "%02d" $((n - 1)))
echo "$n device calls; tracked files $tracked B; each call carries at most $((room + whl)) B besides them"
for i in $(seq 0 $((n - 2))); do
  d=$(printf "%02d" "$i")
  t=120; [ "$i" = 0 ] && t=360
  echo "device call $((i + 1)) (carry [\".gpu/$d\"], timeout $t, the next call at once: the machine stays warm 30 s):"
  check=""; [ "$i" = 0 ] && check=" && timeout 300 python3 benchmarks/gpu_check.py --out \$OUT  # (#6: kernels + model step, random weights)"
  echo "  mkdir -p /tmp/stash && cp .gpu/$d/* /tmp/stash/ && nvidia-smi -L$check"
done
cat <<CALLS
device call $n (carry [".gpu/$last", ".whl"]; MAX_MINUTES = budget left minus ~2 min of setup and saving):
  rm -rf $(for i in $(seq 0 $((n - 2))); do printf ".gpu/%02d " "$i"; done); GGUF_PARTS_DIR=/tmp/stash \\
  LAYER_ORDER=\$PWD/adadepth/artifacts/smollm2-135m-sd INIT_ADAPTER=\$PWD/adadepth/artifacts/smollm2-135m-sd \\
  DISTILL_PROMPTS=2048 CALIB_TRAINED=0 EVAL=0 MAX_MINUTES=8 bash benchmarks/gpu_train.sh
then here: cat <files_at>/artifact.tar.part-* | tar x -C /tmp/new && adadepth eval --model /tmp/new/artifact --compare
CALLS
