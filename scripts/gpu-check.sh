#!/usr/bin/env bash
# Every GPU check in one call, for a GPU machine that has PyTorch but no Rust and no data
# set. Two halves:
#
#   bash scripts/gpu-check.sh --pack     # here: a stripped release binary into dist/gpu/
#   bash scripts/gpu-check.sh            # there, with dist/gpu carried: the checks
#
# With the device tool: run(command="bash scripts/gpu-check.sh", carry=["dist/gpu"]).
# The checks: `layerwise devices`; on cuda:0, a pipelined run (one stage per layer) against
# the same run sequential, and a run resumed half-way against the uninterrupted one, both
# compared by `layerwise eval` of their final checkpoints and by every layer file of them
# (weights, optimizer state, generator; SHA-256 from the manifests), bit for bit;
# a streamed JPEG folder (made by `bench data`, which also times the loader on all cores)
# pipelined against sequential; `bench train --json` of mlp
# predsim and vgg8b predsim on random CIFAR-shaped data with 1, 2 and 4 stages on the one
# GPU, and of vgg8b predsim with bf16 products (model.bf16) on one stage; a model too big
# for the GPU refused by validate; two processes (a torchrun-style launch of 2 ranks, both
# on the one GPU) with the GPU link over TCP and over NCCL, each against the
# single-process run (NCCL may refuse two ranks on one GPU: that check is then listed as
# not run, never as passed); `auto`
# over a worker, which times the layers on its GPU for the coordinator; the mlp recipe in
# eager PyTorch (scripts/torch_baseline.py) as the yardstick.
# Figures go to stdout and to $OUT (or dist/gpu-out) as JSON. The exactness checks and the
# yardstick run first; a bench starts only within BUDGET_S seconds (450) of the start, so
# that the whole fits the device tool's 600 s a command; what is skipped is listed.
#
# DEVICE=cpu QUICK=1 bash scripts/gpu-check.sh runs the same script here, on the CPU with
# tiny benches and this checkout's torch, to check the script itself before a GPU is lent.
set -euo pipefail
cd "$(dirname "$0")/.."

# The sources a binary is built from, as one hash: --pack records it beside the binary and
# the checks refuse a binary packed from other sources (the GPU machine has no git).
source_hash() { find crates Cargo.toml Cargo.lock -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1; }

if [[ "${1:-}" == "--pack" ]]; then
    . scripts/setup.sh
    cargo build --release -p layerwise
    mkdir -p dist/gpu
    strip -o dist/gpu/layerwise target/release/layerwise
    source_hash > dist/gpu/source.sha256
    ls -l dist/gpu/layerwise
    exit 0
fi

BIN=${LAYERWISE_BIN:-dist/gpu/layerwise}
DEV=${DEVICE:-cuda:0}
QUICK=${QUICK:-0}
# Benches start only while the script has run less than this (seconds): the device tool
# stops a command at 600 s, and what is skipped is said, not lost silently.
BUDGET=${BUDGET_S:-450}
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu-check: BUDGET_S: expected whole seconds, got '$BUDGET'" >&2; exit 2; }
OUT=${OUT:-dist/gpu-out}
mkdir -p "$OUT"
[[ -x "$BIN" ]] || { echo "gpu-check: no binary at $BIN: run 'bash scripts/gpu-check.sh --pack' where Rust is, and carry dist/gpu" >&2; exit 2; }
if [[ -z "${LAYERWISE_BIN:-}" && "$(cat dist/gpu/source.sha256 2>/dev/null)" != "$(source_hash)" ]]; then
    echo "gpu-check: $BIN was packed from other sources than these: run 'bash scripts/gpu-check.sh --pack' again" >&2
    exit 2
fi
PY=${PYTHON:-python3}
TORCH_DIR=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
echo "gpu-check: torch $TORCH_VERSION at $TORCH_DIR"
case "$TORCH_VERSION" in
    2.11.*) ;;
    *) echo "gpu-check: the binary is built against torch 2.11; this machine has $TORCH_VERSION" >&2; exit 2 ;;
esac
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step() { echo; echo "=== $*"; }
failures=()
skipped=()
notrun=()  # checks this machine cannot run: listed, never counted as passed

