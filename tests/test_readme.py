"""The README's "Hacking" recipes, run as written: each Python block is
executed in the module its comment names, then the new corruption, block and
method go through finetune.py, the block table and table.py."""
import argparse
import json
import os
import re

import pytest

import checkpoints
import corruptions
import data
import finetune
import model
import table
from tinydata import result_file

pytestmark = pytest.mark.usefixtures("small_net")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(word):
    """The Python block after the README paragraph that starts **A <word>"""
    text = open(os.path.join(ROOT, "README.md")).read()
    part = text[text.index(f"**A {word}"):]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


def run(tiny, out, *flags):
    root, src = tiny
    argv = ["--ckpt", src, "--data_dir", str(root), "--cache_dir", str(root / "cache"),
            "--device", "cpu", "--train_n", "50", "--val_per_class", "2", "--test_per_class", "3",
            "--epochs", "1", "--batch_size", "25", "--lrs", "1e-2", "--out_dir", str(out), *flags]
    return finetune.main(argv)


def test_a_new_corruption(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(corruptions, "CORRUPTIONS", dict(corruptions.CORRUPTIONS))
    exec(recipe("corruption"), vars(corruptions))
    assert "my_blur" in data.parse_names("all")
    assert len(data.parse_names("paper14")) == 14
    assert len(data.parse_names("standard15")) == 15
    res, = run(tiny, tmp_path, "--corruption", "my_blur", "--tune", "fc")
    assert res["corruption"] == "my_blur" and 0 <= res["test_acc"] <= 100
    assert finetune.parse_args([]).corruption == "paper14"  # the default run did not grow


def test_a_new_block(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(model, "BLOCKS", {a: dict(b) for a, b in model.BLOCKS.items()})
    monkeypatch.setitem(model.ARCHS, "resnet26", model.ResNet26)  # 4 units a stage
    exec(recipe("block"), vars(model))
    net = model.build_model()
    assert model.resolve_tune(net, "layer3b") == [
        n for n, _ in net.named_parameters() if n.startswith(("layer3.2.", "layer3.3."))]
    assert "layer3b" in model.block_table(net) and "layer3b" in table.blocks()
    src = str(tmp_path / "full.pt")  # a random source of the full size, tiny's holdout
    checkpoints.save_checkpoint(src, net, argparse.Namespace(holdout=60), {})
    res, = run((tiny[0], src), tmp_path, "--corruption", "gaussian_noise", "--tune", "layer3b")
    assert res["trained"]["names"] and all(n.startswith("layer3.") for n in res["trained"]["names"])


def test_a_new_method(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, "METHODS", dict(finetune.METHODS))
    exec(recipe("method"), vars(finetune))
    res, = run(tiny, tmp_path, "--corruption", "gaussian_noise", "--tune", "bias")
    names = res["trained"]["names"]
    assert names and all(n.endswith(".bias") for n in names)
    path = result_file(tmp_path, "cifar_c-gaussian_noise-bias-s0.json")
    assert json.load(open(path))["tune"] == "bias"
    md = table.main(["--results", str(tmp_path)])
    assert re.search(r"^\| bias\[[^|]*\| \d", md, re.M)  # a row of its own
