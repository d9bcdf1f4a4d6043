"""
Surgical fine-tuning (Lee et al. 2023): adapt a source model to a shifted target by training
one block (or what a method picks), select lr and epoch on target val, report target test.

    python finetune.py --data cifar_c --tune layer1      # the paper's 14 corruptions
    python finetune.py --data cifar_flip --tune fc       # labels y -> 9 - y
    python finetune.py --tune auto_rgn                   # or auto_snr, l1
    python finetune.py --objective memo --tune layer1    # label-free (unsupervised.py)

One JSON per (data, corruption, tune, seed) in --out_dir. A run whose result exists, or
that another process runs (a lock in <out_dir>/.locks), is skipped: sweep.sh is plain loops
and a killed sweep resumes. A CIFAR-C corruption: 1-5 minutes on a 2-core CPU (RESULTS.md).
"""
import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import checkpoints
import common
import data
import imagenet
import model
import rgn
import unsupervised

# The protocol per target dataset (PROTOCOL.md sections 4, 5, 8) keyed by flag name: the flags'
# defaults. *_per_class: per group for waterbirds / celeba; test_per_class 0: all the rest;
# imagenet_c's train_n None: 5 a class. The CIFAR head alone takes FC_LRS.
CIFAR = dict(arch="resnet26", train_n=1000, val_per_class=10, test_per_class=90, epochs=15,
             lrs="1e-3,1e-4,1e-5", wd=1e-4, ckpt="paper", data_dir="data")
BREEDS = dict(arch="resnet50", train_n=850, val_per_class=10, test_per_class=0, epochs=15,
              lrs="5e-4,1e-4,1e-5", wd=0.0, corruption="clean", data_dir="data/imagenet")
GROUPS = dict(arch="resnet50", train_n=400, val_per_class=30, test_per_class=0, wd=1e-4,
              corruption="clean")
PROTOCOL = {
    "cifar_c": dict(CIFAR, corruption="paper14"),
    "cifar_flip": dict(CIFAR, corruption="clean"),
    "imagenet_c": dict(arch="resnet50", train_n=None, val_per_class=10, test_per_class=10,
                       epochs=10, lrs="1e-3,1e-4,1e-5", wd=1e-4, corruption="paper15",
                       ckpt="imagenet", data_dir="data/imagenet-c"),
    "living17": dict(BREEDS, ckpt="ckpt/living17.pt"),
    "entity30": dict(BREEDS, ckpt="ckpt/entity30.pt"),
    "waterbirds": dict(GROUPS, epochs=100, lrs="5e-3,1e-3,5e-4", ckpt="ckpt/waterbirds.pt",
                       data_dir="data/waterbird_complete95_forest2water2"),
    "celeba": dict(GROUPS, epochs=50, lrs="1e-3,5e-4,1e-4", ckpt="ckpt/celeba.pt",
                   data_dir="data"),
    "tiny_breeds": dict(BREEDS, arch="resnet26", image_size=32, ckpt="ckpt/tiny_breeds.pt",
                        data_dir="data/tiny-imagenet-200"),  # ours (imagenet.py)
}
MEMO = dict(test_per_class=100, corruption="standard15")  # its table's: 100 a class
FC_LRS = "1e-1,1e-2,1e-3"
# The methods: --tune name -> None (their code is below) or a function (net, names) -> the
# names to train, picked once before the grid. Each starts from every parameter.
METHODS = {"auto_rgn": None, "auto_snr": None, "l1": None}
SNR_THRESHOLD = {"eb": 0.95, "per_example": 0.2}  # the authors'; ours
# The flags that change a run's numbers: one set away from its default tags the result's name
NUMBER_FLAGS = ("severity", "corruption_seed", "train_n", "val_per_class", "test_per_class",
                "split_seed", "cifar10c_dir", "lrs", "epochs", "batch_size", "wd",
                "l1_lambdas", "snr_threshold", "snr_n", "ckpt", "weights", "image_size",
                "ent_lr", "ent_batch_size", "memo_copies", "memo_lr")


