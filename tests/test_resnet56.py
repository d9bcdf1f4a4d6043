"""The second CIFAR source, akamaster's BatchNorm ResNet-56, on random weights: its names and
size, the block table, only the tuned block moving with BatchNorm statistics untouched, the
file format it is published in (downloaded or local, checksum-checked), and its own columns
in the table."""
import copy
import hashlib
import json
import os

import pytest
import torch

import checkpoints
import finetune
import model
import table
from tinydata import make_images, one_lr, tune_names


def published(net, path):
    """net saved as akamaster's file: {"state_dict" with module. and linear., best_prec1}."""
    state = {"module." + ("linear." + k[3:] if k.startswith("fc.") else k): v
             for k, v in net.state_dict().items() if "num_batches" not in k}
    torch.save({"state_dict": state, "best_prec1": 93.62}, path)


def test_names_size_and_blocks():
    net = model.build_model("resnet56")
    names = [n for n, _ in net.named_parameters()]
    assert sum(p.numel() for p in net.parameters()) == 853_018
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"] and names[-1] == "fc.bias"
    groups = model.block_params(net)
    blocks = [set(groups[b]) for b in ("layer1", "layer2", "layer3", "fc")]
    assert sum(map(len, blocks)) == len(set().union(*blocks)) == len(names)  # disjoint, all
    assert {n.split(".")[0] for n in groups["layer1"]} == {"conv1", "bn1", "layer1"}


def test_only_the_block_moves_and_batchnorm_statistics_stay():
    torch.manual_seed(0)
    net = model.build_model("resnet56").eval()
    for m in net.modules():  # statistics that are not the defaults, so a change would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    x, y = (torch.from_numpy(a) for a in make_images(40, seed=2))
    splits = {"train": (x[:24], 9 - y[:24]), "val": (x[24:32], y[24:32]), "test": (x[32:], y[32:])}
    args = finetune.parse_args(["--tune", "layer2", "--epochs", "1", "--batch_size", "8",
                                "--device", "cpu"])
    names = tune_names(net, "layer2")
    k = model.frozen_stages(net, names, splits, args.prefix_cache_gb)
    assert k == 2  # conv1 and layer1 run once: exact, BatchNorm in eval mode
    tuned = copy.deepcopy(net)
    one_lr(tuned, names, {s: (model.prefix(net, a, k), b) for s, (a, b) in splits.items()},
           1e-2, args, start=k)
    for n, t in tuned.state_dict().items():  # layer2's weights move, nothing else does
        assert torch.equal(t, net.state_dict()[n]) != (n in names), n


def test_the_published_file_loads_online_and_offline(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = model.build_model("resnet56")
    path = tmp_path / "resnet56-4bfd9763.th"
    published(net, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    url, _, name = checkpoints.KNOWN["resnet56"]
    monkeypatch.setitem(checkpoints.KNOWN, "resnet56", (url, digest, name))
    monkeypatch.setattr(checkpoints, "RESNET56_SHA256", digest)
    loaded, ck = checkpoints.load_checkpoint(str(path))  # offline: a local path
    assert loaded.arch == "resnet56" and ck["metrics"]["test_acc"] == 93.62
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items()
               if "num_batches" not in k)
    args = finetune.parse_args(["--ckpt", str(path), "--corruption", "fog"])
    assert args.changed == {"ckpt": "resnet56"}  # a copy is named as the published file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    got = []

    def download(u, dst, progress=False):
        got.append(u)
        open(dst, "wb").write(path.read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    online, _ = checkpoints.load_checkpoint("resnet56")  # online: downloaded once
    checkpoints.load_checkpoint("resnet56")
    assert got == [url] and online.arch == "resnet56"
    open(tmp_path / "hub" / "checkpoints" / name, "ab").write(b"x")  # a changed file
    with pytest.raises(SystemExit) as e:
        checkpoints.load_checkpoint("resnet56")
    assert str(e.value.code).startswith("error:") and "sha256" in str(e.value.code)


def test_its_runs_get_columns_of_their_own(tmp_path):
    def put(tune, acc, seed):
        r = {"data": "cifar_flip", "corruption": "clean", "tune": tune, "seed": seed,
             "test_acc": acc, "val_acc": 50.0, "changed": {"ckpt": "resnet56"}, "args": {}}
        json.dump(r, open(os.path.join(tmp_path, f"f-{tune}-{seed}.json"), "w"))
    for s in range(3):
        put("fc", 80.0 + s, s), put("all", 60.0, s), put("layer1", 20.0, s)
    md = table.main(["--results", str(tmp_path)])
    assert "| CIFAR-F RN56 |" in md.splitlines()[2] + " |" and "| Full Fine-Tuning | " in md
    assert "| fc | +21.0 [" in md and "- CIFAR-F RN56: fc - all +21.0 [" in md
    assert "| Avg Rank |" in md and "| Full Fine-Tuning | no data |" in md  # not a paper column
