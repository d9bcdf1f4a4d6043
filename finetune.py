"""
Surgical fine-tuning: adapt the source ResNet-26 to a shifted target by training one block (or a method's choice of
parameters), select lr and epoch on target validation, report target test accuracy (PROTOCOL sections 3-6). The CIFAR
source is the paper's own checkpoint (--ckpt paper, downloaded once and checksum-checked).

    python finetune.py --data cifar_c --tune layer1              # 14 corruptions of the paper, severity 5, seed 0
    python finetune.py --data cifar_c --corruption gaussian_noise --tune all --seed 1
    python finetune.py --data cifar_flip --tune fc               # labels y -> 9 - y (the common reading of the
                                                                 # paper's unpublished map); the source scores ~0%
    python finetune.py --tune auto_rgn | auto_snr | l1           # the automatic methods, over every parameter
    python finetune.py --objective memo --tune layer1            # unsupervised, the paper's label-free table: MEMO
                                                                 # per test image (memo.py), from the source each time
    python finetune.py --objective entropy --tune layer1         # unsupervised, TENT-style: entropy minimisation
                                                                 # on the unlabelled test stream
    python finetune.py --data imagenet_c --imagenet_c_dir /data/imagenet-c --tune layer1   # ResNet-50, section 8:
    python finetune.py --data living17 | entity30 | waterbirds | celeba --tune layer4       # the user's folders

Per run: 3 lrs x 15 epochs on 1,000 target images (16 steps an epoch), val after every epoch, test where the
selection can land (--test_every_epoch: every epoch). With the prefix cache, --tune fc trains the head on features
computed once, so it takes seconds even on a CPU; --tune all or layer1 backpropagates through the whole net: about
1.5 minutes a run with --cpu_bf16 on 2 CPU cores (README "The paper's CIFAR cells" has the measured times).

Result: one JSON per (data, corruption, tune, seed) in --out_dir, e.g. results/cifar_c-gaussian_noise-layer1-s0.json
(cifar_flip: cifar_flip-clean-fc-s0.json; a prefix list such as layer2.0.,fc. is written layer2.0.+fc.; settings
that change the numbers away from the protocol add -p<hash>: result_path()), holding
    data, corruption, severity, tune, seed    what was run ("clean" is the corruption of cifar_flip)
    args                                      every flag
    trained                                   {"tensors", "params", "names"}: what trained (auto_rgn: its norms stay
                                              frozen unless --rgn_include_norm)
    prefix_stage                              how many leading stages (model.STAGES) were computed once; 0: none
    history                                   one entry per lr in grid order (l1: every lr for each lambda):
                                              {"lr", "lambda", "epochs": [{"epoch", "train_loss", "val_acc",
                                              "val_loss", "test_acc", "test_loss", "seconds"}, ...] from epoch 0 (the
                                              source model, train_loss null; test_acc null where the test split
                                              was not scored), "rgn": per epoch {block: mean lr multiplier}
                                              (auto_rgn), "snr": per epoch {block: tensors trained} (auto_snr eb)}
    selected                                  {"lr", "lambda", "epoch", "val_acc", "test_acc"}: best target-val
                                              accuracy over epochs 1..E, ties -> first seen (lr grid order, then epoch)
    test_acc, val_acc                         target accuracies (%) at the selection; tune none: epoch 0
    metric, test_avg_acc                      "accuracy", or for waterbirds / celeba "worst-group accuracy": then
                                              *_acc are the worst group's (the paper's cells), test_avg_acc the mean of
                                              the 4 group accuracies and history has val/test_avg_acc, test_group_acc
    source_acc, source_acc_before             source-distribution test accuracy (%) of the selected model / the
                                              checkpoint: clean CIFAR-10; BREEDS: the source subclasses; else null
    snr                                       auto_snr: {"criterion", "threshold"} (per_example: also "scores":
                                              {name: score}, "selected": [names])
    variant                                   a method's non-default flags (e.g. "snr_per_example"), also at the
                                              end of the file name; null for the default method
    changed                                   {flag: value} of the settings that change the numbers and differ
                                              from the protocol ({} for a protocol run; the file name's -p<hash>)
    seconds, torch, device                    wall time of the run, versions, hardware
--objective entropy / memo write ...-s0-entropy.json / -memo.json with "objective" added; the history is one entry
{"lr", "lambda": null, "stream": [{"batch", "n", "entropy", "acc", "seconds"}, ...]} (memo: per chunk of images),
test_acc the accuracy (%) of the predictions, val_acc and selected.epoch null, source_acc the clean accuracy of the
model the stream left (memo: the source's; every image starts from it).
The paper's table reads these: No Adaptation = tune none; Cross-Val = per (data, seed) the block among
layer1/layer2/layer3/fc with the best val_acc, at its test_acc; Full Fine-Tuning = all; L1 = l1; Auto-SNR; Auto-RGN.
"""
import argparse
import copy
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import sys
import time

import torch
import torch.nn.functional as F

import data
import memo as memo_
import model as M
import rgn
import train as T

BLOCK_TUNES = ("none", "layer1", "layer2", "layer3", "layer4", "fc", "all")  # layer4: ResNet-50 only
METHODS = ("auto_rgn", "auto_snr", "l1")  # automatic methods, each over every parameter
FC_LRS = "1e-1,1e-2,1e-3"  # CIFAR: the head alone takes larger steps (PROTOCOL section 5)
# The protocol per target (PROTOCOL sections 4, 5, 8): target-train images, val / test images per class (per group
# for waterbirds and celeba; test 0 = the whole test split), epochs, lr grid, weight decay; flags override.
# imagenet_c train_n None = 5 per class.
PROTOCOL = {
    "cifar_c": dict(train_n=1000, val=10, test=90, epochs=15, lrs="1e-3,1e-4,1e-5", wd=1e-4),
    "cifar_flip": dict(train_n=1000, val=10, test=90, epochs=15, lrs="1e-3,1e-4,1e-5", wd=1e-4),
    "imagenet_c": dict(train_n=None, val=10, test=10, epochs=10, lrs="1e-3,1e-4,1e-5", wd=1e-4),
    "living17": dict(train_n=850, val=10, test=0, epochs=15, lrs="5e-4,1e-4,1e-5", wd=0.0),
    "entity30": dict(train_n=850, val=10, test=0, epochs=15, lrs="5e-4,1e-4,1e-5", wd=0.0),
    "waterbirds": dict(train_n=400, val=30, test=0, epochs=100, lrs="5e-3,1e-3,5e-4", wd=1e-4),
    "celeba": dict(train_n=400, val=30, test=0, epochs=50, lrs="1e-3,5e-4,1e-4", wd=1e-4),
}