def parser(d="cifar_c", objective="ce", add_help=True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.Help,
                                usage="%(prog)s [--data D] [--tune T] [options]",
                                add_help=add_help)
    a = p.add_argument_group("target data (defaults: --data's protocol)").add_argument
    a("--data", default="cifar_c", choices=list(PROTOCOL))
    a("--corruption", help="a name, a list or paper14, standard15, all (imagenet_c: paper15)")
    a("--severity", type=int, default=5, choices=range(1, 6))
    a("--corruption_seed", type=int, default=0, help="the corruptions' randomness")
    a("--train_n", type=int, help="target training images")
    a("--val_per_class", type=int, help="per group for waterbirds, celeba")
    a("--test_per_class", type=int, help="0 = the rest")
    a("--split_seed", type=int, default=0, help="the same for every --seed")
    a("--data_dir", help="the dataset's folder (CIFAR: holds cifar-10-batches-py)")
    a("--breeds_dir", default="data/breeds", help="the BREEDS hierarchy files")
    a("--image_size", type=int, default=224, help="ImageNet family: crop size")
    a("--cifar10c_dir", default="", help="read the official CIFAR-10-C here")
    a("--cache_dir", default="data/cache", help="decoded / corrupted tensors")
    a = p.add_argument_group("fine-tuning").add_argument
    a("--tune", default="layer1", help="none, a block, all, a method, or blocks / prefixes: "
      "layer1+layer2, layer2.0.,fc.")
    a("--lrs", help=f"Adam lr grid (CIFAR fc alone: {FC_LRS})")
    a("--epochs", type=int, help="passes over the target training set")
    a("--batch_size", type=int, default=64, help="Adam's")
    a("--wd", type=float, help="Adam's coupled weight decay")
    a("--test_every_epoch", action="store_true", help="test every epoch (same result)")
    a("--prefix_cache_gb", type=float, default=16, help="for the frozen stages' output")
    a = p.add_argument_group("automatic methods (rgn.py)").add_argument
    a("--l1_lambdas", default="1e-5,1e-4,1e-3", help="l1: lambda grid")
    a("--snr", default="eb", choices=["eb", "per_example"], help="the authors', or ours")
    a("--snr_threshold", type=float, help=f"auto_snr: {SNR_THRESHOLD}")
    a("--snr_n", type=int, default=128, help="auto_snr per_example: images")
    a = p.add_argument_group("label-free (unsupervised.py)").add_argument
    a("--objective", default="ce", choices=["ce", "memo", "entropy"])
    a("--memo_copies", type=int, default=32, help="AugMix copies an image")
    a("--memo_lr", type=float, default=0.005, help="MEMO's SGD step")
    a("--ent_lr", type=float, default=1e-3, help="entropy: Adam lr (TENT's, one for every tune)")
    a("--ent_batch_size", type=int, default=64, help="entropy: stream batch")
    a = p.add_argument_group("run").add_argument
    a("--ckpt", help="source: paper, resnet56 (downloaded once), imagenet, or a path")
    a("--weights", default="imagenet", choices=["imagenet", "none"], help="--ckpt imagenet's")
    a("--seed", type=int, default=0, help="batch order and the rest")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--cpu_bf16", action="store_true", help="bf16 autocast on the CPU (AMX)")
    a("--out_dir", default="results", help="one JSON a run")
    # the protocol's values become the defaults, so --help shows them
    p.set_defaults(**{**PROTOCOL[d], **(MEMO if objective == "memo" else {})})
    return p


