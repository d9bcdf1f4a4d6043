"""
Checkpoints: ours (plain types, loadable with weights_only, written
atomically, with a checksum), the paper's CIFAR ResNet-26 (downloaded once,
its sha256 checked before it is unpickled) and RobustBench's WideResNet-28-10
state dicts. Every failure is one line saying what to do.
"""
import hashlib
import os
import zipfile

import numpy as np
import torch

import common
from model import WideResNet28, build_model

CKPT_VERSION = 1
# The paper's CIFAR source (PROTOCOL.md section 1): the test-time-training
# ResNet-26 the MEMO authors publish (MIT), 90.83% clean. Its final norm is
# "bn." there, "norm." here.
PAPER_URL = ("https://github.com/zhangmarvin/memo/raw/main/cifar-10-exps/"
             "results/cifar10_rn26_gn/ckpt.pth")
PAPER_SHA256 = "272f183ab9ba6624480da6e7779ccc0ccda647b06b3c3134a1f670b142f36403"
# A BatchNorm CIFAR ResNet-56 of the authors' kind (github.com/akamaster/pytorch_resnet_cifar10,
# BSD 2-clause, 93.6% clean): --ckpt resnet56. Its head is "linear." there, "fc." here.
RESNET56_URL = ("https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/"
                "pretrained_models/resnet56-4bfd9763.th")
RESNET56_SHA256 = "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"
KNOWN = {"paper": (PAPER_URL, PAPER_SHA256, "cifar10_rn26_gn_memo.pth"),
         "resnet56": (RESNET56_URL, RESNET56_SHA256, "resnet56-4bfd9763.th")}


def save_checkpoint(path, model, args, metrics):
    flags = {k: v for k, v in vars(args).items()
             if v is None or isinstance(v, (int, float, str))}
    w = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    common.atomic_save({
        "version": CKPT_VERSION, "arch": model.arch, "num_classes": model.fc.out_features,
        "state_dict": w, "sha1": common.digest(w), "args": flags, "metrics": metrics}, path)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def known(path):
    """"paper" or "resnet56" when path is a copy of that published file, else None."""
    if os.path.isfile(path):
        digest = sha256(path)
        return next((k for k, (_, sha, _) in KNOWN.items() if sha == digest), None)


def download(name):
    """A published file (KNOWN) in torch's hub cache, downloaded on first use."""
    url, sha, file = KNOWN[name]
    path = os.path.join(torch.hub.get_dir(), "checkpoints", file)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"downloading the {name} checkpoint (3 MB) from {url}")
        try:  # torch writes a temp file and renames it when whole
            torch.hub.download_url_to_file(url, path, progress=False)
        except Exception as e:  # offline, proxy, HTTP error
            raise SystemExit(f"error: could not download the {name} checkpoint "
                             f"({type(e).__name__}); offline? fetch {url} elsewhere "
                             "and pass its path as --ckpt")
    if name == "resnet56" and sha256(path) != sha:  # the paper's: checked on load
        raise SystemExit(f"error: {path} is not the published file (sha256); delete it and "
                         f"download it again ({url})")
    return path


def load_paper(path):
    """The TTT/MEMO file as our ResNet-26; its sha256 is checked first."""
    digest = sha256(path)
    if digest != PAPER_SHA256:
        raise SystemExit(
            f"error: {path} has sha256 {digest[:12]}..., not the paper "
            f"checkpoint's {PAPER_SHA256[:12]}...; delete it and download it "
            f"again ({PAPER_URL})")
    try:  # numpy >= 2; the file names numpy.core.multiarray.scalar
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    # err_cls is a numpy float64: allow what rebuilds it, never weights_only=False
    allow = [(scalar, "numpy.core.multiarray.scalar"), scalar, np.dtype,
             type(np.dtype("float64"))]
    with torch.serialization.safe_globals(allow):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model("resnet26", 10)
    model.load_state_dict({("norm." + k[3:] if k.startswith("bn.") else k): v
                           for k, v in raw["net"].items()})
    acc = round(100 * (1 - float(raw["err_cls"])), 2)
    return model, meta(model, {"test_acc": acc, "source": PAPER_URL})


def meta(model, metrics, args=None):
    """What a checkpoint says of itself, for a file that is not ours."""
    return {"version": CKPT_VERSION, "arch": model.arch,
            "num_classes": model.fc.out_features, "args": args or {"holdout": 0},
            "metrics": metrics}


def load_robustbench(state):
    """A RobustBench WRN state dict (bare, or "state_dict", "module."
    prefixes allowed) -> the model; None for other keys."""
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "block1.layer.0.conv1.weight" not in state:
        return None
    n = len({k.split(".")[2] for k in state if k.startswith("block1.layer.")})
    width = state["block1.layer.0.conv1.weight"].shape[0] // 16
    model = WideResNet28(state["fc.weight"].shape[0], depth=6 * n + 4, width=width)
    model.load_state_dict(state)
    return model


