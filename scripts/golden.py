#!/usr/bin/env python3
"""Golden values for layerwise's numerical tests, computed by PyTorch itself.

Each case is written to tests/golden/<case>.safetensors: the inputs, the initial tensors
(named as layerwise names them), and what PyTorch computes from them. The case's settings
travel in the file's metadata as JSON under "config", the torch version that computed them
under "torch". Run with the project's torch:

    . scripts/setup.sh && python3 scripts/golden.py            # rewrite tests/golden
    . scripts/setup.sh && python3 scripts/golden.py --check    # recompute, compare, write nothing

`--check` (scripts/test.sh runs it) recomputes every case into a temporary folder and fails,
naming the cases, unless each file is byte for byte the committed one: the goldens the
tests hold layerwise to are what this script computes, not an older copy.

The model code here is written independently of layerwise's Rust, from the method's spec
(shared/docs/ALGORITHM.md), with PyTorch's functional ops and torch.optim.
"""
import filecmp
import json
import os
import struct
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # none is needed here
import torch  # noqa: E402
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden")
DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint8: "U8"}
QUIET = False


def save(case, tensors, config):
    """Writes a safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = bytes(t.reshape(-1).view(torch.uint8).tolist())  # little-endian on x86 and arm
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"config": json.dumps(config, sort_keys=True), "torch": torch.__version__}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, case + ".safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
    if not QUIET:
        print(f"golden: {case}: {len(tensors)} tensors")


# ---------------------------------------------------------------- the method, functionally

def sim_matrix(x, use_std=True):
    if x.dim() == 4 and use_std and x.shape[1] > 3 and x.shape[2] > 1:
        feats = torch.std(x.reshape(x.shape[0], x.shape[1], -1), dim=2)
    else:
        feats = x.reshape(x.shape[0], -1)
    centred = feats - feats.mean(dim=1).unsqueeze(1)
    length = 1e-8 + torch.sqrt(torch.sum(centred ** 2, dim=1))
    unit = centred / length.unsqueeze(1)
    return torch.clamp(unit @ unit.t(), -1, 1)


class FeedbackLinear(torch.autograd.Function):
    """y = x W^T + b; the error reaches x through the fixed matrix B, not W^T."""

    @staticmethod
    def forward(ctx, x, w, b, feedback):
        ctx.save_for_backward(x, feedback)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        return g @ feedback, g.t() @ x, g.sum(0), None


def pool_for_decoder(c, d, dim_in):
    kh = kw = 1
    dh = dw = d
    n = c * dh * dw
    while n > dim_in and kh < d:
        kh *= 2
        dh = -(-d // kh)
        n = c * dh * dw
        if n > dim_in:
            kw *= 2
            dw = -(-d // kw)
            n = c * dh * dw
    return (kh, kw), ((kh * (dh - d // kh)) // 2, (kw * (dw - d // kw)) // 2), n


def channels_last(w):
    """A convolution weight in channels-last layout, as layerwise keeps them: the
    convolution then runs channels-last (the same values to rounding as contiguous)."""
    return w.contiguous(memory_format=torch.channels_last)


def product(cfg, op, x, w, b=None):
    """op(x, w, b); with cfg["bf16"], on bfloat16 operands with the result in float32, as
    autocast runs a convolution or a linear layer."""
    if not cfg.get("bf16"):
        return op(x, w, b)
    low = lambda t: None if t is None else t.bfloat16()
    return op(low(x), low(w), low(b)).float()


def conv3x3(x, w, b):
    return F.conv2d(x, channels_last(w), b, stride=1, padding=1)


def block_hidden(p, x, kind, cfg, train=True):
    if kind == "conv":
        z = product(cfg, conv3x3, x, p["encoder.weight"], p["encoder.bias"])
    else:
        z = product(cfg, F.linear, x.reshape(x.shape[0], -1), p["encoder.weight"], p["encoder.bias"])
    if cfg["batch_norm"]:
        z = F.batch_norm(z, p["bn.running_mean"], p["bn.running_var"], p["bn.weight"], p["bn.bias"], train, 0.1, 1e-5)
    return F.leaky_relu(z, 0.01) if cfg["nonlin"] == "leakyrelu" else F.relu(z)


def block_send_on(h, noise, pool):
    out = h * noise if noise is not None else h
    if pool == "M":
        out = F.max_pool2d(out, 2, 2)
    return out


def local_losses(p, h, kind, cfg, y, sim_target, bce_target):
    """(total, pred, sim, logits) of a block's heads on h."""
    bio = cfg["training"] == "bio"
    loss = cfg["loss"]
    pool = None
    if kind == "conv":
        (kh, kw), pad, _ = pool_for_decoder(h.shape[1], h.shape[2], cfg["dim_in_decoder"])
        if (kh, kw) != (1, 1):
            pool = ((kh, kw), pad)

    def pooled(t):
        return F.avg_pool2d(t, pool[0], pool[0], pool[1]) if pool else t

    pred = sim = logits = None
    if loss in ("sim", "predsim"):
        if bio:
            g = pooled(h)
        elif kind == "conv":
            g = product(cfg, conv3x3, h, p["sim_transform.weight"])
        else:
            g = product(cfg, F.linear, h, p["sim_transform.weight"])
        sim = F.mse_loss(sim_matrix(g, cfg["similarity_std"]), sim_target)
    if loss in ("pred", "predsim"):
        feats = pooled(h).reshape(h.shape[0], -1)
        if bio:
            logits = FeedbackLinear.apply(feats, p["decoder.weight"], p["decoder.bias"], p["decoder.feedback"])
            pred = F.binary_cross_entropy_with_logits(logits, bce_target)
        else:
            logits = product(cfg, F.linear, feats, p["decoder.weight"], p["decoder.bias"])
            pred = F.cross_entropy(logits, y)
    if loss == "predsim":
        total = (1 - cfg["beta"]) * pred + cfg["beta"] * sim
    else:
        total = pred if pred is not None else sim
    return total, pred, sim, logits


