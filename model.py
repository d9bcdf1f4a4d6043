"""
The networks of the paper and the table of blocks that surgical fine-tuning tunes one at a time.

ResNet-26 (CIFAR): pre-activation, GroupNorm with 8 groups, parameter-free shortcuts, widths 16/32/64, as in the
test-time-training code the paper's CIFAR checkpoint comes from (PROTOCOL section 1). 366,938 parameters.
ResNet-50 (ImageNet family, PROTOCOL section 8): torchvision's, BatchNorm, 25,557,032 parameters.
WideResNet-28-10 (CIFAR, the authors' released code): RobustBench's names, BatchNorm, 36,479,194 parameters.

    python model.py                    # print the block table with parameter counts
    python model.py --arch resnet50    # the same for ResNet-50 (no download: the counts need no weights)
    python model.py --arch wrn28_10    # RobustBench's WideResNet-28-10
"""
import argparse
import glob
import hashlib
import os
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CKPT_VERSION = 1

# Blocks the paper tunes one at a time (Lee et al. 2023, Fig. 1 / Table 1). The stem conv rides with layer1, as in
# the authors' code; the final norm trains only under "all". Values are parameter-name prefixes.
BLOCKS = {
    "resnet26": {"layer1": ("conv1.", "layer1."), "layer2": ("layer2.",), "layer3": ("layer3.",), "fc": ("fc.",)},
    "resnet50": {"layer1": ("conv1.", "bn1.", "layer1."), "layer2": ("layer2.",), "layer3": ("layer3.",),
                 "layer4": ("layer4.",), "fc": ("fc.",)},
    "wrn28_10": {"layer1": ("conv1.", "block1."), "layer2": ("block2.",), "layer3": ("block3.",), "fc": ("fc.",)},
}
# The forward pass as a chain of stages, so a frozen prefix can be computed once and cached (finetune.py); each
# stage with the parameter-name prefixes it holds.
STAGE_PARAMS = {
    "resnet26": {"conv1": ("conv1.",), "layer1": ("layer1.",), "layer2": ("layer2.",), "layer3": ("layer3.",),
                 "head": ("norm.", "fc.")},
    "resnet50": {"conv1": ("conv1.", "bn1."), "layer1": ("layer1.",), "layer2": ("layer2.",), "layer3": ("layer3.",),
                 "layer4": ("layer4.",), "head": ("fc.",)},
    "wrn28_10": {"conv1": ("conv1.",), "block1": ("block1.",), "block2": ("block2.",), "block3": ("block3.",),
                 "head": ("bn1.", "fc.")},
}
STAGES = tuple(STAGE_PARAMS["resnet26"])
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's weights expect these


def he_fan_out(net):
    """Conv weights drawn from N(0, 2 / (k*k*C_out)): He init over fan-out, as both CIFAR nets' code does."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)


class Shortcut(nn.Module):
    """Parameter-free shortcut: average-pool by the stride, then zero-pad the new channels."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x


class BasicBlock(nn.Module):
    """Pre-activation block: norm -> ReLU -> conv(stride) -> norm -> ReLU -> conv, plus the shortcut of the input."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = Shortcut(c_in, c_out, stride) if (stride > 1 or c_in != c_out) else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.relu(self.bn1(x)))
        h = self.conv2(F.relu(self.bn2(h)))
        return self.shortcut(x) + h


class ResNet26(nn.Module):
    arch, stages = "resnet26", STAGES

    def __init__(self, num_classes=10, n=4, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        c, layers = widths[0], []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(*[BasicBlock(c if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)]))
            c = w
        self.layer1, self.layer2, self.layer3 = layers
        self.norm = nn.GroupNorm(8, c)
        self.fc = nn.Linear(c, num_classes)
        he_fan_out(self)

    def stage(self, name, x):
        if name == "conv1":  # uint8 images in, scaled to [0,1] then (x - 0.5) / 0.5 per channel
            x = x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x
            return self.conv1(x)
        if name == "head":
            return self.fc(F.relu(self.norm(x)).mean((2, 3)))
        return getattr(self, name)(x)

    def forward(self, x, start=0, stop=None):
        """Run stages[start:stop]. x: uint8 (N,3,32,32) images when start == 0, else that stage's input."""
        for name in self.stages[start:stop]:
            x = self.stage(name, x)
        return x


