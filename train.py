"""
Source training: ResNet-26 on clean CIFAR-10 -> a checkpoint that finetune.py adapts (PROTOCOL section 2).

    python train.py                     # the checkpoint's recipe: SGD 0.1, momentum 0.9, wd 5e-4, batch 128,
                                        # crop + flip, 75 epochs, lr x0.1 at epochs 50 and 65 -> ckpt/source.pt
    python train.py --small --data_dir ../shared/data/cifar10-sample --holdout 1017    # tiny real run on a CPU

The recipe is the one behind the paper's checkpoint (90.83% clean test accuracy). --small keeps the same code path
at laptop scale: 15 epochs (decays at 10 and 13) on at most 4,000 training images.

The ImageNet family (PROTOCOL section 8; ResNet-50 from torchvision's ImageNet weights with a new head; the data
is the user's, in its standard layout; README "The ImageNet family"):
    python train.py --data living17 --imagenet_dir /data/imagenet --breeds_dir /data/breeds   # 5 epochs -> ckpt
    python train.py --data waterbirds --waterbirds_dir /data/waterbird_complete95_forest2water2   # 300 epochs
    python train.py --data celeba --celeba_dir /data                                             # 50 epochs
ImageNet-C needs no source training: its source is torchvision's ImageNet model itself.
"""
import argparse
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import data
import model as M

# Source-training recipes. cifar10: the paper's checkpoint (PROTOCOL section 2). The others: the epochs of PROTOCOL
# section 8 (5 / 300 / 50); SGD lr and wd are our choice for BREEDS (the paper does not give them) and the ERM
# settings of Sagawa et al. 2020 for Waterbirds (1e-3, 1e-4) and CelebA (1e-4, 1e-4), at a constant lr.
RECIPES = {
    "cifar10": dict(arch="resnet26", epochs=75, lr=0.1, wd=5e-4, milestones=""),
    "living17": dict(arch="resnet50", epochs=5, lr=0.01, wd=1e-4, milestones=""),
    "entity30": dict(arch="resnet50", epochs=5, lr=0.01, wd=1e-4, milestones=""),
    "waterbirds": dict(arch="resnet50", epochs=300, lr=1e-3, wd=1e-4, milestones="none"),
    "celeba": dict(arch="resnet50", epochs=50, lr=1e-4, wd=1e-4, milestones="none"),
}


# the settings a --resume must share with the interrupted run
STATE_KEYS = ("data", "arch", "epochs", "milestones", "batch_size", "lr", "momentum", "wd", "seed", "limit", "holdout",
              "weights", "image_size", "data_dir")


def add_folder_args(g):
    """Where the ImageNet-family datasets live (train.py and finetune.py): each in its standard layout."""
    g.add_argument("--imagenet_c_dir", default="data/imagenet-c", help="ImageNet-C: <dir>/<corruption>/<severity>/"
                   "<wnid>/*.JPEG, the official release")
    g.add_argument("--imagenet_dir", default="data/imagenet", help="ImageNet, <dir>/{train,val}/<wnid>/*.JPEG "
                   "(living17, entity30)")
    g.add_argument("--breeds_dir", default="data/breeds", help="the BREEDS hierarchy files dataset_class_info.json, "
                   "class_hierarchy.txt, node_names.txt (BREEDS-Benchmarks, imagenet_class_hierarchy/modified)")
    g.add_argument("--waterbirds_dir", default="data/waterbird_complete95_forest2water2",
                   help="the released Waterbirds folder, with metadata.csv")
    g.add_argument("--celeba_dir", default="data", help="torchvision's CelebA root: <dir>/celeba/img_align_celeba, "
                   "list_attr_celeba.txt, list_eval_partition.txt")
    g.add_argument("--image_size", type=int, default=224, help="ImageNet family: images are resized (shorter side "
                   "size*256/224) and center-cropped to this; below 224 for CPU-scale runs only")


