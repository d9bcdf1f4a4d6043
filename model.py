"""
The networks and the table of blocks that surgical fine-tuning tunes one at
a time (their checkpoints: checkpoints.py).

ResNet-26 (CIFAR, PROTOCOL.md section 1): pre-activation, GroupNorm, 366,938
parameters. ResNet-50 (ImageNet family): torchvision's, BatchNorm. WRN-28-10:
RobustBench's CIFAR net, the one the authors' released code fine-tunes.
ResNet-56: a public BatchNorm CIFAR net of the authors' kind (akamaster).

    python model.py                    # the block table with parameter counts
    python model.py --arch resnet50    # the same for ResNet-50 (no download)
"""
import argparse
import re

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
    "resnet56": {"layer1": ("conv1.", "bn1.", "layer1."), "layer2": ("layer2.",),
                 "layer3": ("layer3.",), "fc": ("fc.",)},
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
    "resnet56": {"conv1": ("conv1.", "bn1."), "layer1": ("layer1.",), "layer2": ("layer2.",),
                 "layer3": ("layer3.",), "head": ("fc.",)},
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


# -----------------------------------------------------------------------------
# ResNet-56 of github.com/akamaster/pytorch_resnet_cifar10 (BatchNorm, option-A
# shortcuts), its names but "fc" for its "linear" head

class PostBlock(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN, + shortcut, -> ReLU; where the shape
    changes the shortcut subsamples by 2 and zero-pads the channels."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = (c_out - c_in) // 2 if stride != 1 or c_in != c_out else None

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.pad is not None:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(h + x)


class ResNet56(Staged):
    """93.6% clean as published; inputs normalised with ImageNet's mean and std."""
    arch = "resnet56"

    def __init__(self, num_classes=10, n=9, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c, layers = widths[0], []
        for i, w in enumerate(widths):
            s = 1 if i == 0 else 2
            layers.append(nn.Sequential(*[PostBlock(c if j == 0 else w, w, s if j == 0 else 1)
                                          for j in range(n)]))
            c = w
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(c, num_classes)
        for mod in self.modules():  # its kaiming_normal_ init
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(mod.weight)
        for k, v in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            self.register_buffer(k, 255 * torch.tensor(v).view(1, 3, 1, 1), persistent=False)

    def stage(self, name, x):
        if name == "conv1":
            if x.dtype == torch.uint8:
                x = (x.float() - self.mean) / self.std
            return F.relu(self.bn1(self.conv1(x)))
        if name == "head":
            return self.fc(x.mean((2, 3)))
        return getattr(self, name)(x)


ARCHS = {"resnet26": ResNet26, "resnet50": ResNet50, "wrn28_10": WideResNet28,
         "resnet56": ResNet56}


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


def frozen_stages(net, names, splits, gb):
    """How many leading stages are frozen and can run once for every split: those before
    the first tuned one, if gb GiB hold their output (ResNet-50's layer1: 1.6 MB an image)."""
    if not gb or not names:
        return 0
    k = first_stage(names, net.arch)
    one = [prefix(net, x[:1], k) for x, *_ in splits.values()]
    need = sum(o.numel() * o.element_size() * len(x) for o, (x, *_) in zip(one, splits.values()))
    return k if need <= gb * 2 ** 30 else 0


def probe(arch, nets={}):
    """A random net of arch, built once: its names check a --tune."""
    key = (arch, ARCHS[arch])
    if key not in nets:
        nets[key] = ARCHS[arch]()
    return nets[key]


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet26", choices=sorted(ARCHS))
    args = p.parse_args(argv)
    k = 1000 if args.arch == "resnet50" else 10
    print(block_table(build_model(args.arch, k)))


if __name__ == "__main__":
    main()
