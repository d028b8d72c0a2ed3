#!/usr/bin/env python3
"""Throughput yardstick: the demo's recipe (predsim mlp 3x1024, leakyrelu, dropout 0.1,
Adam 5e-4, batch 128, Fashion-MNIST with crop 2 + flip) trained the way the paper's public
PyTorch code trains it: one process, eager PyTorch, layer after layer per batch, one Adam
per layer. Written by us from the method's spec, for comparing images/s with
`layerwise bench train`; prints one JSON line. Its augmentation is lighter than a per-image
pipeline (one crop offset per batch, in the training thread), which favours it.

    . scripts/setup.sh && python3 scripts/torch_baseline.py [--steps 150] [--threads 2]
        [--device cuda:0] [--synthetic] [--fused] [--bf16]

`--synthetic` trains on 50,000 random CIFAR-shaped images (3x32x32) instead of
Fashion-MNIST, as scripts/gpu-check.sh does on a machine without the data set.
`--fused` gives each Adam PyTorch's fused kernel (layerwise's default), where the paper's
code updates one tensor at a time: the same kernels as layerwise, to see what the engine
itself costs.
`--bf16` runs every linear layer's product in bfloat16 with a float32 result, as
layerwise's `model.bf16` does (similarity matrices, batch norm, losses and weights stay
float32).
"""
import argparse
import gzip
import json
import struct
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = "/usr/share/datasets/fashion-mnist"
BF16 = False  # set by --bf16


def linear(m, x):
    """`m(x)`, or with --bf16 its product in bfloat16 and its result in float32."""
    if not BF16:
        return m(x)
    low = lambda t: None if t is None else t.bfloat16()
    return F.linear(low(x), low(m.weight), low(m.bias)).float()


def read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = struct.unpack(">" + "I" * dims, raw[4:4 + 4 * dims])
    return torch.frombuffer(bytearray(raw[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def sim_matrix(x):
    x = x.reshape(x.shape[0], -1)
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (xn @ xn.t()).clamp(-1, 1)


class Block(nn.Module):
    def __init__(self, d_in, d_out, classes, beta=0.99):
        super().__init__()
        self.encoder = nn.Linear(d_in, d_out)
        self.bn = nn.BatchNorm1d(d_out)
        self.sim_transform = nn.Linear(d_out, d_out, bias=False)
        self.decoder = nn.Linear(d_out, classes)
        self.decoder.weight.data.zero_()
        self.beta = beta

    def train_step(self, x, y, sim_target):
        h = F.leaky_relu(self.bn(linear(self.encoder, x)), 0.01)
        out = F.dropout(h, 0.1, True)
        pred = F.cross_entropy(linear(self.decoder, h), y)
        sim = F.mse_loss(sim_matrix(linear(self.sim_transform, h)), sim_target)
        loss = (1 - self.beta) * pred + self.beta * sim
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return out.detach()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    global BF16
    BF16 = args.bf16
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    dev = torch.device(args.device)
    if args.synthetic:
        images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)
        labels = torch.randint(0, 10, (50_000,))
    else:
        images = read_idx(f"{ROOT}/train-images-idx3-ubyte.gz").unsqueeze(1)
        labels = read_idx(f"{ROOT}/train-labels-idx1-ubyte.gz").long()
    channels, size = images.shape[1], images.shape[2]
    d_in = channels * size * size
    def adam(module):
        return torch.optim.Adam(module.parameters(), lr=5e-4, fused=True if args.fused else None)

    blocks = [Block(width, 1024, 10).to(dev) for width in (d_in, 1024, 1024)]
    for blk in blocks:  # made on the device
        blk.opt = adam(blk)
    out = nn.Linear(1024, 10).to(dev)
    out.weight.data.zero_()
    out_opt = adam(out)
    n, b = images.shape[0], 128
    perm = torch.randperm(n)

    def batch(i):
        idx = perm[(i * b) % n:(i * b) % n + b]
        x = F.pad(images[idx].float(), (2, 2, 2, 2))
        dy, dx = torch.randint(0, 5, (2,))
        x = x[:, :, dy:dy + size, dx:dx + size]
        flip = torch.rand(len(idx)) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        x = (x / 255.0 - 0.286) / 0.353
        return x.reshape(len(idx), -1).to(dev), labels[idx].to(dev)

    def step(i):
        x, y = batch(i)
        sim_target = sim_matrix(F.one_hot(y, 10).float())
        for blk in blocks:
            x = blk.train_step(x, y, sim_target)
        loss = 0.01 * F.cross_entropy(linear(out, x), y)
        out_opt.zero_grad()
        loss.backward()
        out_opt.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for i in range(10):  # warm-up
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.steps):
        step(10 + i)
    sync()
    secs = time.perf_counter() - start
    print(json.dumps({"recipe": f"mlp 3x1024 predsim, batch 128, input {channels}x{size}x{size}",
                      "device": args.device, "threads": args.threads, "steps": args.steps, "fused": args.fused, "bf16": args.bf16,
                      "images_per_sec": round(args.steps * b / secs)}))


if __name__ == "__main__":
    main()
