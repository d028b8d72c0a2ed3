#!/usr/bin/env python3
"""Reads a run's TensorBoard event files with TensorBoard's own reader and compares every
scalar with the run's metrics.jsonl: each epoch once, each figure equal (to float32).
Prints one JSON line (the tags and epochs read); exits 1 on a difference.

    python3 scripts/tensorboard_check.py RUN_DIR
"""

import json
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def expected(line):
    """The scalars layerwise writes for one metrics.jsonl line, by tag."""
    nan = float("nan")
    out = {
        "error/train": line["train_error"],
        "error/test": line["test_error"],
        "loss/train": line["train_loss"],
        "loss/test": line["test_loss"],
        "lr": line["lr"],
        "images_per_sec": line["images_per_sec"],
        "seconds/epoch": line["epoch_seconds"],
        "data/wait_seconds": line.get("data_wait_s", 0.0),
        "data/skipped_images": line.get("skipped_images", 0),
    }
    if line.get("validation_error") is not None:
        out["error/validation"] = line["validation_error"]
    for l in line["layers"]:
        out[f"layer{l['layer']}/loss_pred"] = nan if l["loss_pred"] is None else l["loss_pred"]
        out[f"layer{l['layer']}/loss_sim"] = nan if l["loss_sim"] is None else l["loss_sim"]
        if l.get("error") is not None:
            out[f"layer{l['layer']}/error"] = l["error"]
    for s in line["stages"]:
        out[f"stage{s['stage']}/utilisation"] = s["utilisation"]
    return out


def same(a, b):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def main():
    run = sys.argv[1]
    lines = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    problems = []
    for line in lines:
        for tag, want in expected(line).items():
            got = [e for e in acc.Scalars(tag) if e.step == line["epoch"]] if tag in tags else []
            if len(got) != 1:
                problems.append(f"{tag} at epoch {line['epoch']}: {len(got)} values")
            elif not same(got[0].value, float(want)):
                problems.append(f"{tag} at epoch {line['epoch']}: {got[0].value} against {want}")
    epochs = sorted({e.step for e in acc.Scalars("error/test")}) if "error/test" in tags else []
    if epochs != [l["epoch"] for l in lines]:
        problems.append(f"epochs {epochs} against metrics.jsonl's {[l['epoch'] for l in lines]}")
    print(json.dumps({"tags": len(tags), "epochs": epochs, "problems": problems}))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