CIFAR_ARCHS = ("resnet26", "wrn28_10")  # the paper's ResNet-26; RobustBench's WRN-28-10 (the authors' released code)


def arch_of(data_name):
    return "resnet26" if data_name.startswith("cifar") else "resnet50"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("target data (PROTOCOL section 4)")
    g.add_argument("--data", default="cifar_c", choices=list(PROTOCOL))
    g.add_argument("--corruption", default=None, help="cifar_c: one name, a comma list, paper14 (default; "
                   "--objective memo: standard15), standard15 or all19; "
                   "imagenet_c: one name, a comma list, paper15 (default) or all19")
    g.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    g.add_argument("--corruption_seed", type=int, default=0, help="seed of the corruptions' randomness")
    g.add_argument("--train_n", type=int, default=None, help="target training images, balanced over classes (groups "
                   "for waterbirds, celeba); default per --data: PROTOCOL above")
    g.add_argument("--val_per_class", type=int, default=None, help="per group for waterbirds and celeba")
    g.add_argument("--test_per_class", type=int, default=None, help="per group for waterbirds and celeba; 0 = all "
                   "the rest; --objective memo: 100")
    g.add_argument("--split_seed", type=int, default=0, help="seed of the per-class shuffle; fixed across --seed, "
                   "so every seed is tested on the same images (the paper's No-Adaptation std is 0)")
    g.add_argument("--cifar10c_dir", default="", help="read cifar_c images from the official CIFAR-10-C release "
                   "in this folder instead of generating them (its images replace the pool: a source without holdout)")
    g.add_argument("--data_dir", default="data", help="folder holding (or to receive) cifar-10-batches-py")
    g.add_argument("--cache_dir", default="data/cache", help="where decoded and corrupted tensors are cached")
    T.add_folder_args(g)
    g = p.add_argument_group("fine-tuning (PROTOCOL section 5)")
    g.add_argument("--tune", default="layer1", help=f"one of {', '.join(BLOCK_TUNES + METHODS)}, or a comma list "
                   "of blocks / parameter-name prefixes, e.g. layer2.0.,fc.")
    g.add_argument("--lrs", default="", help=f"comma list of Adam lrs (default per --data; CIFAR: {FC_LRS} when "
                   "only fc trains)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--wd", type=float, default=None, help="coupled L2 weight decay (torch.optim.Adam's)")
    g.add_argument("--test_every_epoch", action="store_true", help="score the test split after every epoch (for "
                   "curves); by default only where val beats every earlier epoch, the only places selection can land")
    g.add_argument("--no_prefix_cache", action="store_true",
                   help="run the frozen stages before the first tuned one every step instead of once (same result)")
    g.add_argument("--prefix_cache_gb", type=float, default=16, help="memory the cached activations may take; "
                   "splits are cached in the order train, val, test while they fit, the rest run whole")
    g.add_argument("--bn", default="eval", choices=["eval", "train"], help="BatchNorm (ResNet-50, WRN-28-10) while "
                   "tuning: eval "
                   "(running statistics kept, so the prefix cache is exact) or train (batch statistics; no cache)")
    g = p.add_argument_group("automatic methods (PROTOCOL section 6)")
    g.add_argument("--rgn_measure", default="before", choices=["before", "train"], help="auto_rgn: before = the "
                   "authors' (RGN on 5 extra batches at the epoch-start weights, then the epoch at those rates); "
                   "train = on the epoch's first 5 training batches, which are also trained on")
    g.add_argument("--rgn_keep_state", action="store_true", help="auto_rgn: keep Adam's moments across epochs")
    g.add_argument("--rgn_include_norm", action="store_true", help="auto_rgn: measure and train norm layers too")
    g.add_argument("--snr", default="eb", choices=["eb", "per_example"], help="auto_snr criterion: eb = the authors' "
                   "(minibatch g^2 / var over dim 0, 5 batches, re-selected every epoch, norms frozen); per_example "
                   "= mean^2 / var of per-example gradients, min-max normalised, selected once")
    g.add_argument("--snr_threshold", type=float, default=None, help="auto_snr: tensors scoring below this stay "
                   "frozen; default eb 0.95 (the authors'), per_example 0.2 (ours: about 2/3 of the tensors)")
    g.add_argument("--snr_n", type=int, default=128, help="auto_snr per_example: target training images the scores use")
    # The L1 term adds lambda * sign(theta - theta_source) to each weight's gradient; the cross-entropy's own per-weight
    # gradient is ~1e-4..4e-3 (10-90%, median 9e-4) on a CIFAR ResNet-26, so 1e-5 / 1e-4 / 1e-3 = weak / felt / ruling.
    g.add_argument("--l1_lambdas", default="1e-5,1e-4,1e-3", help="l1: comma list of lambda in loss + lambda * "
                   "sum|theta - theta_source|, selected jointly with lr on val")
    g = p.add_argument_group("unsupervised adaptation: entropy minimisation on the unlabelled target test stream")
    g.add_argument("--objective", default="ce", choices=["ce", "entropy", "memo"], help="ce: the supervised "
                   "fine-tuning above; entropy (TENT-style stream) and memo (MEMO per image, memo.py): no target "
                   "label is read, the test split is what is adapted on and scored (train/val unused)")
    g.add_argument("--memo_copies", type=int, default=32, help="memo: AugMix copies per test image")
    g.add_argument("--memo_lr", type=float, default=0.005, help="memo: the plain SGD step's lr (MEMO's CIFAR value)")
    # TENT's CIFAR setting (Wang et al. 2021, cfgs/tent.yaml): Adam 1e-3, no weight decay, one step per batch of 200;
    # batches of 64 here, so a 700-image stream gives 11 updates, not 4. One lr for every --tune, fc too: without
    # labels there is no validation to choose it on.
    g.add_argument("--ent_lr", type=float, default=1e-3, help="Adam lr of the entropy steps (no weight decay)")
    g.add_argument("--ent_steps", type=int, default=1, help="entropy steps per stream batch")
    g.add_argument("--ent_batch_size", type=int, default=64, help="stream batch (64: 11 batches of a 700-image test "
                   "split); each is predicted and scored first, then adapted on")
    g.add_argument("--episodic", action="store_true", help="reset to the source model for every batch, adapt on it, "
                   "then predict it (predicting first would score the source model); default continual")
    g.add_argument("--ent_copies", type=int, default=0, help="N > 0: minimise the entropy of each image's mean "
                   "prediction over N random crop+flip copies (MEMO-style, not its AugMix); 0: per-image entropy "
                   "(TENT)")
    g = p.add_argument_group("run")
    g.add_argument("--ckpt", default=None, help="source checkpoint, trained first (train.py) if missing; default "
                   "CIFAR: paper = the paper's ResNet-26 (downloaded once; a local copy's path works too), "
                   "imagenet_c: imagenet = torchvision's ImageNet model, else ckpt/<data>.pt")
    g.add_argument("--weights", default="imagenet", choices=["imagenet", "none"], help="--ckpt imagenet, and a "
                   "ResNet-50 trained here: torchvision's ImageNet weights or none (random init, for tests)")
    g.add_argument("--seed", type=int, default=0, help="batch order and anything else random in fine-tuning")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--cpu_bf16", action="store_true", help="bf16 autocast on the CPU too, as on CUDA (faster on "
                   "CPUs with AMX or AVX512-BF16)")
    g.add_argument("--out_dir", default="results", help="one JSON per run, written atomically")
    g.add_argument("--small", action="store_true", help="a source model trained here uses train.py --small")
    g.add_argument("--holdout", type=int, default=0, help="a source model trained here holds out the last N training "
                   "images for the target pool (an existing checkpoint's own value is always used)")
    g.add_argument("--source_args", default="", help="extra train.py flags for a source model trained here")
    args = p.parse_args(argv)
    proto = PROTOCOL[args.data]  # flags not given take the protocol's values
    if args.objective == "memo" and args.test_per_class is None:
        args.test_per_class = 100  # MEMO adapts on test images only: 1,000 of them (ours; the paper does not say)
    for flag, key in (("train_n", "train_n"), ("val_per_class", "val"), ("test_per_class", "test"),
                      ("epochs", "epochs"), ("wd", "wd")):
        setattr(args, flag, proto[key] if getattr(args, flag) is None else getattr(args, flag))
    if args.snr_threshold is None:
        args.snr_threshold = 0.95 if args.snr == "eb" else 0.2
    if args.corruption is None:  # an empty --corruption is an error below, never "all"; MEMO's table: the 15
        args.corruption = {"cifar_c": "standard15" if args.objective == "memo" else "paper14",
                           "imagenet_c": "paper15"}.get(args.data, "clean")
    args.ckpt = args.ckpt or {"cifar_c": "paper", "cifar_flip": "paper",
                              "imagenet_c": "imagenet"}.get(args.data, f"ckpt/{args.data}.pt")
    try:
        args.lr_list = [float(v) for v in args.lrs.split(",") if v]
        args.lambda_list = [float(v) for v in args.l1_lambdas.split(",") if v]
    except ValueError:
        raise SystemExit(f"error: --lrs {args.lrs!r} / --l1_lambdas {args.l1_lambdas!r} are not comma lists of numbers")
    check_numbers(args)
    if args.objective == "entropy" and (args.tune in ("auto_snr", "l1") or args.ent_copies < 0
                                        or min(args.ent_steps, args.ent_batch_size) < 1):
        raise SystemExit("error: --objective entropy needs --ent_steps, --ent_batch_size >= 1, --ent_copies >= 0 and a "
                         "--tune other than auto_snr / l1 (they score or select with labels)")
    if args.objective == "memo" and (args.tune in METHODS or args.data != "cifar_c" or args.memo_copies < 1
                                     or not args.memo_lr > 0):
        raise SystemExit("error: --objective memo needs --data cifar_c, --memo_copies >= 1, --memo_lr > 0 and a "
                         "block or prefix list as --tune (the automatic methods select with labels or over epochs)")
    if args.data in ("cifar_c", "imagenet_c"):  # one line for an unknown name
        (data.parse_corruptions if args.data == "cifar_c" else data.parse_imagenet_c)(args.corruption)
    tune_names(probe_model(arch_of(args.data), M.ARCHS[arch_of(args.data)]), args.tune)  # a bad --tune fails now
    return args