def imagenet_weights():
    """torchvision's IMAGENET1K_V1 ResNet-50 weights (76.1% top-1; those of the paper's time, before torchvision's
    V2 recipe), downloaded once into torch's hub cache."""
    from torchvision.models import ResNet50_Weights
    try:
        return ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as e:  # offline, proxy, disk full...
        raise SystemExit(f"error: could not fetch torchvision's ImageNet ResNet-50 weights ({type(e).__name__}); go "
                         f"online once (they are cached under ~/.cache/torch/hub) or pass --weights none (random init)")


class ResNet50(nn.Module):
    """torchvision's ResNet-50 (v1.5, BatchNorm) with its parameter names, so its ImageNet weights load as they are.
    weights "imagenet": those weights, then a new fc when num_classes != 1000; None: random init (tests, or a
    checkpoint about to be loaded). layers / width (torchvision's width_per_group): smaller nets of the same shape
    and names, for tests. BatchNorm is the reason finetune.py keeps the model in eval mode by default (--bn)."""
    arch, stages = "resnet50", tuple(STAGE_PARAMS["resnet50"])

    def __init__(self, num_classes=1000, weights=None, layers=(3, 4, 6, 3), width=64):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet
        net = ResNet(Bottleneck, list(layers), width_per_group=width)
        if weights == "imagenet":
            net.load_state_dict(imagenet_weights())
        for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"):  # same names, same weights
            setattr(self, name, getattr(net, name))
        if num_classes != self.fc.out_features:
            self.fc = nn.Linear(self.fc.in_features, num_classes)
        # uint8 in, normalised here as torchvision's weights expect; not saved in checkpoints (constants)
        self.register_buffer("mean", 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def stage(self, name, x):
        if name == "conv1":  # the stem: conv 7x7/2, norm, ReLU, max-pool 3x3/2 (224 px -> 56)
            x = (x.float() - self.mean) / self.std if x.dtype == torch.uint8 else x
            return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        if name == "head":
            return self.fc(x.mean((2, 3)))
        return getattr(self, name)(x)

    forward = ResNet26.forward


class WideBlock(nn.Module):
    """RobustBench's WideResNet unit (its names: bn1, conv1, bn2, conv2, convShortcut): pre-activation; where the
    shape changes, the 1x1 shortcut conv and the residual branch both start from the activated input."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out
        self.convShortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + h


class WideNetworkBlock(nn.Module):
    def __init__(self, n, c_in, c_out, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet28(nn.Module):
    """WideResNet-28-10 with RobustBench's parameter names, so its CIFAR-10 "Standard" checkpoint (the model the
    authors' released code fine-tunes on CIFAR-10-C) loads as it is: BatchNorm (kept in eval mode by finetune.py's
    --bn eval), inputs in [0, 1] with no normalisation, as RobustBench's models take them. 36,479,194 parameters.
    depth / width: smaller nets of the same names (tests)."""
    arch, stages = "wrn28_10", tuple(STAGE_PARAMS["wrn28_10"])

    def __init__(self, num_classes=10, depth=28, width=10):
        super().__init__()
        n, c = (depth - 4) // 6, (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = WideNetworkBlock(n, c[0], c[1], 1)
        self.block2 = WideNetworkBlock(n, c[1], c[2], 2)
        self.block3 = WideNetworkBlock(n, c[2], c[3], 2)
        self.bn1, self.fc = nn.BatchNorm2d(c[3]), nn.Linear(c[3], num_classes)
        he_fan_out(self)
        nn.init.zeros_(self.fc.bias)

    def stage(self, name, x):
        if name == "conv1":
            return self.conv1(x.float() / 255 if x.dtype == torch.uint8 else x)
        if name == "head":
            return self.fc(F.relu(self.bn1(x)).mean((2, 3)))
        return getattr(self, name)(x)

    forward = ResNet26.forward


def load_robustbench(state):
    """A RobustBench WideResNet-28-10 state dict ({"state_dict": ...} or bare, "module." prefixes allowed) -> the
    model; None when the keys are not that network's."""
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "block1.layer.0.conv1.weight" not in state:
        return None
    n = len({k.split(".")[2] for k in state if k.startswith("block1.layer.")})  # units per block: depth = 6n + 4
    width = state["block1.layer.0.conv1.weight"].shape[0] // 16
    model = WideResNet28(state["fc.weight"].shape[0], depth=6 * n + 4, width=width)
    model.load_state_dict(state)
    return model


ARCHS = {"resnet26": ResNet26, "resnet50": ResNet50, "wrn28_10": WideResNet28}


