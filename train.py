"""
Source training: a model on the source distribution -> a checkpoint that
finetune.py adapts (PROTOCOL.md section 2). CIFAR needs none (--ckpt paper is
the paper's own); this is for your own source models.

    python train.py              # ResNet-26 on CIFAR-10: SGD 0.1, 75 epochs,
                                 # lr x0.1 at 50 and 65 -> ckpt/source.pt
    python train.py --small      # CPU scale: 15 epochs on 4,000 images
    python train.py --data waterbirds --data_dir DIR   # ResNet-50 -> ckpt/waterbirds.pt
    python train.py --resume     # continue a killed run (ckpt/source.pt.state)

A run diverges, stops with one line and writes nothing when a step's loss is
not finite or above 10x the first step's: the existing --out stays as it is.
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import checkpoints
import common
import data
import model

# Recipes, keyed by flag name. cifar10: the paper's checkpoint's. The others:
# the paper's epochs; SGD lr and wd are our choice for BREEDS, the ERM
# settings of Sagawa et al. 2020 for Waterbirds and CelebA at a constant lr.
# milestones None: at 2/3 and 13/15 of the epochs (50 and 65 of 75).
RECIPES = {
    "cifar10": dict(arch="resnet26", epochs=75, lr=0.1, wd=5e-4, milestones=None,
                    data_dir="data"),
    "living17": dict(arch="resnet50", epochs=5, lr=0.01, wd=1e-4, milestones=None,
                     data_dir="data/imagenet"),
    "entity30": dict(arch="resnet50", epochs=5, lr=0.01, wd=1e-4, milestones=None,
                     data_dir="data/imagenet"),
    "waterbirds": dict(arch="resnet50", epochs=300, lr=1e-3, wd=1e-4, milestones="none",
                       data_dir="data/waterbird_complete95_forest2water2"),
    "celeba": dict(arch="resnet50", epochs=50, lr=1e-4, wd=1e-4, milestones="none",
                   data_dir="data"),
    "tiny_breeds": dict(arch="resnet26", epochs=30, lr=0.1, wd=5e-4, milestones=None,
                        data_dir="data/tiny-imagenet-200", image_size=32),  # ours, from scratch
}
# what a --resume must share with the killed run
STATE_KEYS = ("data", "arch", "epochs", "milestones", "batch_size", "lr", "momentum",
              "wd", "seed", "limit", "holdout", "weights", "image_size", "data_dir")
DIVERGED = 10  # a step's loss above this x the first step's: diverged


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.Help,
                                usage="%(prog)s [--data D] [options]")
    a = p.add_argument
    a("--data", default="cifar10", choices=list(RECIPES), help="picks the recipe")
    a("--data_dir", help="the dataset's folder (default: the recipe's)")
    a("--breeds_dir", default="data/breeds", help="living17, entity30: hierarchy")
    a("--image_size", type=int, help="ImageNet family: crop size (default 224; tiny: 32)")
    a("--cache_dir", default="data/cache", help="decoded tensors")
    a("--holdout", type=int, default=0, help="keep the last N CIFAR training "
      "images out (they join finetune.py's target pool)")
    a("--limit", type=int, default=0, help="at most this many images (0: all)")
    a("--small", action="store_true", help="15 epochs on at most 4,000 images")
    a("--epochs", type=int, help="default: the recipe's (--small: 15)")
    a("--milestones", help="epochs where lr drops x0.1, or none")
    a("--batch_size", type=int, default=128)
    a("--lr", type=float, help="SGD lr (default: the recipe's)")
    a("--momentum", type=float, default=0.9)
    a("--wd", type=float, help="SGD's weight decay (default: the recipe's)")
    a("--arch", choices=sorted(model.ARCHS), help="default: the recipe's")
    a("--weights", default="imagenet", choices=["imagenet", "none"],
      help="resnet50's start: torchvision's ImageNet weights or random")
    a("--seed", type=int, default=0)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--compile", action="store_true", help="torch.compile (CUDA only)")
    a("--cpu_bf16", action="store_true", help="bf16 autocast on the CPU (AMX)")
    a("--out", help="checkpoint, written atomically (default: ckpt/source.pt for cifar10, "
      "else ckpt/<data>.pt, where finetune.py looks)")
    a("--resume", action="store_true", help="continue from <out>.state (saved "
      "every epoch) to the weights of an uninterrupted run")
    args = p.parse_args(argv)
    if args.small:  # CPU scale; flags given explicitly still win
        args.limit = args.limit or 4000
        args.epochs = args.epochs or (15 if args.data == "cifar10" else None)
    for flag, value in RECIPES[args.data].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.image_size = args.image_size or 224
    args.out = args.out or ("ckpt/source.pt" if args.data == "cifar10" else f"ckpt/{args.data}.pt")
    if not args.milestones:
        args.milestones = f"{round(args.epochs * 2 / 3)},{round(args.epochs * 13 / 15)}"
    if min(args.epochs, args.batch_size) < 1 or min(args.limit, args.holdout) < 0:
        p.error("--epochs and --batch_size must be positive, --limit and --holdout "
                "non-negative")
    rates = (args.lr, args.wd, args.momentum)
    if not all(math.isfinite(v) and v >= 0 for v in rates) or args.lr == 0:
        p.error(f"--lr {args.lr:g} must be a finite number > 0, --wd and --momentum "
                "finite and >= 0")
    try:
        [int(m) for m in args.milestones.split(",") if m != "none"]
    except ValueError:
        p.error(f"--milestones {args.milestones!r} is not a comma list of integers")
    return args


def source_data(args):
    """((x, y) to train on, (x, y) to report accuracy on or None, classes)."""
    if args.data == "cifar10":
        d = data.load_cifar10(args.data_dir, args.cache_dir)
        (xtr, ytr), _ = data.source_and_pool(d, args.holdout)
        if args.limit:
            xtr, ytr = xtr[:args.limit], ytr[:args.limit]
        return (xtr, ytr), d["test"], 10  # the clean test split
    from imagenet import family_source
    d, k = family_source(args.data, args.data_dir, args.breeds_dir, args.image_size,
                         args.cache_dir, args.limit)
    return d["train"], d["test"], k


def load_state(path, config, dev):
    """A killed run's state, checked: one line when it cannot be used."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume but there is no {path}; nothing to "
                         "continue (run without --resume to start afresh)")
    try:
        s = torch.load(path, map_location=dev, weights_only=True)
        ok = s["sha1"] == common.digest(s["model"])
    except Exception as e:  # truncated, not ours
        ok, s = False, type(e).__name__
    if not ok:
        raise SystemExit(f"error: {path} is damaged ({s if isinstance(s, str) else 'checksum'}"
                         "); delete it and start afresh without --resume")
    if s["config"] != config:
        raise SystemExit(f"error: {path} was written with other settings "
                         f"({s['config']}); delete it or run without --resume")
    return s