step "layerwise devices"
"$BIN" devices | tee "$OUT/devices.txt"
if [[ "$DEV" == cuda* ]] && ! grep -q "cuda devices: [1-9]" "$OUT/devices.txt"; then
    echo "gpu-check: libtorch sees no CUDA device" >&2
    exit 1
fi

step "random CIFAR-shaped data (CIFAR-10 binary format)"
DATA=$(mktemp -d)
"$PY" - "$DATA" <<'EOF'
import os, sys
root = sys.argv[1]
def write(name, n):
    records = bytearray(os.urandom(n * 3073))
    for i in range(n):
        records[i * 3073] %= 10
    with open(os.path.join(root, name), "wb") as f:
        f.write(records)
for i in range(1, 6):
    write(f"data_batch_{i}.bin", 10_000)
write("test_batch.bin", 10_000)
EOF
DATA_SET=(--set data.dataset='"cifar10"' --set "data.root=\"$DATA\"")

# bench: 1, 2 and 4 stages on the one GPU (the config's placement), besides sequential,
# auto and one stage per layer.
stages_json() {  # stages_json LAYERS PARTS: PARTS contiguous stages on $DEV
    "$PY" -c 'import json, sys
n, k = int(sys.argv[1]), int(sys.argv[2])
sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
out, start = [], 0
for s in sizes:
    out.append({"layers": list(range(start, start + s)), "device": sys.argv[3]}); start += s
print(json.dumps(out))' "$1" "$2" "$DEV"
}
# A small mlp predsim on $DEV for the exactness checks.
run_small() {  # run_small DIR [extra args...]
    local dir=$1; shift
    "$BIN" train configs/demo.json --run-dir "$dir" "${DATA_SET[@]}" \
        --set model.num_hidden=256 --set train.epochs=2 --set train.steps_per_epoch=20 \
        --set train.eval_batches=2 --set checkpoint.every_epochs=1 --set train.cpu_threads=1 \
        "$@" 2>>"$OUT/train.log"
}
# What a final checkpoint evaluates to, less where it lies.
eval_json() {
    "$BIN" eval "$1" --json 2>>"$OUT/train.log" | "$PY" -c 'import json, sys
e = json.load(sys.stdin); e.pop("checkpoint"); print(json.dumps(e, sort_keys=True))' ||
        { echo "FAILED: layerwise eval $1" >&2; failures+=("eval of $1"); }
}
ON_GPU="[{\"layers\": [0, 1, 2, 3], \"device\": \"$DEV\"}]"
PER_LAYER=$(stages_json 4 4)
RUNS=$(mktemp -d)

# same_eval WHAT NAME_A A NAME_B B: the two evaluations (files under $OUT) must be equal.
same_eval() {
    if cmp -s "$OUT/$3" "$OUT/$5"; then
        echo "same evaluation: $(cat "$OUT/$5")"
    else
        echo "DIFFERENT: $2 $(cat "$OUT/$3") $4 $(cat "$OUT/$5")"
        failures+=("$1 on $DEV")
    fi
}

# same_weights WHAT DIR_A DIR_B: the newest checkpoints of two runs hold the same layers,
# bit for bit: every layer file (weights, optimizer state, generator) has the same SHA-256
# in the two manifests. An evaluation alone reads two batches; this reads every tensor.
same_weights() {
    local report="$OUT/weights-$(basename "$3").txt"
    if "$PY" - "$2" "$3" > "$report" <<'EOF'
import glob, json, os, sys
def layers(run):
    newest = sorted(d for d in glob.glob(os.path.join(run, "checkpoints", "step-*")) if not d.endswith(".partial"))[-1]
    files = json.load(open(os.path.join(newest, "manifest.json")))["files"]
    return os.path.basename(newest), {f["name"]: f["sha256"] for f in files if f["name"].endswith(".safetensors")}
(sa, a), (sb, b) = layers(sys.argv[1]), layers(sys.argv[2])
print(f"{sa}: {len(a)} layer files; {sb}: {len(b)}")
for name in sorted(set(a) | set(b)):
    if a.get(name) != b.get(name):
        print(f"differs: {name}")
sys.exit(0 if a == b and sa == sb and a else 1)
EOF
    then
        echo "same weights: $(head -n 1 "$report"), every file bit for bit"
    else
        echo "DIFFERENT WEIGHTS: $(tr '\n' ' ' < "$report")"
        failures+=("$1 (weights) on $DEV")
    fi
}