def make_targets(y, classes, projection):
    onehot = torch.zeros(y.shape[0], classes).scatter_(1, y.unsqueeze(1), 1.0)
    if projection is None:
        return sim_matrix(onehot), None
    projected = F.linear(onehot, projection)
    return sim_matrix(projected), (projected > 0).float()


def uniform(shape, bound, gen):
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def block_params(kind, cin, cout, classes, cfg, size_out, gen):
    """Random initial tensors for one block, decoder weight non-zero so every path has a gradient."""
    p = {}
    if kind == "conv":
        p["encoder.weight"] = uniform((cout, cin, 3, 3), (cin * 9) ** -0.5, gen)
    else:
        p["encoder.weight"] = uniform((cout, cin), cin ** -0.5, gen)
    p["encoder.bias"] = uniform((cout,), 0.1, gen)
    if cfg["batch_norm"]:
        p["bn.weight"] = 1 + uniform((cout,), 0.2, gen)
        p["bn.bias"] = uniform((cout,), 0.2, gen)
        p["bn.running_mean"] = uniform((cout,), 0.1, gen)
        p["bn.running_var"] = 1 + uniform((cout,), 0.1, gen)
    if cfg["training"] == "backprop":
        return p
    bio = cfg["training"] == "bio"
    if cfg["loss"] in ("sim", "predsim") and not bio:
        shape = (cout, cout, 3, 3) if kind == "conv" else (cout, cout)
        p["sim_transform.weight"] = uniform(shape, 0.3, gen)
    if cfg["loss"] in ("pred", "predsim"):
        dim_in = pool_for_decoder(cout, size_out, cfg["dim_in_decoder"])[2] if kind == "conv" else cout
        outputs = cfg["target_proj_size"] if bio else classes
        p["decoder.weight"] = uniform((outputs, dim_in), 0.3, gen)
        p["decoder.bias"] = uniform((outputs,), 0.1, gen)
        if bio:
            p["decoder.feedback"] = uniform((outputs, dim_in), dim_in ** -0.5, gen)
    return p


BASE = {
    "batch_norm": True, "nonlin": "relu", "loss": "predsim", "training": "local", "beta": 0.99,
    "dim_in_decoder": 32, "similarity_std": True, "target_proj_size": 16, "dropout": 0.0,
}


# ---------------------------------------------------------------- cases

def similarity_cases():
    gen = torch.Generator().manual_seed(1)
    t = {
        "conv_std": torch.randn(8, 6, 5, 5, generator=gen),
        "conv_three_channels": torch.randn(8, 3, 4, 4, generator=gen),
        "linear": torch.randn(8, 12, generator=gen),
    }
    out = dict(t)
    out["conv_std.S"] = sim_matrix(t["conv_std"])
    out["conv_std.S_nostd"] = sim_matrix(t["conv_std"], use_std=False)
    out["conv_three_channels.S"] = sim_matrix(t["conv_three_channels"])
    out["linear.S"] = sim_matrix(t["linear"])
    save("similarity", out, {})