def parse_args(argv=None):
    first, _ = parser(add_help=False).parse_known_args(argv)  # --data, --objective
    p = parser(first.data, first.objective)
    args = p.parse_args(argv)
    args.snr_threshold = SNR_THRESHOLD[args.snr] if args.snr_threshold is None else args.snr_threshold
    args.changed = {k: v for k in NUMBER_FLAGS if (v := getattr(args, k)) != p.get_default(k)}
    if args.changed.get("snr_threshold") == SNR_THRESHOLD[args.snr]:
        del args.changed["snr_threshold"]
    if "ckpt" in args.changed and (name := checkpoints.known(args.ckpt)):  # a published file's
        args.changed["ckpt"] = name  # local copy is named as that file; the paper's is the default
        if name == "paper":
            del args.changed["ckpt"]
    check(args)
    return args


def numbers(s):
    return [float(v) for v in s.split(",") if v]


def check(args):
    """One line and exit for settings that cannot run."""
    bad = []
    try:
        rates = numbers(args.lrs) + numbers(args.l1_lambdas)
        if not numbers(args.lrs) or not numbers(args.l1_lambdas) or not all(
                math.isfinite(v) and v > 0 for v in rates):
            bad.append("--lrs and --l1_lambdas must list finite numbers > 0")
    except ValueError:
        bad.append(f"--lrs {args.lrs!r} and --l1_lambdas {args.l1_lambdas!r} must be lists")
    least = (args.epochs, args.batch_size, args.val_per_class, args.train_n or 1,
             args.snr_n - 1, args.memo_copies, args.ent_batch_size)
    if min(least) < 1:
        bad.append("--epochs, --batch_size, --train_n, --val_per_class, --memo_copies, "
                   "--ent_batch_size must be at least 1, --snr_n 2")
    finite = (args.wd, args.snr_threshold, args.memo_lr, args.ent_lr)
    if (min(args.test_per_class, args.wd, args.ent_lr) < 0
            or not all(math.isfinite(v) for v in finite) or args.memo_lr <= 0):
        bad.append("--test_per_class, --wd, --ent_lr must be >= 0, "
                   "--memo_lr > 0, all finite")
    if not args.corruption:
        bad.append("--corruption is empty; give a name, a list or a preset")
    shifts = args.data in ("cifar_c", "imagenet_c")  # flags set where they do not apply:
    off = {"corruption": not shifts and args.corruption != "clean", "severity": not shifts,
           "corruption_seed": args.data != "cifar_c", "cifar10c_dir": args.data != "cifar_c",
           "image_size": args.data.startswith("cifar")}
    off = [k for k, v in off.items() if v and (k == "corruption" or k in args.changed)]
    if off:
        bad.append(f"--{', --'.join(off)} does not apply to --data {args.data}")
    if args.objective == "entropy" and args.tune in ("auto_snr", "l1"):
        bad.append("--objective entropy cannot run auto_snr or l1 (they use labels)")
    if args.objective == "memo" and (args.tune in METHODS or args.data != "cifar_c"):
        bad.append("--objective memo needs --data cifar_c and blocks as --tune")
    if bad:
        raise SystemExit("error: " + "; ".join(bad))
    corruptions(args)  # an unknown name fails now
    if args.tune not in METHODS:  # a --tune matching nothing fails now
        model.resolve_tune(model.probe(args.arch), args.tune)


def corruptions(args):
    if args.data == "imagenet_c":
        return imagenet.parse_imagenet_c(args.corruption)
    return data.parse_names(args.corruption) if args.data == "cifar_c" else ["clean"]


# The methods side by side: what a run may train (before the grid), each epoch's optimizer

def method_params(args, source, train, log=print):
    """(names the run may train, names it trains, the Auto-SNR record)."""
    tune = "all" if args.tune in METHODS else args.tune
    names = model.resolve_tune(source, tune)
    if METHODS.get(args.tune):
        names = METHODS[args.tune](source, names)
        return names, names, None
    norms = rgn.norm_param_names(source)  # the automatic methods skip norms
    if args.tune == "auto_snr" and args.snr == "eb":  # chosen every epoch
        names = [n for n in names if n not in norms]
        return names, names, {"criterion": "eb", "threshold": args.snr_threshold}
    if args.tune == "auto_snr":  # per-example SNR, once, on a seeded subset
        x, y = train[:2]
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(x), generator=g)[:args.snr_n].to(x.device)
        scores = rgn.snr_scores(source.eval(), F.cross_entropy, x[idx], y[idx], names, 32)
        names = rgn.snr_select(scores, args.snr_threshold)
        blocks = ", ".join(sorted({n.split(".")[0] for n in names}))
        log(f"auto_snr: {len(names)}/{len(scores)} tensors >= {args.snr_threshold}: {blocks}")
        return names, names, {"criterion": "per_example", "scores": scores,
                              "threshold": args.snr_threshold, "selected": names}
    if args.tune == "auto_rgn":
        return names, [n for n in names if n not in norms], None
    return names, names, None


