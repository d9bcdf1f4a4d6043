"""Tiny CIFAR-format folders for the tests: the official pickle layout, any number of images per file."""
import os
import pickle
import re

import numpy as np


def make_images(n, seed=0, num_classes=10):
    """(n,3,32,32) uint8 images whose class shows as a colour bias, so a net can learn it; labels cycle
    classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    x = rng.integers(0, 160, (n, 3, 32, 32))
    x[np.arange(n), y % 3] += 40 + 8 * y[:, None, None]
    return x.clip(0, 255).astype(np.uint8), y


def write_cifar(root, train_sizes=(60, 45, 73), test_size=50, seed=0):
    """Write <root>/cifar-10-batches-py with data_batch_1.. of the given sizes and a test_batch; returns the
    folder."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    files = [(f"data_batch_{i + 1}", n) for i, n in enumerate(train_sizes)] + [("test_batch", test_size)]
    for i, (name, n) in enumerate(files):
        x, y = make_images(n, seed=seed + i)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y.tolist(), b"data": x.reshape(n, -1),
                         b"filenames": [f"{j}.png".encode() for j in range(n)]}, f)
    return folder


def narrow_resnet26(num_classes=10):
    """A narrow, shallow ResNet-26 with the same parameter names (n=2 units per stage, widths 8/8/16): ~30x
    faster on a CPU, same code paths. Tests patch it into model.ARCHS["resnet26"]."""
    import model
    return model.ResNet26(num_classes, n=2, widths=(8, 8, 16))


def tiny_resnet50(num_classes=1000, weights=None):
    """ResNet-50's shape and parameter names (stem, 4 bottleneck stages, fc; BatchNorm) with one unit per
    stage and narrow bottlenecks: runs on a CPU in milliseconds. Tests patch it into
    model.ARCHS["resnet50"]."""
    import model
    assert weights is None, "tests never download weights"
    return model.ResNet50(num_classes, layers=(1, 1, 1, 1), width=8)


def untag(name):
    """A result file name without its settings tag (-p<hash>, finetune.result_path): tests run at tiny
    settings."""
    return re.sub(r"-p[0-9a-f]{8}(?=\.json$|\.log$)", "", name)


def result_file(folder, name):
    """The one file in folder whose untagged name is name."""
    hits = [os.path.join(folder, f) for f in os.listdir(folder) if untag(f) == name]
    assert len(hits) == 1, (name, os.listdir(folder))
    return hits[0]


def untagged(folder):
    return sorted(untag(f) for f in os.listdir(folder))


def tune_names(net, tune):
    """The parameters a --tune value may train (a method: every one)."""
    import finetune
    import model
    return model.resolve_tune(net, "all" if tune in finetune.METHODS else tune)


def one_lr(net, names, splits, lr, args, start=0, l1_lambda=0.0):
    """finetune.train_one_lr with the source's epoch 0 first, as grid() writes
    it: (history, best state)."""
    import finetune
    import model
    v, t = (model.evaluate(net, splits[s], start) for s in ("val", "test"))
    e0 = finetune.entry(0, None, v, t, 0.0)
    h, best = finetune.train_one_lr(net, names, splits, start, lr, args,
                                    l1_lambda=l1_lambda)
    h["epochs"].insert(0, e0)
    return h, best
