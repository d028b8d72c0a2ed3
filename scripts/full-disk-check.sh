#!/usr/bin/env bash
# A real full disk, not an injected error: the run directory on a 100 MB tmpfs that holds
# one checkpoint of the demo's model (70 MB) and not a second. Checks that the run fails
# naming the checkpoint, keeps the last good one, leaves no .partial folder and records
# `failed`; that with room again (the tmpfs grown) `--resume` finishes; and that its final
# checkpoint's layers are bit-identical to an uninterrupted run's. Needs root (mount).
#
#   sudo bash scripts/full-disk-check.sh [BIN]     # BIN: default target/release/layerwise
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/layerwise}
[[ -x "$BIN" ]] || { echo "full-disk-check: no binary at $BIN (cargo build --release -p layerwise)" >&2; exit 2; }
DISK=$(mktemp -d)
WHOLE=$(mktemp -d)
cleanup() { umount "$DISK" 2>/dev/null || true; rm -rf "$DISK" "$WHOLE"; }
trap cleanup EXIT
mount -t tmpfs -o size=100m tmpfs "$DISK"
SETS=(--set train.epochs=4 --set train.steps_per_epoch=30 --set train.eval_batches=5
      --set checkpoint.every_steps=10 --set checkpoint.keep=2 --set train.cpu_threads=1)
fail() { echo "full-disk-check: FAILED: $*" >&2; exit 1; }

if "$BIN" train configs/demo.json --run-dir "$DISK/run" "${SETS[@]}" 2>"$WHOLE/full.log" >/dev/null; then
    fail "the run on a full disk succeeded"
fi
grep -q "No space left on device" "$WHOLE/full.log" || fail "no 'No space left on device' in the log"
grep -q '"state": "failed"' "$DISK/run/status.json" || fail "status.json: $(cat "$DISK/run/status.json")"
! ls -d "$DISK"/run/checkpoints/*.partial 2>/dev/null || fail "a .partial folder stayed"
kept=$(ls "$DISK/run/checkpoints")
[[ -n "$kept" ]] || fail "no checkpoint kept"
echo "full disk: failed as it should: $(tail -n 1 "$WHOLE/full.log"); kept: $kept"

mount -o remount,size=400m "$DISK"
"$BIN" train configs/demo.json --run-dir "$DISK/run" "${SETS[@]}" --resume 2>>"$WHOLE/full.log" >/dev/null \
    || fail "the resume with room again: $(tail -n 1 "$WHOLE/full.log")"
"$BIN" train configs/demo.json --run-dir "$WHOLE/run" "${SETS[@]}" 2>/dev/null >/dev/null
final=checkpoints/step-0000000120
for f in "$WHOLE/run/$final"/*.safetensors; do
    cmp -s "$f" "$DISK/run/$final/$(basename "$f")" || fail "$(basename "$f") differs from the uninterrupted run's"
done
echo "full-disk-check: passed: resumed with room again, final layers bit-identical to an uninterrupted run"
