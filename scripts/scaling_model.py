#!/usr/bin/env python3
"""The link side of a pipeline of local learners over N hosts, on paper.

For each shipped recipe, the layers are split over N hosts in contiguous groups that even
out their forward multiply-adds (as `auto` evens out measured step times); each link then
carries the last layer's activation of its group (float32, or bfloat16 with model.bf16)
and the labels. A link of B bit/s feeds at most B / 8 / bytes-per-image images/s; the
pipeline runs at the smaller of that and its slowest stage's compute, less the fill and
drain of each epoch. Prints the busiest link's bytes per image, and that ceiling at 10 and
100 Gbit/s, for 2, 4, 8 and 16 hosts. The layer shapes follow crates/nn/src/arch.rs.

    python3 scripts/scaling_model.py [--bf16]
"""

import sys

VGG = {
    "vgg8b": "128 256 M 256 512 M 512 M 512 M",
    "vgg11b": "128 128 128 256 M 256 512 M 512 512 M 512 M",
}


def layers(arch, channels, size, num_layers=1, hidden=1024):
    """(forward MACs, activation elements) per image of each hidden layer, then the output."""
    out = []
    if arch == "mlp":
        features = channels * size * size
    else:
        first = True
        for token in VGG[arch].split():
            if token == "M":
                macs, _ = out[-1]
                size = size // 2
                out[-1] = (macs, channels * size * size)
                continue
            kernel, stride, pad = (7, 2, 3) if first and size > 64 else (3, 1, 1)
            size_out = (size + 2 * pad - kernel) // stride + 1
            cout = int(token)
            out.append((kernel * kernel * channels * cout * size_out * size_out, cout * size_out * size_out))
            channels, size, first = cout, size_out, False
        features = channels * size * size
    for _ in range(num_layers):
        out.append((features * hidden, hidden))
        features = hidden
    out.append((features * 10, 10))
    return out


def split(costs, n):
    """Contiguous groups of `costs` over at most `n` parts minimising the largest part's sum:
    the index after each part's last layer."""
    n = min(n, len(costs))
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (len(costs) + 1) for _ in range(n + 1)]
    cut = [[0] * (len(costs) + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(1, len(costs) + 1):
            for i in range(k - 1, j):
                worst = max(best[k - 1][i], prefix[j] - prefix[i])
                if worst < best[k][j]:
                    best[k][j], cut[k][j] = worst, i
    ends, j = [], len(costs)
    for k in range(n, 0, -1):
        ends.append(j)
        j = cut[k][j]
    return sorted(ends)


RECIPES = [
    ("mlp 3x1024, 28 px", "mlp", 1, 28, 3),
    ("vgg8b, 32 px", "vgg8b", 3, 32, 1),
    ("vgg11b, 32 px", "vgg11b", 3, 32, 1),
    ("vgg8b, 224 px", "vgg8b", 3, 224, 1),
    ("vgg11b, 224 px", "vgg11b", 3, 224, 1),
]


def main():
    element = 2 if "--bf16" in sys.argv else 4
    print(f"activations in {'bfloat16' if element == 2 else 'float32'}; labels 8 bytes an image")
    print(f"{'recipe':<20} {'hosts':>5} {'busiest link, bytes/image':>26} {'ceiling @10 Gbit/s':>19} {'@100 Gbit/s':>12}")
    for name, arch, channels, size, num_layers in RECIPES:
        ls = layers(arch, channels, size, num_layers)
        for n in (2, 4, 8, 16):
            ends = split([m for m, _ in ls], n)
            busiest = max(ls[e - 1][1] * element + 8 for e in ends[:-1]) if len(ends) > 1 else 0
            ceiling = lambda gbit: gbit * 1e9 / 8 / busiest if busiest else float("inf")
            hosts = f"{len(ends)}" + ("" if len(ends) == n else f" of {n}")
            print(f"{name:<20} {hosts:>5} {busiest:>26,} {ceiling(10):>19,.0f} {ceiling(100):>12,.0f}")


if __name__ == "__main__":
    main()
