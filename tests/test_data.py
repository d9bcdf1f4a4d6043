import os
import urllib.error

import pytest
import torch

import data
from tinydata import write_cifar


def test_reader_handles_unusual_batch_sizes(tmp_path):
    write_cifar(tmp_path, train_sizes=(7, 130, 1), test_size=33)
    d = data.load_cifar10(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    x, y = d["train"]
    assert x.shape == (138, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert d["test"][0].shape == (33, 3, 32, 32)
    # the cache is written once and reproduces the tensors exactly
    assert len(os.listdir(tmp_path / "cache")) == 1
    d2 = data.load_cifar10(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(d2["train"][0], x) and torch.equal(d2["test"][1], d["test"][1])


def test_reader_matches_pickle_layout(tmp_path):
    import pickle
    folder = write_cifar(tmp_path, train_sizes=(5,), test_size=4)
    raw = pickle.load(open(os.path.join(folder, "data_batch_1"), "rb"), encoding="bytes")
    x, y = data.load_cifar10(str(tmp_path), cache_dir=None)["train"]
    # row-major 3072 = 3 planes of 32x32 (R, G, B)
    assert x[2, 1, 4, 7].item() == raw[b"data"][2][1024 + 4 * 32 + 7]
    assert y.tolist() == raw[b"labels"]


def test_missing_data_offline_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as e:
        data.load_cifar10(str(tmp_path / "nothing"), cache_dir=None)
    msg = str(e.value)
    assert msg.startswith("error:") and "cifar-10-batches-py" in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "nothing" / "cifar-10-batches-py")


def test_crop_flip_shape_dtype_and_alignment():
    n = 64
    x = torch.arange(1, n + 1, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    y = torch.arange(n)
    g = torch.Generator().manual_seed(0)
    xb, yb = next(data.batches(x, y, n, shuffle=True, generator=g))
    xb = data.crop_flip(xb, generator=g)
    assert xb.shape == (n, 3, 32, 32) and xb.dtype == torch.uint8
    # each image holds only its own value (label + 1) or the zero padding: labels stay aligned with images
    for img, label in zip(xb, yb):
        assert set(img.unique().tolist()) <= {0, label.item() + 1}
        assert (img == label + 1).float().mean() >= (28 / 32) ** 2  # at most 4 padded rows and columns
    assert (xb == 0).any()  # some crops did shift


def test_flip_is_a_horizontal_mirror():
    x = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    out = data.crop_flip(x, pad=0, generator=torch.Generator().manual_seed(1))
    same, mirrored = (out == x).flatten(1).all(1), (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 50 < mirrored.sum() < 150


def test_batches_cover_every_index_once():
    x, y = torch.zeros(50, 3, 32, 32, dtype=torch.uint8), torch.arange(50)
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([yb for _, yb in data.batches(x, y, 16, shuffle=True, generator=g)])
    assert sorted(seen.tolist()) == list(range(50))


def test_target_split_balanced_disjoint_seeded():
    y = torch.arange(10).repeat(30)[torch.randperm(300, generator=torch.Generator().manual_seed(3))]
    s = data.target_split(y, train_n=100, val_per_class=5, test_per_class=12, seed=7)
    for split, k in {"train": 10, "val": 5, "test": 12}.items():
        assert torch.bincount(y[s[split]], minlength=10).tolist() == [k] * 10
    sets = [set(v.tolist()) for v in s.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    again = data.target_split(y, train_n=100, val_per_class=5, test_per_class=12, seed=7)
    other = data.target_split(y, train_n=100, val_per_class=5, test_per_class=12, seed=8)
    assert all(torch.equal(s[k], again[k]) for k in s)
    assert not torch.equal(s["train"], other["train"])


def test_target_split_too_large_is_clear():
    y = torch.arange(10).repeat(20)
    with pytest.raises(SystemExit, match="lower --train_n"):
        data.target_split(y, train_n=200, val_per_class=10, test_per_class=90)


def test_holdout_moves_training_images_into_pool():
    d = {"train": (torch.zeros(30, 3, 32, 32, dtype=torch.uint8), torch.arange(30)),
         "test": (torch.ones(12, 3, 32, 32, dtype=torch.uint8), torch.arange(100, 112))}
    (xs, ys), (xp, yp) = data.source_and_pool(d, holdout=10)
    assert len(xs) == 20 and len(xp) == 22
    assert not set(ys.tolist()) & set(yp.tolist())  # nothing the source trains on is in the pool


def test_cifar_flip_has_no_fixed_point():
    y = torch.arange(10)
    f = data.flip_labels(y)
    assert (f != y).all() and sorted(f.tolist()) == list(range(10))
    x, yf = data.shifted_pool((torch.zeros(10, 3, 32, 32, dtype=torch.uint8), y), "cifar_flip")
    assert torch.equal(yf, f)