def family_root(args, name):
    """(root, info_dir) of an ImageNet-family dataset from the folder flags."""
    if name in ("living17", "entity30"):
        return args.imagenet_dir, args.breeds_dir
    return {"imagenet_c": args.imagenet_c_dir, "waterbirds": args.waterbirds_dir,
            "celeba": args.celeba_dir}[name], None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="cifar10", choices=list(RECIPES), help="source dataset; picks the recipe")
    g.add_argument("--data_dir", default="data", help="folder holding (or to receive) cifar-10-batches-py")
    g.add_argument("--cache_dir", default="data/cache", help="where decoded tensors are cached")
    g.add_argument("--holdout", type=int, default=0,
                   help="keep the last N training images out of source training; they join the target pool")
    g.add_argument("--limit", type=int, default=0, help="train on at most this many images (0 = all)")
    add_folder_args(g)
    g = p.add_argument_group("optimisation (defaults: the --data recipe, RECIPES above)")
    g.add_argument("--epochs", type=int, default=None, help="cifar10: 75 (15 with --small)")
    g.add_argument("--milestones", default=None, help="comma list of epochs where lr drops x0.1, or none "
                   "(default: at 2/3 and 13/15 of --epochs, i.e. 50,65 for 75; waterbirds, celeba: none)")
    g.add_argument("--batch_size", type=int, default=128)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--wd", type=float, default=None, help="coupled L2 weight decay (torch.optim.SGD's)")
    g = p.add_argument_group("run")
    g.add_argument("--arch", default=None, choices=sorted(M.ARCHS), help="default: the recipe's")
    g.add_argument("--weights", default="imagenet", choices=["imagenet", "none"], help="resnet50's initialisation: "
                   "torchvision's ImageNet weights (downloaded once) or none (random)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    g.add_argument("--cpu_bf16", action="store_true", help="bf16 autocast on the CPU too, as on CUDA (faster on "
                   "CPUs with AMX or AVX512-BF16)")
    g.add_argument("--out", default="ckpt/source.pt", help="checkpoint path (written atomically)")
    g.add_argument("--resume", action="store_true", help="continue the run that <out>.state holds (written after "
                   "every epoch, removed once the checkpoint is saved); the result equals an uninterrupted run's")
    g.add_argument("--small", action="store_true", help="CPU scale: 15 epochs on at most 4,000 images")
    args = p.parse_args(argv)
    recipe = RECIPES[args.data]
    if args.small:  # defaults at CPU scale; flags given explicitly still win
        args.limit = args.limit or 4000
    if args.epochs is None:  # an explicit 0 is an error below, never the default
        args.epochs = 15 if args.small and args.data == "cifar10" else recipe["epochs"]
    args.lr, args.wd = recipe["lr"] if args.lr is None else args.lr, recipe["wd"] if args.wd is None else args.wd
    args.arch = args.arch or recipe["arch"]
    if args.epochs < 1 or args.batch_size < 1 or args.limit < 0 or args.holdout < 0:
        p.error("--epochs and --batch_size must be positive, --limit and --holdout non-negative")
    if not all(math.isfinite(v) and v >= 0 for v in (args.lr, args.wd, args.momentum)) or args.lr == 0:
        p.error(f"--lr {args.lr:g} must be a finite number > 0, --wd and --momentum finite and >= 0")
    ms = recipe["milestones"] if args.milestones is None else args.milestones
    try:
        ms = [] if ms == "none" else [int(m) for m in ms.split(",") if m] or [round(args.epochs * 2 / 3),
                                                                            round(args.epochs * 13 / 15)]
    except ValueError:
        p.error(f"--milestones {args.milestones!r} is not a comma list of integers or none")
    args.milestones = ",".join(map(str, ms)) or "none"
    return args


CPU_BF16 = False  # bf16 autocast on the CPU too (--cpu_bf16): set once by get_device, read by autocast


def get_device(name="auto", cpu_bf16=False):
    """Resolve --device once; CUDA-only speedups (TF32, bf16 autocast, channels_last) are switched on here.
    cpu_bf16: bf16 autocast on the CPU as well (1.5-1.9x faster on CPUs with AMX / AVX512-BF16, slower without)."""
    global CPU_BF16
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu or auto")
    dev = torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    CPU_BF16 = cpu_bf16
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        print(f"device: cuda ({torch.cuda.get_device_name()}), bf16 autocast, TF32, channels_last")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads{', bf16 autocast' if cpu_bf16 else ''})"
              f"{'' if name == 'cpu' else ', no CUDA device found'}")
    return dev