def block_case(name, kind, **over):
    cfg = dict(BASE, **over)
    gen = torch.Generator().manual_seed(len(name) * 7919)
    classes, b = 5, 8
    if kind == "conv":
        cin, cout, size = 3, 6, 8
        x = torch.randn(b, cin, size, size, generator=gen)
        noise_shape = (b, cout, 1, 1)
    else:
        cin, cout, size = 12, 10, 1
        x = torch.randn(b, cin, generator=gen)
        noise_shape = (b, cout)
    y = torch.randint(0, classes, (b,), generator=gen)
    p = block_params(kind, cin, cout, classes, cfg, size, gen)
    init = {k: v.clone() for k, v in p.items()}
    projection = uniform((cfg["target_proj_size"], classes), classes ** -0.5, gen) if cfg["training"] == "bio" else None
    sim_target, bce_target = make_targets(y, classes, projection)
    p_keep = 0.75
    noise = (torch.rand(noise_shape, generator=gen) < p_keep).float().div_(p_keep)
    params = {k: v.clone().requires_grad_(not k.startswith("bn.running") and k != "decoder.feedback") for k, v in p.items()}
    h = block_hidden(params, x, kind, cfg)
    out = block_send_on(h, noise, "M" if kind == "conv" else None)
    total, pred, sim, logits = local_losses(params, h, kind, cfg, y, sim_target, bce_target)
    trainable = [k for k, v in params.items() if v.requires_grad]
    grads = torch.autograd.grad(total, [params[k] for k in trainable])
    tensors = {"x": x, "y": y, "noise": noise, "h": h, "out": out, "loss.total": total, "targets.sim": sim_target}
    if projection is not None:
        tensors["projection"] = projection
        tensors["targets.bce"] = bce_target
    if pred is not None:
        tensors["loss.pred"] = pred
        tensors["logits"] = logits
    if sim is not None:
        tensors["loss.sim"] = sim
    for k, v in init.items():
        tensors["init." + k] = v
    for k, g in zip(trainable, grads):
        tensors["grad." + k] = g
    for k in ("bn.running_mean", "bn.running_var"):
        if k in params:
            tensors["after." + k] = params[k]
    cfg.update(kind=kind, classes=classes, cin=cin, cout=cout, size=size, dropout=1 - p_keep)
    save(name, tensors, cfg)


def optimizer_case(name, ctor, cfg):
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(7, 5, generator=gen)
    grads = [torch.randn(7, 5, generator=gen) for _ in range(5)]
    p = torch.nn.Parameter(p0.clone())
    opt = ctor([p])
    tensors = {"init": p0}
    for i, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        tensors[f"grad.{i}"] = g
        tensors[f"after.{i}"] = p.detach().clone()
    state = opt.state[p]
    for k, v in state.items():
        if k != "step" and torch.is_tensor(v):
            tensors["state." + k] = v
    save(name, tensors, cfg)


def network_case(name, arch, steps=2, **over):
    """A whole network trained for `steps` steps with one fused torch.optim.Adam per layer."""
    cfg = dict(BASE, **over)
    gen = torch.Generator().manual_seed(11)
    classes, b = 4, 8
    bio = cfg["training"] == "bio"
    if arch == "mlp":
        cin, size = 12, 1
        layers = [("linear", 12, 16, 1, None), ("linear", 16, 16, 1, None)]
        out_in = 16
        xs = [torch.randn(b, 12, generator=gen) for _ in range(steps)]
    else:  # conv 4 @8 M -> conv 6 @4 M -> linear 24 -> 16
        layers = [("conv", 3, 4, 8, "M"), ("conv", 4, 6, 4, "M"), ("linear", 24, 16, 1, None)]
        out_in = 16
        xs = [torch.randn(b, 3, 8, 8, generator=gen) for _ in range(steps)]
    ys = [torch.randint(0, classes, (b,), generator=gen) for _ in range(steps)]
    blocks = []
    for kind, ci, co, size, pool in layers:
        p = block_params(kind, ci, co, classes, cfg, size, gen)
        blocks.append({k: v.clone().requires_grad_(not k.startswith("bn.running") and k != "decoder.feedback") for k, v in p.items()})
    out_p = {"weight": uniform((classes, out_in), 0.2, gen).requires_grad_(), "bias": uniform((classes,), 0.1, gen).requires_grad_()}
    projection = uniform((cfg["target_proj_size"], classes), classes ** -0.5, gen) if bio else None
    tensors = {}
    for i, blk in enumerate(blocks):
        for k, v in blk.items():
            tensors[f"init.layers.{i}.{k}"] = v.detach().clone()
    for k, v in out_p.items():
        tensors[f"init.output.{k}"] = v.detach().clone()
    if projection is not None:
        tensors["projection"] = projection

    def trainable(d):
        return [v for v in d.values() if v.requires_grad]

    # Fused, as layerwise's default (optim.fused).
    opts = [torch.optim.Adam(trainable(blk), lr=1e-2, fused=True) for blk in blocks] + [
        torch.optim.Adam(trainable(out_p), lr=1e-2, fused=True)]
    scale = (1 - cfg["beta"]) if cfg["loss"] == "predsim" and cfg["training"] != "backprop" else 1.0
    for step, (x, y) in enumerate(zip(xs, ys)):
        tensors[f"x.{step}"] = x
        tensors[f"y.{step}"] = y
        sim_target, bce_target = make_targets(y, classes, projection)
        for o in opts:
            o.zero_grad()
        h_in = x
        global_total = 0
        for (kind, _, _, _, pool), blk in zip(layers, blocks):
            if cfg["training"] in ("local", "bio"):
                h_in = h_in.detach()
            h = block_hidden(blk, h_in, kind, cfg)
            if cfg["training"] != "backprop":
                total, *_ = local_losses(blk, h, kind, cfg, y, sim_target, bce_target)
                if cfg["training"] in ("local", "bio"):
                    total.backward()
                else:
                    global_total = global_total + total
            h_in = block_send_on(h, None, pool)
        if cfg["training"] in ("local", "bio"):
            h_in = h_in.detach()
        logits = product(cfg, F.linear, h_in.reshape(b, -1), out_p["weight"], out_p["bias"])
        tensors[f"logits.{step}"] = logits.detach()
        loss = scale * F.cross_entropy(logits, y)
        (global_total + loss).backward()
        for o in opts:
            o.step()
    for i, blk in enumerate(blocks):
        for k, v in blk.items():
            tensors[f"final.layers.{i}.{k}"] = v.detach().clone()
    for k, v in out_p.items():
        tensors[f"final.output.{k}"] = v.detach().clone()
    cfg.update(arch=arch, classes=classes, steps=steps, lr=1e-2)
    save(name, tensors, cfg)