def method_epoch(args, net, names, lr, opt, hist, loss_of, probe_batches):
    """The optimizer for the next epoch (None: nothing trains in it)."""
    if args.tune == "auto_rgn":  # Adam, a rate per tensor: lr * RGN / max RGN
        if opt is None:
            named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
            opt = rgn.AutoRGN(named, lr, args.wd, norm_names=rgn.norm_param_names(net))
            model.freeze_except(net, opt.names)  # frozen norms need no grad
        opt.new_epoch()  # the authors': 5 batches at the epoch's start, no step
        for xb, yb in probe_batches():
            loss_of(xb, yb).backward()
            opt.measure()
            opt.zero_grad(set_to_none=True)
        return opt
    if args.tune == "auto_snr" and args.snr == "eb":  # scores >= threshold train
        model.freeze_except(net, names)
        named = [(n, p) for n, p in net.named_parameters() if n in names]
        scores = rgn.eb_scores(loss_of, probe_batches(), named)
        chosen = [n for n in names if scores[n] >= args.snr_threshold]
        blocks = model.block_params(net).items()
        hist["snr"].append({b: sum(n in chosen for n in ns) for b, ns in blocks if b != "all"})
        params = model.freeze_except(net, chosen)
        return torch.optim.Adam(params, lr, weight_decay=args.wd) if params else None
    params = [p for p in net.parameters() if p.requires_grad]
    return opt or torch.optim.Adam(params, lr, weight_decay=args.wd)


# One lr: train, score val after every epoch, keep the best epoch's weights.

def entry(epoch, train_loss, v, t, t0):
    """A history entry from evaluate() of val and test (t None: not scored)."""
    e = {"epoch": epoch, "train_loss": train_loss, "val_acc": v["acc"], "val_loss": v["loss"],
         "test_acc": t and t["acc"], "test_loss": t and t["loss"]}
    if "avg_acc" in v:  # waterbirds / celeba: the groups too
        e.update(val_avg_acc=v["avg_acc"], test_avg_acc=t and t["avg_acc"],
                 test_group_acc=t and t["group_acc"])
    return {**e, "seconds": time.time() - t0}