# A run that fails is a failure of its check; the checks after it still run.
ran() {  # ran WHAT RUN_SMALL_ARGS...
    local what=$1; shift
    run_small "$@" && return 0
    echo "FAILED: $what; the log's last line: $(tail -n 1 "$OUT/train.log")"
    failures+=("$what on $DEV")
    return 1
}

step "pipelined (one stage per layer) against sequential, on $DEV"
if ran "sequential run" "$RUNS/seq" --set pipeline.mode='"sequential"' --set "pipeline.placement=$ON_GPU" &&
    ran "pipelined run" "$RUNS/pipe" --set "pipeline.placement=$PER_LAYER"; then
    eval_json "$RUNS/seq" > "$OUT/eval-sequential.json"
    eval_json "$RUNS/pipe" > "$OUT/eval-pipelined.json"
    same_eval "pipelined != sequential" sequential eval-sequential.json pipelined eval-pipelined.json
    same_weights "pipelined != sequential" "$RUNS/seq" "$RUNS/pipe"
fi

step "resumed half-way against uninterrupted, on $DEV"
if ran "first half" "$RUNS/half" --set "pipeline.placement=$PER_LAYER" --set train.epochs=1 &&
    ran "resumed half" "$RUNS/half" --set "pipeline.placement=$PER_LAYER" --resume; then
    eval_json "$RUNS/half" > "$OUT/eval-resumed.json"
    same_eval "resume != uninterrupted" uninterrupted eval-pipelined.json resumed eval-resumed.json
    same_weights "resume != uninterrupted" "$RUNS/pipe" "$RUNS/half"
fi

step "bf16 products (model.bf16): pipelined against sequential, on $DEV"
if ran "bf16 sequential run" "$RUNS/seq16" --set model.bf16=true --set pipeline.mode='"sequential"' --set "pipeline.placement=$ON_GPU" &&
    ran "bf16 pipelined run" "$RUNS/pipe16" --set model.bf16=true --set "pipeline.placement=$PER_LAYER"; then
    eval_json "$RUNS/seq16" > "$OUT/eval-sequential-bf16.json"
    eval_json "$RUNS/pipe16" > "$OUT/eval-pipelined-bf16.json"
    same_eval "bf16 pipelined != sequential" sequential eval-sequential-bf16.json pipelined eval-pipelined-bf16.json
    same_weights "bf16 pipelined != sequential" "$RUNS/seq16" "$RUNS/pipe16"
    echo "float32: $(cat "$OUT/eval-pipelined.json" 2>/dev/null)"
fi

step "a streamed JPEG folder (decode threads, pinned float batches) on $DEV: pipelined against sequential"
# bench data makes 512 JPEGs (and their shards) and times the loader with 1, 2 and all cores.
if "$BIN" bench data --batches 1 --images "$RUNS/jpeg" --count 512 --size 224 | tee "$OUT/bench-data.txt" | grep -E "made|thread"; then
    JPEG=(--set data.dataset='"image-folder"' --set "data.root=\"$RUNS/jpeg\"" --set data.stream=true
        --set data.image_size=32 --set data.random_resized_crop=true --set data.workers=4)
    if ran "streamed sequential run" "$RUNS/jseq" "${JPEG[@]}" --set pipeline.mode='"sequential"' --set "pipeline.placement=$ON_GPU" &&
        ran "streamed pipelined run" "$RUNS/jpipe" "${JPEG[@]}" --set "pipeline.placement=$PER_LAYER"; then
        same_weights "streamed pipelined != sequential" "$RUNS/jseq" "$RUNS/jpipe"
    fi
else
    echo "FAILED: bench data"; failures+=("bench data")
fi

