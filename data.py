"""
CIFAR-10 as uint8 tensors, the paper's CIFAR distribution shifts generated on the device (CIFAR-10-C
corruptions, CIFAR-Flip labels), and the target splits (PROTOCOL section 4). The ImageNet family is in
family.py.

    python data.py                          # download (first use) and cache CIFAR-10, print its sizes
    python data.py --gallery gallery.png    # every corruption at every severity, labelled, on 2 images
"""
import argparse
import glob
import hashlib
import os
import pickle

import numpy as np
import torch

from common import file_digest, load_cache, save_cache
from corruptions import CORRUPTIONS

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


# -----------------------------------------------------------------------------
# CIFAR-10: the official python pickles -> uint8 (N,3,32,32) images + int64 labels, cached as one tensor file

def _read_batches(folder, names):
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
            x, y = np.asarray(d["data"], dtype=np.uint8), np.asarray(d["labels"], dtype=np.int64)
        except Exception as e:  # truncated, not a pickle, not a dict, no data / labels
            raise SystemExit(f"error: {path} is not a CIFAR-10 python batch ({type(e).__name__}); replace it "
                             f"with the file from the official archive {CIFAR_URL}")
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y) or ((y < 0) | (y > 9)).any():
            raise SystemExit(f"error: {path} holds data of shape {x.shape} and {len(y)} labels in "
                             f"{y.min(initial=0)}"
                             f"..{y.max(initial=0)}; expected (N, 3072) images and N labels in 0..9")
        xs.append(x.reshape(-1, 3, 32, 32))  # any number of images per file
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar10(data_dir="data", cache_dir="data/cache", download=True):
    """{"train": (x, y), "test": (x, y)} with x uint8 (N,3,32,32), y int64 (N,), on the CPU.

    Reads <data_dir>/cifar-10-batches-py (whatever number of images each batch file holds); when that folder
    is missing, downloads the official archive through torchvision. The decoded tensors are cached in
    cache_dir (None: no cache) with a checksum, keyed by the files' contents, so a reload takes a fraction of
    a second."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder) and download:
        try:
            import torchvision
            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        except Exception as e:  # offline, proxy, disk full...
            raise SystemExit(f"error: no CIFAR-10 in {folder} and the download failed ({type(e).__name__}); "
                             f"create that folder from {CIFAR_URL} (extract it into {data_dir}) or go online")
    train_files = sorted(glob.glob(os.path.join(folder, "data_batch_*")))
    if not train_files or not os.path.isfile(os.path.join(folder, "test_batch")):
        raise SystemExit(f"error: {folder} lacks data_batch_* or test_batch; "
                         f"extract the official archive {CIFAR_URL} into {data_dir}")
    files = train_files + [os.path.join(folder, "test_batch")]
    cache = os.path.join(cache_dir, f"cifar10_{file_digest(files)[:12]}.pt") if cache_dir else None
    out = load_cache(cache) if cache else None
    if out is None:
        out = {"train": _read_batches(folder, [os.path.basename(f) for f in train_files]),
               "test": _read_batches(folder, ["test_batch"])}
        if cache:
            save_cache(out, cache)
    return out


# -----------------------------------------------------------------------------
# on-device batches, airbench style: the whole split lives on the device, augmentation is tensor ops on the
# batch

def crop_flip(x, pad=4, generator=None):
    """Random crop with zero padding `pad` + horizontal flip, per image, as one gather. x: uint8 (N,C,H,W)."""
    n, _, h, w = x.shape
    g = dict(generator=generator, device=x.device)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (n, 1), **g), torch.randint(0, 2 * pad + 1, (n, 1), **g)
    rows = torch.arange(h, device=x.device) + dy  # (N,H) source rows in the padded image
    cols = torch.arange(w, device=x.device) + dx  # (N,W)
    flip = torch.rand(n, 1, **g) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)  # reading columns backwards flips the crop
    out = xp[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def batches(x, y, batch_size, shuffle=False, augment=False, generator=None, drop_last=False):
    """Yield (x, y) minibatches of a split already on its device; a fresh randperm per call when shuffling."""
    n = len(x)
    order = torch.arange(n, device=x.device)
    if shuffle:
        order = torch.randperm(n, generator=generator, device=x.device)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        xb = x[idx]
        yield (crop_flip(xb, generator=generator) if augment else xb), y[idx]


# -----------------------------------------------------------------------------
# corruptions (CIFAR-10-C): the functions and their names live in corruptions.py; here the presets and the
# checks

ALL19 = tuple(sorted(CORRUPTIONS))
# the paper's 14 (its Table 1 CIFAR-C column): the 19 without the five it does not list
NOT_IN_PAPER = ("brightness", "contrast", "defocus_blur", "elastic_transform", "fog")
PAPER14 = tuple(n for n in ALL19 if n not in NOT_IN_PAPER)
# the 15 of Hendrycks & Dietterich (2019), the unsupervised table's (PROTOCOL section 9)
STANDARD15 = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")


def _parse_names(spec, presets, valid, what):
    """A preset name, one name or a comma list -> tuple of names; one clear line for an unknown name."""
    names = presets.get(spec) or tuple(n for n in spec.split(",") if n)
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SystemExit(f"error: unknown {what} {','.join(bad) or spec!r}; valid: {', '.join(presets)} or "
                         f"any of {', '.join(valid)}")
    return names


def parse_corruptions(spec):
    """CIFAR-10-C: 'paper14' (the supervised table's), 'standard15' (the unsupervised table's: the 15 of
    Hendrycks & Dietterich), 'all19', one name or a comma list -> tuple of names."""
    return _parse_names(spec, {"paper14": PAPER14, "standard15": STANDARD15, "all19": ALL19}, ALL19,
                        "corruption")


def corrupt(x, name, severity, seed=0, generator=None):
    """Corrupt a uint8 batch (N,3,32,32) on any device; the same (seed, name, severity) gives the same images
    on the same device. Returns uint8, truncated like the reference's np.uint8."""
    parse_corruptions(name)
    if severity not in range(1, 6):
        raise SystemExit(f"error: severity {severity} is outside 1..5")
    g = generator or torch.Generator(device=x.device).manual_seed(seed)
    out = CORRUPTIONS[name](x.float() / 255, severity, g)
    return out if out.dtype == torch.uint8 else (out.clamp(0, 1) * 255).floor().to(torch.uint8)