def train_one_lr(net, names, splits, k, lr, args, best_val=-1.0, l1_lambda=0.0, on_epoch=None):
    """Train net's named parameters in place at lr for args.epochs. splits: {split: (x, y[, g])}
    on the device, x the input of stage k (the frozen stages before it ran once). Test is
    scored only where val beats best_val, the grid's best so far: the only places selection
    can land. Returns (history, the tuned tensors at this lr's best val epoch)."""
    dev, (xtr, ytr) = splits["train"][0].device, splits["train"][:2]
    torch.manual_seed(args.seed)
    g = torch.Generator(device=dev).manual_seed(args.seed)  # the same batches
    gm = torch.Generator(device=dev).manual_seed(args.seed + 1)  # probe batches
    params = model.freeze_except(net, names)
    src = [p.detach().clone() for p in params] if l1_lambda else None
    hist = {"lr": lr, "lambda": l1_lambda if args.tune == "l1" else None, "epochs": []}
    if args.tune == "auto_rgn" or (args.tune == "auto_snr" and args.snr == "eb"):
        hist[args.tune.removeprefix("auto_")] = []  # per epoch and block: rates, or tensors
    opt, best, top, t0 = None, {}, -1.0, time.time()

    def loss_of(xb, yb):
        with common.autocast(dev):
            return F.cross_entropy(net(xb, start=k).float(), yb)

    def probe_batches():  # as the authors' islice(train_loader, 5)
        b = data.batches(xtr, ytr, args.batch_size, shuffle=True, generator=gm)
        return itertools.islice(b, 5)
    for epoch in range(1, args.epochs + 1):
        net.eval()  # BatchNorm keeps its statistics, as the authors' (ResNet-26: none)
        opt = method_epoch(args, net, names, lr, opt, hist, loss_of, probe_batches)
        tot, batches = 0.0, data.batches(xtr, ytr, args.batch_size, shuffle=True, generator=g)
        for step, (xb, yb) in enumerate(batches, 1):
            loss = loss_of(xb, yb)
            where = f"lr {lr:g}, epoch {epoch}, step {step}"
            tot += common.finite(loss, where, "Try smaller --lrs.") * len(yb)
            if opt is not None:  # auto_snr may choose nothing for an epoch
                reg = 0.0
                if src:
                    reg = l1_lambda * sum((p - p0).abs().sum() for p, p0 in zip(params, src))
                (loss + reg).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        v, t = model.evaluate(net, splits["val"], k), None
        if args.test_every_epoch or v["acc"] > best_val:
            t = model.evaluate(net, splits["test"], k)
        best_val = max(best_val, v["acc"])
        hist["epochs"].append(entry(epoch, tot / len(xtr), v, t, t0))
        if on_epoch:
            on_epoch(hist["epochs"][-1])
        if v["acc"] > top:  # strictly: ties keep the earlier epoch
            top = v["acc"]
            best = {n: p.detach().clone() for n, p in net.named_parameters() if n in set(names)}
        if "rgn" in hist:
            hist["rgn"].append(rgn.block_multipliers(opt.multipliers, model.BLOCKS[net.arch]))
    return hist, best


def select(history, min_epoch=1):
    """The (lr, lambda, epoch) of the best val accuracy over epochs >= min_epoch; ties go to
    the first seen (grid order, then epoch order: max keeps the first of equals)."""
    runs = [(i, h, e) for i, h in enumerate(history) for e in h["epochs"] if e["epoch"] >= min_epoch]
    i, h, e = max(runs, key=lambda r: r[2]["val_acc"])
    sel = {"run": i, "lr": h["lr"], "lambda": h["lambda"], "epoch": e["epoch"],
           "val_acc": e["val_acc"], "test_acc": e["test_acc"]}
    if "test_avg_acc" in e:
        sel["test_avg_acc"] = e["test_avg_acc"]
    return sel


# The grid (lr x lambda) and selection: one line per lr.

