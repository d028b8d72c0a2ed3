#!/usr/bin/env bash
# Soak: N short jobs (default 20, the demo recipe cut to a few steps on Fashion-MNIST) run
# back to back under one `layerwise serve`, submitted one after the other; prints the
# service's resident memory after each job and the last against the second. A figure,
# not a test.   scripts/soak.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release -p layerwise
BIN=target/release/layerwise
N="${1:-20}"
root=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$root"' EXIT
"$BIN" serve --jobs "$root/jobs" --runs "$root/runs" --scan-every 0.2 2>"$root/serve.log" &
pid=$!
rss() { awk '/^VmRSS/ {print $2}' "/proc/$pid/status"; }
first=""
for i in $(seq -w 1 "$N"); do
    config="$root/job$i.json"
    python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); c["train"].update({"epochs": 1, "steps_per_epoch": 40, "eval_batches": 2}); json.dump(c, open(sys.argv[2], "w"))' configs/demo.json "$config"
    "$BIN" submit "$config" --name "job$i" --jobs "$root/jobs" >/dev/null
    until grep -qs '"state": "done"' "$root/runs/job$i/status.json"; do
        if grep -qs '"state": "failed"' "$root/runs/job$i/status.json"; then
            echo "job$i failed: $(cat "$root/runs/job$i/status.json")" >&2
            exit 1
        fi
        sleep 0.2
    done
    now=$(rss)
    echo "after job $i: serve resident memory $((now / 1024)) MiB"
    [ "$i" = 02 ] && first=$now
done
echo "last vs after the second job: $(python3 -c "print(f'{$now / $first:.3f}')")x"
