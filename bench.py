"""
The measured numbers behind RESULTS.md that are not accuracies: speed, and
how close our generated CIFAR-10-C is to the reference generator.

    python bench.py --what finetune        # seconds a run (one lr), per --tune,
                                           # prefix cache on / off
    python bench.py --what finetune --train_n 200 --val_n 20 --test_n 180
    python bench.py --what finetune --data imagenet_c   # ResNet-50, 224 px
    python bench.py --what corruptions     # img/s of the 19 corruptions
    python bench.py --what fidelity --ref stats.json --data_dir D   # vs reference

finetune: one lr, 15 epochs on 1,000 images (16 steps of 64), val (100)
every epoch, test (900) at val records, as finetune.py runs it; random images.
fidelity: statistics of (corrupted - clean) per (corruption, severity) beside
the reference's (a JSON {corruption: {severity: {stat: value}}}); mad must be
within --tol (frost, whose photographs we replace by a texture: twice that).
"""
import argparse
import copy
import json
import sys
import time

import torch
import torch.nn.functional as F

import common
import data
import finetune
import model
from corruptions import CORRUPTIONS
from data import corrupt, parse_names

# one run's (train, val, test images, epochs, px, classes, net), as the protocol
SIZES = {"cifar_c": (1000, 100, 900, 15, 32, 10, "resnet26"),
         "imagenet_c": (5000, 10000, 10000, 10, 224, 1000, "resnet50")}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--what", default="finetune", choices=["finetune", "corruptions", "fidelity"])
    a("--data", default="cifar_c", choices=list(SIZES), help="finetune: sizes, net")
    a("--tunes", default="none,layer1,layer2,layer3,fc,all,auto_rgn")
    for k in ("train_n", "val_n", "test_n", "epochs"):
        a(f"--{k}", type=int, help="default: --data's")
    a("--data_dir", default="", help="cifar-10-batches-py's folder (corruptions: "
      "its test images instead of random ones)")
    a("--n_images", type=int, default=1017, help="corruptions: images a severity")
    a("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    a("--ref", help="fidelity: the reference statistics (JSON)")
    a("--tol", type=float, default=0.15, help="fidelity: relative tolerance on mad")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    keys = ("train_n", "val_n", "test_n", "epochs", "px", "classes", "arch")
    for k, v in zip(keys, SIZES[args.data]):
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_finetune(source, tune, splits, args, dev, cache):
    """Seconds of one lr as finetune.py runs it: the prefix, epochs, evals."""
    fargs = finetune.parse_args(["--data", args.data, "--tune", tune, "--epochs",
                                 str(args.epochs), "--device", dev.type])
    fargs.prefix_cache_gb = 16 if cache else 0
    names = finetune.method_params(fargs, source, splits["train"], print)[0]
    sync(dev)
    t0 = time.time()
    k = model.frozen_stages(source, names, splits, fargs.prefix_cache_gb)
    cached = {s: (model.prefix(source, x, k), y) for s, (x, y) in splits.items()}
    finetune.train_one_lr(copy.deepcopy(source), names, cached, k, 1e-3, fargs)
    sync(dev)
    return time.time() - t0, k, names


def bench_finetune(args, dev):
    torch.manual_seed(0)
    source = model.build_model(args.arch, args.classes)
    source = common.prepare(source, dev).eval()
    g, px = torch.Generator().manual_seed(0), args.px
    splits = {s: (torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8,
                                generator=g).to(dev),
                  torch.randint(0, args.classes, (n,), generator=g).to(dev))
              for s, n in (("train", args.train_n), ("val", args.val_n),
                           ("test", args.test_n))}
    warm = {s: (x[:64], y[:64]) for s, (x, y) in splits.items()}
    time_finetune(source, "all", warm, argparse.Namespace(**{**vars(args), "epochs": 1}),
                  dev, False)
    print(f"{args.arch}, one lr: {args.epochs} epochs on {args.train_n} images, val "
          f"{args.val_n}, test {args.test_n} at val records; {common.device_name(dev)}")
    print(f"{'tune':9s} {'params':>8s} {'cached':>7s} {'cache off':>10s} {'cache on':>9s}")
    rows = {}
    for tune in args.tunes.split(","):
        off, _, names = time_finetune(source, tune, splits, args, dev, cache=False)
        on, k, _ = time_finetune(source, tune, splits, args, dev, cache=True)
        rows[tune] = {"off": off, "on": on, "stages": k}
        n = sum(p.numel() for nm, p in source.named_parameters() if nm in set(names))
        print(f"{tune:9s} {n:8,d} {k:7d} {off:9.2f}s {on:8.2f}s")
    return rows


