"""
The paper's protocol as flags: per target dataset, the split sizes, epochs, lr grid and weight decay (PROTOCOL
sections 4-6, 8), keyed by flag name so that --help and the printed protocol show the real values; the checks
of every flag; and the name of each run's result file, which records any setting that changes the numbers.
finetune.py runs what this describes.
"""
import argparse
import hashlib
import json
import math
import os
import shlex
import sys

import common as C
import data
import model as M
import unsupervised

METHODS = ("auto_rgn", "auto_snr", "l1")  # the automatic methods: each starts from every parameter
# The protocol per target (PROTOCOL sections 4, 5, 8), keyed by flag name: a flag not given takes these
# values. *_per_class are per group for waterbirds / celeba; test_per_class 0 = all the rest; imagenet_c
# train_n None = 5 per class. The CIFAR head alone takes larger steps: FC_LRS when only fc trains (PROTOCOL
# section 5).
CIFAR = dict(train_n=1000, val_per_class=10, test_per_class=90, epochs=15, lrs="1e-3,1e-4,1e-5", wd=1e-4,
             ckpt="paper", data_dir="data")
BREEDS = dict(train_n=850, val_per_class=10, test_per_class=0, epochs=15, lrs="5e-4,1e-4,1e-5", wd=0.0,
              corruption="clean", data_dir="data/imagenet")
PROTOCOL = {
    "cifar_c": dict(CIFAR, corruption="paper14"),
    "cifar_flip": dict(CIFAR, corruption="clean"),
    "imagenet_c": dict(train_n=None, val_per_class=10, test_per_class=10, epochs=10, lrs="1e-3,1e-4,1e-5",
                       wd=1e-4, corruption="paper15", ckpt="imagenet", data_dir="data/imagenet-c"),
    "living17": dict(BREEDS, ckpt="ckpt/living17.pt"),
    "entity30": dict(BREEDS, ckpt="ckpt/entity30.pt"),
    "waterbirds": dict(train_n=400, val_per_class=30, test_per_class=0, epochs=100, lrs="5e-3,1e-3,5e-4",
                       wd=1e-4, corruption="clean", ckpt="ckpt/waterbirds.pt",
                       data_dir="data/waterbird_complete95_forest2water2"),
    "celeba": dict(train_n=400, val_per_class=30, test_per_class=0, epochs=50, lrs="1e-3,5e-4,1e-4", wd=1e-4,
                   corruption="clean", ckpt="ckpt/celeba.pt", data_dir="data"),
}
MEMO = dict(test_per_class=100, corruption="standard15")  # --objective memo: its table's 15; 100 a class
FC_LRS = "1e-1,1e-2,1e-3"
SNR_THRESHOLD = {"eb": 0.95, "per_example": 0.2}  # the authors'; ours: about 2/3 of the tensors


DESCRIPTION = """Surgical fine-tuning: train one block of a source model (or what an automatic method
chooses) on a shifted target; select lr and epoch on target val; report target test accuracy (README: Use)."""