# Two ranks launched as torchrun launches them, both on $DEV: rank 0 coordinates and holds
# the first layers, rank 1 the rest; the link between them carries GPU tensors.
two_ranks() {  # two_ranks DIR LINK
    local dir=$1 link=$2 port pids=() rc=0
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    for rank in 0 1; do
        RANK=$rank WORLD_SIZE=2 LOCAL_RANK=$rank MASTER_ADDR=127.0.0.1 LAYERWISE_PORT=$port \
            LAYERWISE_SECRET=gpu-check-shared-secret run_small "$dir" --set "pipeline.gpu_link=\"$link\"" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    return $rc
}
links=(tcp)
[[ "$DEV" == cuda* ]] && links+=(nccl)
for link in "${links[@]}"; do
    step "two processes on $DEV, GPU link over $link, against one process"
    if two_ranks "$RUNS/ranks-$link" "$link"; then
        eval_json "$RUNS/ranks-$link" > "$OUT/eval-two-processes-$link.json"
        same_eval "two processes ($link link) != one process" one-process eval-sequential.json \
            "two-processes-$link" "eval-two-processes-$link.json"
        same_weights "two processes ($link link) != one process" "$RUNS/seq" "$RUNS/ranks-$link"
    elif [[ "$link" == nccl ]] && grep -qi "duplicate GPU\|same device\|invalid usage" "$OUT/train.log"; then
        echo "NCCL refuses two ranks on one GPU here: the NCCL link needs two GPUs; its error:"
        grep -i -m1 "duplicate GPU\|same device\|invalid usage" "$OUT/train.log" | tee "$OUT/nccl-one-gpu.txt"
        notrun+=("two processes over nccl: NCCL refused two ranks on one GPU (the link needs two GPUs)")
    else
        echo "FAILED: two processes over $link; the log's last lines:"
        tail -n 5 "$OUT/train.log"
        failures+=("two processes over $link on $DEV")
    fi
done

# `auto` over a worker on $DEV: the coordinator times the layers on its own $DEV and asks
# the worker to time them on its; then each gets a stage. The same weights as one process.
step "auto over a worker on $DEV (each process times the layers on its device), against one process"
auto_over_worker() {  # auto_over_worker DIR
    local dir=$1 coordinator rc=0
    mkdir -p "$dir"
    LAYERWISE_SECRET=gpu-check-shared-secret run_small "$dir" --listen 127.0.0.1:0 \
        --set pipeline.placement='"auto"' --set 'pipeline.workers=["w1"]' --set pipeline.gpu_link='"tcp"' &
    coordinator=$!
    while [[ ! -s "$dir/coordinator.addr" ]] && kill -0 "$coordinator" 2>/dev/null; do sleep 0.2; done
    [[ -s "$dir/coordinator.addr" ]] || { wait "$coordinator"; return 1; }
    LAYERWISE_SECRET=gpu-check-shared-secret "$BIN" worker --coordinator "$(cat "$dir/coordinator.addr")" \
        --name w1 --once --devices "$DEV" 2>>"$OUT/train.log" || rc=1
    wait "$coordinator" || rc=1
    return $rc
}
if auto_over_worker "$RUNS/auto-worker" && grep -q "auto: w1 on $DEV with" "$OUT/train.log"; then
    grep "auto: .* on $DEV" "$OUT/train.log" | tail -n 2 | sed 's/.*auto: /measured: /'
    eval_json "$RUNS/auto-worker" > "$OUT/eval-auto-over-worker.json"
    same_eval "auto over a worker != one process" one-process eval-sequential.json \
        auto-over-worker eval-auto-over-worker.json
    same_weights "auto over a worker != one process" "$RUNS/seq" "$RUNS/auto-worker"
else
    echo "FAILED: auto over a worker; the log's last lines:"
    tail -n 5 "$OUT/train.log"
    failures+=("auto over a worker on $DEV")
fi

if [[ "$DEV" == cuda* ]]; then
    step "a model too big for $DEV is refused before anything runs"
    BIG=$(mktemp --suffix .json)
    "$PY" -c 'import json, sys
json.dump({"model": {"arch": "mlp", "num_layers": 3, "num_hidden": 120000},
           "pipeline": {"placement": [{"layers": [0, 1, 2, 3], "device": sys.argv[2]}]}}, open(sys.argv[1], "w"))' "$BIG" "$DEV"
    if "$BIN" validate --no-data "$BIG" > "$OUT/too-big.txt" 2>&1; then
        echo "FAILED: accepted: $(cat "$OUT/too-big.txt")"; failures+=("a model too big for $DEV was accepted")
    elif grep -q "$DEV has" "$OUT/too-big.txt"; then
        echo "refused: $(cat "$OUT/too-big.txt")"
    else
        echo "FAILED: refused, but not for $DEV's memory: $(cat "$OUT/too-big.txt")"; failures+=("too big for $DEV")
    fi
    rm -f "$BIG"
