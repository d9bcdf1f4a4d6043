"""The paper's CIFAR checkpoint (--ckpt paper) on a fake file in its format: loaded by path and through the
hub cache, checksum-checked before unpickling, weights_only always, one line for each way it can fail."""
import hashlib
import os
import urllib.error

import numpy as np
import pytest
from tinydata import tune_names, one_lr
import torch

import checkpoints as CK
import model as M
import finetune as P
import model as wrn


@pytest.fixture
def fake_paper(tmp_path, monkeypatch):
    """A file in the TTT/MEMO format ({"err_cls": numpy float64, "err_ssh", "net", "optimizer"}, the final
    norm as "bn."), whose checksum is made the expected one; returns (path, the ResNet26 whose weights it
    holds)."""
    torch.manual_seed(0)
    net = M.build_model("resnet26")
    state = {("bn." + k[5:] if k.startswith("norm.") else k): v for k, v in net.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"err_cls": np.float64(0.0917), "err_ssh": 0, "net": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0]}]}}, path)
    monkeypatch.setattr(CK, "PAPER_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    loads = []
    real_load = torch.load

    def watched(*a, **kw):  # every load of this project is weights_only
        loads.append(kw.get("weights_only"))
        return real_load(*a, **kw)
    monkeypatch.setattr(torch, "load", watched)
    yield path, net
    assert all(w is True for w in loads)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_local_copy_loads_with_names_mapped(fake_paper):
    path, net = fake_paper
    model, ckpt = CK.load_checkpoint(str(path))
    assert same_weights(model, net) and ckpt["arch"] == "resnet26" and ckpt["args"]["holdout"] == 0
    assert ckpt["metrics"]["test_acc"] == 90.83


def test_paper_downloads_once_into_the_hub_cache(fake_paper, tmp_path, monkeypatch):
    path, net = fake_paper
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    got = []

    def download(url, dst, **kw):
        got.append(url)
        with open(dst, "wb") as f:
            f.write(path.read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):
        model, _ = CK.load_checkpoint("paper")
        assert same_weights(model, net)
    assert got == [CK.PAPER_URL]  # the second use reads the cache


def test_wrong_checksum_is_refused_before_unpickling(fake_paper, monkeypatch):
    path, _ = fake_paper
    monkeypatch.setattr(CK, "PAPER_SHA256", "0" * 64)
    monkeypatch.setattr(CK.torch, "load", lambda *a, **k: pytest.fail("unpickled a wrong file"))
    with pytest.raises(SystemExit) as e:
        CK.load_checkpoint(str(path))
    msg = str(e.value.code)
    assert msg.startswith("error:") and "sha256" in msg and CK.PAPER_URL in msg and "\n" not in msg


def test_offline_with_no_copy_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, **kw):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SystemExit) as e:
        CK.load_checkpoint("paper")
    msg = str(e.value.code)
    assert "could not download" in msg and "--ckpt" in msg and "\n" not in msg
    assert not os.listdir(tmp_path / "hub" / "checkpoints")  # nothing half-written


@pytest.mark.parametrize("what", ["truncated", "folder"])
def test_broken_file_or_folder_is_one_line(fake_paper, tmp_path, what):
    path, _ = fake_paper
    if what == "truncated":  # the published checksum can no longer match
        path.write_bytes(path.read_bytes()[:5000])
    target = str(tmp_path) if what == "folder" else str(path)
    with pytest.raises(SystemExit) as e:
        CK.load_checkpoint(target)
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg and ("folder" in msg if what == "folder" else True)


# -----------------------------------------------------------------------------
# RobustBench's WideResNet-28-10 (the CIFAR model of the authors' released code), on random weights

def test_wrn28_10_has_robustbench_names_and_a_disjoint_block_table():
    net = M.build_model("wrn28_10")
    assert sum(p.numel() for p in net.parameters()) == 36_479_194
    names = [n for n, _ in net.named_parameters()]
    assert {"conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
            "block3.layer.3.conv2.weight", "bn1.weight", "fc.weight", "fc.bias"} <= set(names)
    groups = M.block_params(net)
    blocks = [set(groups[b]) for b in ("layer1", "layer2", "layer3", "fc")]
    assert sum(map(len, blocks)) == len(set().union(*blocks))  # disjoint
    assert set(names) - set().union(*blocks) == {"bn1.weight", "bn1.bias"}  # the final norm: under all only
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # the stages chain to the whole forward pass
        assert torch.equal(net.eval()(x), net(net(x, stop=2), start=2))


def test_robustbench_file_loads_and_only_the_tuned_block_moves(tmp_path):
    from tinydata import make_images
    torch.manual_seed(0)
    small = wrn.WideResNet28(10, depth=10, width=1)  # one unit a block: same names, same code paths
    for m in small.modules():  # running statistics that are not the defaults, so a reset would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "Standard.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in small.state_dict().items()}}, path)
    net, ckpt = CK.load_checkpoint(str(path))
    assert ckpt["arch"] == "wrn28_10" and same_weights(net, small)
    x, y = (torch.from_numpy(a) for a in make_images(48, seed=1))
    splits = {"train": (x[:32], 9 - y[:32]), "val": (x[32:40], 9 - y[32:40]), "test": (x[40:], 9 - y[40:])}
    args = P.parse_args(["--tune", "layer2", "--epochs", "1", "--batch_size", "16", "--device", "cpu"])
    names = tune_names(net, "layer2")
    k = M.frozen_stages(net, names, splits, args.prefix_cache_gb)
    assert k == 2  # conv1 and block1 computed once: exact, BatchNorm in eval mode
    before = {n: t.clone() for n, t in net.state_dict().items()}
    cached = {s: (M.prefix(net, a, k), b) for s, (a, b) in splits.items()}
    one_lr(net, names, cached, 1e-2, args, start=k)
    for n, t in net.state_dict().items():  # block2's weights move; nothing else, running statistics included
        assert torch.equal(t, before[n]) != (n in names), n
