"""
RobustBench's WideResNet-28-10 for CIFAR-10, with its parameter names, so its "Standard" checkpoint (the model
the authors' released code fine-tunes on CIFAR-10-C; RobustBench downloads it as Standard.pt) loads as it is.
BatchNorm (finetune.py keeps it in eval mode: --bn eval); inputs in [0, 1], no normalisation, as RobustBench's
models take them. 36,479,194 parameters. Its blocks are in model.BLOCKS["wrn28_10"].

    python model.py --arch wrn28_10                       # its block table
    python finetune.py --ckpt Standard.pt --tune layer1   # fine-tune it (a GPU job: it is 100x ResNet-26)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import STAGE_PARAMS, Staged, he_fan_out


class WideBlock(nn.Module):
    """RobustBench's unit (its names: bn1, conv1, bn2, conv2, convShortcut): pre-activation; where the shape
    changes, the 1x1 shortcut conv and the residual branch both start from the activated input."""

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


class WideResNet28(Staged):
    """depth / width: smaller nets of the same names (tests)."""
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


def load_robustbench(state):
    """A RobustBench WideResNet state dict ({"state_dict": ...} or bare, "module." prefixes allowed) -> the
    model; None when the keys are not that network's."""
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "block1.layer.0.conv1.weight" not in state:
        return None
    # units per block: depth = 6n + 4
    n = len({k.split(".")[2] for k in state if k.startswith("block1.layer.")})
    width = state["block1.layer.0.conv1.weight"].shape[0] // 16
    model = WideResNet28(state["fc.weight"].shape[0], depth=6 * n + 4, width=width)
    model.load_state_dict(state)
    return model