fi

SUMMARY=$(mktemp --suffix .py)
cat > "$SUMMARY" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["machine"]
print("{}: matmul in {} {:.0f} GFLOP/s".format(", ".join(m["device_names"]), m["matmul_kind"], m["matmul_gflops"]))
for run in r["runs"]:
    dev = (run.get("peak_device_bytes") or 0) / 1e9
    placement = run["placement"] if isinstance(run["placement"], str) else json.dumps(run["stages"])
    placement = "{} ({} process{})".format(placement, run["processes"], "es" if run["processes"] > 1 else "")[:40]
    print("{:<11} {:<40} {:>9.0f} img/s {:>8.1f} GFLOP/s  eff {:.2f}  RSS {:.2f} GB  device {:.2f} GB".format(
        run["mode"], placement, run["images_per_sec"], run["gflops"], run["efficiency"],
        run["peak_rss_bytes"] / 1e9, dev))
EOF
step "eager PyTorch yardstick: mlp predsim on $DEV, Adam as in the paper's code, fused, and fused with bf16 products"
for flags in "" --fused "--fused --bf16"; do
    "$PY" scripts/torch_baseline.py --device "$DEV" --synthetic --steps "$([[ "$QUICK" == 1 ]] && echo 5 || echo 200)" $flags \
        | tee -a "$OUT/torch-baseline.json" || failures+=("eager PyTorch yardstick $flags")
done

bench() {  # [PARTS="1 2 4"] bench NAME CONFIG LAYERS STEPS [extra args...]
    local name=$1 config=$2 layers=$3 steps=$4; shift 4
    for parts in ${PARTS:-1 2 4}; do
        step "bench $name, $parts stage(s) on $DEV"
        if ((SECONDS >= BUDGET)); then
            echo "skipped: ${SECONDS}s gone of a ${BUDGET}s budget (BUDGET_S)"
            skipped+=("bench $name $parts")
            continue
        fi
        "$BIN" bench train "$config" --steps "$steps" --repeats "$([[ "$QUICK" == 1 ]] && echo 1 || echo 3)" --json "${DATA_SET[@]}" \
            --set "pipeline.placement=$(stages_json "$layers" "$parts")" "$@" \
            > "$OUT/bench-$name-$parts.json" 2>>"$OUT/bench.log" || failures+=("bench $name $parts")
        "$PY" "$SUMMARY" "$OUT/bench-$name-$parts.json" || true
    done
}
if [[ "$QUICK" == 1 ]]; then
    bench mlp-predsim configs/fashion-mnist-mlp-predsim.json 4 2 --set model.num_hidden=64
    bench vgg8b-predsim configs/fashion-mnist-vgg8b-predsim.json 8 1 --set model.feat_mult=0.0625 --set train.batch_size=8
    PARTS=1 bench vgg8b-predsim-bf16 configs/fashion-mnist-vgg8b-predsim.json 8 1 --set model.feat_mult=0.0625 \
        --set train.batch_size=8 --set model.bf16=true
else
    bench mlp-predsim configs/fashion-mnist-mlp-predsim.json 4 200
    bench vgg8b-predsim configs/fashion-mnist-vgg8b-predsim.json 8 50
    PARTS=1 bench vgg8b-predsim-bf16 configs/fashion-mnist-vgg8b-predsim.json 8 50 --set model.bf16=true
fi

rm -rf "$DATA" "$RUNS" "$SUMMARY"
echo
if ((${#skipped[@]})); then
    printf 'gpu-check: skipped for time: %s\n' "${skipped[@]}"
fi
if ((${#notrun[@]})); then
    printf 'gpu-check: not run here: %s\n' "${notrun[@]}"
fi
if ((${#failures[@]})); then
    printf 'gpu-check: FAILED: %s\n' "${failures[@]}"
    exit 1
fi
if ((${#skipped[@]} + ${#notrun[@]})); then
    echo "gpu-check: every check that ran passed (${#skipped[@]} skipped for time, ${#notrun[@]} not run here); figures in $OUT"
else
    echo "gpu-check: all checks passed; figures in $OUT"
fi