def load_resnet56(state):
    """akamaster's ResNet-56 file ({"state_dict", "best_prec1"}, "module." names) -> the
    model; None for other keys. Its BatchNorms lack num_batches_tracked: kept as ours."""
    state = {k.removeprefix("module."): v for k, v in state.get("state_dict", {}).items()}
    if "linear.weight" not in state or "layer3.8.conv2.weight" not in state:
        return None
    model = build_model("resnet56", state["linear.weight"].shape[0])
    state = {("fc." + k[7:] if k.startswith("linear.") else k): v for k, v in state.items()}
    model.load_state_dict({**model.state_dict(), **state})
    return model


def is_paper_format(path):
    try:  # torch.save's zip holds data.pkl; TTT/MEMO's has "err_cls"
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") and b"err_cls" in z.read(n)
                       for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path, device="cpu"):
    """(model, the checkpoint without its weights) for one of ours, a published file
    ("paper", "resnet56", or a copy) or a RobustBench WRN state dict."""
    if path in KNOWN:
        path = download(path)
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "not found"
        raise SystemExit(
            f"error: checkpoint {path} {what}; use --ckpt paper (the paper's "
            f"model) or train one with: python train.py --out {path}")
    paper = is_paper_format(path)
    try:
        if paper:
            model, ckpt = load_paper(path)
        else:
            model, ckpt = read_ours(path, device)
    except SystemExit:
        raise
    except Exception as e:  # truncated file, wrong format, mismatched weights
        fix = (f"download it again ({PAPER_URL})" if paper
               else f"retrain: python train.py --out {path}")
        raise SystemExit(f"error: {path} is not a readable checkpoint "
                         f"({type(e).__name__}); delete it and {fix}")
    bad = [n for n, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # a diverged run's file
        raise SystemExit(f"error: {path} holds non-finite weights ({bad[0]} and "
                         f"{len(bad) - 1} more): a diverged run; retrain it")
    return model.to(device), ckpt


def read_ours(path, device):
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if isinstance(ckpt, dict) and "version" not in ckpt:  # RobustBench's, akamaster's
        model = load_resnet56(ckpt) or load_robustbench(ckpt)
        if model is not None:
            return model, meta(model, {"test_acc": ckpt.get("best_prec1"), "source": path})
    version = ckpt.get("version") if isinstance(ckpt, dict) else None
    if version is not None and version != CKPT_VERSION:
        raise SystemExit(
            f"error: {path} is a version-{version} checkpoint and this code "
            f"reads version {CKPT_VERSION}; use the code that wrote it, or "
            "retrain with: python train.py --out another path")
    assert version == CKPT_VERSION, "not a checkpoint dict"
    if ckpt.get("sha1", common.digest(ckpt["state_dict"])) != common.digest(ckpt["state_dict"]):
        raise SystemExit(f"error: {path} fails its checksum: the file changed after it "
                         f"was written; retrain: python train.py --out {path}")
    model = build_model(ckpt["arch"], ckpt["num_classes"])
    model.load_state_dict(ckpt.pop("state_dict"))
    return model, ckpt


def load_source(args, dev):
    """finetune.py's source in eval mode on dev, and the holdout it was
    trained with. A missing file names the train.py command: source training
    takes minutes to hours and never starts by itself."""
    if args.ckpt == "imagenet":
        weights = None if args.weights == "none" else "imagenet"
        return common.prepare(build_model("resnet50", 1000, weights), dev), 0
    if args.ckpt not in KNOWN and not os.path.exists(args.ckpt):
        src = f"--data {args.data} --data_dir {args.data_dir}"
        if args.data.startswith("cifar"):
            src = "--data cifar10"
        raise SystemExit(f"error: no checkpoint at {args.ckpt}; use --ckpt paper "
                         "(CIFAR: the paper's model) or train one first: "
                         f"python train.py {src} --out {args.ckpt}")
    source, ckpt = load_checkpoint(args.ckpt, dev)
    k = source.fc.out_features
    if args.data.startswith("cifar") and k != 10:
        raise SystemExit(f"error: {args.ckpt} has {k} outputs; CIFAR needs a "
                         "10-class source")
    cifar_ok = args.arch == "resnet26" and source.arch in ("wrn28_10", "resnet56")
    if source.arch != args.arch and not cifar_ok:
        raise SystemExit(f"error: {args.ckpt} holds a {source.arch}; --data "
                         f"{args.data} needs a {args.arch} source")
    return common.prepare(source, dev).eval(), int(ckpt["args"].get("holdout") or 0)