def train(args):
    """Train a source model per args; returns (model, metrics)."""
    dev = common.get_device(args.device, args.cpu_bf16)
    torch.manual_seed(args.seed)
    (xtr, ytr), test, k = source_data(args)
    # on the device when it fits (an ImageNet-family set of 50k images: 7.5 GB)
    if dev.type == "cpu" or xtr.numel() < 16e9:
        xtr, ytr = xtr.to(dev), ytr.to(dev)
    else:
        xtr = xtr.pin_memory()
    xte, yte = (t.to(dev) for t in test) if test else (None, None)
    weights = args.weights if args.arch == "resnet50" and args.weights != "none" else None
    raw = common.prepare(model.build_model(args.arch, k, weights), dev)
    net = torch.compile(raw) if args.compile and dev.type == "cuda" else raw
    opt = torch.optim.SGD(raw.parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.wd)
    milestones = [int(m) for m in args.milestones.split(",") if m != "none"]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    g = torch.Generator(device=xtr.device).manual_seed(args.seed)
    pad = xtr.shape[-1] // 8  # crop padding: 4 px at 32 (CIFAR's), 28 at 224
    n_par = sum(p.numel() for p in raw.parameters())
    print(f"source training ({args.data}, {args.arch}"
          f"{', from ImageNet weights' if weights else ''}): {len(xtr):,d} images, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr} (x0.1 at "
          f"{args.milestones}), wd {args.wd}, {n_par:,d} parameters")
    # what the next epoch depends on, saved after each: weights, optimizer,
    # schedule, both random streams
    st, config = f"{args.out}.state", {k: getattr(args, k) for k in STATE_KEYS}
    first, before, test_acc, loss0 = 1, 0.0, math.nan, None
    if args.resume:
        s = load_state(st, config, dev)
        raw.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        sched.load_state_dict(s["sched"])
        g.set_state(s["gen"])
        torch.set_rng_state(s["rng"])
        first, before, test_acc = s["epoch"] + 1, s["seconds"], s["test_acc"]
        loss0 = s.get("loss0")
        print(f"resuming {st}: epochs {first}..{args.epochs} to go")
    elif os.path.isfile(st):
        print(f"note: {st} holds a killed run; starting afresh (--resume continues it)")
    t0 = time.time() - before
    for epoch in range(first, args.epochs + 1):
        net.train()
        te, tot, correct = time.time(), 0.0, 0
        for xb, yb in data.batches(xtr, ytr, args.batch_size, shuffle=True, generator=g):
            xb = data.crop_flip(xb, pad, g).to(dev, non_blocking=True)
            yb = yb.to(dev, non_blocking=True)
            with common.autocast(dev):
                out = net(xb)
                loss = F.cross_entropy(out.float(), yb)
            # checked before the update: a NaN never reaches the weights
            where = f"epoch {epoch}, lr {sched.get_last_lr()[0]:g}"
            v = common.finite(loss, where, "Try a smaller --lr.")
            loss0 = v if loss0 is None else loss0
            if v > DIVERGED * loss0:
                raise SystemExit(f"error: the loss is {v:.3g} at {where}, over {DIVERGED}x "
                                 f"the first step's {loss0:.3g}: the run diverged; nothing "
                                 "was written. Try a smaller --lr.")
            tot += v * len(yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (out.argmax(1) == yb).sum().item()
        sched.step()
        ips = len(xtr) / (time.time() - te)
        scored = xte is not None and (epoch in (1, args.epochs) or epoch % 5 == 0)
        if scored:  # else the last value stands
            test_acc = model.evaluate(net, (xte, yte))["acc"]
        el = time.time() - t0
        w = raw.state_dict()
        common.atomic_save({
            "config": config, "epoch": epoch, "model": w, "sha1": common.digest(w),
            "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": g.get_state(),
            "rng": torch.get_rng_state(), "seconds": el, "test_acc": test_acc,
            "loss0": loss0}, st)
        acc = f"{test_acc:5.1f}%" if scored else "  -   "
        eta = common.fmt_time(el / epoch * (args.epochs - epoch))
        print(f"epoch {epoch:3d}/{args.epochs} | loss {tot / len(xtr):.3f} | train "
              f"{100 * correct / len(xtr):5.1f}% | test {acc} | {ips:,.0f} img/s | "
              f"{common.fmt_time(el)} elapsed, ETA {eta}", flush=True)
    metrics = {"test_acc": None if math.isnan(test_acc) else test_acc,
               "train_images": len(xtr), "seconds": time.time() - t0,
               "torch": str(torch.__version__), "device": common.device_name(dev)}
    return raw, metrics


def main(argv=None):
    args = parse_args(argv)
    common.check_writable(args.out, "--out")
    net, metrics = train(args)
    checkpoints.save_checkpoint(args.out, net, args, metrics)
    os.remove(f"{args.out}.state")  # whole: nothing left to resume
    acc = metrics["test_acc"]
    acc = "none (no source test split)" if acc is None else f"{acc:.2f}%"
    print(f"source test accuracy {acc} after {common.fmt_time(metrics['seconds'])}; "
          f"saved {args.out}")
    return net


if __name__ == "__main__":
    common.run(main, "the last finished epoch is in <out>.state "
                     "(--resume continues it)")