@functools.lru_cache(maxsize=4)
def probe_model(arch, builder):
    """A randomly initialised net of arch, built once per builder: its parameter names check --tune."""
    return builder()


def check_numbers(args):
    """One line and exit 2 for a size or number flag that would give an empty split, a split overlapping another,
    a rate that is not a finite positive number, or a silent default (PROTOCOL sizes need at least one image)."""
    bad = []
    finite_pos = [("--lrs", v) for v in args.lr_list] + [("--memo_lr", args.memo_lr)]
    finite_pos += [("--l1_lambdas", v) for v in args.lambda_list]
    bad += [f"{flag} {v:g} must be a finite number > 0" for flag, v in finite_pos if not (math.isfinite(v) and v > 0)]
    if args.l1_lambdas and not args.lambda_list:
        bad.append("--l1_lambdas lists no value")
    bad += [f"{flag} {v:g} must be a finite number >= 0" for flag, v in (("--wd", args.wd), ("--ent_lr", args.ent_lr))
            if not (math.isfinite(v) and v >= 0)]  # --ent_lr 0: the stream without adaptation
    ints = {"--epochs": args.epochs, "--batch_size": args.batch_size, "--val_per_class": args.val_per_class,
            "--ent_steps": args.ent_steps, "--ent_batch_size": args.ent_batch_size}
    if args.train_n is not None:
        ints["--train_n"] = args.train_n
    bad += [f"{flag} {v} must be at least 1" for flag, v in ints.items() if v < 1]
    if args.test_per_class < 0 or args.holdout < 0 or args.ent_copies < 0:
        bad.append("--test_per_class (0 = all the rest), --holdout and --ent_copies must be >= 0")
    if args.snr_n < 2 or not (math.isfinite(args.snr_threshold)):
        bad.append("--snr_n must be at least 2 and --snr_threshold a finite number")
    if not args.corruption:
        bad.append("--corruption is empty; give a name, a comma list, paper14 / standard15 / all19 (CIFAR) or "
                   "paper15 (ImageNet-C)")
    if bad:
        raise SystemExit("error: " + "; ".join(bad))


def tune_names(model, tune):
    """--tune -> the names of the parameters it trains, in model order (the methods start from every one)."""
    if tune in METHODS:
        return M.resolve_tune(model, "all")
    chosen = set()
    for part in re.split(r"[,+]", tune):  # each part a block name or a parameter-name prefix; "+" as in file names
        ok = bool(part) and part not in METHODS and (part != "none" or tune == "none")  # "fc,none" is a typo
        try:
            chosen.update(M.resolve_tune(model, part) if ok else [])
        except SystemExit:
            ok = False
        if not ok:
            raise SystemExit(f"error: --tune {tune!r}: {part!r} is not one of {', '.join(BLOCK_TUNES + METHODS)} "
                             f"nor a parameter-name prefix (python model.py lists the blocks; e.g. layer2.0.,fc.)")
    return [n for n, _ in model.named_parameters() if n in chosen]


def lr_grid(args, names):
    if args.lr_list:
        return args.lr_list
    fc = names and all(n.startswith("fc.") for n in names) and args.data.startswith("cifar")
    return [float(v) for v in (FC_LRS if fc else PROTOCOL[args.data]["lrs"]).split(",")]


