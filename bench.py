"""
The speed numbers in the README, one function per benchmark, on the current device; random images unless
--data_dir, so no data on disk is needed.

    python bench.py                                 # every benchmark at the paper's sizes
    python bench.py --what finetune                 # seconds a run (one lr), per --tune, cache on / off
    python bench.py --what finetune --train_n 200 --val_n 20 --test_n 180          # a quick look on a CPU
    python bench.py --what finetune --data imagenet_c                 # ResNet-50 at ImageNet-C sizes
    python bench.py --what corruptions --threads 1 --data_dir ../shared/data/cifar10-sample   # CIFAR-10-C

finetune: one run = one lr, 15 epochs on 1,000 target images (16 steps of 64), val (100) after every epoch and
before the first, test (900) where val sets a record, as finetune.py runs it. The prefix cache computes the
frozen stages once; without it every step runs them. corruptions: seconds for all 19 corruptions x 5
severities of --n_images images, after a warm-up call each. Measured numbers: README "Speed".
"""
import argparse
import copy
import time

import torch

import common as C
import data
import finetune as FT
import model as M
import protocol as P

TUNES = {"cifar_c": "none,layer1,layer2,layer3,fc,all,auto_rgn", "imagenet_c": "layer1,layer4,fc,all"}
# (train, val, test images, epochs, image size, classes) of one run
SIZES = {"cifar_c": (1000, 100, 900, 15, 32, 10), "imagenet_c": (5000, 10000, 10000, 10, 224, 1000)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=C.Help)
    p.add_argument("--what", default="all", choices=["all", "finetune", "corruptions"], help="the benchmarks")
    g = p.add_argument_group("finetune")
    g.add_argument("--data", default="cifar_c", choices=list(SIZES), help="sizes and network of the run")
    g.add_argument("--tunes", default="", help="comma list of --tune values to time (default per --data)")
    g.add_argument("--train_n", type=int, default=None)
    g.add_argument("--val_n", type=int, default=None)
    g.add_argument("--test_n", type=int, default=None)
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--image_size", type=int, default=None)
    g.add_argument("--batch_size", type=int, default=64)
    g = p.add_argument_group("corruptions")
    g.add_argument("--data_dir", default="", help="folder with cifar-10-batches-py: time on its test images")
    g.add_argument("--n_images", type=int, default=1017, help="images per (corruption, severity)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tunes = args.tunes or TUNES[args.data]
    for k, v in zip(("train_n", "val_n", "test_n", "epochs", "image_size", "num_classes"), SIZES[args.data]):
        setattr(args, k, v if getattr(args, k, None) is None else getattr(args, k))
    return args


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_finetune(source, tune, splits, args, dev, cache):
    """Seconds for one finetune.py run of one lr: the prefix (when cached) + the epochs + the evaluations."""
    fargs = P.parse_args(["--data", args.data, "--tune", tune, "--epochs", str(args.epochs), "--batch_size",
                           str(args.batch_size), "--seed", str(args.seed), "--device", dev.type])
    names = FT.tune_names(source, tune)
    _sync(dev)
    t0 = time.time()
    k = C.cache_stage(names, fargs, source.arch) if cache else 0
    cached, starts = C.cached_splits(source, splits, k, fargs)
    FT.finetune(copy.deepcopy(source), names, cached, 1e-3, fargs, start=starts)
    _sync(dev)
    return time.time() - t0, k, names


def bench_finetune(args, dev):
    """Table of seconds per fine-tuning run for every --tune, with and without the prefix cache."""
    torch.manual_seed(args.seed)
    arch = "resnet26" if args.data == "cifar_c" else "resnet50"
    source = C.prepare(M.build_model(arch, args.num_classes), dev).eval()
    g, px = torch.Generator().manual_seed(args.seed), args.image_size
    splits = {s: (torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g).to(dev),
                  torch.randint(0, args.num_classes, (n,), generator=g).to(dev))
              for s, n in (("train", args.train_n), ("val", args.val_n), ("test", args.test_n))}
    warm = {s: (x[:args.batch_size], y[:args.batch_size]) for s, (x, y) in splits.items()}
    # warm up
    time_finetune(source, "all", warm, argparse.Namespace(**{**vars(args), "epochs": 1}), dev, False)
    print(f"fine-tuning {source.arch}, one lr: {args.epochs} epochs on {args.train_n} images of {px} px "
          f"(batch {args.batch_size}), val {args.val_n} evaluated {args.epochs + 1} times, test "
          f"{args.test_n} at val records; {C.device_name(dev)}")
    print(f"{'tune':9s} {'params':>8s} {'cached':>7s} {'cache off':>10s} {'cache on':>9s} {'speedup':>8s}")
    rows = {}
    for tune in args.tunes.split(","):
        off, _, names = time_finetune(source, tune, splits, args, dev, cache=False)
        k = C.cache_stage(names, P.parse_args(["--data", args.data, "--tune", tune]), source.arch)
        on = time_finetune(source, tune, splits, args, dev, cache=True)[0] if k else off  # k = 0: same path
        rows[tune] = {"off": off, "on": on, "stages": k}
        n = sum(p.numel() for nm, p in source.named_parameters() if nm in set(names))
        note = "" if k else "  (nothing to cache)"
        print(f"{tune:9s} {n:8,d} {k:7d} {off:9.2f}s {on:8.2f}s {off / on:7.1f}x{note}")
    # the CIFAR bar (ResNet-50's prefix costs more)
    if args.data == "cifar_c" and "fc" in rows and "all" in rows:
        r = rows["all"]["on"] / rows["fc"]["on"]
        print(f"acceptance: fc {rows['fc']['on']:.2f}s vs all {rows['all']['on']:.2f}s with the cache = "
              f"{r:.1f}x ({'PASS' if r >= 10 else 'FAIL'}: needs >= 10x)")
    return rows


def bench_corruptions(args, dev):
    """Seconds per corruption for 5 severities of n images, and the total, on the current device."""
    if args.data_dir:
        x = data.load_cifar10(args.data_dir, cache_dir=None)["test"][0]
        x = x.repeat((args.n_images + len(x) - 1) // len(x), 1, 1, 1)[:args.n_images]
    else:
        x = torch.randint(0, 256, (args.n_images, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator())
    x = x.to(dev)
    print(f"CIFAR-10-C: 19 corruptions x 5 severities x {len(x):,d} images, {C.device_name(dev)}, "
          f"{torch.get_num_threads()} thread(s)")
    rows = {}
    for name in data.ALL19:
        data.corrupt(x[:8], name, 5)  # warm-up: builds cached operators, loads kernels
        _sync(dev)
        t0 = time.time()
        for s in range(1, 6):
            data.corrupt(x, name, s, seed=s)
        _sync(dev)
        rows[name] = time.time() - t0
        print(f"{name:18s} {rows[name]:6.2f}s {5 * len(x) / rows[name]:10,.0f} img/s")
    total = sum(rows.values())
    print(f"{'total':18s} {total:6.2f}s {95 * len(x) / total:10,.0f} img/s")
    return rows


BENCHES = {"finetune": bench_finetune, "corruptions": bench_corruptions}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = C.get_device(args.device)
    return {name: fn(args, dev) for name, fn in BENCHES.items() if args.what in ("all", name)}


if __name__ == "__main__":
    main()
