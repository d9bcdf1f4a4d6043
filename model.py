"""
The networks, the table of blocks that surgical fine-tuning tunes one at a
time, and the checkpoints they load from (ours, the paper's, RobustBench's).

ResNet-26 (CIFAR, PROTOCOL.md section 1): pre-activation, GroupNorm, 366,938
parameters. ResNet-50 (ImageNet family): torchvision's, BatchNorm. WRN-28-10:
RobustBench's CIFAR net, the one the authors' released code fine-tunes.

    python model.py                    # the block table with parameter counts
    python model.py --arch resnet50    # the same for ResNet-50 (no download)
"""
import argparse
import hashlib
import os
import re
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Blocks the paper tunes one at a time (Lee et al. 2023, Fig. 1). Values are
# parameter-name prefixes. The stem rides with layer1, as in the authors'
# code; the final norm trains only under "all".
BLOCKS = {
    "resnet26": {"layer1": ("conv1.", "layer1."), "layer2": ("layer2.",),
                 "layer3": ("layer3.",), "fc": ("fc.",)},
    "resnet50": {"layer1": ("conv1.", "bn1.", "layer1."), "layer2": ("layer2.",),
                 "layer3": ("layer3.",), "layer4": ("layer4.",), "fc": ("fc.",)},
    "wrn28_10": {"layer1": ("conv1.", "block1."), "layer2": ("block2.",),
                 "layer3": ("block3.",), "fc": ("fc.",)},
}
# The forward pass as a chain of stages with the prefixes each holds: the
# frozen stages before the first tuned one run once (finetune.py's cache).
STAGES = {
    "resnet26": {"conv1": ("conv1.",), "layer1": ("layer1.",), "layer2": ("layer2.",),
                 "layer3": ("layer3.",), "head": ("norm.", "fc.")},
    "resnet50": {"conv1": ("conv1.", "bn1."), "layer1": ("layer1.",),
                 "layer2": ("layer2.",), "layer3": ("layer3.",),
                 "layer4": ("layer4.",), "head": ("fc.",)},
    "wrn28_10": {"conv1": ("conv1.",), "block1": ("block1.",), "block2": ("block2.",),
                 "block3": ("block3.",), "head": ("bn1.", "fc.")},
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def he_fan_out(net):
    """Conv weights ~ N(0, 2 / (k*k*C_out)), as both CIFAR nets' code does."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)


class Staged(nn.Module):
    """A net whose forward is its stages in order (STAGES[arch])."""

    def forward(self, x, start=0, stop=None):
        # x: uint8 images when start == 0, else the input of stage `start`
        for name in list(STAGES[self.arch])[start:stop]:
            x = self.stage(name, x)
        return x


# -----------------------------------------------------------------------------
# ResNet-26, the paper's CIFAR net

class Shortcut(nn.Module):
    """No parameters: average-pool by the stride, zero-pad new channels."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x


class BasicBlock(nn.Module):
    """norm -> ReLU -> conv(stride) -> norm -> ReLU -> conv, + shortcut."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        change = stride > 1 or c_in != c_out
        self.shortcut = Shortcut(c_in, c_out, stride) if change else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.relu(self.bn1(x)))
        h = self.conv2(F.relu(self.bn2(h)))
        return self.shortcut(x) + h


class ResNet26(Staged):
    arch = "resnet26"

    def __init__(self, num_classes=10, n=4, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        c, layers = widths[0], []
        for i, w in enumerate(widths):
            s = 1 if i == 0 else 2
            units = [BasicBlock(c if j == 0 else w, w, s if j == 0 else 1)
                     for j in range(n)]
            layers.append(nn.Sequential(*units))
            c = w
        self.layer1, self.layer2, self.layer3 = layers
        self.norm = nn.GroupNorm(8, c)
        self.fc = nn.Linear(c, num_classes)
        he_fan_out(self)

    def stage(self, name, x):
        if name == "conv1":  # uint8 -> [0, 1] -> (x - 0.5) / 0.5
            if x.dtype == torch.uint8:
                x = x.float().div(127.5).sub(1.0)
            return self.conv1(x)
        if name == "head":  # (N, 64, 8, 8) -> norm, ReLU, pool -> (N, 64) -> logits
            return self.fc(F.relu(self.norm(x)).mean((2, 3)))
        return getattr(self, name)(x)


# -----------------------------------------------------------------------------
# ResNet-50, the ImageNet family's

def imagenet_weights():
    """torchvision's IMAGENET1K_V1 weights (76.1% top-1, the paper's time)."""
    from torchvision.models import ResNet50_Weights
    try:
        return ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as e:  # offline, proxy, disk full
        raise SystemExit(
            "error: could not fetch torchvision's ImageNet ResNet-50 weights "
            f"({type(e).__name__}); go online once (they are cached in "
            "~/.cache/torch/hub) or pass --weights none (random init)")


class ResNet50(Staged):
    """torchvision's ResNet-50 with its names, so its weights load as they
    are. layers / width: smaller nets of the same names (tests)."""
    arch = "resnet50"

    def __init__(self, num_classes=1000, weights=None, layers=(3, 4, 6, 3),
                 width=64):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet
        net = ResNet(Bottleneck, list(layers), width_per_group=width)
        if weights == "imagenet":
            net.load_state_dict(imagenet_weights())
        for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"):
            setattr(self, name, getattr(net, name))
        if num_classes != self.fc.out_features:
            self.fc = nn.Linear(self.fc.in_features, num_classes)
        # uint8 in, normalised here; constants, not saved in checkpoints
        for k, v in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            t = 255 * torch.tensor(v).view(1, 3, 1, 1)
            self.register_buffer(k, t, persistent=False)

    def stage(self, name, x):
        if name == "conv1":  # conv 7x7/2, norm, ReLU, max-pool 3x3/2
            if x.dtype == torch.uint8:
                x = (x.float() - self.mean) / self.std
            return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        if name == "head":
            return self.fc(x.mean((2, 3)))
        return getattr(self, name)(x)


# -----------------------------------------------------------------------------
# WideResNet-28-10 with RobustBench's names, so its Standard.pt loads as it is

class WideBlock(nn.Module):
    """Pre-activation; where the shape changes, the 1x1 shortcut and the
    branch both start from the activated input."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out
        self.convShortcut = None
        if not self.equal:
            self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + h


