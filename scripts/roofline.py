#!/usr/bin/env python3
"""The fastest an MLP predsim training step can run on this machine, from its parts.

Times, in eager PyTorch with the given threads, the matrix products one step of
local-loss training needs (per hidden layer: the block forward and back to its weights,
its input being detached; the sim transform forward, back to its weights and back into
the block) and one Adam step over all the parameters, fused and unfused. Their sum is a
floor for a sequential step that leaves out everything else (similarity matrices,
classifiers, norms, nonlinearities, dropout, losses, loading). Prints the floor as
images/s, for comparing `layerwise bench train` and the public code against.

    python3 scripts/roofline.py [--batch 128] [--hidden 1024] [--layers 3] [--threads 2]
"""
import argparse
import time

import torch


def median_ms(step, repeats=30):
    for _ in range(5):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--inputs", type=int, default=784)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="each part is timed this many times over; its best is kept")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    b, h = a.batch, a.hidden

    parts = []
    for i in range(a.layers):
        fan_in = a.inputs if i == 0 else h
        x, w, g, s = torch.randn(b, fan_in), torch.randn(h, fan_in), torch.randn(b, h), torch.randn(h, h)
        parts += [
            (f"layer {i}: block forward", lambda x=x, w=w: x @ w.t()),
            (f"layer {i}: block to weights", lambda x=x, g=g: g.t() @ x),
            (f"layer {i}: sim transform forward", lambda g=g, s=s: g @ s.t()),
            (f"layer {i}: sim transform to weights", lambda g=g: g.t() @ g),
            (f"layer {i}: sim transform to input", lambda g=g, s=s: g @ s),
        ]

    shapes = []
    for i in range(a.layers):
        fan_in = a.inputs if i == 0 else h
        # block and its batch norm, sim transform, classifier
        shapes += [(h, fan_in), (h,), (h,), (h,), (h, h), (a.classes, h), (a.classes,)]
    shapes += [(a.classes, h), (a.classes,)]
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    for q in params:
        q.grad = torch.randn_like(q)
    count = sum(q.numel() for q in params)
    fused = torch.optim.Adam(params, lr=1e-4, fused=True)
    unfused = torch.optim.Adam(params, lr=1e-4, foreach=False)
    parts += [("Adam, fused", fused.step), ("Adam, one tensor at a time", unfused.step)]

    # Round after round, so that a machine whose speed drifts slows every part alike;
    # each part's best round is kept.
    best = {name: float("inf") for name, _ in parts}
    for _ in range(a.rounds):
        for name, step in parts:
            best[name] = min(best[name], median_ms(step))
    adam = {True: best.pop("Adam, fused"), False: best.pop("Adam, one tensor at a time")}
    products_ms = sum(best.values())

    for name, ms in best.items():
        print(f"{name:<36} {ms:7.2f} ms")
    print(f"{'matrix products of a step':<36} {products_ms:7.2f} ms")
    print(f"{'Adam, fused':<36} {adam[True]:7.2f} ms  ({count / 1e6:.2f} M parameters)")
    print(f"{'Adam, one tensor at a time':<36} {adam[False]:7.2f} ms")
    for fused in (True, False):
        floor = products_ms + adam[fused]
        kind = "fused" if fused else "unfused"
        print(f"floor with Adam {kind}: {floor:.1f} ms a step, at most {1e3 * b / floor:,.0f} images/s on {a.threads} thread(s)")


if __name__ == "__main__":
    main()