# -----------------------------------------------------------------------------
# target data (PROTOCOL section 4): a labelled pool, a shift applied to it, and per-class train/val/test
# indices

def source_and_pool(d, holdout=0):
    """(source train x, y) and the target pool (x, y). The pool is the test split (the paper); holdout > 0
    also moves the last `holdout` training images into it, for small copies of CIFAR-10 whose test split is
    too small for the paper's per-class counts. The source model must then be trained with the same
    holdout."""
    (xt, yt), (xs, ys) = d["train"], d["test"]
    if not 0 <= holdout < len(xt):
        raise SystemExit(f"error: --holdout {holdout} must be in 0..{len(xt) - 1}: the training split has "
                         f"{len(xt):,d} images and some must stay for source training")
    if holdout:
        pool = (torch.cat([xs, xt[-holdout:]]), torch.cat([ys, yt[-holdout:]]))
        return (xt[:-holdout], yt[:-holdout]), pool
    return (xt, yt), (xs, ys)


def per_class_split(labels, counts, seed=0, flags=("--train_n", "--val_per_class", "--test_per_class")):
    """Per value v = 0..K-1 of labels, a seeded shuffle of its indices (one generator, values in order) cut
    into consecutive chunks of counts[i][v] images (None: all the rest): disjoint by construction. Returns one
    sorted int64 index tensor per chunk; flags[i], the flag that sets chunk i, is named when a value has too
    few."""
    g = torch.Generator().manual_seed(seed)
    chunks = [[] for _ in counts]
    for v in range(len(counts[0])):
        idx = (labels == v).nonzero().flatten()
        idx, start = idx[torch.randperm(len(idx), generator=g)], 0
        for i, c in enumerate(counts):
            n = len(idx) - start if c[v] is None else c[v]
            if start + n > len(idx) or (c[v] is None and n < 1):  # "the rest" must hold one image at least
                raise SystemExit(f"error: class/group {v} has {len(idx)} images, fewer than the "
                                 f"{start + max(n, 1)} "
                                 f"asked ({'+'.join(str(c[v] or 1) for c in counts[:i + 1])}); lower "
                                 f"{' or '.join(flags[:i + 1])}")
            chunks[i].append(idx[start:start + n])
            start += n
    return [torch.cat(c).sort().values for c in chunks]