def cache_stage(names, args, arch="resnet26"):
    """How many leading stages are frozen and computed once: up to the first tuned one (0: no cache; none
    evaluates once, so caching would only add the training split's forward pass; BatchNorm in train mode makes
    the frozen stages' output depend on the batch)."""
    bn_train = args.bn == "train" and arch != "resnet26"  # the others have BatchNorm
    return 0 if args.no_prefix_cache or not names or bn_train else M.first_stage(names, arch)


@torch.no_grad()
def prefix(model, x, stop, chunk=256):
    """Output of the frozen stages [0, stop) for a whole split, once: eval mode, no grad, in chunks. Exact because
    GroupNorm keeps no running state and there is no augmentation; chunk matches evaluate()'s batch."""
    if stop == 0:
        return x
    model.eval()
    with T.autocast(x.device):
        return torch.cat([model(xb, start=0, stop=stop) for xb in x.split(chunk)])


@torch.no_grad()
def measure(model, split, start=0):
    """{"acc", "loss"} of a split (x, y) or (x, y, groups). With groups (waterbirds, celeba) acc is the worst
    group's accuracy, the paper's metric there, plus "avg_acc" (mean of the group accuracies: the accuracy on the
    group-balanced target distribution) and "group_acc" (per group id, ascending)."""
    x, y, g = (*split, None)[:3]
    hit, loss = T.hits(model, x, y, start=start)
    if g is None:
        return {"acc": hit.float().mean().item() * 100, "loss": loss}
    acc = [hit[g == k].float().mean().item() * 100 for k in g.unique().tolist()]
    return {"acc": min(acc), "loss": loss, "avg_acc": sum(acc) / len(acc), "group_acc": acc}


def epoch_entry(epoch, train_loss, v, t, t0):
    """One history entry from measure() of val and of test (t None: test not scored at this epoch)."""
    e = {"epoch": epoch, "train_loss": train_loss, "val_acc": v["acc"], "val_loss": v["loss"],
         "test_acc": t and t["acc"], "test_loss": t and t["loss"]}
    if "avg_acc" in v:  # waterbirds / celeba: the group-balanced average and the per-group accuracies too
        e.update(val_avg_acc=v["avg_acc"], test_avg_acc=t and t["avg_acc"], test_group_acc=t and t["group_acc"])
    e["seconds"] = time.time() - t0
    return e