def check():
    """Recomputes every case into a temporary folder and compares it with tests/golden."""
    global OUT, QUIET
    committed, QUIET = OUT, True
    with tempfile.TemporaryDirectory() as fresh:
        OUT = fresh
        compute_all()
        ours, theirs = set(os.listdir(fresh)), set(os.listdir(committed))
        differ = sorted(f for f in ours & theirs if not filecmp.cmp(os.path.join(fresh, f), os.path.join(committed, f), shallow=False))
        problems = [f"{f}: differs" for f in differ] + [f"{f}: not committed" for f in sorted(ours - theirs)]
        problems += [f"{f}: committed, not computed by this script" for f in sorted(theirs - ours)]
    if problems:
        print("golden --check: tests/golden is not what scripts/golden.py computes with torch "
              f"{torch.__version__} (rerun it and commit):", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print(f"golden --check: all {len(ours)} cases match tests/golden (torch {torch.__version__})")
    return 0


def main():
    return check() if sys.argv[1:] == ["--check"] else compute_all()


def compute_all():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    similarity_cases()
    for kind in ("linear", "conv"):
        for loss in ("pred", "sim", "predsim"):
            block_case(f"block_{kind}_{loss}", kind, loss=loss)
            block_case(f"block_{kind}_bio_{loss}", kind, loss=loss, training="bio")
        block_case(f"block_{kind}_leaky_nobn_nostd", kind, nonlin="leakyrelu", batch_norm=False, similarity_std=False)
        block_case(f"block_{kind}_bf16_predsim", kind, bf16=True)
    # Adam in both of torch.optim's CPU paths: the single-tensor default and the fused kernel.
    for fused, suffix in ((False, ""), (True, "_fused")):
        optimizer_case(f"optim_adam{suffix}", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3, fused=fused),
                       {"kind": "adam", "lr": 1e-2, "weight_decay": 1e-3, "fused": fused})
        optimizer_case(f"optim_amsgrad{suffix}", lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, fused=fused),
                       {"kind": "amsgrad", "lr": 1e-2, "weight_decay": 0.0, "fused": fused})
    optimizer_case("optim_sgd_momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
                   {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": False})
    optimizer_case("optim_sgd_nesterov", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                   {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": True})
    optimizer_case("optim_sgd_plain", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.0),
                   {"kind": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False})
    for training in ("local", "backprop", "local_global", "bio"):
        network_case(f"network_mlp_{training}", "mlp", training=training)
    network_case("network_conv_local", "conv", training="local")
    # Without batch norm: with it, the conv bias's true gradient is zero, and Adam turns the
    # float32 noise left in it into full-size steps whose sign no two implementations share.
    network_case("network_conv_local_global", "conv", training="local_global", batch_norm=False)
    network_case("network_conv_bio", "conv", training="bio")
    network_case("network_mlp_local_sim_leaky", "mlp", training="local", loss="sim", nonlin="leakyrelu")
    network_case("network_mlp_local_bf16", "mlp", training="local", bf16=True)
    network_case("network_conv_local_bf16", "conv", training="local", bf16=True)


if __name__ == "__main__":
    sys.exit(main())