def grid(args, source, names, target, log):
    """Returns (history, selection, the selected model, prefix stage)."""
    k = model.frozen_stages(source, names, target, args.prefix_cache_gb)
    splits = {s: (model.prefix(source, x, k), *rest) for s, (x, *rest) in target.items()}
    t0 = time.time()  # epoch 0 is the source: the same for every lr
    epoch0 = entry(0, None, model.evaluate(source, splits["val"], k),
                   model.evaluate(source, splits["test"], k), t0)
    lambdas = numbers(args.l1_lambdas) if args.tune == "l1" else [0.0]
    lrs = numbers(args.lrs)
    fc = names and all(n.startswith("fc.") for n in names)
    if fc and args.data.startswith("cifar") and "lrs" not in args.changed:
        lrs = numbers(FC_LRS)
    todo = [(lr, lam) for lam in lambdas for lr in lrs] if names else []
    history, states, best_val = [], [], -1.0
    if not todo:  # tune none: the source is the result
        history, states = [{"lr": None, "lambda": None, "epochs": [epoch0]}], [{}]
    said = [time.time()]

    def progress(e, j):  # a line every 10 s or so: where, and the ETA
        done, total = j * args.epochs + e["epoch"], len(todo) * args.epochs
        if time.time() - said[0] >= 10 and done < total:
            eta = common.fmt_time((time.time() - t0) / done * (total - done))
            log(f"lr {j + 1}/{len(todo)}, epoch {e['epoch']}/{args.epochs} | val "
                f"{e['val_acc']:.1f}% | ETA {eta}")
            said[0] = time.time()
    for j, (lr, lam) in enumerate(todo):
        h, best = train_one_lr(copy.deepcopy(source), names, splits, k, lr, args, best_val, lam,
                               lambda e, j=j: progress(e, j))
        h["epochs"].insert(0, epoch0)
        best_val = max([best_val] + [e["val_acc"] for e in h["epochs"][1:]])
        history.append(h)
        states.append(best)
        top = max(h["epochs"][1:], key=lambda e: e["val_acc"])
        rates = " ".join(f"{b} {m:.2f}" for b, m in h.get("rgn", [{}])[-1].items())
        extra = f" | rgn {rates}" if rates else ""  # the last epoch's mean per block
        lam_s = f" lambda {lam:.0e}" if lam else ""
        log(f"[{j + 1}/{len(todo)}] lr {lr:.0e}{lam_s} | val {epoch0['val_acc']:.1f} -> "
            f"{h['epochs'][-1]['val_acc']:.1f}%, best {top['val_acc']:.1f}% at "
            f"epoch {top['epoch']}{extra}")
    sel = select(history, min_epoch=1 if names else 0)
    tuned = copy.deepcopy(source)
    with torch.no_grad():  # the source with the tuned tensors as selected
        for n, p in tuned.named_parameters():
            p.copy_(states[sel["run"]].get(n, p))
    return history, sel, tuned, k


# One run -> one result file; skipped when done, locked while running.

def variant(args):
    """A non-default setting of an automatic method, or None."""
    return f"snr_{args.snr}" if args.tune == "auto_snr" and args.snr != "eb" else None


def result_path(args, corruption):
    """<out_dir>/<data>-<corruption>-<tune>-s<seed>[-<objective>][-<variant>][-p<hash of the
    changed settings>].json: a quick run never stands in for a protocol run."""
    tune = "".join(c if c.isalnum() or c in "._+-" else "_" for c in args.tune.replace(",", "+"))
    name = f"{args.data}-{corruption}-{tune}-s{args.seed}"
    if args.objective != "ce":
        name += f"-{args.objective}"
    if variant(args):
        name += f"-{variant(args)}"
    if args.changed:
        h = hashlib.sha1(json.dumps(args.changed, sort_keys=True).encode())
        name += f"-p{h.hexdigest()[:8]}"
    return os.path.join(args.out_dir, name + ".json")


