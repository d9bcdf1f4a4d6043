"""
The networks of the paper and the table of blocks that surgical fine-tuning tunes one at a time.

ResNet-26 (CIFAR): pre-activation, GroupNorm with 8 groups, parameter-free shortcuts, widths 16/32/64, as in
the test-time-training code the paper's CIFAR checkpoint comes from (PROTOCOL section 1). 366,938 parameters.
ResNet-50 (ImageNet family, PROTOCOL section 8): torchvision's, BatchNorm, 25,557,032 parameters.
WideResNet-28-10 (wrn.py): RobustBench's CIFAR net, which the authors' released code fine-tunes. Checkpoints
(ours, the paper's, RobustBench's) are read and written by checkpoints.py.

    python model.py                    # the block table with parameter counts
    python model.py --arch resnet50    # the same for ResNet-50 (no download: the counts need no weights)
"""
import argparse
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


# Blocks the paper tunes one at a time (Lee et al. 2023, Fig. 1 / Table 1). The stem conv rides with layer1,
# as in the authors' code; the final norm trains only under "all". Values are parameter-name prefixes.
BLOCKS = {
    "resnet26": {"layer1": ("conv1.", "layer1."), "layer2": ("layer2.",), "layer3": ("layer3.",),
                 "fc": ("fc.",)},
    "resnet50": {"layer1": ("conv1.", "bn1.", "layer1."), "layer2": ("layer2.",), "layer3": ("layer3.",),
                 "layer4": ("layer4.",), "fc": ("fc.",)},
    "wrn28_10": {"layer1": ("conv1.", "block1."), "layer2": ("block2.",), "layer3": ("block3.",),
                 "fc": ("fc.",)},
}
# The forward pass as a chain of stages, each with the parameter-name prefixes it holds, so that the frozen
# stages before the first tuned one can run once and be cached (finetune.py).
STAGE_PARAMS = {
    "resnet26": {"conv1": ("conv1.",), "layer1": ("layer1.",), "layer2": ("layer2.",), "layer3": ("layer3.",),
                 "head": ("norm.", "fc.")},
    "resnet50": {"conv1": ("conv1.", "bn1."), "layer1": ("layer1.",), "layer2": ("layer2.",),
                 "layer3": ("layer3.",),
                 "layer4": ("layer4.",), "head": ("fc.",)},
    "wrn28_10": {"conv1": ("conv1.",), "block1": ("block1.",), "block2": ("block2.",), "block3": ("block3.",),
                 "head": ("bn1.", "fc.")},
}
STAGES = tuple(STAGE_PARAMS["resnet26"])
# torchvision's weights expect these
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def he_fan_out(net):
    """Conv weights drawn from N(0, 2 / (k*k*C_out)): He init over fan-out, as both CIFAR nets' code does."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)


class Staged(nn.Module):
    """A net whose forward is its stages in order; subclasses define stages and stage(name, x)."""

    def forward(self, x, start=0, stop=None):
        """Run stages[start:stop]. x: uint8 images when start == 0, else that stage's input."""
        for name in self.stages[start:stop]:
            x = self.stage(name, x)
        return x


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
    """Pre-activation block: norm -> ReLU -> conv(stride) -> norm -> ReLU -> conv, plus the shortcut of the
    input."""

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