class WideStage(nn.Module):
    def __init__(self, n, c_in, c_out, stride):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
            for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet28(Staged):
    """BatchNorm; inputs in [0, 1], unnormalised, as RobustBench's."""
    arch = "wrn28_10"

    def __init__(self, num_classes=10, depth=28, width=10):
        super().__init__()
        n, c = (depth - 4) // 6, (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = WideStage(n, c[0], c[1], 1)
        self.block2 = WideStage(n, c[1], c[2], 2)
        self.block3 = WideStage(n, c[2], c[3], 2)
        self.bn1, self.fc = nn.BatchNorm2d(c[3]), nn.Linear(c[3], num_classes)
        he_fan_out(self)
        nn.init.zeros_(self.fc.bias)

    def stage(self, name, x):
        if name == "conv1":
            return self.conv1(x.float() / 255 if x.dtype == torch.uint8 else x)
        if name == "head":
            return self.fc(F.relu(self.bn1(x)).mean((2, 3)))
        return getattr(self, name)(x)


ARCHS = {"resnet26": ResNet26, "resnet50": ResNet50, "wrn28_10": WideResNet28}


def build_model(arch="resnet26", num_classes=10, weights=None):
    """weights: None (random init) or "imagenet" (ResNet-50 only)."""
    if weights and arch != "resnet50":
        raise SystemExit(f"error: --weights {weights} exists for resnet50 only")
    kw = {"weights": weights} if weights else {}
    return ARCHS[arch](num_classes=num_classes, **kw)


# -----------------------------------------------------------------------------
# blocks, --tune, and the forward pass in pieces

def block_params(model):
    """Tune name -> parameter names, for every block and "all"."""
    names = [n for n, _ in model.named_parameters()]
    groups = {b: [n for n in names if n.startswith(prefixes)]
              for b, prefixes in BLOCKS[model.arch].items()}
    groups["all"] = names
    return groups


def resolve_tune(model, tune):
    """The parameter names a --tune value trains, in model order: "none",
    a block, "all", or blocks and name prefixes joined by "," or "+"."""
    groups, chosen = block_params(model), set()
    if tune == "none":
        return []
    for part in re.split(r"[,+]", tune):
        prefix = part and part != "none"  # "fc,none" is a typo, not a prefix
        names = groups.get(part) or [
            n for n in groups["all"] if prefix and n.startswith(part)]
        if not names:
            raise SystemExit(
                f"error: --tune {tune!r}: {part!r} matches no parameter; use none, "
                f"{', '.join(groups)}, a method, or parameter-name prefixes "
                "(python model.py lists the blocks)")
        chosen.update(names)
    return [n for n in groups["all"] if n in chosen]


def freeze_except(model, names):
    """requires_grad for the named parameters only; returns them."""
    names = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return [p for n, p in model.named_parameters() if n in names]