def target_split(y, train_n=1000, val_per_class=10, test_per_class=90, seed=0, num_classes=10):
    """Per class: train_n/num_classes images for training, the next val_per_class for validation, the next
    test_per_class (0: all the rest) for test, from one seeded shuffle (per_class_split). Depends on labels
    and seed only, so every corruption and tune shares it. Returns {"train": idx, "val": idx, "test": idx}."""
    if train_n % num_classes or min(train_n, val_per_class) < 1 or test_per_class < 0:
        raise SystemExit(f"error: --train_n {train_n} must be a positive multiple of {num_classes} (balanced "
                         f"classes), --val_per_class {val_per_class} at least 1 and --test_per_class "
                         f"{test_per_class} >= 0")
    if (y < 0).any() or (y >= num_classes).any():
        raise SystemExit(f"error: labels outside 0..{num_classes - 1} in the target pool; is this CIFAR-10?")
    counts = [[n] * num_classes for n in (train_n // num_classes, val_per_class, test_per_class or None)]
    return dict(zip(("train", "val", "test"), per_class_split(y, counts, seed)))


def flip_labels(y, num_classes=10):
    """CIFAR-Flip: y -> 9 - y, a permutation without fixed points (the paper's exact map is unpublished)."""
    return num_classes - 1 - y


def load_release(folder, corruption, severity, expect_labels=None):
    """Images of the official CIFAR-10-C release (<folder>/<corruption>.npy: (50000,32,32,3) uint8, severities
    1..5 in blocks of 10,000 test images, and labels.npy) as uint8 (10000,3,32,32)."""
    path = os.path.join(folder, f"{corruption}.npy")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, "labels.npy")):
        raise SystemExit(f"error: {path} or labels.npy missing; --cifar10c_dir must hold the official "
                         "CIFAR-10-C release (https://zenodo.org/record/2535967)")
    x = np.load(path, mmap_mode="r")
    if x.shape != (50000, 32, 32, 3):
        raise SystemExit(f"error: {path} has shape {x.shape}, expected (50000, 32, 32, 3)")
    y = torch.from_numpy(np.load(os.path.join(folder, "labels.npy"))[(severity - 1) * 10000:severity * 10000])
    if expect_labels is not None and not torch.equal(y.long(), expect_labels):
        raise SystemExit(f"error: labels.npy in {folder} does not match the CIFAR-10 test labels; the "
                         "release stands in for the test split only (train without --holdout)")
    return torch.from_numpy(np.array(x[(severity - 1) * 10000:severity * 10000])).permute(0, 3, 1, 2)


def shifted_pool(pool, shift, severity=5, seed=0, cache_dir=None, device="cpu", release_dir=None):
    """The target pool under a shift: "cifar_flip" (clean images, flipped labels) or a corruption name,
    generated here or, with release_dir, read from the official CIFAR-10-C release (whose images replace the
    pool's). Generated on `device` in chunks; cached on disk keyed by (corruption, severity, seed, pool,
    device type), so a sweep generates each once. Returns CPU tensors."""
    x, y = pool
    if shift == "cifar_flip":
        return x, flip_labels(y)
    if release_dir:
        return load_release(release_dir, shift, severity, expect_labels=y).contiguous(), y
    device = torch.device(device)
    key = hashlib.sha1(x.numpy().tobytes()).hexdigest()[:10]
    name = f"{shift}_s{severity}_seed{seed}_{key}_{device.type}.pt"
    path = os.path.join(cache_dir, name) if cache_dir else None
    xc = load_cache(path) if path else None
    if xc is None:
        g = torch.Generator(device=device).manual_seed(seed)
        xc = torch.cat([corrupt(xb.to(device), shift, severity, generator=g).cpu() for xb in x.split(2000)])
        if path:
            save_cache(xc, path)
    return xc, y


