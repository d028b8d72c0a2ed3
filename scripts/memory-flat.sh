#!/usr/bin/env bash
# Memory of a streamed run over a set larger than the loader may hold: makes COUNT
# 500x375 JPEGs (default 14,400: 2.0 GiB once decoded at 224 px) in DIR, trains a small
# MLP on them for one epoch at 224 px with data.prefetch_mib 256, and prints the
# coordinator's peak resident memory (VmHWM) and its resident memory sampled through the
# epoch. The bound it should stay within: the model and libtorch, plus the prefetched
# batches (at most 256 MiB), plus the batch in the making.
#
#   bash scripts/memory-flat.sh [DIR] [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/layerwise-memory-flat}
count=${2:-14400}
bin=${LAYERWISE_BIN:-target/release/layerwise}
if [ ! -d "$dir/train" ]; then
    "$bin" bench data --batches 1 --images "$dir" --count "$count" | grep made
fi
cfg=$(mktemp --suffix .json)
cat > "$cfg" <<JSON
{
  "data": {"dataset": "image-folder", "root": "$dir", "stream": true, "image_size": 224,
           "random_resized_crop": true, "prefetch": 16, "prefetch_mib": 256},
  "model": {"arch": "mlp", "num_layers": 1, "num_hidden": 16, "dim_in_decoder": 16},
  "train": {"epochs": 1, "batch_size": 64, "eval_batches": 2},
  "pipeline": {"mode": "pipelined"}
}
JSON
run=$(mktemp -d)
"$bin" train "$cfg" --run-dir "$run/run" 2> "$run/log" &
pid=$!
peak=0; samples=()
while kill -0 "$pid" 2> /dev/null; do
    rss=$(awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$pid/status" 2> /dev/null || echo 0)
    hwm=$(awk '/^VmHWM:/ {print int($2 / 1024)}' "/proc/$pid/status" 2> /dev/null || echo "$peak")
    [ "${hwm:-0}" -gt "$peak" ] && peak=$hwm
    samples+=("${rss:-0}")
    sleep 1
done
wait "$pid" || { tail -5 "$run/log"; exit 1; }
decoded=$(( count * 3 * 224 * 224 / 1048576 ))
echo "decoded set: ${decoded} MiB at 224 px; prefetch bound 256 MiB"
echo "resident MiB each second: ${samples[*]}"
echo "peak resident (VmHWM): ${peak} MiB"
grep -E "streaming|images_per_sec|epoch 1" "$run/log" | tail -3
rm -rf "$run" "$cfg"