def first_stage(names, arch="resnet26"):
    """Index of the first stage holding a tuned parameter."""
    for i, prefixes in enumerate(STAGES[arch].values()):
        if any(n.startswith(prefixes) for n in names):
            return i
    return len(STAGES[arch])


@torch.no_grad()
def prefix(model, x, stop, chunk=256):
    """Output of stages [0, stop) for a whole split, in eval mode. Exact as a
    cache: those stages keep no batch state (GroupNorm, BatchNorm in eval)."""
    if stop == 0:
        return x
    model.eval()
    with common.autocast(x.device):
        return torch.cat([model(xb, 0, stop) for xb in x.split(chunk)])


@torch.no_grad()
def evaluate(model, split, start=0, batch_size=256):
    """{"acc" (%), "loss"} of a split (x, y[, groups]) on its device. With
    groups (Waterbirds, CelebA) acc is the worst group's, the paper's metric
    there, "avg_acc" their mean and "group_acc" each. Batches of 256: 2.6x
    faster than 1000 on a 2-core CPU."""
    x, y, g = (*split, None)[:3]
    model.eval()
    hit, loss = [], 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with common.autocast(x.device):
            logits = model(xb, start=start).float()
        hit.append(logits.argmax(1) == yb)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
    hit = torch.cat(hit) if hit else torch.zeros(0, dtype=torch.bool)
    out = {"acc": 100.0 * hit.sum().item() / max(len(x), 1),
           "loss": loss / max(len(x), 1)}
    if g is not None:
        acc = [100.0 * hit[g == k].sum().item() / (g == k).sum().item()
               for k in g.unique().tolist()]
        out.update(acc=min(acc), avg_acc=sum(acc) / len(acc), group_acc=acc)
    return out


def block_table(model):
    """Block, parameter count, prefixes; the final norm last."""
    count = {n: p.numel() for n, p in model.named_parameters()}
    blocks = BLOCKS[model.arch]
    rows = [(b, sum(count[n] for n in ns), " ".join(blocks.get(b, ("(every one)",))))
            for b, ns in block_params(model).items()]
    rest = [n for n in count if not any(n.startswith(ps) for ps in blocks.values())]
    if rest:
        what = "final norm, tuned only under all: " + " ".join(rest)
        rows.append(("(norm)", sum(count[n] for n in rest), what))
    return "\n".join(f"{b:8s} {c:>10,d}  {what}" for b, c, what in rows)


# -----------------------------------------------------------------------------
# checkpoints: ours (plain types, weights_only, written atomically), the
# paper's CIFAR file, RobustBench's WRN. Every failure is one line.

CKPT_VERSION = 1
# The paper's CIFAR source (PROTOCOL.md section 1): the test-time-training
# ResNet-26 the MEMO authors publish (MIT), 90.83% clean. Its final norm is
# "bn." there, "norm." here.
PAPER_URL = ("https://github.com/zhangmarvin/memo/raw/main/cifar-10-exps/"
             "results/cifar10_rn26_gn/ckpt.pth")
PAPER_SHA256 = "272f183ab9ba6624480da6e7779ccc0ccda647b06b3c3134a1f670b142f36403"


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


def paper_path():
    """The paper's file in torch's hub cache, downloaded on first use."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", "cifar10_rn26_gn_memo.pth")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"downloading the paper's CIFAR checkpoint (3 MB) from {PAPER_URL}")
        try:  # torch writes a temp file and renames it when whole
            torch.hub.download_url_to_file(PAPER_URL, path, progress=False)
        except Exception as e:  # offline, proxy, HTTP error
            raise SystemExit(
                "error: could not download the paper's checkpoint "
                f"({type(e).__name__}); offline? fetch {PAPER_URL} elsewhere "
                "and pass its path as --ckpt")
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


def is_paper_format(path):
    try:  # torch.save's zip holds data.pkl; TTT/MEMO's has "err_cls"
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") and b"err_cls" in z.read(n)
                       for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path, device="cpu"):
    """(model, the checkpoint without its weights) for one of ours, the
    paper's file ("paper" or a copy) or a RobustBench WRN state dict."""
    if path == "paper":
        path = paper_path()
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
    if isinstance(ckpt, dict) and "version" not in ckpt:  # RobustBench's
        model = load_robustbench(ckpt)
        if model is not None:
            return model, meta(model, {"test_acc": None, "source": path})
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet26", choices=sorted(ARCHS))
    args = p.parse_args(argv)
    k = 1000 if args.arch == "resnet50" else 10
    print(block_table(build_model(args.arch, k)))


if __name__ == "__main__":
    main()