def finetune(model, names, splits, lr, args, start=0, l1_lambda=0.0, epoch0=None, record=None, log=print):
    """Train the named parameters of model (in place) with Adam at lr for args.epochs, evaluating target val after
    every epoch. splits: {"train"|"val"|"test": (x, y) or (x, y, groups)} on the device, x being the input of stage
    start[split] (images when 0, cached activations otherwise; an int: the same for every split). tune auto_rgn:
    rgn.AutoRGN over names; l1_lambda > 0: loss + l1_lambda * sum|theta - theta_source|. epoch0: the source model's
    history entry (computed here when None). record: {"val": best val accuracy so far over the grid}: test is scored
    only where val beats it, the only epochs select() can land on (every epoch with --test_every_epoch); updated.
    Returns (history entry, {name: tensor} at the first epoch >= 1 with the best val accuracy, the one select()
    would take from this lr)."""
    start = start if isinstance(start, dict) else dict.fromkeys(splits, start)
    record = {"val": -1.0} if record is None else record
    dev, (xtr, ytr) = splits["train"][0].device, splits["train"][:2]
    torch.manual_seed(args.seed)
    g = torch.Generator(device=dev).manual_seed(args.seed)  # the same batch order for every lr
    params = M.freeze_except(model, names)
    opt, src = None, None
    rgn_before = args.tune == "auto_rgn" and args.rgn_measure == "before"
    eb = args.tune == "auto_snr" and args.snr == "eb"  # names are the candidates; re-selected every epoch below
    if names and args.tune == "auto_rgn":
        steps = None if rgn_before else math.ceil(len(xtr) / args.batch_size)  # before: epochs marked below
        opt = rgn.AutoRGN([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr, args.wd,
                          steps_per_epoch=steps, keep_state=args.rgn_keep_state,
                          include_norm=args.rgn_include_norm, norm_names=rgn.norm_param_names(model))
        params = M.freeze_except(model, opt.names)  # frozen norms need no gradient at all
    elif names and not eb:
        opt = torch.optim.Adam(params, lr, weight_decay=args.wd)
    if l1_lambda:
        src = [p.detach().clone() for p in params]
    if epoch0 is None:  # the source model's entry, when the caller has not scored it already
        epoch0 = epoch_entry(0, None, measure(model, splits["val"], start["val"]),
                             measure(model, splits["test"], start["test"]), time.time())
    hist = {"lr": lr, "lambda": l1_lambda if args.tune == "l1" else None, "epochs": [epoch0],
            **({"rgn": []} if args.tune == "auto_rgn" else {}), **({"snr": []} if eb else {})}
    best, best_val, t0 = {}, -1.0, time.time()
    tag = f"lr {lr:.0e}" + (f" lambda {l1_lambda:.0e}" if hist["lambda"] is not None else "") if names else ""
    # the automatic methods measure on 5 batches of their own shuffle at the epoch-start weights, as the authors'
    # islice(train_loader, 5) does; their own generator keeps the training batch order every method's
    gm = torch.Generator(device=dev).manual_seed(args.seed + 1)

    def probe():
        return itertools.islice(data.batches(xtr, ytr, args.batch_size, shuffle=True, generator=gm), 5)

    def loss_of(xb, yb):
        with T.autocast(dev):
            return F.cross_entropy(model(xb, start=start["train"]).float(), yb)
    for epoch in range(1, args.epochs + 1 if names else 1):
        tot, seen = 0.0, 0
        model.train(args.bn == "train")  # ResNet-26 has no BatchNorm or dropout: the same either way
        if rgn_before:  # the epoch's rates from the epoch-start weights; no step here
            opt.new_epoch()
            for xb, yb in probe():
                loss_of(xb, yb).backward()
                opt.measure()
                opt.zero_grad(set_to_none=True)
        if eb:  # the authors' Auto-SNR: tensors scoring >= threshold train this epoch, Adam rebuilt (moments reset)
            M.freeze_except(model, names)
            scores = rgn.eb_scores(loss_of, probe(), [(n, p) for n, p in model.named_parameters() if n in names])
            chosen = [n for n in names if scores[n] >= args.snr_threshold]
            params = M.freeze_except(model, chosen)
            opt = torch.optim.Adam(params, lr, weight_decay=args.wd) if params else None
            hist["snr"].append({b: sum(n in chosen for n in ns) for b, ns in M.block_params(model).items()
                                if b != "all"})
        for step, (xb, yb) in enumerate(data.batches(xtr, ytr, args.batch_size, shuffle=True, generator=g), 1):
            loss = loss_of(xb, yb)
            v = T.finite(loss, f"{tag}, epoch {epoch}, step {step}", "Try smaller --lrs.")
            if opt is not None:  # eb may select nothing for an epoch: the model then stays as it is
                reg = l1_lambda * sum((p - p0).abs().sum() for p, p0 in zip(params, src)) if src else 0.0
                (loss + reg).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            tot, seen = tot + v * len(yb), seen + len(yb)
        v = measure(model, splits["val"], start["val"])
        t = None
        if args.test_every_epoch or v["acc"] > record["val"]:
            t = measure(model, splits["test"], start["test"])
        record["val"] = max(record["val"], v["acc"])
        hist["epochs"].append(epoch_entry(epoch, tot / seen, v, t, t0))
        if v["acc"] > best_val:  # strictly better: ties keep the earlier epoch, as select() does
            best_val, best = v["acc"], {n: p.detach().clone() for n, p in model.named_parameters() if n in set(names)}
        test_s = f"{t['acc']:5.1f}%" if t else "  -   "
        log(f"{tag} | epoch {epoch:2d}/{args.epochs} | loss {tot / seen:.4f} | val {v['acc']:5.1f}% | test {test_s} | "
            f"{T.fmt_time(time.time() - t0)}")
        if eb:
            log("    auto_snr tensors trained this epoch: " + " ".join(f"{b} {k}" for b, k in hist["snr"][-1].items()))
        if "rgn" in hist:
            hist["rgn"].append(rgn.block_multipliers(opt.multipliers, M.BLOCKS[model.arch]))
            log("    rgn multipliers: " + " ".join(f"{b} {m:.3f}" for b, m in hist["rgn"][-1].items()))
    return hist, best


def select(history, min_epoch=1):
    """The (lr, lambda, epoch) with the best val accuracy over epochs >= min_epoch, ties -> first seen (history
    order, then epoch order). Pure: history is finetune()'s entries. Returns a dict with the run's index too."""
    sel = None
    for i, h in enumerate(history):
        for e in h["epochs"]:
            if e["epoch"] >= min_epoch and (sel is None or e["val_acc"] > sel["val_acc"]):
                sel = {"run": i, "lr": h["lr"], "lambda": h["lambda"], "epoch": e["epoch"],
                       "val_acc": e["val_acc"], "test_acc": e["test_acc"],
                       **({"test_avg_acc": e["test_avg_acc"]} if "test_avg_acc" in e else {})}
    return sel


def cached_splits(source, target, k, args, log=print):
    """{split: (stage-k activations or the images, y[, groups])} and {split: its start stage}: the prefix of the
    frozen stages computed once per split, in the order train, val, test while --prefix_cache_gb lasts (a ResNet-50
    layer1 output is 1.6 MB an image in bf16: 25,000 ImageNet-C images would take 40 GB)."""
    budget, out, starts = args.prefix_cache_gb * 2 ** 30, {}, {}
    for s, (x, *rest) in target.items():
        one = prefix(source, x[:1], k) if k else x[:1]
        need = one.numel() * one.element_size() * len(x)
        starts[s] = k if k and need <= budget else 0
        budget -= need if starts[s] else 0
        out[s] = (prefix(source, x, starts[s]), *rest)
    if k and min(starts.values()) == 0:
        log(f"prefix cache: {', '.join(s for s in starts if not starts[s])} over --prefix_cache_gb "
            f"{args.prefix_cache_gb:g}: run whole every epoch")
    return out, starts


def run(args, source, target, clean, corruption, source_acc_before, log=print):
    """One (data, corruption, tune, seed): the lr (x lambda) grid, selection on target val, the result JSON.
    target: {"train"|"val"|"test": (x uint8 images, y[, groups])} on the device; clean: the source-distribution
    test split (x, y) for the source accuracy kept (clean CIFAR-10), or None."""
    t0, dev = time.time(), target["train"][0].device
    names, snr = tune_names(source, args.tune), None
    if args.tune == "auto_snr" and args.snr == "eb":  # candidates: every non-norm tensor, chosen per epoch
        names = [n for n in names if n not in rgn.norm_param_names(source)]
        snr = {"criterion": "eb", "threshold": args.snr_threshold}
    elif args.tune == "auto_snr":  # score every tensor on a seeded subset of the target training images
        x, y = target["train"]
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:args.snr_n].to(dev)
        scores = rgn.snr_scores(source.eval(), F.cross_entropy, x[idx], y[idx], names, chunk_size=32)
        names = rgn.snr_select(scores, args.snr_threshold)
        snr = {"criterion": "per_example", "threshold": args.snr_threshold, "scores": scores, "selected": names}
        log(f"auto_snr: {len(names)}/{len(scores)} tensors at or above {args.snr_threshold}: "
            + ", ".join(sorted({n.split(".")[0] for n in names})))
    k = cache_stage(names, args, source.arch)
    splits, starts = cached_splits(source, target, k, args, log)
    lambdas = args.lambda_list if args.tune == "l1" else [0.0]
    grid = [(lr, lam) for lam in lambdas for lr in lr_grid(args, names)] if names else [(None, 0.0)]
    trained = names  # auto_rgn trains all but the norms it freezes (rgn.AutoRGN, as the reference does); auto_snr eb:
    # the candidates, each epoch's choice is in history[i]["snr"]
    if args.tune == "auto_rgn" and not args.rgn_include_norm:
        trained = [n for n in names if n not in rgn.norm_param_names(source)]
    n_params = sum(p.numel() for n, p in source.named_parameters() if n in set(trained))
    log(f"tune {args.tune}: {len(trained)} tensors, {n_params:,d} parameters; prefix cache: "
        + (f"stages {', '.join(source.stages[:k])} computed once" if k else "none"))
    t1 = time.time()  # epoch 0 is the source model: the same for every lr, so scored once
    epoch0 = epoch_entry(0, None, measure(source, splits["val"], starts["val"]),
                         measure(source, splits["test"], starts["test"]), t1)
    log(f"source | epoch  0 | val {epoch0['val_acc']:5.1f}% | test {epoch0['test_acc']:5.1f}% | "
        f"{T.fmt_time(time.time() - t1)}")
    history, states, record = [], [], {"val": -1.0}
    for lr, lam in grid:
        h, best = finetune(copy.deepcopy(source), names, splits, lr, args, start=starts, l1_lambda=lam,
                           epoch0=epoch0, record=record, log=log)
        history.append(h)
        states.append(best)
    sel = select(history, min_epoch=1 if names else 0)
    tuned = copy.deepcopy(source)
    with torch.no_grad():  # the selected model = the source with the tuned tensors at their selected values
        for n, p in tuned.named_parameters():
            p.copy_(states[sel["run"]].get(n, p))
    source_acc = T.evaluate(tuned, *clean)[0] if names and clean else source_acc_before
    grouped = "test_avg_acc" in sel
    res = {"data": args.data, "corruption": corruption, "severity": args.severity if "_c" in args.data else None,
           "tune": args.tune, "seed": args.seed, "args": {k_: v for k_, v in vars(args).items() if "_list" not in k_},
           "trained": {"tensors": len(trained), "params": n_params, "names": trained},
           "prefix_stage": k, "history": history,
           "selected": {k_: v for k_, v in sel.items() if k_ != "run"},
           "test_acc": sel["test_acc"], "val_acc": sel["val_acc"], "source_acc": source_acc,
           "metric": "worst-group accuracy" if grouped else "accuracy", "test_avg_acc": sel.get("test_avg_acc"),
           "source_acc_before": source_acc_before, "snr": snr, "seconds": time.time() - t0,
           "torch": str(torch.__version__), "device": T.device_name(dev)}
    path = save_result(res, args, corruption)
    at = f"lr {sel['lr']:g}, epoch {sel['epoch']}" if names else "the source model"
    at += f", lambda {sel['lambda']:g}" if sel["lambda"] is not None else ""
    worst = f"{'worst-group ' if grouped else ''}test {res['test_acc']:.2f}%" + (
        f" (average {res['test_avg_acc']:.2f}%)" if grouped else "")
    kept = f"source test {source_acc:.2f}% (before {source_acc_before:.2f}%)" if clean else "no source test split"
    log(f"result {args.data} {corruption} tune={args.tune} seed={args.seed}: {worst} (val {res['val_acc']:.1f}% at "
        f"{at}; no adaptation {history[0]['epochs'][0]['test_acc']:.2f}%) | {kept} | {T.fmt_time(res['seconds'])} "
        f"-> {path}")
    return res