def build_model(arch="resnet26", num_classes=10, weights=None):
    """weights: None (random init) or "imagenet" (ResNet-50 only)."""
    if weights and arch != "resnet50":
        raise SystemExit(f"error: --weights {weights} exists for resnet50 only")
    return ARCHS[arch](num_classes=num_classes, **({"weights": weights} if weights else {}))


def block_params(model, arch=None):
    """Tune name -> list of parameter names, for every block of the table plus "all" (arch: model.arch)."""
    arch = arch or model.arch
    names = [n for n, _ in model.named_parameters()]
    groups = {b: [n for n in names if n.startswith(prefixes)] for b, prefixes in BLOCKS[arch].items()}
    groups["all"] = names
    return groups


def resolve_tune(model, tune, arch=None):
    """Which parameters train for a --tune value: a block name, "all", "none", or a comma list of name prefixes
    (for forks: e.g. "layer2.0.,fc."). Returns the parameter names; exits with one line if nothing matches."""
    groups = block_params(model, arch)
    if tune == "none":
        return []
    if tune in groups:
        return groups[tune]
    prefixes = tuple(p for p in tune.split(",") if p)
    names = [n for n in groups["all"] if n.startswith(prefixes)]
    if not names:
        raise SystemExit(f"error: --tune {tune!r} matches no parameter; use one of {['none', *groups]} "
                         f"or a comma list of parameter-name prefixes (python model.py lists them)")
    return names


def freeze_except(model, names):
    """requires_grad only for the named parameters; returns them in model order."""
    names = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return [p for n, p in model.named_parameters() if n in names]


def first_stage(names, arch="resnet26"):
    """Index of the first stage that holds a tuned parameter: stages before it are frozen (and, in eval mode,
    stateless), so their output can be computed once and cached."""
    for i, prefixes in enumerate(STAGE_PARAMS[arch].values()):
        if any(n.startswith(prefixes) for n in names):
            return i
    return len(STAGE_PARAMS[arch])


def block_table(model, arch=None):
    arch = arch or model.arch
    rows = [(b, sum(p.numel() for n, p in model.named_parameters() if n in set(ns)))
            for b, ns in block_params(model, arch).items()]
    return "\n".join(f"{b:8s} {c:>10,d}  {' '.join(BLOCKS[arch].get(b, ('(every parameter, total)',)))}"
                     for b, c in rows)


# -----------------------------------------------------------------------------
# checkpoints: a small versioned dict of plain types, loadable with torch.load(weights_only=True)

def save_checkpoint(path, model, arch, args, metrics):
    ckpt = {"version": CKPT_VERSION, "arch": arch, "num_classes": model.fc.out_features,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
            "metrics": metrics}
    atomic_save(ckpt, path)


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: a reader (or a kill -9) sees the old file or the new one, never half
    of one. Temp files that killed writers left next to path are removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
    remove_orphans(path)


def remove_orphans(path):
    """Delete path.tmp<PID> files whose writer process is gone (a kill -9 mid-write leaves one behind)."""
    for f in glob.glob(glob.escape(path) + ".tmp*"):
        pid = f.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.remove(f)
            except OSError:
                pass  # another cleaner got there first


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's live process
    return True