class ResNet26(Staged):
    arch, stages = "resnet26", STAGES

    def __init__(self, num_classes=10, n=4, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        c, layers = widths[0], []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            units = [BasicBlock(c if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)]
            layers.append(nn.Sequential(*units))
            c = w
        self.layer1, self.layer2, self.layer3 = layers
        self.norm = nn.GroupNorm(8, c)
        self.fc = nn.Linear(c, num_classes)
        he_fan_out(self)

    def stage(self, name, x):
        if name == "conv1":  # uint8 images in, scaled to [0,1] then (x - 0.5) / 0.5 per channel
            x = x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x
            return self.conv1(x)
        if name == "head":  # (N, 64, 8, 8) -> norm, ReLU, global average pool -> (N, 64) -> logits
            return self.fc(F.relu(self.norm(x)).mean((2, 3)))
        return getattr(self, name)(x)


def imagenet_weights():
    """torchvision's IMAGENET1K_V1 ResNet-50 weights (76.1% top-1; those of the paper's time, before
    torchvision's V2 recipe), downloaded once into torch's hub cache."""
    from torchvision.models import ResNet50_Weights
    try:
        return ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as e:  # offline, proxy, disk full...
        raise SystemExit("error: could not fetch torchvision's ImageNet ResNet-50 weights "
                         f"({type(e).__name__}); go online once (they are cached under ~/.cache/torch/hub) "
                         "or pass --weights none (random init)")


class ResNet50(Staged):
    """torchvision's ResNet-50 (v1.5, BatchNorm) with its parameter names, so its ImageNet weights load as
    they are. weights "imagenet": those weights, then a new fc when num_classes != 1000; None: random init.
    layers / width (torchvision's width_per_group): smaller nets of the same names, for tests. BatchNorm is
    why finetune.py keeps the model in eval mode by default (--bn)."""
    arch, stages = "resnet50", tuple(STAGE_PARAMS["resnet50"])

    def __init__(self, num_classes=1000, weights=None, layers=(3, 4, 6, 3), width=64):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet
        net = ResNet(Bottleneck, list(layers), width_per_group=width)
        if weights == "imagenet":
            net.load_state_dict(imagenet_weights())
        # same names, same weights
        for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"):
            setattr(self, name, getattr(net, name))
        if num_classes != self.fc.out_features:
            self.fc = nn.Linear(self.fc.in_features, num_classes)
        # uint8 in, normalised here as torchvision's weights expect; constants, not saved in checkpoints
        self.register_buffer("mean", 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def stage(self, name, x):
        if name == "conv1":  # the stem: conv 7x7/2, norm, ReLU, max-pool 3x3/2 (224 px -> 56)
            x = (x.float() - self.mean) / self.std if x.dtype == torch.uint8 else x
            return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        if name == "head":
            return self.fc(x.mean((2, 3)))
        return getattr(self, name)(x)


def wide_resnet(**kw):
    from wrn import WideResNet28  # optional: imported when asked for
    return WideResNet28(**kw)


ARCHS = {"resnet26": ResNet26, "resnet50": ResNet50, "wrn28_10": wide_resnet}


def build_model(arch="resnet26", num_classes=10, weights=None):
    """weights: None (random init) or "imagenet" (ResNet-50 only)."""
    if weights and arch != "resnet50":
        raise SystemExit(f"error: --weights {weights} exists for resnet50 only")
    return ARCHS[arch](num_classes=num_classes, **({"weights": weights} if weights else {}))


def block_params(model):
    """Tune name -> list of parameter names, for every block of the table plus "all"."""
    names = [n for n, _ in model.named_parameters()]
    groups = {b: [n for n in names if n.startswith(prefixes)] for b, prefixes in BLOCKS[model.arch].items()}
    groups["all"] = names
    return groups


def resolve_tune(model, tune):
    """The parameter names a --tune value trains, in model order: "none", a block, "all", or a list of blocks
    and parameter-name prefixes joined by "," or "+" (e.g. "layer1+layer2", "layer2.0.,fc."). One line if a
    part matches nothing."""
    groups, chosen = block_params(model), set()
    if tune == "none":
        return []
    for part in re.split(r"[,+]", tune):
        prefix = part and part != "none"  # "fc,none" is a typo, not a prefix
        names = groups.get(part) or [n for n in groups["all"] if prefix and n.startswith(part)]
        if not names:
            raise SystemExit(f"error: --tune {tune!r}: {part!r} matches no parameter; use none, "
                             f"{', '.join(groups)}, "
                             f"a method, or parameter-name prefixes (python model.py lists the blocks)")
        chosen.update(names)
    return [n for n in groups["all"] if n in chosen]


def freeze_except(model, names):
    """requires_grad only for the named parameters; returns them in model order."""
    names = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return [p for n, p in model.named_parameters() if n in names]


def first_stage(names, arch="resnet26"):
    """Index of the first stage holding a tuned parameter: the stages before it are frozen (and, in eval mode,
    stateless), so their output can be computed once and cached."""
    for i, prefixes in enumerate(STAGE_PARAMS[arch].values()):
        if any(n.startswith(prefixes) for n in names):
            return i
    return len(STAGE_PARAMS[arch])


def block_table(model):
    """The block table as text: block, parameter count, prefixes; the final norm (tuned only under all)
    last."""
    count = {n: p.numel() for n, p in model.named_parameters()}
    rows = [(b, sum(count[n] for n in ns), " ".join(BLOCKS[model.arch].get(b, ("(every parameter)",))))
            for b, ns in block_params(model).items()]
    rest = [n for n in count if not any(n.startswith(p) for ps in BLOCKS[model.arch].values() for p in ps)]
    if rest:
        what = "final norm, tuned only under all: " + " ".join(rest)
        rows.append(("(norm)", sum(count[n] for n in rest), what))
    return "\n".join(f"{b:8s} {c:>10,d}  {what}" for b, c, what in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet26", choices=sorted(ARCHS))
    args = p.parse_args(argv)
    print(block_table(build_model(args.arch, 1000 if args.arch == "resnet50" else 10)))


if __name__ == "__main__":
    main()
