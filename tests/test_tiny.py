"""Our feature-level shift from Tiny-ImageNet-200 (imagenet.tiny_files, --data tiny_breeds)
on tiny fake folders in its layout: the BREEDS rule's superclasses, source and target
subclasses apart, the extra classes of some copies dropped, one line for each broken
layout, and train.py then finetune.py end to end."""
import os

import pytest
import torch

import finetune
import imagenet
import train
from fakefolders import make_breeds_info, make_tiny

pytestmark = pytest.mark.usefixtures("small_net")


@pytest.fixture
def tiny_folder(tmp_path, monkeypatch):
    facts = make_breeds_info(str(tmp_path / "breeds"))
    monkeypatch.setattr(imagenet, "TINY_N", len(facts["leaves"]))
    root = make_tiny(str(tmp_path / "tiny"), facts["leaves"], extra=imagenet.TINY_EXTRA)
    return root, str(tmp_path / "breeds")


def one_line(fn, *a):
    with pytest.raises(SystemExit) as e:
        fn(*a)
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


def test_superclasses_and_their_halves(tiny_folder, capsys):
    root, info = tiny_folder
    f = imagenet.tiny_files(root, info)
    assert "n02480855, n10148035 beyond the official" in capsys.readouterr().out
    src = {p.split(os.sep)[-3] for p in f["source_train"][0]}
    tgt = {p.split(os.sep)[-3] for p in f["target_train"][0]}
    assert src and tgt and not src & tgt and not (src | tgt) & set(imagenet.TINY_EXTRA)
    k = int(f["source_train"][1].max()) + 1  # superclasses: 2 source + 2 target classes each
    assert len(src) == len(tgt) == 2 * k and k >= 2
    assert torch.equal(f["source_train"][1].bincount(), torch.full((k,), 8))  # 2 x 4 images
    assert len(f["target_test"][0]) == 2 * 2 * k  # val images of the target classes


@pytest.mark.parametrize("damage, says", [
    ("train", "train is missing"), ("val/val_annotations.txt", "val_annotations.txt is missing"),
    ("unknown", "unknown class 'n99999999'"), ("count", "lists")])
def test_a_broken_folder_is_one_line(tiny_folder, damage, says, monkeypatch):
    root, info = tiny_folder
    if damage == "unknown":
        with open(os.path.join(root, "val", "val_annotations.txt"), "a") as f:
            f.write("val_x.JPEG\tn99999999\t0\t0\t1\t1\n")
    elif damage == "count":
        monkeypatch.setattr(imagenet, "TINY_N", 200)
    else:
        os.rename(os.path.join(root, damage), os.path.join(root, damage + ".gone"))
    assert says in one_line(imagenet.tiny_files, root, info)


def test_train_then_finetune_a_middle_block(tiny_folder, tmp_path):
    root, info = tiny_folder
    ckpt = str(tmp_path / "src.pt")
    train.main(["--data", "tiny_breeds", "--data_dir", root, "--breeds_dir", info, "--epochs", "1",
                "--batch_size", "8", "--device", "cpu", "--cache_dir", "", "--out", ckpt])
    res, = finetune.main(["--data", "tiny_breeds", "--data_dir", root, "--breeds_dir", info,
                          "--ckpt", ckpt, "--tune", "layer2", "--train_n", "12",
                          "--val_per_class", "1", "--epochs", "1", "--device", "cpu",
                          "--cache_dir", "", "--out_dir", str(tmp_path / "res")])
    assert res["data"] == "tiny_breeds" and res["args"]["image_size"] == 32
    assert all(n.startswith("layer2.") for n in res["trained"]["names"])
    assert res["source_acc"] is not None  # measured on the source classes' val images