# The paper's own CIFAR source model (PROTOCOL section 1): the test-time-training ResNet-26 that the MEMO authors
# publish (MIT licence), 90.83% clean CIFAR-10 test accuracy. Its state dict is ours but for the final norm ("bn.").
PAPER_CKPT_URL = "https://github.com/zhangmarvin/memo/raw/main/cifar-10-exps/results/cifar10_rn26_gn/ckpt.pth"
PAPER_CKPT_SHA256 = "272f183ab9ba6624480da6e7779ccc0ccda647b06b3c3134a1f670b142f36403"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def paper_checkpoint_path():
    """The paper's checkpoint in torch's hub cache (~/.cache/torch/hub/checkpoints), downloaded on first use."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", "cifar10_rn26_gn_memo.pth")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"downloading the paper's CIFAR checkpoint (3 MB) from {PAPER_CKPT_URL}")
        try:  # torch writes a temp file and renames it when the download is whole
            torch.hub.download_url_to_file(PAPER_CKPT_URL, path, progress=False)
        except Exception as e:  # offline, proxy, HTTP error
            raise SystemExit(f"error: could not download the paper's checkpoint ({type(e).__name__}); offline? fetch "
                             f"{PAPER_CKPT_URL} elsewhere and pass its path as --ckpt")
    return path


def _unpickle_ttt(path):
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2; the file names it numpy.core.multiarray.scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    # err_cls is a numpy float64: allow exactly the types that rebuild it, never weights_only=False
    with torch.serialization.safe_globals([(scalar, "numpy.core.multiarray.scalar"), scalar, np.dtype,
                                          type(np.dtype("float64"))]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_ttt(path, device):
    """A checkpoint in the test-time-training / MEMO format ({"err_cls", "net", ...}), as the paper's ResNet-26.
    Only the published file is accepted: its sha256 is checked before it is unpickled."""
    digest = sha256(path)
    if digest != PAPER_CKPT_SHA256:
        raise SystemExit(f"error: {path} has sha256 {digest[:12]}..., not the paper checkpoint's "
                         f"{PAPER_CKPT_SHA256[:12]}...; delete it and download it again ({PAPER_CKPT_URL})")
    raw = _unpickle_ttt(path)
    state = {("norm." + k[3:] if k.startswith("bn.") else k): v for k, v in raw["net"].items()}
    model = build_model("resnet26", 10)
    model.load_state_dict(state)
    acc = round(100 * (1 - float(raw["err_cls"])), 2)
    _finite(model, path)
    ckpt = {"version": CKPT_VERSION, "arch": "resnet26", "num_classes": 10, "args": {"holdout": 0},
            "metrics": {"test_acc": acc, "source": PAPER_CKPT_URL}}
    return model.to(device), ckpt


def load_checkpoint(path, device="cpu"):
    """Returns (model, ckpt) for a checkpoint of ours, the paper's file ("paper": downloaded on first use; or a local
    copy), or a RobustBench WideResNet-28-10 state dict (its CIFAR-10 Standard.pt, which RobustBench downloads).
    One clear line and exit != 0 when the file is missing, not a checkpoint, or not the published file."""
    if path == "paper":
        path = paper_checkpoint_path()
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "not found"
        raise SystemExit(f"error: checkpoint {path} {what}; use --ckpt paper (the paper's model) or train one with: "
                         f"python train.py --out {path}")
    try:
        with zipfile.ZipFile(path) as z:  # torch.save's format: a zip holding data.pkl; TTT/MEMO's has "err_cls"
            ttt = any(n.endswith("data.pkl") and b"err_cls" in z.read(n) for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        ttt = False
    if ttt:
        try:
            return _load_ttt(path, device)
        except SystemExit:
            raise
        except Exception as e:
            raise SystemExit(f"error: {path} is not a readable TTT/MEMO checkpoint ({type(e).__name__}); delete it "
                             f"and download it again ({PAPER_CKPT_URL})")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        wrn = load_robustbench(ckpt) if isinstance(ckpt, dict) and "version" not in ckpt else None
        if wrn is not None:  # a RobustBench file, e.g. its CIFAR-10 Standard.pt
            meta = {"version": CKPT_VERSION, "arch": "wrn28_10", "num_classes": wrn.fc.out_features,
                    "args": {"holdout": 0}, "metrics": {"test_acc": None, "source": path}}
            return _finite(wrn, path).to(device), meta
        version = ckpt.get("version") if isinstance(ckpt, dict) else None
        if version is not None and version != CKPT_VERSION:
            raise SystemExit(f"error: {path} is a version-{version} checkpoint and this code reads version "
                             f"{CKPT_VERSION}; use the copy of the project that wrote it, or retrain with: python "
                             f"train.py --out another path")
        assert version == CKPT_VERSION, "not a checkpoint dict"
        model = build_model(ckpt["arch"], ckpt["num_classes"])
        model.load_state_dict(ckpt["state_dict"])
    except SystemExit:
        raise
    except Exception as e:  # truncated file, wrong format, mismatched weights
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}); "
                         f"delete it and retrain with: python train.py --out {path}")
    return _finite(model, path).to(device), ckpt


def _finite(model, path):
    """The model, or one line and exit when a weight is NaN or infinite (a diverged run's file): never fine-tuned."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SystemExit(f"error: {path} holds non-finite weights ({bad[0]} and {len(bad) - 1} more): a diverged "
                         f"run; retrain it")
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet26", choices=sorted(ARCHS))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model = build_model(args.arch, 1000 if args.arch == "resnet50" else 10)
    print(block_table(model, args.arch))
    final = {"resnet26": "norm", "wrn28_10": "bn1"}.get(args.arch)  # the final norm, outside every block
    if final:
        n = sum(p.numel() for p in getattr(model, final).parameters())
        print(f"{final:8s} {n:>10,d}  (final norm, tuned only under all)")


if __name__ == "__main__":
    main()
