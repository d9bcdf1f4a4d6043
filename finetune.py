"""
Surgical fine-tuning (Lee et al. 2023): adapt a source model to a shifted target by training one block (or
what an automatic method chooses), select lr and epoch on target validation, report target test accuracy.

    python finetune.py --data cifar_c --tune layer1      # the paper's 14 corruptions at severity 5, seed 0
    python finetune.py --data cifar_flip --tune fc       # CIFAR-Flip (labels y -> 9 - y)
    python finetune.py --tune auto_rgn | auto_snr | l1   # the automatic methods, over every parameter
    python finetune.py --objective memo --tune layer1    # label-free (unsupervised.py)

The CIFAR source is the paper's own ResNet-26 (--ckpt paper: downloaded once, checksum-checked). One JSON per
(data, corruption, tune, seed) in --out_dir; its fields are in the README ("Result files"). A CIFAR-C run of
one corruption takes 1-5 minutes on a 2-core CPU with --cpu_bf16 (README: the measured times).
"""
import copy
import itertools
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import common as C
import data
import model as M
import protocol as P
import rgn
import unsupervised
from checkpoints import load_source
from protocol import parse_args

# -----------------------------------------------------------------------------
# method dispatch: which tensors a run may train (before the grid) and how each epoch trains them (rgn.py)

def tune_names(model, tune):
    return M.resolve_tune(model, "all" if tune in P.METHODS else tune)  # a method starts from every tensor


def method_params(args, source, train, log=print):
    """(names: the tensors the run may train, trained: those it does, the Auto-SNR record or None)."""
    names = tune_names(source, args.tune)
    norms = rgn.norm_param_names(source)  # the authors' automatic methods never train norm layers
    if args.tune == "auto_snr" and args.snr == "eb":  # candidates; chosen anew every epoch by method_epoch
        names = [n for n in names if n not in norms]
        return names, names, {"criterion": "eb", "threshold": args.snr_threshold}
    if args.tune == "auto_snr":  # per-example SNR of every tensor, once, on a seeded subset of train
        x, y = train[:2]
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(x), generator=g)[:args.snr_n].to(x.device)
        scores = rgn.snr_scores(source.eval(), F.cross_entropy, x[idx], y[idx], names, chunk_size=32)
        names = rgn.snr_select(scores, args.snr_threshold)
        log(f"auto_snr: {len(names)}/{len(scores)} tensors at or above {args.snr_threshold}: "
            + ", ".join(sorted({n.split(".")[0] for n in names})))
        return names, names, {"criterion": "per_example", "threshold": args.snr_threshold, "scores": scores,
                              "selected": names}
    frozen = args.tune == "auto_rgn" and not args.rgn_include_norm
    return names, [n for n in names if not (frozen and n in norms)], None


