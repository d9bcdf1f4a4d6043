"""The ImageNet-family loaders of data.py on tiny fake folders (tests/fakefolders.py): counts, balance, labels
and groups as written, the BREEDS construction, decoding and its cache, and one clear line for each malformed
layout."""
import os
import shutil

import numpy as np
import pytest
import torch

import data
import imagenet as family
from fakefolders import (make_breeds_info, make_celeba, make_imagenet, make_imagenet_c, make_waterbirds,
                         write_image)


SIZE = 32  # px: tiny crops keep the file fast


def exits(fn, *args, **kw):
    """The message of the SystemExit fn raises (one line)."""
    with pytest.raises(SystemExit) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def spy_reads(monkeypatch):
    """Record the paths of every read_images call (still decoding them); returns the list of calls."""
    calls, real = [], family.read_images
    monkeypatch.setattr(family, "read_images",
                        lambda paths, *a, **k: calls.append(list(paths)) or real(paths, *a, **k))
    return calls


def group_of(rows, key="img_filename", attr="place"):
    """{file name: group 2*y + attribute} of the rows a builder wrote."""
    return {os.path.basename(r[key]): 2 * r["y"] + r[attr] for r in rows}


# ---------------------------------------------------------------------------- decoding

def test_read_images_resizes_crops_and_keeps_square(tmp_path):
    from torchvision.io import decode_image, read_file
    from torchvision.transforms.v2 import functional as F
    square = write_image(str(tmp_path / "square.png"), 3, h=SIZE, w=SIZE)
    write_image(str(tmp_path / "wide.JPEG"), 5)
    x = family.read_images([str(tmp_path / "square.png"), str(tmp_path / "wide.JPEG")], size=SIZE, threads=2)
    assert x.shape == (2, 3, SIZE, SIZE) and x.dtype == torch.uint8
    assert torch.equal(x[0], square)  # already size x size: kept as is
    # 40x48: shorter side to round(32*256/224) = 37 (37x44), then the central 32x32
    wide = decode_image(read_file(str(tmp_path / "wide.JPEG")))
    assert torch.equal(x[1], F.center_crop(F.resize(wide, 37, antialias=True), SIZE))
    assert not torch.equal(x[1], F.center_crop(wide, SIZE))


