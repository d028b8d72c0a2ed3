#!/usr/bin/env python3
"""Runs a network exported by `layerwise export` in PyTorch and compares its predictions
with those `layerwise eval --predictions` wrote.

    python3 scripts/export_check.py MODEL.safetensors IDX_DIR PREDICTIONS.txt

MODEL.json (beside the weights) says what each layer computes. IDX_DIR holds the test set
as t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz). Prints a JSON line with
the agreement and the test error PyTorch finds; exits 1 if any prediction differs.
"""
import gzip
import json
import os
import struct
import sys

import torch
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U8": torch.uint8}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        buf = bytearray(raw[base + start:base + end])
        t = torch.frombuffer(buf, dtype=DTYPES[meta["dtype"]]) if buf else torch.empty(0, dtype=DTYPES[meta["dtype"]])
        out[name] = t.reshape(meta["shape"]).clone()
    return out


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = struct.unpack(">" + "I" * dims, raw[4:4 + 4 * dims])
    return torch.tensor(list(raw[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def find(root, name):
    for candidate in (name + ".gz", name):
        if os.path.exists(os.path.join(root, candidate)):
            return os.path.join(root, candidate)
    raise SystemExit(f"{root}: no {name}(.gz)")


def forward(w, desc, x):
    slope = desc["leaky_relu_slope"]
    for i, layer in enumerate(desc["layers"]):
        p = f"layers.{i}."
        if layer["kind"] == "conv":
            x = F.conv2d(x, w[p + "conv.weight"], w[p + "conv.bias"], stride=layer["stride"], padding=layer["padding"])
        else:
            x = F.linear(x.flatten(1), w[p + "linear.weight"], w[p + "linear.bias"])
        if layer["batch_norm"]:
            x = F.batch_norm(x, w[p + "bn.running_mean"], w[p + "bn.running_var"], w[p + "bn.weight"], w[p + "bn.bias"],
                             False, 0.0, layer["batch_norm"]["eps"])
        x = F.leaky_relu(x, slope) if layer["nonlin"] == "leakyrelu" else F.relu(x)
        pool = layer.get("pool_after")
        if pool:
            op = F.max_pool2d if pool["kind"] == "max" else F.avg_pool2d
            x = op(x, pool["kernel"], pool["stride"], pool["padding"])
    return F.linear(x.flatten(1), w["output.weight"], w["output.bias"])


def main():
    model, idx_dir, predictions = sys.argv[1:4]
    torch.set_num_threads(1)
    w = read_safetensors(model)
    with open(os.path.splitext(model)[0] + ".json") as f:
        desc = json.load(f)
    images = read_idx(find(idx_dir, "t10k-images-idx3-ubyte")).float().unsqueeze(1) / 255.0
    labels = read_idx(find(idx_dir, "t10k-labels-idx1-ubyte")).long()
    mean = torch.tensor(desc["input"]["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(desc["input"]["std"], dtype=torch.float32).view(1, -1, 1, 1)
    x = (images - mean) / std
    with torch.no_grad():
        pred = torch.cat([forward(w, desc, x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    with open(predictions) as f:
        theirs = torch.tensor([int(line) for line in f if line.strip()])
    same = int((pred == theirs).sum())
    error = 100.0 * float((pred != labels).float().mean())
    print(json.dumps({"examples": len(pred), "same_predictions": same, "test_error": error}))
    return 0 if same == len(pred) == len(theirs) else 1


if __name__ == "__main__":
    sys.exit(main())