def method_epoch(args, model, names, lr, opt, hist, loss_of, probe, steps):
    """The optimizer for the next epoch (None: nothing trains in it); opt is the last epoch's or None."""
    if args.tune == "auto_rgn":  # Adam with a rate per tensor, lr * RGN / max RGN, norms frozen
        if opt is None:
            opt = rgn.AutoRGN([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr, args.wd,
                              steps_per_epoch=None if args.rgn_measure == "before" else steps,
                              keep_state=args.rgn_keep_state, include_norm=args.rgn_include_norm,
                              norm_names=rgn.norm_param_names(model))
            M.freeze_except(model, opt.names)  # frozen norms need no gradient at all
        if args.rgn_measure == "before":  # the authors': the rates from 5 probe batches, no step taken
            opt.new_epoch()
            for xb, yb in probe():
                loss_of(xb, yb).backward()
                opt.measure()
                opt.zero_grad(set_to_none=True)
        return opt
    if args.tune == "auto_snr" and args.snr == "eb":  # tensors scoring >= threshold train this epoch
        M.freeze_except(model, names)
        scores = rgn.eb_scores(loss_of, probe(), [(n, p) for n, p in model.named_parameters() if n in names])
        chosen = [n for n in names if scores[n] >= args.snr_threshold]
        hist["snr"].append({b: sum(n in chosen for n in ns) for b, ns in M.block_params(model).items()
                            if b != "all"})
        params = M.freeze_except(model, chosen)
        return torch.optim.Adam(params, lr, weight_decay=args.wd) if params else None
    params = [p for p in model.parameters() if p.requires_grad]
    return opt or torch.optim.Adam(params, lr, weight_decay=args.wd)


# -----------------------------------------------------------------------------
# one lr: train, evaluate val every epoch, keep the best

def epoch_entry(epoch, train_loss, v, t, t0):
    """One history entry from C.measure() of val and of test (t None: test not scored at this epoch)."""
    e = {"epoch": epoch, "train_loss": train_loss, "val_acc": v["acc"], "val_loss": v["loss"],
         "test_acc": t and t["acc"], "test_loss": t and t["loss"]}
    if "avg_acc" in v:  # waterbirds / celeba: the group-balanced average and the per-group accuracies too
        e.update(val_avg_acc=v["avg_acc"], test_avg_acc=t and t["avg_acc"],
                 test_group_acc=t and t["group_acc"])
    return {**e, "seconds": time.time() - t0}


def finetune(model, names, splits, lr, args, start=0, epoch0=None, record=None, l1_lambda=0.0):
    """Train the named parameters of model in place at lr for args.epochs, val after every epoch. splits:
    {split: (x, y[, groups])} on the device, x the input of stage start[split] (an int: every split's).
    epoch0: the source's history entry (None: scored here). record["val"]: the best val accuracy so far in the
    grid; test is scored only where val beats it, the only places select() can land. Returns (history entry,
    {name: tensor} at this lr's best-val epoch)."""
    start = start if isinstance(start, dict) else dict.fromkeys(splits, start)
    record = {"val": -1.0} if record is None else record
    if epoch0 is None:
        t0 = time.time()
        epoch0 = epoch_entry(0, None, C.measure(model, splits["val"], start["val"]),
                             C.measure(model, splits["test"], start["test"]), t0)
    dev, (xtr, ytr) = splits["train"][0].device, splits["train"][:2]
    torch.manual_seed(args.seed)
    g = torch.Generator(device=dev).manual_seed(args.seed)  # the same batch order for every lr and method
    # the methods' probe batches: a stream of their own
    gm = torch.Generator(device=dev).manual_seed(args.seed + 1)
    params, tuned = M.freeze_except(model, names), set(names)
    src = [p.detach().clone() for p in params] if l1_lambda else None
    hist = {"lr": lr, "lambda": l1_lambda if args.tune == "l1" else None, "epochs": [epoch0]}
    if args.tune == "auto_rgn":  # the per-block mean rate multiplier, each epoch
        hist["rgn"] = []
    if args.tune == "auto_snr" and args.snr == "eb":  # tensors chosen per block, each epoch
        hist["snr"] = []
    opt, best, best_val, t0 = None, {}, -1.0, time.time()
    steps = math.ceil(len(xtr) / args.batch_size)

    def loss_of(xb, yb):
        with C.autocast(dev):
            return F.cross_entropy(model(xb, start=start["train"]).float(), yb)

    def probe():  # 5 batches of their own shuffle, as the authors' islice(train_loader, 5)
        return itertools.islice(data.batches(xtr, ytr, args.batch_size, shuffle=True, generator=gm), 5)
    for epoch in range(1, args.epochs + 1 if names else 1):
        model.train(args.bn == "train")  # ResNet-26 has no BatchNorm or dropout: the same either way
        opt = method_epoch(args, model, names, lr, opt, hist, loss_of, probe, steps)
        tot = 0.0
        batches = data.batches(xtr, ytr, args.batch_size, shuffle=True, generator=g)  # a fresh shuffle
        for step, (xb, yb) in enumerate(batches, 1):
            loss = loss_of(xb, yb)
            tot += C.finite(loss, f"lr {lr:g}, epoch {epoch}, step {step}", "Try smaller --lrs.") * len(yb)
            if opt is not None:  # auto_snr may choose nothing for an epoch: the model then stays as it is
                reg = l1_lambda * sum((p - p0).abs().sum() for p, p0 in zip(params, src)) if src else 0.0
                (loss + reg).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        v = C.measure(model, splits["val"], start["val"])
        t = None
        if args.test_every_epoch or v["acc"] > record["val"]:  # the only epochs select() can land on
            t = C.measure(model, splits["test"], start["test"])
        record["val"] = max(record["val"], v["acc"])
        hist["epochs"].append(epoch_entry(epoch, tot / len(xtr), v, t, t0))
        if v["acc"] > best_val:  # strictly better: ties keep the earlier epoch, as select() does
            best_val = v["acc"]
            best = {n: p.detach().clone() for n, p in model.named_parameters() if n in tuned}
        if "rgn" in hist:
            hist["rgn"].append(rgn.block_multipliers(opt.multipliers, M.BLOCKS[model.arch]))
    return hist, best


def select(history, min_epoch=1):
    """The (lr, lambda, epoch) with the best val accuracy over epochs >= min_epoch, ties -> first seen
    (history order, then epoch order), with its history index as "run"."""
    sel = None
    for i, h in enumerate(history):
        for e in h["epochs"]:
            if e["epoch"] >= min_epoch and (sel is None or e["val_acc"] > sel["val_acc"]):
                sel = {"run": i, "lr": h["lr"], "lambda": h["lambda"], "epoch": e["epoch"],
                       "val_acc": e["val_acc"], "test_acc": e["test_acc"]}
                if "test_avg_acc" in e:
                    sel["test_avg_acc"] = e["test_avg_acc"]
    return sel


# -----------------------------------------------------------------------------
# one run: (data, corruption, tune, seed) -> the grid, selection on val, one result file

def supervised(args, source, names, target, k, where, log):
    """The lr (x lambda) grid, one line per lr. Returns (history, selection, the selected model)."""
    splits, starts = C.cached_splits(source, target, k, args, log)
    t0 = time.time()  # epoch 0 is the source model: the same for every lr, so scored once
    epoch0 = epoch_entry(0, None, C.measure(source, splits["val"], starts["val"]),
                         C.measure(source, splits["test"], starts["test"]), t0)
    lambdas = [float(v) for v in args.l1_lambdas.split(",") if v] if args.tune == "l1" else [0.0]
    grid = [(lr, lam) for lam in lambdas for lr in P.lr_grid(args, names)] if names else [(None, 0.0)]
    history, states, record = [], [], {"val": -1.0}
    for j, (lr, lam) in enumerate(grid):
        h, best = finetune(copy.deepcopy(source), names, splits, lr, args, starts, epoch0, record, lam)
        history.append(h)
        states.append(best)
        if names:
            curve, top = [e["val_acc"] for e in h["epochs"]], max(h["epochs"][1:], key=lambda e: e["val_acc"])
            extra = ""
            if "rgn" in h:  # the last epoch's mean rate multiplier per block
                extra = " | rgn " + " ".join(f"{b} {m:.2f}" for b, m in h["rgn"][-1].items())
            log(f"{where((j + 1) / len(grid))} lr {lr:.0e}{f' lambda {lam:.0e}' if lam else ''} | val "
                f"{curve[0]:.1f} -> {curve[-1]:.1f}%, best {top['val_acc']:.1f}% at epoch "
                f"{top['epoch']}{extra}")
    sel = select(history, min_epoch=1 if names else 0)
    tuned = copy.deepcopy(source)
    with torch.no_grad():  # the selected model: the source with the tuned tensors at their selected values
        for n, p in tuned.named_parameters():
            p.copy_(states[sel["run"]].get(n, p))
    return history, sel, tuned


def run(args, source, target, clean, corruption, acc_before, where=lambda f: "", log=print):
    """One (data, corruption, tune, seed). target: {split: (x uint8, y[, groups])} on the device; clean: the
    source-distribution test split or None. where(fraction of this run done) -> the position and ETA of a log
    line. Writes protocol.result_path() and returns the result."""
    t0, dev = time.time(), target["test"][0].device
    names, trained, snr = method_params(args, source, target["train"], log)
    k = C.cache_stage(names, args, source.arch)
    if args.objective == "ce":
        history, sel, tuned = supervised(args, source, names, target, k, where, log)
        source_acc = C.evaluate(tuned, *clean)[0] if names and clean else acc_before
    else:
        k = 0 if args.objective == "memo" or args.ent_copies else k  # augmented copies need the images
        test = target["test"]
        history, sel, source_acc = unsupervised.run(args, source, names, test, clean, k, acc_before, log)
    severity = args.severity if args.data.endswith("_c") else None
    metric = "worst-group accuracy" if "test_avg_acc" in sel else "accuracy"
    n_params = sum(p.numel() for n, p in source.named_parameters() if n in set(trained))
    res = {"data": args.data, "corruption": corruption, "severity": severity, "tune": args.tune,
           "seed": args.seed, "objective": args.objective, "variant": P.variant(args),
           "changed": P.changed_settings(args), "args": vars(args),
           "trained": {"tensors": len(trained), "params": n_params, "names": trained},
           "prefix_stage": k, "history": history, "selected": {k_: v for k_, v in sel.items() if k_ != "run"},
           "test_acc": sel["test_acc"], "val_acc": sel["val_acc"], "test_avg_acc": sel.get("test_avg_acc"),
           "metric": metric, "source_acc": source_acc, "source_acc_before": acc_before, "snr": snr,
           "seconds": time.time() - t0, "torch": str(torch.__version__), "device": C.device_name(dev),
           "code": C.code_version()}
    path = P.result_path(args, corruption)
    res = C.write_json(res, path)  # rounded as written, so the caller sees the file's numbers
    at = f"lr {sel['lr']:g}, epoch {sel['epoch']}" if names and sel["epoch"] is not None else args.objective
    kept = f" | source test {source_acc:.2f}% (before {acc_before:.2f}%)" if clean else ""
    log(f"{where(1.0)} result: test {res['test_acc']:.2f}% ({res['metric']}; val {sel['val_acc'] or 0:.1f}% "
        f"at {at}){kept} | {C.fmt_time(res['seconds'])} -> {path}")
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--result_paths"]:  # sweep.sh: the run list, nothing run (protocol.result_paths)
        return P.result_paths()
    args = parse_args(argv)
    corruptions = P.corruption_list(args)
    C.check_writable(os.path.join(args.out_dir, "result.json"), "--out_dir")  # before any compute, not after
    dev = C.get_device(args.device, args.cpu_bf16)
    source, holdout = load_source(args, dev)
    if args.data.startswith("cifar"):
        targets = data.cifar_targets(args, corruptions, holdout, dev)
    else:
        from family import family_targets
        targets = family_targets(args, corruptions, source.fc.out_features, dev)
    bn = "" if source.arch == "resnet26" else f", BatchNorm in {args.bn} mode"  # GroupNorm has no mode
    if args.objective != "ce":
        print(f"method: --tune {args.tune}; {unsupervised.describe(args)}{bn}")
    else:
        fc = f" (fc alone: {P.FC_LRS})" if args.data.startswith("cifar") else ""
        l1 = f" x lambda {args.l1_lambdas}" if args.tune == "l1" else ""
        print(f"method: --tune {args.tune}; Adam, lr grid {args.lrs}{fc}{l1}, wd {args.wd:g}, batch "
              f"{args.batch_size}, {args.epochs} epochs, seed {args.seed}{bn}; selection: best val accuracy "
              f"over epochs 1..{args.epochs} and the grid, ties -> first; test accuracy there")
    results, clean, acc_before, t0 = [], None, None, time.time()
    for i, (c, target, clean_c) in enumerate(targets):
        if clean_c is not None and clean_c is not clean:  # the source accuracy, once per source test split
            clean, acc_before = clean_c, C.evaluate(source, *clean_c)[0]
            print(f"source: {args.ckpt}, source test accuracy {acc_before:.2f}%")

        # "[corruption k/N]" and the command's ETA, from the fraction of this run done
        def where(f, i=i, c=c):
            el, done = time.time() - t0, (i + f) / len(corruptions)
            eta = C.fmt_time(el / done * (1 - done))
            return f"[{c} {i + 1}/{len(corruptions)}, {C.fmt_time(el)}, ETA {eta}]"
        results.append(run(args, source, target, clean_c, c, acc_before, where))
    if len(results) > 1:
        kept = [r["source_acc"] for r in results if r["source_acc"] is not None]
        print(f"mean over {len(results)} corruptions, tune={args.tune} seed={args.seed}: test "
              f"{sum(r['test_acc'] for r in results) / len(results):.2f}%"
              + (f" | source test {sum(kept) / len(kept):.2f}%" if kept else ""))
    return results


if __name__ == "__main__":
    main()