def test_read_images_cache_is_used_and_keyed(tmp_path, monkeypatch):
    paths = [str(tmp_path / f"{i}.JPEG") for i in range(3)]
    for i, p in enumerate(paths):
        write_image(p, i)
    cache = tmp_path / "cache"
    x = family.read_images(paths, SIZE, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 1
    monkeypatch.setattr(family, "_read_image", lambda *a: pytest.fail("decoded although cached"))
    assert torch.equal(family.read_images(paths, SIZE, cache_dir=str(cache)), x)
    monkeypatch.undo()
    os.utime(paths[1], ns=(1, 10**18))  # a changed file is a new key
    family.read_images(paths, SIZE, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 2
    monkeypatch.setattr(family, "CACHE_MAX_BYTES", 3 * 3 * SIZE * SIZE - 1)  # too big: decoded, not cached
    assert torch.equal(family.read_images(paths[::-1], SIZE, cache_dir=str(cache)), x.flip(0))
    assert len(os.listdir(cache)) == 2


def test_read_images_names_a_missing_or_broken_file(tmp_path):
    good = str(tmp_path / "good.JPEG")
    write_image(good, 0)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    broken = str(tmp_path / "broken.jpg")
    assert "broken.jpg cannot be decoded" in exits(family.read_images, [good, broken], SIZE)
    gone = str(tmp_path / "gone.jpg")
    assert f"{gone} is missing" in exits(family.read_images, [good, gone], SIZE)
    assert f"{gone} is missing" in exits(family.read_images, [good, gone], SIZE,
                                         cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------------------- ImageNet-C

def test_parse_imagenet_c():
    assert family.parse_imagenet_c("paper15") == family.IMAGENET_C15 and len(family.IMAGENET_C15) == 15
    assert len(family.parse_imagenet_c("all19")) == 19
    assert family.parse_imagenet_c("fog,snow") == ("fog", "snow")
    assert "speckle_noise" in family.parse_imagenet_c("all19")
    msg = exits(family.parse_imagenet_c, "fog,blurry")
    assert "blurry" in msg and "paper15" in msg and "jpeg_compression" in msg


def test_imagenet_c_files_labels_and_order(tmp_path):
    files = make_imagenet_c(str(tmp_path), ("fog",), (3, 5), per_class=4)
    paths, y, wnids = family.imagenet_c_files(str(tmp_path), "fog", 3)
    assert wnids == sorted(files) and y.dtype == torch.int64 and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [os.path.basename(p) for p in paths] == [f for w in wnids for f in sorted(files[w])]
    assert all(os.path.basename(os.path.dirname(p)) == wnids[k] for p, k in zip(paths, y.tolist()))
    assert all(f"{os.sep}3{os.sep}" in p for p in paths)


def test_imagenet_c_target_same_files_for_every_corruption(tmp_path, monkeypatch):
    make_imagenet_c(str(tmp_path / "c"), ("fog", "snow"), (5,), per_class=6)
    calls = spy_reads(monkeypatch)
    t = {c: family.family_target("imagenet_c", str(tmp_path / "c"), corruption=c, train_n=6, val_per_class=1,
                                 test_per_class=2, size=SIZE) for c in ("fog", "snow")}
    fog = t["fog"]
    assert fog["num_classes"] == 3 and fog["counts"] == {"train": 6, "val": 3, "test": 6}
    for split, n in (("train", 2), ("val", 1), ("test", 2)):
        x, y = fog[split]
        assert x.shape == (3 * n, 3, SIZE, SIZE) and torch.bincount(y, minlength=3).tolist() == [n] * 3
    assert fog["groups"] is None and fog["source_test"] is None
    assert len(calls) == 6 and sum(map(len, calls)) == 30  # only the returned images are decoded
    rel = [[os.path.relpath(p, str(tmp_path / "c" / c / "5")) for p in call]
           for call, c in zip(calls, ["fog"] * 3 + ["snow"] * 3)]
    assert rel[:3] == rel[3:]  # the same files under both corruptions
    assert not set(rel[0]) & set(rel[1]) and not set(rel[1]) & set(rel[2])  # splits disjoint
    assert not torch.equal(fog["train"][0], t["snow"]["train"][0])  # but the images differ
    msg = exits(family.family_source, "imagenet_c", str(tmp_path / "c"))
    assert msg.startswith("error: imagenet_c has no source")


def test_imagenet_c_layout_errors(tmp_path):
    root = str(tmp_path / "c")
    assert root in exits(family.imagenet_c_files, root, "fog")
    make_imagenet_c(root, ("fog",), (5,), per_class=2)
    os.makedirs(os.path.join(root, "Blur"))
    msg = exits(family.imagenet_c_files, root, "snow")
    assert os.path.join(root, "snow", "5") in msg and "holds the corruption folders Blur, fog" in msg
    assert "Blur: not ImageNet-C names" in msg
    assert os.path.join(root, "fog", "3") in exits(family.imagenet_c_files, root, "fog", 3)
    empty = os.path.join(root, "fog", "5", "n00000009")
    os.makedirs(empty)
    (tmp_path / "c" / "fog" / "5" / "n00000009" / "notes.txt").write_text("no images here")
    assert f"class folder {empty} holds no" in exits(family.imagenet_c_files, root, "fog")
    assert "unknown ImageNet-C corruption ''" in exits(family.family_target, "imagenet_c", root)


# ---------------------------------------------------------------------------- BREEDS

def test_breeds_classes_match_a_hand_computation(tmp_path):
    facts = make_breeds_info(str(tmp_path))
    for name, n_sub in (("living17", 4), ("entity30", 8)):
        supers, source, target, names = family.breeds_classes(name, str(tmp_path))
        f = facts[name]
        # living17: S3 is at level 5 only by the longest path (level 4 by the shortest),
        # so 3 superclasses not 2
        assert supers == f["superclasses"] == sorted(supers) and names == f["names"]
        for s, src, tgt in zip(supers, source, target):
            assert len(src) == len(tgt) == n_sub // 2 and not set(src) & set(tgt)
            assert set(src) | set(tgt) <= set(f["leaves"][s])
        # by hand: BREEDS' seed 2, one stream over the superclasses in order; here each superclass's pool (the
        # leaves under the children of its first node with more than one child) is all its leaves
        rng = np.random.RandomState(2)
        for s, src, tgt in zip(supers, source, target):
            pick = rng.choice(f["leaves"][s], n_sub, replace=False).tolist()
            assert src == pick[:n_sub // 2] and tgt == pick[n_sub // 2:]
    assert len(family.breeds_classes("entity30", str(tmp_path))[0]) == 2


def test_breeds_files_and_splits(tmp_path, monkeypatch):
    facts = make_breeds_info(str(tmp_path / "info"))
    make_imagenet(str(tmp_path / "in"), facts["leaves"], n_train=4, n_val=2)
    supers, source, target, _ = family.breeds_classes("living17", str(tmp_path / "info"))
    f = family.breeds_files("living17", str(tmp_path / "in"), str(tmp_path / "info"))
    for key, subs, per in (("source_train", source, 4), ("source_test", source, 2),
                           ("target_train", target, 4), ("target_test", target, 2)):
        paths, y = f[key]
        assert torch.bincount(y).tolist() == [2 * per] * 3  # 2 subclasses per superclass
        assert all(os.path.basename(os.path.dirname(p)) in subs[k] for p, k in zip(paths, y.tolist()))
        assert f"{os.sep}{'val' if key.endswith('test') else 'train'}{os.sep}" in paths[0]
    calls = spy_reads(monkeypatch)
    t = family.family_target("living17", str(tmp_path / "in"), str(tmp_path / "info"), train_n=10,
                             val_per_class=2, size=SIZE)
    assert t["num_classes"] == 3 and t["counts"] == {"train": 10, "val": 6, "test": 12}
    assert torch.bincount(t["train"][1]).tolist() == [4, 3, 3]  # 10 over 3: the first one more
    assert torch.bincount(t["val"][1]).tolist() == [2, 2, 2] and t["test"][0].shape == (12, 3, SIZE, SIZE)
    train, val, test = calls[1:4]  # calls[0]: source_test
    assert not set(train) & set(val) and set(train) | set(val) <= set(f["target_train"][0])
    assert sorted(test) == sorted(f["target_test"][0]) and sorted(calls[0]) == sorted(f["source_test"][0])
    assert t["source_test"][0].shape == (12, 3, SIZE, SIZE) and t["groups"] is None
    msg = exits(family.family_target, "living17", str(tmp_path / "in"), str(tmp_path / "info"),
                train_n=12, val_per_class=5)
    assert ("class/group 0 has 8 images, fewer than the 9 asked (4+5); "
            "lower --train_n or --val_per_class") in msg
    d, k = family.family_source("entity30", str(tmp_path / "in"), str(tmp_path / "info"), size=SIZE, limit=5)
    assert k == 2 and d["train"][0].shape == (5, 3, SIZE, SIZE)
    assert d["test"][0].shape == (2 * 4 * 2, 3, SIZE, SIZE)


def test_breeds_errors(tmp_path):
    info, root = str(tmp_path / "info"), str(tmp_path / "in")
    facts = make_breeds_info(info)
    make_imagenet(root, facts["leaves"], n_train=1, n_val=1)
    os.remove(os.path.join(info, "node_names.txt"))
    msg = exits(family.breeds_classes, "living17", info)
    assert os.path.join(info, "node_names.txt") in msg and "BREEDS-Benchmarks" in msg
    with open(os.path.join(info, "node_names.txt"), "w") as f:
        f.write("n00001740\tentity\nn10000001 physical entity without a tab\n")
    assert "node_names.txt line 2 is malformed" in exits(family.breeds_classes, "living17", info)
    with open(os.path.join(info, "class_hierarchy.txt"), "a") as f:
        f.write("n00001740\n")
    assert "class_hierarchy.txt line" in exits(family.breeds_classes, "living17", info)
    make_breeds_info(info)
    gone = os.path.join(root, "train", family.breeds_classes("living17", info)[2][1][0])  # a target subclass
    shutil.rmtree(gone)
    assert f"class folder {gone} is missing" in exits(family.breeds_files, "living17", root, info)
    shutil.rmtree(os.path.join(root, "val"))
    assert os.path.join(root, "val") in exits(family.breeds_files, "living17", root, info)


# ---------------------------------------------------------------------------- Waterbirds and CelebA

def test_waterbirds_groups_and_balanced_target(tmp_path, monkeypatch):
    rows = make_waterbirds(str(tmp_path))
    s = family.group_files("waterbirds", str(tmp_path))
    truth = group_of(rows)
    for k, split in enumerate(("train", "val", "test")):
        paths, y, g = s[split]
        assert len(paths) == sum(r["split"] == k for r in rows)
        assert g.tolist() == [truth[os.path.basename(p)] for p in paths] and torch.equal(y, g // 2)
    calls = spy_reads(monkeypatch)
    t = family.family_target("waterbirds", str(tmp_path), train_n=8, val_per_class=3, size=SIZE)
    assert t["num_classes"] == 2 and t["counts"] == {"train": 8, "val": 12, "test": 12}
    assert t["source_test"] is None
    train, val, test = calls
    assert sorted(truth[os.path.basename(p)] for p in train) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.bincount(t["groups"]["val"]).tolist() == [3] * 4 and not set(train) & set(val)
    assert sorted(test) == sorted(s["test"][0]) and torch.equal(t["groups"]["test"] // 2, t["test"][1])
    assert set(train) | set(val) <= set(s["val"][0])
    d, k = family.family_source("waterbirds", str(tmp_path), size=SIZE)
    assert k == 2 and len(d["train"][1]) == 12 and d["test"] is None
    assert "multiple of 4" in exits(family.family_target, "waterbirds", str(tmp_path), train_n=10)
    msg = exits(family.family_target, "waterbirds", str(tmp_path), train_n=8, val_per_class=5)
    assert "lower --train_n or --val_per_class" in msg
    assert "lower --test_per_class" in exits(family.family_target, "waterbirds", str(tmp_path), train_n=8,
                                             val_per_class=3, test_per_class=4)


def test_waterbirds_errors(tmp_path):
    make_waterbirds(str(tmp_path), {"train": (1, 1, 1, 1), "val": (1, 1, 1, 1), "test": (1, 1, 1, 1)})
    path = str(tmp_path / "metadata.csv")
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(line.rsplit(",", 2)[0] for line in lines) + "\n")  # drop place, place_filename
    msg = exits(family.group_files, "waterbirds", str(tmp_path))
    assert path in msg and "lacks the column place" in msg and "img_filename, y, split, place" in msg
    with open(path, "w") as f:
        bad = lines[3].split(",")
        f.write("\n".join(lines[:3] + [",".join(bad[:3] + ["7"] + bad[4:])] + lines[4:]) + "\n")  # split 7
    assert f"{path}, line 4: split is '7'" in exits(family.group_files, "waterbirds", str(tmp_path))
    os.remove(path)
    assert path in exits(family.family_target, "waterbirds", str(tmp_path))
    assert "pass --data_dir" in exits(family.family_target, "waterbirds", None)


def test_celeba_groups_and_errors(tmp_path):
    rows = make_celeba(str(tmp_path))
    s = family.group_files("celeba", str(tmp_path))
    truth = group_of(rows, key="file", attr="male")
    for k, split in enumerate(("train", "val", "test")):
        paths, y, g = s[split]
        assert len(paths) == sum(r["split"] == k for r in rows)
        assert g.tolist() == [truth[os.path.basename(p)] for p in paths] and torch.equal(y, g // 2)
        assert all(p.startswith(str(tmp_path / "celeba" / "img_align_celeba")) for p in paths)
    t = family.family_target("celeba", str(tmp_path), train_n=4, val_per_class=2, test_per_class=1, size=SIZE)
    assert t["counts"] == {"train": 4, "val": 8, "test": 4}
    assert sorted(t["groups"]["test"].tolist()) == [0, 1, 2, 3]
    # an image file referenced but missing: named when it is read (the whole test split is read here)
    first_test = [r for r in rows if r["split"] == 2][0]["file"]
    gone = os.path.join(str(tmp_path), "celeba", "img_align_celeba", first_test)
    os.remove(gone)
    assert f"{gone} is missing" in exits(family.family_target, "celeba", str(tmp_path), train_n=4,
                                         val_per_class=2, test_per_class=0, size=SIZE,
                                         cache_dir=str(tmp_path / "cache"))
    attr = str(tmp_path / "celeba" / "list_attr_celeba.txt")
    text = open(attr).read()
    with open(attr, "w") as f:
        f.write(text.replace("Blond_Hair", "Blonde"))
    msg = exits(family.group_files, "celeba", str(tmp_path))
    assert attr in msg and "lacks the attribute column Blond_Hair" in msg
    lines = text.splitlines()
    fields = lines[3].split()
    fields[1 + lines[1].split().index("Blond_Hair")] = "0"  # field 0 is the file name
    with open(attr, "w") as f:
        f.write("\n".join(lines[:3] + [" ".join(fields)] + lines[4:]) + "\n")
    msg = exits(family.group_files, "celeba", str(tmp_path))
    assert f"{attr}, line 4: Blond_Hair is '0'; expected one of -1, 1" in msg
    os.remove(str(tmp_path / "celeba" / "list_eval_partition.txt"))
    assert "list_eval_partition.txt is missing" in exits(family.group_files, "celeba", str(tmp_path))


def test_balanced_indices():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 0])
    a, b, c = data.per_class_split(labels, [[2, 1, 1], [1, 1, 0], [None, None, None]], seed=3)
    assert labels[a].tolist().count(0) == 2 and torch.bincount(labels[b], minlength=3).tolist() == [1, 1, 0]
    assert torch.bincount(labels[c], minlength=3).tolist() == [2, 1, 1]  # the rest
    assert sorted(torch.cat([a, b, c]).tolist()) == list(range(10))  # disjoint and covering
    again = data.per_class_split(labels, [[2, 1, 1], [1, 1, 0], [None, None, None]], seed=3)
    assert all(torch.equal(i, j) for i, j in zip((a, b, c), again))
    msg = exits(data.per_class_split, labels, [[1, 1, 1], [1, 1, 2]])
    assert ("class/group 2 has 2 images, fewer than the 3 asked (1+2); "
            "lower --train_n or --val_per_class") in msg