def test_images(args, dev):
    if args.data_dir:
        x = data.load_cifar10(args.data_dir, cache_dir=None)["test"][0]
        reps = (args.n_images + len(x) - 1) // len(x)
        return x.repeat(reps, 1, 1, 1)[:args.n_images].to(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    return x.to(dev)


def bench_corruptions(args, dev):
    """Seconds per corruption for 5 severities of n images."""
    x, rows = test_images(args, dev), {}
    print(f"CIFAR-10-C: {len(CORRUPTIONS)} corruptions x 5 severities x {len(x):,d} "
          f"images, {common.device_name(dev)}, {torch.get_num_threads()} thread(s)")
    for name in sorted(CORRUPTIONS):
        corrupt(x[:8], name, 5)  # warm-up: cached operators, kernels
        sync(dev)
        t0 = time.time()
        for s in range(1, 6):
            corrupt(x, name, s, seed=s)
        sync(dev)
        rows[name] = time.time() - t0
        print(f"{name:18s} {rows[name]:6.2f}s {5 * len(x) / rows[name]:10,.0f} img/s")
    return rows


def stats(clean, corrupted):
    """Five statistics on the 0..255 scale; these definitions reproduce the
    reference's numbers for contrast and noise."""
    x, c = clean.double(), corrupted.double()
    lap = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=x.dtype).view(1, 1, 3, 3)

    def hf(v):  # mean |4-neighbour Laplacian of the channel mean|
        return F.conv2d(v.mean(1, keepdim=True), lap).abs().mean()

    def sat(v):  # HSV saturation (max - min) / max, 0 for black
        mx, mn = v.amax(1), v.amin(1)
        return torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-8), 0 * mx).mean()
    return {"mad": (c - x).abs().mean().item(),  # mean |corrupted - clean|
            "mean_shift": (c.mean() - x.mean()).item(),
            "std_ratio": (c.flatten(1).std(1) / x.flatten(1).std(1)).mean().item(),
            "hf_ratio": (hf(c) / hf(x)).item(),  # blur < 1 < noise
            "sat_ratio": (sat(c) / sat(x)).item()}


def bench_fidelity(args, dev):
    try:
        with open(args.ref or "") as f:
            ref = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --ref {args.ref}: cannot read reference stats ({e})")
    clean = data.load_cifar10(args.data_dir or "data")["test"][0]
    names, bad, worst = parse_names("all"), 0, (0.0, "")
    keys = ("mad", "mean_shift", "std_ratio", "hf_ratio", "sat_ratio")
    print(f"{'corruption':18s} sev " + " ".join(f"{k:>13s}" for k in keys) + " (ours/ref)")
    for name in names:
        for sev in range(1, 6):
            s, r = stats(clean, corrupt(clean, name, sev)), ref[name][str(sev)]
            off = abs(s["mad"] / r["mad"] - 1)
            tol = args.tol * (2 if name == "frost" else 1)
            bad, worst = bad + (off > tol), max(worst, (off, f"{name} {sev}"))
            cells = " ".join(f"{s[k]:6.2f}/{r[k]:<6.2f}" for k in keys)
            print(f"{name:18s} {sev:3d} {cells}{'  <- mad off' if off > tol else ''}")
    print(f"{len(names) * 5 - bad}/{len(names) * 5} within tolerance on mad; largest "
          f"deviation {100 * worst[0]:.1f}% ({worst[1]})")
    return bad


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = common.get_device(args.device)
    what = {"finetune": bench_finetune, "corruptions": bench_corruptions,
            "fidelity": bench_fidelity}[args.what]
    out = what(args, dev)
    if args.what == "fidelity" and out:
        sys.exit(1)
    return out


if __name__ == "__main__":
    common.run(main)