def variant(args):
    """Non-default settings of an automatic method ("+"-joined), or None: named in the result's file name and kept
    apart from the default method by table.py."""
    on = []
    if args.tune == "auto_snr":
        on += [f"snr_{args.snr}"] if args.snr != "eb" else []
    if args.tune == "auto_rgn":
        on += [n for n, v in (("measure_train", args.rgn_measure == "train"), ("keep_state", args.rgn_keep_state),
                              ("with_norm", args.rgn_include_norm)) if v]
    return "+".join(on) or None


# The flags that change a run's numbers (device, precision and folders do not). A run that sets any of them away
# from its --data default is written under a name tagged with them, so a quick run never stands in for (or
# overwrites) a protocol run, and the sweep counts a run done only for the settings it asks for.
NUMBER_FLAGS = ("severity", "corruption_seed", "train_n", "val_per_class", "test_per_class", "split_seed",
                "cifar10c_dir", "lrs", "epochs", "batch_size", "wd", "l1_lambdas", "snr_threshold", "snr_n", "ckpt",
                "weights", "bn", "image_size", "ent_lr", "ent_steps", "ent_batch_size", "episodic", "ent_copies",
                "memo_copies", "memo_lr")


def changed_settings(args):
    """{flag: value} of the NUMBER_FLAGS that differ from the --data (and --objective) defaults."""
    base = parse_args(["--data", args.data, "--objective", args.objective, "--snr", args.snr])
    return {k: getattr(args, k) for k in NUMBER_FLAGS if getattr(args, k) != getattr(base, k)}


def result_path(args, corruption):
    """<out_dir>/<data>-<corruption>-<tune>-s<seed>[-<objective>][-<variant>][-p<settings hash>].json"""
    changed = changed_settings(args)
    tune = re.sub(r"[^\w.+-]", "_", args.tune.replace(",", "+"))
    name = f"{args.data}-{corruption}-{tune}-s{args.seed}" + ("" if args.objective == "ce" else f"-{args.objective}")
    name += f"-{variant(args)}" if variant(args) else ""
    name += f"-p{hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]}" if changed else ""
    return os.path.join(args.out_dir, name + ".json")


