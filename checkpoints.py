"""
Checkpoints: ours (a small versioned dict of plain types, loadable with torch.load(weights_only=True), written
atomically), the paper's own CIFAR ResNet-26 (--ckpt paper: downloaded once, checksum-checked before
unpickling) and RobustBench's WideResNet-28-10 state dicts (wrn.py). Every failure is one line saying what to
do.
"""
import hashlib
import os
import zipfile

import numpy as np
import torch

import common as C
import model as M
from common import atomic_save

CKPT_VERSION = 1
# The paper's own CIFAR source model (PROTOCOL section 1): the test-time-training ResNet-26 that the MEMO
# authors publish (MIT licence), 90.83% clean CIFAR-10 test accuracy. Its state dict is ours but for the final
# norm ("bn.").
PAPER_CKPT_URL = "https://github.com/zhangmarvin/memo/raw/main/cifar-10-exps/results/cifar10_rn26_gn/ckpt.pth"
PAPER_CKPT_SHA256 = "272f183ab9ba6624480da6e7779ccc0ccda647b06b3c3134a1f670b142f36403"


def save_checkpoint(path, model, args, metrics):
    flags = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str))}
    atomic_save({"version": CKPT_VERSION, "arch": model.arch, "num_classes": model.fc.out_features,
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "args": flags,
                 "metrics": metrics}, path)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def paper_checkpoint_path():
    """The paper's checkpoint in torch's hub cache (~/.cache/torch/hub/checkpoints), downloaded on first
    use."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", "cifar10_rn26_gn_memo.pth")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"downloading the paper's CIFAR checkpoint (3 MB) from {PAPER_CKPT_URL}")
        try:  # torch writes a temp file and renames it when the download is whole
            torch.hub.download_url_to_file(PAPER_CKPT_URL, path, progress=False)
        except Exception as e:  # offline, proxy, HTTP error
            raise SystemExit(f"error: could not download the paper's checkpoint ({type(e).__name__}); "
                             f"offline? fetch {PAPER_CKPT_URL} elsewhere and pass its path as --ckpt")
    return path


def _unpickle_paper(path):
    try:
        # numpy >= 2; the file names it numpy.core.multiarray.scalar
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    # err_cls is a numpy float64: allow exactly the types that rebuild it, never weights_only=False
    with torch.serialization.safe_globals([(scalar, "numpy.core.multiarray.scalar"), scalar, np.dtype,
                                          type(np.dtype("float64"))]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_paper(path):
    """The test-time-training / MEMO format ({"err_cls", "net", ...}) as our ResNet-26 and its metadata. Only
    the published file is accepted: its sha256 is checked before it is unpickled."""
    digest = sha256(path)
    if digest != PAPER_CKPT_SHA256:
        raise SystemExit(f"error: {path} has sha256 {digest[:12]}..., not the paper checkpoint's "
                         f"{PAPER_CKPT_SHA256[:12]}...; delete it and download it again ({PAPER_CKPT_URL})")
    raw = _unpickle_paper(path)
    model = M.build_model("resnet26", 10)
    model.load_state_dict({("norm." + k[3:] if k.startswith("bn.") else k): v for k, v in raw["net"].items()})
    meta = {"test_acc": round(100 * (1 - float(raw["err_cls"])), 2), "source": PAPER_CKPT_URL}
    return model, {"version": CKPT_VERSION, "arch": "resnet26", "num_classes": 10, "args": {"holdout": 0},
                   "metrics": meta}


def _is_paper_format(path):
    try:
        # torch.save's format: a zip holding data.pkl; TTT/MEMO's has "err_cls"
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") and b"err_cls" in z.read(n) for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path, device="cpu"):
    """(model, ckpt dict) for a checkpoint of ours, the paper's file ("paper": downloaded on first use, or a
    local copy), or a RobustBench WideResNet-28-10 state dict. One line and exit != 0 when the file is
    missing, is not a checkpoint, is not the published file or holds non-finite weights."""
    if path == "paper":
        path = paper_checkpoint_path()
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "not found"
        raise SystemExit(f"error: checkpoint {path} {what}; use --ckpt paper (the paper's model) or train "
                         f"one with: python train.py --out {path}")
    paper = _is_paper_format(path)
    try:
        if paper:
            model, ckpt = _load_paper(path)
        else:
            ckpt = torch.load(path, map_location=device, weights_only=True)
            model = None
            if isinstance(ckpt, dict) and "version" not in ckpt:  # a RobustBench file, e.g. its Standard.pt
                from wrn import load_robustbench
                model = load_robustbench(ckpt)
            if model is not None:
                ckpt = {"version": CKPT_VERSION, "arch": model.arch, "num_classes": model.fc.out_features,
                        "args": {"holdout": 0}, "metrics": {"test_acc": None, "source": path}}
            else:
                version = ckpt.get("version") if isinstance(ckpt, dict) else None
                if version is not None and version != CKPT_VERSION:
                    raise SystemExit(f"error: {path} is a version-{version} checkpoint and this code reads "
                                     f"version {CKPT_VERSION}; use the copy of the project that wrote it, or "
                                     "retrain with: python train.py --out another path")
                assert version == CKPT_VERSION, "not a checkpoint dict"
                model = M.build_model(ckpt["arch"], ckpt["num_classes"])
                model.load_state_dict(ckpt["state_dict"])
    except SystemExit:
        raise
    except Exception as e:  # truncated file, wrong format, mismatched weights
        fix = f"download it again ({PAPER_CKPT_URL})" if paper else f"retrain: python train.py --out {path}"
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}); delete it and "
                         f"{fix}")
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # a diverged run's file: never fine-tuned
        raise SystemExit(f"error: {path} holds non-finite weights ({bad[0]} and {len(bad) - 1} more): a "
                         "diverged run; retrain it")
    return model.to(device), ckpt


def load_source(args, dev):
    """The source model in eval mode on dev and the holdout it was trained with. A missing checkpoint is an
    error naming the train.py command: source training takes from minutes to hours and is never started
    silently."""
    if args.ckpt == "imagenet":
        weights = None if args.weights == "none" else "imagenet"
        return C.prepare(M.build_model("resnet50", 1000, weights), dev), 0
    if args.ckpt != "paper" and not os.path.exists(args.ckpt):
        data_flag = f"--data {args.data} --data_dir {args.data_dir}"
        if args.data.startswith("cifar"):
            data_flag = "--data cifar10"
        raise SystemExit(f"error: no checkpoint at {args.ckpt}; use --ckpt paper (CIFAR: the paper's model) "
                         f"or train one first: python train.py {data_flag} --out {args.ckpt}")
    source, ckpt = load_checkpoint(args.ckpt, dev)
    arch = "resnet26" if args.data.startswith("cifar") else "resnet50"
    if args.data.startswith("cifar") and ckpt["num_classes"] != 10:
        raise SystemExit(f"error: {args.ckpt} has {ckpt['num_classes']} outputs; CIFAR needs a 10-class "
                         "source")
    if ckpt["arch"] != arch and not (arch == "resnet26" and ckpt["arch"] == "wrn28_10"):
        raise SystemExit(f"error: {args.ckpt} holds a {ckpt['arch']}; --data {args.data} needs a {arch} "
                         "source")
    return C.prepare(source, dev).eval(), int(ckpt["args"].get("holdout") or 0)