def device_name(dev):
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def autocast(dev):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=CPU_BF16)


def prepare(model, dev):
    model = model.to(dev)
    return model.to(memory_format=torch.channels_last) if dev.type == "cuda" else model


# evaluation batches of 256: 2.6x faster than 1000 on a 2-core CPU (cache-sized activations), no slower on a GPU
@torch.no_grad()
def hits(model, x, y, batch_size=256, start=0):
    """(bool per image: predicted right, mean loss) of model, in eval mode, on a split already on its device
    (start: the first stage to run, x its input)."""
    model.eval()
    out, loss = [], 0.0
    for xb, yb in data.batches(x, y, batch_size):
        with autocast(x.device):
            logits = model(xb, start=start).float()
        out.append(logits.argmax(1) == yb)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool), loss / max(len(x), 1)


def evaluate(model, x, y, batch_size=256, start=0):
    """Accuracy (%) and mean loss of model on a split already on its device."""
    hit, loss = hits(model, x, y, batch_size, start)
    return 100.0 * hit.sum().item() / max(len(x), 1), loss


def check_writable(path, flag):
    """One line and exit now, before any compute, when the file path (or the folders it needs) cannot be written.
    Creates nothing: probes the nearest existing folder with a temporary file."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a folder; give a file path")
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(d):
        if os.path.exists(d):
            raise SystemExit(f"error: {flag} {path}: {d} is a file, not a folder")
        d = os.path.dirname(d)
    try:
        tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
        raise SystemExit(f"error: {flag} {path}: cannot write in {d} ({e.strerror}); choose another place")


def finite(loss, where, advice):
    """loss.item(), or one line and exit when it is NaN or infinite: a diverged run stops before its update and
    writes nothing (no result, no checkpoint). Checked before backward(), so the weights never take a NaN step."""
    v = loss.item()
    if not math.isfinite(v):
        raise SystemExit(f"error: the loss is {v} at {where}: the run diverged; nothing was written. {advice}")
    return v


def fmt_time(s):
    return f"{s:.0f}s" if s < 100 else f"{s / 60:.1f}m"


def source_data(args):
    """((x, y) to train on, (x, y) to report accuracy on or None, number of classes), on the CPU."""
    if args.data == "cifar10":
        d = data.load_cifar10(args.data_dir, args.cache_dir)
        (xtr, ytr), _ = data.source_and_pool(d, args.holdout)
        xtr, ytr = (xtr[:args.limit], ytr[:args.limit]) if args.limit else (xtr, ytr)
        return (xtr, ytr), d["test"], 10  # clean test split: the paper's source accuracy
    root, info = family_root(args, args.data)
    d, k = data.family_source(args.data, root, info, args.image_size, args.cache_dir, args.limit)
    return d["train"], d["test"], k


def train(args):
    """Train a source model per args; returns (model, metrics). Used by main() and by finetune.py."""
    dev = get_device(args.device, args.cpu_bf16)
    torch.manual_seed(args.seed)
    (xtr, ytr), test, k = source_data(args)
    # on the device when it fits (all of CIFAR; an ImageNet-family set of ~50k 224 px images is 7.5 GB)
    keep = dev.type == "cpu" or xtr.numel() < 16e9
    xtr, ytr = (xtr.to(dev), ytr.to(dev)) if keep else (xtr.pin_memory(), ytr)
    xte, yte = (t.to(dev) for t in test) if test else (None, None)
    weights = args.weights if args.arch == "resnet50" and args.weights != "none" else None
    raw = prepare(M.build_model(args.arch, k, weights), dev)
    net = torch.compile(raw) if args.compile and dev.type == "cuda" else raw
    opt = torch.optim.SGD(raw.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    milestones = [int(m) for m in args.milestones.split(",") if m != "none"]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    g = torch.Generator(device=xtr.device).manual_seed(args.seed)
    pad = xtr.shape[-1] // 8  # crop padding: 4 px at 32 (the CIFAR recipe), 28 at 224
    print(f"source training ({args.data}, {args.arch}{', from ImageNet weights' if weights else ''}): {len(xtr):,d} "
          f"images, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr} (x0.1 at {args.milestones}), wd "
          f"{args.wd}, {sum(p.numel() for p in raw.parameters()):,d} parameters")
    # everything the next epoch depends on, saved after each: weights, optimizer, schedule, both random streams
    st, config = f"{args.out}.state", {k: getattr(args, k) for k in STATE_KEYS}
    first, before, test_acc = 1, 0.0, math.nan
    if os.path.isfile(st) and not args.resume:
        print(f"note: {st} holds an interrupted run; starting afresh (--resume continues it)")
    elif os.path.isfile(st):
        s = torch.load(st, map_location=dev, weights_only=True)
        if s["config"] != config:
            raise SystemExit(f"error: {st} was written with other settings ({s['config']}); delete it or run without "
                             f"--resume")
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
        te, tot, correct, seen = time.time(), 0.0, 0, 0
        for xb, yb in data.batches(xtr, ytr, args.batch_size, shuffle=True, generator=g):
            xb, yb = data.crop_flip(xb, pad, g).to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            with autocast(dev):
                out = net(xb)
                loss = F.cross_entropy(out.float(), yb)
            # one sync per step; negligible next to the step on these sizes
            tot += finite(loss, f"epoch {epoch}, lr {sched.get_last_lr()[0]:g}", "Try a smaller --lr.") * len(yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
        sched.step()
        ips = seen / (time.time() - te)
        scored = xte is not None and (epoch == args.epochs or epoch % 5 == 0 or epoch == 1)
        test_acc = evaluate(net, xte, yte)[0] if scored else test_acc  # the last scored value
        el = time.time() - t0
        M.atomic_save({"config": config, "epoch": epoch, "model": raw.state_dict(), "opt": opt.state_dict(),
                       "sched": sched.state_dict(), "gen": g.get_state(), "rng": torch.get_rng_state(),
                       "seconds": el, "test_acc": test_acc}, st)
        test_s = f"{test_acc:5.1f}%" if scored else "  -   "
        print(f"epoch {epoch:3d}/{args.epochs} | loss {tot / seen:.3f} | train {100 * correct / seen:5.1f}% | "
              f"test {test_s} | {ips:,.0f} img/s | {fmt_time(el)} elapsed, ETA "
              f"{fmt_time(el / epoch * (args.epochs - epoch))}")
    metrics = {"test_acc": None if math.isnan(test_acc) else test_acc, "train_images": len(xtr),
               "seconds": time.time() - t0, "torch": str(torch.__version__), "device": device_name(dev)}
    return raw, metrics


def save_source(args, net, metrics):
    """The checkpoint at args.out, then the per-epoch state removed: the run is whole, nothing is left to resume."""
    M.save_checkpoint(args.out, net, args.arch, args, metrics)
    os.remove(f"{args.out}.state")


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.out, "--out")
    net, metrics = train(args)
    save_source(args, net, metrics)
    acc = "none (no source test split)" if metrics["test_acc"] is None else f"{metrics['test_acc']:.2f}%"
    print(f"source test accuracy {acc} after {fmt_time(metrics['seconds'])}; saved {args.out}")
    return net


if __name__ == "__main__":
    main()