def run(args, source, target, clean, corruption, acc_before, log=print):
    """One (data, corruption, tune, seed). target: {split: (x uint8, y[, groups])} on the
    device; clean: the source test split or None. Writes the result."""
    t0, dev = time.time(), target["test"][0].device
    names, trained, snr = method_params(args, source, target["train"], log)
    if args.objective == "ce":
        history, sel, tuned, k = grid(args, source, names, target, log)
        source_acc = acc_before
        if names and clean:
            source_acc = model.evaluate(tuned, clean)["acc"]
    else:  # augmented copies need the images: no prefix
        k = 0
        if args.objective == "entropy" and names:
            k = model.frozen_stages(source, names, {"test": target["test"]}, args.prefix_cache_gb)
        history, sel, source_acc = unsupervised.run(args, source, names, target["test"], clean,
                                                    k, acc_before, log)
    res = {"data": args.data, "corruption": corruption,
           "severity": args.severity if args.data.endswith("_c") else None, "tune": args.tune,
           "seed": args.seed, "objective": args.objective, "variant": variant(args),
           "changed": args.changed, "args": vars(args),
           "trained": {"tensors": len(trained), "names": trained, "params": sum(
               p.numel() for n, p in source.named_parameters() if n in set(trained))},
           "prefix_stage": k, "history": history,
           "selected": {a: v for a, v in sel.items() if a != "run"},
           "test_acc": sel["test_acc"], "val_acc": sel["val_acc"],
           "test_avg_acc": sel.get("test_avg_acc"),
           "metric": "worst-group accuracy" if "test_avg_acc" in sel else "accuracy",
           "source_acc": source_acc, "source_acc_before": acc_before, "snr": snr,
           "seconds": time.time() - t0, "torch": str(torch.__version__),
           "device": common.device_name(dev), "code": common.code_version()}
    path = result_path(args, corruption)
    try:
        res = common.write_json(res, path)  # rounded as written
    except OSError as e:  # the work is not lost: the whole result on stdout
        print(json.dumps(common.tidy(res)))
        raise SystemExit(f"error: cannot write {path} ({e.strerror}); the result is printed "
                         "above as JSON")
    at = f"lr {sel['lr']:g}, epoch {sel['epoch']}" if names and args.objective == "ce" else args.objective
    kept = f" | source test {source_acc:.2f}% (before {acc_before:.2f}%)" if clean else ""
    log(f"result: test {res['test_acc']:.2f}% ({res['metric']}; val {sel['val_acc'] or 0:.1f}% "
        f"at {at}){kept} | {common.fmt_time(res['seconds'])} -> {path}")
    return res


def describe(args, source):
    bn = "" if source.arch == "resnet26" else ", BatchNorm in eval mode"
    if args.objective != "ce":
        return f"method: --tune {args.tune}; {unsupervised.describe(args)}{bn}"
    fc = f" (fc alone: {FC_LRS})" if args.data.startswith("cifar") else ""
    l1 = f" x lambda {args.l1_lambdas}" if args.tune == "l1" else ""
    return (f"method: --tune {args.tune}; Adam, lr grid {args.lrs}{fc}{l1}, wd {args.wd:g}, "
            f"batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}{bn}; selection: "
            f"best val accuracy over the grid and epochs 1..{args.epochs}, ties -> first")


def main(argv=None):
    args = parse_args(argv)
    todo = [c for c in corruptions(args) if not os.path.exists(result_path(args, c))]
    if len(todo) < len(corruptions(args)):  # nothing to do: nothing loaded either
        print(f"{len(corruptions(args)) - len(todo)} run(s) already have a result in "
              f"{args.out_dir}: skipped (delete a file to run it again)")
        if not todo:
            return []
    common.check_writable(os.path.join(args.out_dir, "result.json"), "--out_dir")
    dev = common.get_device(args.device, args.cpu_bf16)
    source, holdout = checkpoints.load_source(args, dev)
    load = (data.cifar_target(args, holdout, dev) if args.data.startswith("cifar")
            else imagenet.imagenet_target(args, source.fc.out_features, dev))
    print(describe(args, source))
    results, clean, acc_before, t0 = [], None, None, time.time()
    for i, c in enumerate(todo):
        with common.claim(result_path(args, c)) as mine:
            if not mine:
                print(f"[{c}] skipped: done or running in another process")
                continue
            target, clean_c = load(c)
            if clean_c is not None and clean_c is not clean:  # once a split
                clean = clean_c
                acc_before = model.evaluate(source, clean)["acc"]
                print(f"source: {args.ckpt}, source test accuracy {acc_before:.2f}%")

            def log(line, i=i, c=c):  # "[corruption i/N, elapsed]"
                el = common.fmt_time(time.time() - t0)
                print(f"[{c} {i + 1}/{len(todo)}, {el}] {line}", flush=True)
            results.append(run(args, source, target, clean_c, c, acc_before, log))
    if len(results) > 1:
        mean = sum(r["test_acc"] for r in results) / len(results)
        print(f"mean over {len(results)} corruptions, tune={args.tune} seed={args.seed}: {mean:.2f}%")
    return results


if __name__ == "__main__":
    common.run(main)
