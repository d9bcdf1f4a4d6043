import pytest
import torch

import model as M


# PROTOCOL.md section 1: exact parameter counts of the paper's ResNet-26
COUNTS = {"conv1": 432, "layer1": 18688, "layer2": 69600, "layer3": 277440, "norm": 128, "fc": 650}


def test_parameter_counts():
    net = M.build_model("resnet26")
    by_top = {}
    for n, p in net.named_parameters():
        by_top[n.split(".")[0]] = by_top.get(n.split(".")[0], 0) + p.numel()
    assert by_top == COUNTS
    assert sum(p.numel() for p in net.parameters()) == 366938


def test_block_table_disjoint_and_covering():
    net = M.build_model()
    groups = M.block_params(net)
    blocks = [b for b in groups if b != "all"]
    seen = {}
    for b in blocks:
        for n in groups[b]:
            assert n not in seen, f"{n} is in both {seen.get(n)} and {b}"
            seen[n] = b
    rest = set(groups["all"]) - set(seen)
    assert rest == {"norm.weight", "norm.bias"}  # the final norm trains only under "all"
    assert sum(p.numel() for n, p in net.named_parameters() if n in groups["layer1"]) == 432 + 18688


@pytest.mark.parametrize("tune", ["none", "layer1", "layer2", "layer3", "fc", "all", "layer2.0.,fc."])
def test_freeze_leaves_only_chosen_block(tune):
    net = M.build_model()
    names = M.resolve_tune(net, tune)
    params = M.freeze_except(net, names)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == set(names) and len(params) == len(names)
    if tune in M.BLOCKS["resnet26"]:
        assert all(n.startswith(M.BLOCKS["resnet26"][tune]) for n in trainable)
    # gradients reach exactly the trainable parameters
    if names:
        net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).sum().backward()
        assert {n for n, p in net.named_parameters() if p.grad is not None} == trainable


def test_unknown_tune_is_one_clear_line():
    with pytest.raises(SystemExit, match="matches no parameter"):
        M.resolve_tune(M.build_model(), "layer9")


def test_stages_compose_and_prefix_start():
    net = M.build_model().eval()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    h = net(x, stop=2)  # conv1 + layer1
    assert h.shape == (3, 16, 32, 32)
    assert torch.equal(net(h, start=2), net(x))
    assert M.first_stage(M.resolve_tune(net, "layer2")) == 2
    assert M.first_stage(M.resolve_tune(net, "fc")) == len(M.STAGES["resnet26"]) - 1
    assert M.first_stage(M.resolve_tune(net, "layer1")) == 0


def test_input_normalisation():
    net = M.build_model()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    # uint8 in equals the normalised float (x/255 - 0.5)/0.5 in
    assert torch.allclose(net(x), net((x.float() / 255 - 0.5) / 0.5), atol=1e-5)


# ResNet-50 (ImageNet family): torchvision's network with its names, so its weights load as they are

def test_resnet50_block_table():
    net = M.build_model("resnet50", 1000)
    groups = M.block_params(net)
    blocks = [b for b in groups if b != "all"]
    assert blocks == ["layer1", "layer2", "layer3", "layer4", "fc"]
    seen = [n for b in blocks for n in groups[b]]
    # disjoint, and no final norm: covering
    assert len(seen) == len(set(seen)) and set(seen) == set(groups["all"])
    assert {"conv1.weight", "bn1.weight", "bn1.bias"} <= set(groups["layer1"])  # the stem rides with layer1
    assert sum(p.numel() for p in net.parameters()) == 25_557_032
    assert "25,557,032" in M.block_table(net)
    assert M.build_model("resnet50", 17).fc.out_features == 17


def test_resnet50_matches_torchvision():
    """Same state-dict keys and shapes as torchvision's resnet50, and the same function once those weights are
    loaded: uint8 in here equals ImageNet-normalised float into torchvision's (what the IMAGENET1K weights
    expect)."""
    from torchvision.models import resnet50
    from tinydata import tiny_resnet50
    tv, ours = resnet50(), M.build_model("resnet50", 1000)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in tv.state_dict().items()} == shapes
    torch.manual_seed(0)
    small = tiny_resnet50(5).eval()
    from torchvision.models.resnet import Bottleneck, ResNet
    ref = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=8).eval()
    ref.load_state_dict(small.state_dict())
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    mean, std = torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(small(x), ref((x.float() / 255 - mean) / std), atol=1e-4)
        h = small(x, stop=3)  # stem + layer1 + layer2
        assert h.shape == (2, 512, 8, 8) and torch.equal(small(h, start=3), small(x))
    names = M.resolve_tune(small, "layer3")
    assert M.first_stage(names, "resnet50") == 3
    assert M.first_stage(M.resolve_tune(small, "layer1"), "resnet50") == 0
    assert M.first_stage(M.resolve_tune(small, "fc"), "resnet50") == len(M.STAGES["resnet50"]) - 1


def test_resnet50_weights_offline_is_one_line(monkeypatch):
    from torchvision.models import ResNet50_Weights

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(type(ResNet50_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(SystemExit, match="--weights none"):
        M.build_model("resnet50", 1000, weights="imagenet")
    with pytest.raises(SystemExit, match="resnet50 only"):
        M.build_model("resnet26", 10, weights="imagenet")