def save_result(res, args, corruption):
    """One JSON per run at result_path(), written atomically, strict JSON; returns the path."""
    res["variant"], res["changed"] = variant(args), changed_settings(args)
    path = result_path(args, corruption)
    os.makedirs(args.out_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(strict(res), f, indent=1, allow_nan=False)
    os.replace(tmp, path)  # a sweep reading results/ never sees half a file
    M.remove_orphans(path)
    return path


def strict(v):
    """A result with every NaN / infinity (a loss can overflow) as null: result files are strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict(x) for x in v]
    return v


# -----------------------------------------------------------------------------
# the paper's unsupervised setting: online entropy minimisation on the unlabelled target test stream

def entropy(logits, n_aug=0):
    """Mean entropy (nats) of the softmax of (B, C) logits: TENT's loss (Wang et al. 2021). n_aug > 0: the rows are
    n_aug copy-major blocks of the same images, scored by the entropy of each image's mean prediction (MEMO's)."""
    logp = logits.float().log_softmax(1)
    if n_aug:
        logp = logp.view(n_aug, -1, logp.shape[1]).logsumexp(0) - math.log(n_aug)  # log mean softmax, (B, C)
    return -(logp.exp() * logp).sum(1).mean()


@torch.no_grad()
def predict(model, x, start=0):
    model.eval()
    with T.autocast(x.device):
        out = model(x, start=start).float()
    return out.argmax(1), entropy(out).item()


def adapt_stream(model, names, x, args, start=0, log=print):
    """Entropy minimisation of the named parameters of model (in place) over the stream x (images when start == 0,
    else stage-`start` activations) in order, in batches of ent_batch_size. Continual: a batch is predicted by the
    model the earlier batches left, then drives ent_steps Adam steps. Episodic: the model restarts from the source
    for every batch, adapts on it, then predicts it. Only images come in, so no label can be read here.
    Returns (predictions (N,), [{"batch", "n", "entropy" of the scored predictions, "seconds"}])."""
    params = M.freeze_except(model, names)
    src, opt, g = [p.detach().clone() for p in params], None, torch.Generator(x.device).manual_seed(args.seed)

    def new_opt():  # auto_rgn: per-tensor rates measured on the first 5 steps after each reset, norms frozen
        if args.tune != "auto_rgn":
            return torch.optim.Adam(params, args.ent_lr)
        o = rgn.AutoRGN([(n, p) for n, p in model.named_parameters() if p.requires_grad], args.ent_lr,
                        include_norm=args.rgn_include_norm, norm_names=rgn.norm_param_names(model))
        M.freeze_except(model, o.names)
        return o
    preds, stream, t0, nb = [], [], time.time(), math.ceil(len(x) / args.ent_batch_size)
    for i, xb in enumerate(x.split(args.ent_batch_size)):
        if names and (opt is None or args.episodic):  # episodic: the source weights and fresh Adam moments
            with torch.no_grad():
                for p, p0 in zip(params, src):
                    p.copy_(p0)
            opt = new_opt()
        if not args.episodic:  # scored before any update on this batch
            pred, ent = predict(model, xb, start)
        for _ in range(args.ent_steps if names else 0):
            model.train(args.bn == "train")  # TENT proper on a BatchNorm net: --bn train (batch statistics)
            xa = torch.cat([data.crop_flip(xb, generator=g) for _ in range(args.ent_copies)]) if args.ent_copies else xb
            with T.autocast(x.device):
                loss = entropy(model(xa, start=start), args.ent_copies)
            T.finite(loss, f"stream batch {i + 1}", "Try a smaller --ent_lr.")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if args.episodic:
            pred, ent = predict(model, xb, start)
        preds.append(pred)
        stream.append({"batch": i, "n": len(xb), "entropy": ent, "seconds": time.time() - t0})
        log(f"stream {i + 1:3d}/{nb} | entropy {ent:.3f} | {T.fmt_time(time.time() - t0)}")
    return torch.cat(preds), stream


def run_entropy(args, source, target, clean, corruption, source_acc_before, log=print):
    """run() for --objective entropy / memo: the target test split in a --seed order is adapted on (a stream, or
    per image for memo); the labels are read once, after it, to score its predictions. JSON as run()'s plus
    "objective"; history holds the stream's records, val_acc and the selected epoch are null, source_acc is the
    clean accuracy of the model the stream left (memo: the source's, as every image starts from it again)."""
    t0, dev = time.time(), target["test"][0].device
    names = tune_names(source, args.tune)
    frozen = rgn.norm_param_names(source) if args.tune == "auto_rgn" and not args.rgn_include_norm else set()
    trained = [n for n in names if n not in frozen]
    memo = args.objective == "memo"
    k = 0 if args.ent_copies or memo else cache_stage(names, args, source.arch)  # augmentations need images
    x, y = target["test"][:2]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed)).to(dev)
    net = copy.deepcopy(source)
    if memo:
        preds, stream = memo_.adapt(net, names, x[order], args, log=log)
    else:
        preds, stream = adapt_stream(net, names, prefix(source, x[order], k), args, start=k, log=log)
    hit = (preds == y[order]).float() * 100  # the scoring
    for b, h in zip(stream, hit.split([b["n"] for b in stream])):
        b["acc"] = h.mean().item()
    acc, source_acc = hit.mean().item(), source_acc_before
    if names and clean and not memo:
        source_acc = T.evaluate(net, *clean)[0]
    lr = args.memo_lr if memo else args.ent_lr
    res = {"data": args.data, "corruption": corruption, "severity": args.severity if "_c" in args.data else None,
           "tune": args.tune, "seed": args.seed, "objective": args.objective,
           "args": {k_: v for k_, v in vars(args).items() if "_list" not in k_},
           "trained": {"tensors": len(trained), "params": sum(p.numel() for n, p in source.named_parameters()
                                                             if n in set(trained)), "names": trained},
           "prefix_stage": k, "history": [{"lr": lr, "lambda": None, "stream": stream}],
           "selected": {"lr": lr, "lambda": None, "epoch": None, "val_acc": None, "test_acc": acc},
           "test_acc": acc, "val_acc": None, "source_acc": source_acc, "source_acc_before": source_acc_before,
           "metric": "accuracy", "test_avg_acc": None,
           "snr": None, "seconds": time.time() - t0, "torch": str(torch.__version__), "device": T.device_name(dev)}
    path = save_result(res, args, corruption)
    kept = f"source test {source_acc:.2f}% (before {source_acc_before:.2f}%)" if clean else "no source test split"
    log(f"result {args.data} {corruption} tune={args.tune} seed={args.seed} {args.objective}: {acc:.2f}% | {kept} | "
        f"{T.fmt_time(res['seconds'])} -> {path}")
    return res


def load_source(args, dev):
    """The source model in eval mode on dev, and the holdout it was trained with: torchvision's ImageNet ResNet-50
    (--ckpt imagenet), the checkpoint, or (missing) a source model trained here with train.py and saved there."""
    if args.ckpt == "imagenet":
        net = M.build_model("resnet50", 1000, None if args.weights == "none" else "imagenet")
        return T.prepare(net, dev).eval(), 0
    if args.ckpt != "paper" and not os.path.exists(args.ckpt):
        family = [] if args.data.startswith("cifar") else [
            "--data", args.data, "--weights", args.weights, "--image_size", str(args.image_size),
            *[v for f in ("imagenet_dir", "breeds_dir", "waterbirds_dir", "celeba_dir") for v in (f"--{f}",
                                                                                                getattr(args, f))]]
        targv = ["--data_dir", args.data_dir, "--cache_dir", args.cache_dir, "--device", args.device,
                 "--holdout", str(args.holdout), "--out", args.ckpt, *(["--small"] if args.small else []),
                 *family, *shlex.split(args.source_args)]
        print(f"no checkpoint at {args.ckpt}: training a source model first: python train.py {shlex.join(targv)}")
        targs = T.parse_args(targv)
        net, metrics = T.train(targs)
        T.save_source(targs, net, metrics)
    source, ckpt = M.load_checkpoint(args.ckpt, dev)
    if args.data.startswith("cifar") and ckpt["num_classes"] != 10:
        raise SystemExit(f"error: {args.ckpt} has {ckpt['num_classes']} outputs; CIFAR needs a 10-class source")
    if ckpt["arch"] != arch_of(args.data) and not (args.data.startswith("cifar") and ckpt["arch"] in CIFAR_ARCHS):
        raise SystemExit(f"error: {args.ckpt} holds a {ckpt['arch']}; --data {args.data} needs a "
                         f"{arch_of(args.data)} source (python train.py --data ... --out another path)")
    holdout = int(ckpt["args"].get("holdout") or 0)
    if args.holdout and args.holdout != holdout:
        print(f"note: --holdout {args.holdout} ignored; {args.ckpt} was trained with holdout {holdout}")
    return T.prepare(source, dev).eval(), holdout