def per_data(key):
    """The protocol's values of a flag for --help, datasets with the same value together."""
    same = {}
    for d, p in PROTOCOL.items():
        same.setdefault(p[key], []).append(d)
    pairs = [f"{'/'.join(ds)} {v}" for v, ds in same.items() if v is not None]
    return "default per --data: " + ", ".join(pairs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=C.Help,
                                usage="python finetune.py [--data D] [--tune T] [options]")
    g = p.add_argument_group("target data (PROTOCOL section 4)")
    g.add_argument("--data", default="cifar_c", choices=list(PROTOCOL))
    g.add_argument("--corruption",
                   help="a name, a comma list or a preset: paper14, standard15 (memo's default), all19; "
                        "imagenet_c: paper15, all19")
    g.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    g.add_argument("--corruption_seed", type=int, default=0, help="seed of the corruptions' randomness")
    g.add_argument("--train_n", type=int,
                   help="target training images, " + per_data("train_n") + ", imagenet_c 5 a class")
    g.add_argument("--val_per_class", type=int, help="per group for waterbirds, celeba; "
                   + per_data("val_per_class"))
    g.add_argument("--test_per_class", type=int, help="0 = the rest; " + per_data("test_per_class"))
    g.add_argument("--split_seed", type=int, default=0, help="the split's shuffle; the same for every --seed")
    g.add_argument("--data_dir",
                   help="the dataset's folder (CIFAR: holds cifar-10-batches-py); README for each")
    g.add_argument("--breeds_dir", default="data/breeds",
                   help="living17, entity30: the BREEDS hierarchy files")
    g.add_argument("--image_size", type=int, default=224,
                   help="ImageNet family: resize and center-crop to this")
    g.add_argument("--cifar10c_dir", default="",
                   help="read cifar_c from the official CIFAR-10-C release here")
    g.add_argument("--cache_dir", default="data/cache", help="decoded and corrupted tensors, made once")
    g = p.add_argument_group("fine-tuning (PROTOCOL section 5)")
    g.add_argument("--tune", default="layer1",
                   help="none, layer1..layer4, fc, all, auto_rgn, auto_snr, l1, or blocks / name prefixes "
                        "joined by , or + (e.g. layer1+layer2)")
    g.add_argument("--lrs", help=f"Adam lr grid, {per_data('lrs')}; CIFAR fc alone {FC_LRS}")
    g.add_argument("--epochs", type=int, help=per_data("epochs"))
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--wd", type=float, help="Adam's coupled weight decay, " + per_data("wd"))
    g.add_argument("--bn", default="eval", choices=["eval", "train"], help="BatchNorm mode while tuning")
    g.add_argument("--test_every_epoch", action="store_true",
                   help="score test every epoch, not only where selection can land (same result)")
    g.add_argument("--prefix_cache_gb", type=float, default=16,
                   help="memory for the frozen stages' output, computed once; 0: none (same result)")
    g = p.add_argument_group("automatic methods (PROTOCOL section 6; rgn.py)")
    g.add_argument("--l1_lambdas", default="1e-5,1e-4,1e-3",
                   help="l1: lambdas of lambda * |theta - theta_source|")
    g.add_argument("--rgn_measure", default="before", choices=["before", "train"],
                   help="auto_rgn: on 5 extra batches at the epoch-start weights (the authors'), or on the "
                        "epoch's first 5")
    g.add_argument("--rgn_keep_state", action="store_true",
                   help="auto_rgn: keep Adam's moments across epochs")
    g.add_argument("--rgn_include_norm", action="store_true", help="auto_rgn: train the norm layers too")
    g.add_argument("--snr", default="eb", choices=["eb", "per_example"],
                   help="auto_snr: the authors' criterion, per epoch, or per-example SNR, once")
    g.add_argument("--snr_threshold", type=float, help=f"auto_snr: default {SNR_THRESHOLD}")
    g.add_argument("--snr_n", type=int, default=128, help="auto_snr per_example: images scored")
    unsupervised.add_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--ckpt",
                   help="source model: paper (CIFAR, downloaded once), imagenet (torchvision's), or a path "
                        "(train.py); default per --data")
    g.add_argument("--weights", default="imagenet", choices=["imagenet", "none"],
                   help="--ckpt imagenet: torchvision's weights or random (tests)")
    g.add_argument("--seed", type=int, default=0, help="batch order and anything else random in fine-tuning")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--cpu_bf16", action="store_true", help="bf16 autocast on the CPU too (faster with AMX)")
    g.add_argument("--out_dir", default="results", help="one JSON per run, written atomically")
    args = p.parse_args(argv)
    defaults = {**PROTOCOL[args.data], **(MEMO if args.objective == "memo" else {})}
    for flag, value in defaults.items():  # flags not given take the protocol's values
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.snr_threshold is None:
        args.snr_threshold = SNR_THRESHOLD[args.snr]
    check(args)
    return args


