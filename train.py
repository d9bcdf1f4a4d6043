"""
Source training: a model on the source distribution -> a checkpoint that finetune.py adapts (PROTOCOL.md section
2). CIFAR needs none (finetune.py --ckpt paper uses the paper's own); this is for your own source models.

    python train.py              # ResNet-26 on CIFAR-10, the paper checkpoint's recipe: SGD 0.1, 75 epochs,
                                 # lr x0.1 at 50 and 65 -> ckpt/source.pt
    python train.py --small      # CPU scale: 15 epochs on 4,000 images (--data_dir, --holdout: README)
    python train.py --data waterbirds --data_dir /data/waterbird_complete95_forest2water2   # ResNet-50
    python train.py --resume     # continue an interrupted run from ckpt/source.pt.state
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import common
import data
import model

# Source-training recipes, keyed by flag name. cifar10: the paper's checkpoint (PROTOCOL.md section 2). The
# others: the epochs of PROTOCOL.md section 8; SGD lr and wd are our choice for BREEDS (the paper does not give
# them) and the ERM settings of Sagawa et al. 2020 for Waterbirds and CelebA, at a constant lr (milestones
# none). Milestones None: at 2/3 and 13/15 of the epochs (50 and 65 of 75).
RECIPES = {
    "cifar10": dict(arch="resnet26", epochs=75, lr=0.1, wd=5e-4, milestones=None, data_dir="data"),
    "living17": dict(arch="resnet50", epochs=5, lr=0.01, wd=1e-4, milestones=None, data_dir="data/imagenet"),
    "entity30": dict(arch="resnet50", epochs=5, lr=0.01, wd=1e-4, milestones=None, data_dir="data/imagenet"),
    "waterbirds": dict(arch="resnet50", epochs=300, lr=1e-3, wd=1e-4, milestones="none",
                       data_dir="data/waterbird_complete95_forest2water2"),
    "celeba": dict(arch="resnet50", epochs=50, lr=1e-4, wd=1e-4, milestones="none", data_dir="data"),
}
# the settings a --resume must share with the interrupted run
STATE_KEYS = ("data", "arch", "epochs", "milestones", "batch_size", "lr", "momentum", "wd", "seed", "limit",
              "holdout",
              "weights", "image_size", "data_dir")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                usage="python train.py [--data D] [options]")
    p.add_argument("--data", default="cifar10", choices=list(RECIPES),
                   help="source dataset; picks the recipe")
    p.add_argument("--data_dir", help="the dataset's folder (default per --data: RECIPES; README)")
    p.add_argument("--breeds_dir", default="data/breeds",
                   help="living17, entity30: the BREEDS hierarchy files")
    p.add_argument("--image_size", type=int, default=224,
                   help="ImageNet family: resize and center-crop to this")
    p.add_argument("--cache_dir", default="data/cache", help="where decoded tensors are cached")
    p.add_argument("--holdout", type=int, default=0,
                   help="keep the last N CIFAR training images out of training (they join finetune.py's "
                        "target pool)")
    p.add_argument("--limit", type=int, default=0, help="train on at most this many images (0 = all)")
    p.add_argument("--small", action="store_true", help="CPU scale: 15 epochs on at most 4,000 images")
    p.add_argument("--epochs", type=int, help="default: the recipe's (cifar10 75, --small 15)")
    p.add_argument("--milestones",
                   help="epochs where lr drops x0.1, or none (default: at 2/3 and 13/15 of the epochs, or "
                        "the recipe's none)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, help="SGD lr (default: the recipe's)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, help="SGD's coupled weight decay (default: the recipe's)")
    p.add_argument("--arch", choices=sorted(model.ARCHS), help="default: the recipe's")
    p.add_argument("--weights", default="imagenet", choices=["imagenet", "none"],
                   help="resnet50's start: torchvision's ImageNet weights (downloaded once) or random "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    p.add_argument("--cpu_bf16", action="store_true", help="bf16 autocast on the CPU too (faster with AMX)")
    p.add_argument("--out", default="ckpt/source.pt", help="checkpoint path, written atomically")
    p.add_argument("--resume", action="store_true",
                   help="continue the run that <out>.state holds (written after every epoch); the result "
                        "equals an uninterrupted run's")
    args = p.parse_args(argv)
    recipe = RECIPES[args.data]
    if args.small:  # defaults at CPU scale; flags given explicitly still win
        args.limit = args.limit or 4000
        args.epochs = args.epochs or (15 if args.data == "cifar10" else None)
    for flag, value in recipe.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if not args.milestones:
        args.milestones = f"{round(args.epochs * 2 / 3)},{round(args.epochs * 13 / 15)}"
    if args.epochs < 1 or args.batch_size < 1 or args.limit < 0 or args.holdout < 0:
        p.error("--epochs and --batch_size must be positive, --limit and --holdout non-negative")
    if not all(math.isfinite(v) and v >= 0 for v in (args.lr, args.wd, args.momentum)) or args.lr == 0:
        p.error(f"--lr {args.lr:g} must be a finite number > 0, --wd and --momentum finite and >= 0")
    try:
        [int(m) for m in args.milestones.split(",") if m != "none"]
    except ValueError:
        p.error(f"--milestones {args.milestones!r} is not a comma list of integers or none")
    return args


def source_data(args):
    """((x, y) to train on, (x, y) to report accuracy on or None, number of classes), on the CPU."""
    if args.data == "cifar10":
        d = data.load_cifar10(args.data_dir, args.cache_dir)
        (xtr, ytr), _ = data.source_and_pool(d, args.holdout)
        xtr, ytr = (xtr[:args.limit], ytr[:args.limit]) if args.limit else (xtr, ytr)
        return (xtr, ytr), d["test"], 10  # clean test split: the paper's source accuracy
    from imagenet import family_source
    d, k = family_source(args.data, args.data_dir, args.breeds_dir, args.image_size, args.cache_dir,
                         args.limit)
    return d["train"], d["test"], k


def train(args):
    """Train a source model per args; returns (model, metrics)."""
    dev = common.get_device(args.device, args.cpu_bf16)
    torch.manual_seed(args.seed)
    (xtr, ytr), test, k = source_data(args)
    # on the device when it fits (all of CIFAR; an ImageNet-family set of ~50k 224 px images is 7.5 GB)
    keep = dev.type == "cpu" or xtr.numel() < 16e9
    xtr, ytr = (xtr.to(dev), ytr.to(dev)) if keep else (xtr.pin_memory(), ytr)
    xte, yte = (t.to(dev) for t in test) if test else (None, None)
    weights = args.weights if args.arch == "resnet50" and args.weights != "none" else None
    raw = common.prepare(model.build_model(args.arch, k, weights), dev)
    net = torch.compile(raw) if args.compile and dev.type == "cuda" else raw
    opt = torch.optim.SGD(raw.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    milestones = [int(m) for m in args.milestones.split(",") if m != "none"]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    g = torch.Generator(device=xtr.device).manual_seed(args.seed)
    pad = xtr.shape[-1] // 8  # crop padding: 4 px at 32 (the CIFAR recipe), 28 at 224
    print(f"source training ({args.data}, {args.arch}{', from ImageNet weights' if weights else ''}): "
          f"{len(xtr):,d} images, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr} (x0.1 at "
          f"{args.milestones}), wd {args.wd}, {sum(p.numel() for p in raw.parameters()):,d} parameters")
    # everything the next epoch depends on, saved after each: weights, optimizer, schedule, both random
    # streams
    st, config = f"{args.out}.state", {k: getattr(args, k) for k in STATE_KEYS}
    first, before, test_acc = 1, 0.0, math.nan
    if os.path.isfile(st) and not args.resume:
        print(f"note: {st} holds an interrupted run; starting afresh (--resume continues it)")
    elif os.path.isfile(st):
        s = torch.load(st, map_location=dev, weights_only=True)
        if s["config"] != config:
            raise SystemExit(f"error: {st} was written with other settings ({s['config']}); delete it or run "
                             "without --resume")
        raw.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        sched.load_state_dict(s["sched"])
        g.set_state(s["gen"])
        torch.set_rng_state(s["rng"])
        first, before, test_acc = s["epoch"] + 1, s["seconds"], s["test_acc"]
        print(f"resuming {st}: epochs {first}..{args.epochs} to go")
    t0 = time.time() - before
    for epoch in range(first, args.epochs + 1):
        net.train()
        te, tot, correct = time.time(), 0.0, 0
        for xb, yb in data.batches(xtr, ytr, args.batch_size, shuffle=True, generator=g):
            xb, yb = data.crop_flip(xb, pad, g).to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            with common.autocast(dev):
                out = net(xb)
                loss = F.cross_entropy(out.float(), yb)
            # checked before the update: a NaN never reaches the weights; one sync a step, cheap at these
            # sizes
            tot += common.finite(loss, f"epoch {epoch}, lr {sched.get_last_lr()[0]:g}",
                            "Try a smaller --lr.") * len(yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (out.argmax(1) == yb).sum().item()
        sched.step()
        ips = len(xtr) / (time.time() - te)
        # test costs a while
        scored = xte is not None and (epoch == args.epochs or epoch % 5 == 0 or epoch == 1)
        test_acc = model.evaluate(net, (xte, yte))["acc"] if scored else test_acc  # the last scored value
        el = time.time() - t0
        common.atomic_save({"config": config, "epoch": epoch, "model": raw.state_dict(), "opt": opt.state_dict(),
                       "sched": sched.state_dict(), "gen": g.get_state(), "rng": torch.get_rng_state(),
                       "seconds": el, "test_acc": test_acc}, st)
        print(f"epoch {epoch:3d}/{args.epochs} | loss {tot / len(xtr):.3f} | train "
              f"{100 * correct / len(xtr):5.1f}% | "
              f"test {f'{test_acc:5.1f}%' if scored else '  -   '} | {ips:,.0f} img/s | {common.fmt_time(el)} "
              f"elapsed, ETA {common.fmt_time(el / epoch * (args.epochs - epoch))}")
    metrics = {"test_acc": None if math.isnan(test_acc) else test_acc, "train_images": len(xtr),
               "seconds": time.time() - t0, "torch": str(torch.__version__), "device": common.device_name(dev)}
    return raw, metrics


def main(argv=None):
    args = parse_args(argv)
    common.check_writable(args.out, "--out")
    net, metrics = train(args)
    model.save_checkpoint(args.out, net, args, metrics)
    os.remove(f"{args.out}.state")  # the run is whole: nothing left to resume
    acc = "none (no source test split)" if metrics["test_acc"] is None else f"{metrics['test_acc']:.2f}%"
    print(f"source test accuracy {acc} after {common.fmt_time(metrics['seconds'])}; saved {args.out}")
    return net


if __name__ == "__main__":
    main()