def cifar_targets(args, corruptions, holdout, dev):
    """Yields (corruption, {"train"|"val"|"test": (x, y)} on dev, the clean test split on dev), printing the
    data protocol first (PROTOCOL section 4)."""
    d = data.load_cifar10(args.data_dir, args.cache_dir)
    _, pool = data.source_and_pool(d, holdout)
    idx = data.target_split(pool[1], args.train_n, args.val_per_class, args.test_per_class, args.split_seed)
    print(f"protocol: {args.data}, " + (f"corruption {args.corruption} ({len(corruptions)}), severity "
          f"{args.severity}, " + (f"read from {args.cifar10c_dir}" if args.cifar10c_dir else f"generated here "
          f"(seed {args.corruption_seed})") if args.data == "cifar_c" else "labels y -> 9-y")
          + f"; target pool {len(pool[1]):,d} images (test split + {holdout} held-out training images)")
    print(f"  split (seed {args.split_seed}): train {args.train_n} ({args.train_n // 10}/class), val "
          f"{args.val_per_class}/class, test {args.test_per_class}/class; the same for every corruption and tune")
    clean = tuple(t.to(dev) for t in d["test"])
    for c in corruptions:
        xs, ys = data.shifted_pool(pool, args.data if args.data == "cifar_flip" else c, args.severity,
                                   args.corruption_seed, args.cache_dir, dev, release_dir=args.cifar10c_dir or None)
        yield c, {s: (xs[i].to(dev), ys[i].to(dev)) for s, i in idx.items()}, clean


def family_targets(args, corruptions, num_classes, dev):
    """cifar_targets() for the ImageNet family (PROTOCOL section 8), from the user's folders (data.family_target);
    target splits of waterbirds / celeba carry their group ids as a third tensor."""
    root, info = T.family_root(args, args.data)
    for i, c in enumerate(corruptions):
        t = data.family_target(args.data, root, info, c if args.data == "imagenet_c" else None, args.severity,
                               args.train_n, args.val_per_class, args.test_per_class, args.split_seed,
                               args.image_size, args.cache_dir)
        if t["num_classes"] != num_classes:
            raise SystemExit(f"error: {root} has {t['num_classes']} classes but the source model has {num_classes} "
                             f"outputs; " + ("--ckpt imagenet needs all 1000 ImageNet classes" if args.ckpt ==
                                             "imagenet" else f"retrain it on this data (delete {args.ckpt})"))
        groups = t["groups"] or {}
        if i == 0:
            per = "group (4 groups: label x spurious attribute)" if groups else "class"
            print(f"protocol: {args.data} from {root}" + (f", corruption {args.corruption} ({len(corruptions)}), "
                  f"severity {args.severity}" if args.data == "imagenet_c" else "") + f", {t['num_classes']} "
                  f"classes, {args.image_size} px; split (seed {args.split_seed}) per {per}: "
                  + ", ".join(f"{s} {t[s][1].numel():,d}" for s in ("train", "val", "test"))
                  + ("; metric: worst-group accuracy (the paper's cells), average also reported" if groups else ""))
        yield c, {s: tuple(v.to(dev) for v in (*t[s], *([groups[s]] if s in groups else [])))
                  for s in ("train", "val", "test")}, t["source_test"] and tuple(v.to(dev) for v in t["source_test"])


def corruption_list(args):
    if args.data == "cifar_c":
        return data.parse_corruptions(args.corruption)
    return data.parse_imagenet_c(args.corruption) if args.data == "imagenet_c" else ["clean"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--result_paths"]:  # sweep.sh: for each line of flags on stdin, a line "<path>\t<flags>" per
        for line in sys.stdin:       # corruption it names (a preset expanded); nothing is run
            flags = shlex.split(line)
            at = flags.index("--corruption") + 1 if "--corruption" in flags else None
            for c in corruption_list(parse_args(flags)):
                one = flags[:at] + [c] + flags[at + 1:] if at else flags
                print(f"{result_path(parse_args(one), c)}\t{shlex.join(one)}")
        return []
    args = parse_args(argv)
    corruptions = corruption_list(args)
    missing = [c for c in corruptions if args.data == "cifar_c" and not args.cifar10c_dir and c not in data.CORRUPTIONS]
    if missing:
        raise SystemExit(f"error: corruption {', '.join(missing)} is not implemented in data.CORRUPTIONS yet")
    T.check_writable(os.path.join(args.out_dir, "result.json"), "--out_dir")  # before any compute, not after
    dev = T.get_device(args.device, args.cpu_bf16)
    source, holdout = load_source(args, dev)
    names = tune_names(source, args.tune)
    targets = (cifar_targets(args, corruptions, holdout, dev) if args.data.startswith("cifar") else
               family_targets(args, corruptions, source.fc.out_features, dev))
    results, clean, source_acc_before = [], None, None
    for i, (c, target, clean_c) in enumerate(targets):
        if i == 0 and args.objective == "entropy":
            print(f"  unsupervised: the test split as a stream (order: seed {args.seed}), no label read; batches of "
                  f"{args.ent_batch_size}, " + ("each adapted from the source, then predicted" if args.episodic else
                  "each predicted, then adapted on (continual)") + f"; {args.ent_steps} Adam step(s) at lr "
                  f"{args.ent_lr:g} on the " + (f"marginal entropy over {args.ent_copies} crop+flip copies"
                                                if args.ent_copies else "prediction entropy")
                  + f", BatchNorm {args.bn} mode, device {dev.type}")
        elif i == 0 and args.objective == "memo":
            print(f"  unsupervised, MEMO: per test image (order: seed {args.seed}), from the source weights, "
                  f"{args.memo_copies} AugMix copies, one plain SGD step at lr {args.memo_lr:g} on the entropy of "
                  f"their mean prediction, then the original image is predicted; no label read; device {dev.type}")
        elif i == 0:
            print(f"  Adam, lr in {{{', '.join(f'{v:g}' for v in lr_grid(args, names))}}}"
                  + (f" x lambda in {{{args.l1_lambdas}}}" if args.tune == "l1" else "") + f", wd {args.wd:g} "
                  f"(coupled), batch {args.batch_size}, {args.epochs} epochs, no augmentation, seed {args.seed}, "
                  f"BatchNorm {args.bn} mode, device {dev.type}")
            print(f"  selection: best target-val accuracy over epochs 1..{args.epochs} of every lr, ties -> first "
                  f"seen; report target-test accuracy there")
        if clean_c is not None and clean_c is not clean:  # the source accuracy, once per source test split
            clean, source_acc_before = clean_c, T.evaluate(source, *clean_c)[0]
            print(f"source: {args.ckpt}, source test accuracy {source_acc_before:.2f}%")
        results.append((run if args.objective == "ce" else run_entropy)(args, source, target, clean_c, c,
                                                                             source_acc_before))
    if len(results) > 1:
        mean = sum(r["test_acc"] for r in results) / len(results)
        kept = [r["source_acc"] for r in results if r["source_acc"] is not None]
        print(f"mean over {len(results)} corruptions, tune={args.tune} seed={args.seed}: test {mean:.2f}%"
              + (f" | source test {sum(kept) / len(kept):.2f}%" if kept else ""))
    return results


if __name__ == "__main__":
    main()