def check(args):
    """One line and exit 1 for a flag that would give an empty or overlapping split, a rate that is not a
    finite positive number, an unknown corruption or a --tune that matches nothing."""
    try:
        lrs, lambdas = ([float(v) for v in s.split(",") if v] for s in (args.lrs, args.l1_lambdas))
    except ValueError:
        raise SystemExit(f"error: --lrs {args.lrs!r} and --l1_lambdas {args.l1_lambdas!r} must be comma "
                         "lists of numbers")
    bad = []
    if not lrs or not lambdas or not all(math.isfinite(v) and v > 0 for v in lrs + lambdas):
        bad.append(f"--lrs {args.lrs} and --l1_lambdas {args.l1_lambdas} must list finite numbers > 0")
    if min(args.epochs, args.batch_size, args.val_per_class, args.snr_n - 1, args.train_n or 1) < 1:
        bad.append("--epochs, --batch_size, --train_n and --val_per_class must be at least 1, --snr_n at "
                   "least 2")
    if min(args.test_per_class, args.wd) < 0 or not math.isfinite(args.wd + args.snr_threshold):
        bad.append("--test_per_class (0 = all the rest) and --wd must be >= 0, --wd and --snr_threshold "
                   "finite")
    if not args.corruption:
        bad.append("--corruption is empty; give a name, a comma list or a preset (paper14, standard15)")
    if bad:
        raise SystemExit("error: " + "; ".join(bad))
    corruption_list(args)  # an unknown name fails now
    unsupervised.check(args, METHODS)
    arch = "resnet26" if args.data.startswith("cifar") else "resnet50"
    if args.tune not in METHODS:  # a --tune that matches nothing fails now, not after the data is loaded
        M.resolve_tune(probe_model(arch), args.tune)


_probes = {}


def probe_model(arch):
    """A randomly initialised net of arch, built once per builder: its parameter names check --tune."""
    key = (arch, M.ARCHS[arch])
    if key not in _probes:
        _probes[key] = M.ARCHS[arch]()
    return _probes[key]


def corruption_list(args):
    if args.data == "cifar_c":
        return data.parse_corruptions(args.corruption)
    if args.data == "imagenet_c":
        from family import parse_imagenet_c
        return parse_imagenet_c(args.corruption)
    return ["clean"]


def lr_grid(args, names):
    fc = names and all(n.startswith("fc.") for n in names) and args.data.startswith("cifar") and args.lrs == \
        PROTOCOL[args.data]["lrs"]
    return [float(v) for v in (FC_LRS if fc else args.lrs).split(",") if v]


def variant(args):
    """Non-default settings of an automatic method ("+"-joined), or None: in the file name, kept apart by
    table.py."""
    on = {"auto_snr": [f"snr_{args.snr}"] if args.snr != "eb" else [],
          "auto_rgn": [n for n, v in (("measure_train", args.rgn_measure == "train"), ("keep_state",
                       args.rgn_keep_state), ("with_norm", args.rgn_include_norm)) if v]}.get(args.tune, [])
    return "+".join(on) or None


# The flags that change a run's numbers (device, precision and folders do not). A run that sets any of them
# away from its --data default gets a name tagged with them, so a quick run never stands in for a protocol
# run.
NUMBER_FLAGS = ("severity", "corruption_seed", "train_n", "val_per_class", "test_per_class", "split_seed",
                "cifar10c_dir", "lrs", "epochs", "batch_size", "wd", "l1_lambdas", "snr_threshold", "snr_n",
                "ckpt",
                "weights", "bn", "image_size", "ent_lr", "ent_steps", "ent_batch_size", "episodic",
                "ent_copies",
                "memo_copies", "memo_lr")


def changed_settings(args):
    """{flag: value} of the NUMBER_FLAGS that differ from the --data (and --objective) defaults."""
    base = parse_args(["--data", args.data, "--objective", args.objective, "--snr", args.snr])
    return {k: getattr(args, k) for k in NUMBER_FLAGS if getattr(args, k) != getattr(base, k)}


def result_path(args, corruption):
    """<out_dir>/<data>-<corruption>-<tune>-s<seed>[-<objective>][-<variant>][-p<hash of changed
    settings>].json"""
    changed = changed_settings(args)
    tune = "".join(c if c.isalnum() or c in "._+-" else "_" for c in args.tune.replace(",", "+"))
    name = f"{args.data}-{corruption}-{tune}-s{args.seed}"
    if args.objective != "ce":
        name += f"-{args.objective}"
    if variant(args):
        name += f"-{variant(args)}"
    if changed:
        name += f"-p{hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]}"
    return os.path.join(args.out_dir, name + ".json")


def result_paths(lines=sys.stdin):
    """sweep.sh's run list: for each line of finetune.py flags, "<result path>\t<flags>" per corruption it
    names (a preset expanded). Runs nothing; a bad flag fails the whole list."""
    for line in lines:
        flags = shlex.split(line)
        at = flags.index("--corruption") + 1 if "--corruption" in flags else None
        for c in corruption_list(parse_args(flags)):
            one = flags[:at] + [c] + flags[at + 1:] if at else flags
            print(f"{result_path(parse_args(one), c)}\t{shlex.join(one)}")