def cifar_targets(args, corruptions, holdout, dev):
    """Yields (corruption, {"train"|"val"|"test": (x, y)} on dev, the clean test split on dev) for
    finetune.py, printing the data protocol first (PROTOCOL section 4)."""
    d = load_cifar10(args.data_dir, args.cache_dir)
    _, pool = source_and_pool(d, holdout)
    idx = target_split(pool[1], args.train_n, args.val_per_class, args.test_per_class, args.split_seed)
    shift = "labels y -> 9 - y" if args.data == "cifar_flip" else (
        f"{len(corruptions)} corruption(s) at severity {args.severity}, " +
        (f"read from {args.cifar10c_dir}" if args.cifar10c_dir
         else f"generated (seed {args.corruption_seed})"))
    print(f"target: {args.data}, {shift}; pool {len(pool[1]):,d} images (test split + {holdout} held out); "
          f"split (seed {args.split_seed}) per class: train {args.train_n // 10}, val {args.val_per_class}, "
          f"test {args.test_per_class or 'the rest'}")
    clean = tuple(t.to(dev) for t in d["test"])
    for c in corruptions:
        shift = args.data if args.data == "cifar_flip" else c
        xs, ys = shifted_pool(pool, shift, args.severity, args.corruption_seed, args.cache_dir, dev,
                              release_dir=args.cifar10c_dir or None)
        yield c, {s: (xs[i].to(dev), ys[i].to(dev)) for s, i in idx.items()}, clean


def gallery(x, path, names=ALL19, seed=0, scale=2):
    """PNG grid, labelled: a row per (corruption, image), columns clean then severities 1..5. x: uint8
    (n,3,32,32)."""
    from PIL import Image, ImageDraw  # torchvision's own dependency
    from torchvision.utils import make_grid
    rows = []
    for name in names:
        # n rows of 6
        rows += list(torch.stack([x] + [corrupt(x, name, s, seed=seed) for s in range(1, 6)], 1))
    grid = make_grid(torch.cat(rows), nrow=6, padding=1, pad_value=255)
    # 2x: a 32 px image is small on screen
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    cell, left, top = 33 * scale, 120, 14
    out = Image.new("RGB", (img.width + left, img.height + top), "white")
    out.paste(img, (left, top))
    draw = ImageDraw.Draw(out)
    for j, label in enumerate(["clean"] + [f"severity {s}" for s in range(1, 6)]):
        draw.text((left + j * cell + 2, 1), label, fill="black")
    for i, name in enumerate(names):  # the name against the first of its n rows
        draw.text((2, top + i * len(x) * cell + cell // 2 - 5), name, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data", help="folder holding (or to receive) cifar-10-batches-py")
    p.add_argument("--cache_dir", default="data/cache", help="where decoded and generated tensors are cached")
    p.add_argument("--gallery", default="",
                   help="write a PNG of every corruption at every severity to this path")
    p.add_argument("--images", default="3,7", help="test-image indices shown in the gallery")
    p.add_argument("--corruption", default="all19", help="gallery rows: a name, a comma list, a preset")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    d = load_cifar10(args.data_dir, args.cache_dir)
    for split, (x, y) in d.items():
        print(f"{split}: {tuple(x.shape)} {x.dtype}, labels per class "
              f"{torch.bincount(y, minlength=10).tolist()}")
    if args.gallery:
        idx = [int(i) for i in args.images.split(",")]
        gallery(d["test"][0][idx], args.gallery, parse_corruptions(args.corruption), args.seed)
        print(f"wrote {args.gallery}: rows {args.corruption} x images {idx}, columns clean + severities 1..5")


if __name__ == "__main__":
    main()
