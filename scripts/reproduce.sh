#!/usr/bin/env bash
# The paper's Fashion-MNIST MLP table at full length (3 x 1024, 200 epochs each):
# backprop, pred, sim, predsim, and the backprop-free bio variant, one after the other at
# the lowest CPU priority. Safe to stop at any moment and to run again: each run resumes
# from its newest checkpoint, and a finished run is not run again.
#
# Writes results/fashion-mnist-mlp.json (ours beside the paper's, wall time, images/s) and
# results/fashion-mnist-mlp-MODE.png (curves, by `layerwise plot`) from what has finished.
#
#   scripts/reproduce.sh                 # run (or resume) everything, then write results
#   scripts/reproduce.sh --results-only  # only write results from the runs so far
#
# Run directories live outside the clone (REPRO_RUNS, default
# ~/.cache/layerwise/runs/fashion-mnist-mlp), so they survive fresh clones and stay out of git.
# LAYERWISE_BIN names the binary to use (default: target/release/layerwise, built here).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
RUNS="${REPRO_RUNS:-$HOME/.cache/layerwise/runs/fashion-mnist-mlp}"
BIN="${LAYERWISE_BIN:-target/release/layerwise}"
MODES=(backprop pred sim predsim bio)
mkdir -p "$RUNS" results

if [ "${1:-}" != "--results-only" ]; then
    if [ -z "${LAYERWISE_BIN:-}" ]; then
        cargo build --release -p layerwise
    fi
    for mode in "${MODES[@]}"; do
        dir="$RUNS/$mode"
        if grep -qs '"state": "done"' "$dir/status.json"; then
            echo "reproduce: $mode already done in $dir" >&2
            continue
        fi
        echo "reproduce: $mode -> $dir" >&2
        nice -n 19 "$BIN" train "configs/fashion-mnist-mlp-$mode.json" --run-dir "$dir" --resume
    done
fi

for mode in "${MODES[@]}"; do
    if [ -s "$RUNS/$mode/metrics.jsonl" ]; then
        "$BIN" plot "$RUNS/$mode" --out "results/fashion-mnist-mlp-$mode.png" >/dev/null
    fi
done
python3 - "$RUNS" "${MODES[@]}" <<'EOF'
import json, os, sys
runs, modes = sys.argv[1], sys.argv[2:]
paper = {"backprop": 8.37, "pred": 8.60, "sim": 9.70, "predsim": 8.54, "bio": None}
table = {}
for mode in modes:
    path = os.path.join(runs, mode, "metrics.jsonl")
    if not os.path.exists(path):
        continue
    lines = [json.loads(l) for l in open(path) if l.strip()]
    if not lines:
        continue
    last = lines[-1]
    state = json.load(open(os.path.join(runs, mode, "status.json")))["state"]
    table[mode] = {
        "paper": paper[mode],
        "ours": round(last["test_error"], 2),
        "epochs": last["epoch"],
        "done": state == "done",
        "wall_hours": round(sum(l["epoch_seconds"] for l in lines) / 3600, 2),
        "images_per_sec": round(sorted(l["images_per_sec"] for l in lines)[len(lines) // 2]),
    }
with open("results/fashion-mnist-mlp.json", "w") as f:
    json.dump(table, f, indent=2)
    f.write("\n")
print(json.dumps(table, indent=2))
EOF
