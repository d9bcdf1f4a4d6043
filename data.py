"""
CIFAR-10 as uint8 tensors, the CIFAR shifts (CIFAR-10-C corruptions generated
on the device, CIFAR-Flip labels) and the target splits (PROTOCOL.md section
4). The ImageNet family's folders are read by imagenet.py.

    python data.py                          # download (first use), cache, sizes
    python data.py --gallery gallery.png    # every corruption x severity
"""
import argparse
import glob
import hashlib
import os
import pickle

import numpy as np
import torch

import common
import corruptions

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


# -----------------------------------------------------------------------------
# CIFAR-10: the official pickles -> uint8 (N,3,32,32) + int64 labels, cached

def read_batches(folder, names):
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
            x = np.asarray(d["data"], dtype=np.uint8)
            y = np.asarray(d["labels"], dtype=np.int64)
        except Exception as e:  # truncated, not a pickle, no data / labels
            raise SystemExit(
                f"error: {path} is not a CIFAR-10 python batch "
                f"({type(e).__name__}); replace it with the file from the "
                f"official archive {CIFAR_URL}")
        if (x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y)
                or ((y < 0) | (y > 9)).any()):
            raise SystemExit(
                f"error: {path} holds data of shape {x.shape} and {len(y)} "
                f"labels in {y.min(initial=0)}..{y.max(initial=0)}; expected "
                "(N, 3072) images and N labels in 0..9")
        xs.append(x.reshape(-1, 3, 32, 32))  # any number of images a file
        ys.append(y)
    return (torch.from_numpy(np.concatenate(xs)),
            torch.from_numpy(np.concatenate(ys)))


def load_cifar10(data_dir="data", cache_dir="data/cache", download=True):
    """{"train": (x, y), "test": (x, y)}, x uint8 (N,3,32,32), on the CPU,
    from <data_dir>/cifar-10-batches-py (downloaded through torchvision when
    missing). Cached in cache_dir ("" = none), keyed by the files' bytes."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder) and download:
        try:
            import torchvision
            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        except Exception as e:  # offline, proxy, disk full
            raise SystemExit(
                f"error: no CIFAR-10 in {folder} and the download failed "
                f"({type(e).__name__}); pass --data_dir <folder holding "
                f"cifar-10-batches-py>, extract {CIFAR_URL} into {data_dir}, "
                "or go online")
    train = sorted(glob.glob(os.path.join(folder, "data_batch_*")))
    test = os.path.join(folder, "test_batch")
    if not train or not os.path.isfile(test):
        raise SystemExit(f"error: {folder} lacks data_batch_* or test_batch; "
                         f"extract the official archive {CIFAR_URL} into {data_dir}")
    cache = None
    if cache_dir:
        key = common.file_digest(train + [test])[:12]
        cache = os.path.join(cache_dir, f"cifar10_{key}.pt")
    out = common.load_cache(cache) if cache else None
    if out is None:
        out = {"train": read_batches(folder, [os.path.basename(f) for f in train]),
               "test": read_batches(folder, ["test_batch"])}
        if cache:
            save_cache(out, cache)
    return out


def save_cache(obj, path):
    """A cache is optional: a full disk or a read-only folder costs a warning."""
    try:
        common.save_cache(obj, path)
    except OSError as e:
        print(f"warning: cannot write the cache {path} ({e.strerror}); going on "
              "without it")


# -----------------------------------------------------------------------------
# the corruptions' names (corruptions.py registers the functions)

# The paper's 14 (its Table 1 CIFAR-C column) and the standard 15 of
# Hendrycks & Dietterich (the unsupervised table's): fixed lists, so a new
# corruption joins neither.
PAPER14 = ("frost", "gaussian_blur", "gaussian_noise", "glass_blur", "impulse_noise",
           "jpeg_compression", "motion_blur", "pixelate", "saturate", "shot_noise",
           "snow", "spatter", "speckle_noise", "zoom_blur")
STANDARD15 = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
              "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog",
              "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")


def parse_names(spec, presets=None, valid=None, what="corruption"):
    """A preset, one name or a comma list -> tuple of names; one line for an
    unknown name. Default: the CIFAR-10-C registry, presets paper14,
    standard15 and all (every registered corruption)."""
    valid = valid or tuple(sorted(corruptions.CORRUPTIONS))
    presets = presets or {"paper14": PAPER14, "standard15": STANDARD15, "all": valid}
    names = presets.get(spec) or tuple(n for n in spec.split(",") if n)
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SystemExit(f"error: unknown {what} {','.join(bad) or spec!r}; valid: "
                         f"{', '.join(presets)} or any of {', '.join(valid)}")
    return names


def corrupt(x, name, severity, seed=0, generator=None):
    """Corrupt a uint8 batch (N,3,32,32) on its device; the same (seed, name,
    severity) gives the same images on the same device. uint8 out,
    truncated like the reference's np.uint8."""
    parse_names(name)
    if severity not in range(1, 6):
        raise SystemExit(f"error: severity {severity} is outside 1..5")
    g = generator or torch.Generator(device=x.device).manual_seed(seed)
    out = corruptions.CORRUPTIONS[name](x.float() / 255, severity, g)
    if out.dtype == torch.uint8:
        return out
    return (out.clamp(0, 1) * 255).floor().to(torch.uint8)


# -----------------------------------------------------------------------------
# batches on the device, airbench style: augmentation is tensor ops

def crop_flip(x, pad=4, generator=None):
    """Random crop (zero padding pad) + horizontal flip per image, one gather.
    x: uint8 (N,C,H,W)."""
    n, _, h, w = x.shape
    g = dict(generator=generator, device=x.device)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), **g)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), **g)
    rows = torch.arange(h, device=x.device) + dy  # (N,H) rows in the padded image
    cols = torch.arange(w, device=x.device) + dx  # (N,W)
    flip = torch.rand(n, 1, **g) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)  # columns read backwards: a flip
    i = torch.arange(n, device=x.device)[:, None, None]
    out = xp[i, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def batches(x, y, batch_size, shuffle=False, generator=None):
    """(x, y) minibatches of a split on its device; a fresh randperm a call."""
    order = torch.arange(len(x), device=x.device)
    if shuffle:
        order = torch.randperm(len(x), generator=generator, device=x.device)
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


# -----------------------------------------------------------------------------
# target data (PROTOCOL.md section 4): a pool, a shift, per-class splits

def source_and_pool(d, holdout=0):
    """(source train (x, y), target pool (x, y)). The pool is the test split
    (the paper); holdout > 0 moves the last training images into it too, for
    small copies of CIFAR-10 (the source must be trained with the same)."""
    (xt, yt), (xs, ys) = d["train"], d["test"]
    if not 0 <= holdout < len(xt):
        raise SystemExit(
            f"error: --holdout {holdout} must be in 0..{len(xt) - 1}: the "
            f"training split has {len(xt):,d} images and some must stay")
    if holdout:
        pool = (torch.cat([xs, xt[-holdout:]]), torch.cat([ys, yt[-holdout:]]))
        return (xt[:-holdout], yt[:-holdout]), pool
    return (xt, yt), (xs, ys)


FLAGS = ("--train_n", "--val_per_class", "--test_per_class")


def per_class_split(labels, counts, seed=0, flags=FLAGS):
    """For each value v of labels, a seeded shuffle of its indices (one
    generator, values in order) cut into chunks of counts[i][v] images (None:
    the rest): disjoint by construction. One sorted index tensor a chunk."""
    g = torch.Generator().manual_seed(seed)
    chunks = [[] for _ in counts]
    for v in range(len(counts[0])):
        idx = (labels == v).nonzero().flatten()
        idx, start = idx[torch.randperm(len(idx), generator=g)], 0
        for i, c in enumerate(counts):
            n = len(idx) - start if c[v] is None else c[v]
            if start + n > len(idx) or (c[v] is None and n < 1):
                asked = "+".join(str(c[v] or 1) for c in counts[:i + 1])
                raise SystemExit(
                    f"error: class/group {v} has {len(idx)} images, fewer than "
                    f"the {start + max(n, 1)} asked ({asked}); lower "
                    f"{' or '.join(flags[:i + 1])}")
            chunks[i].append(idx[start:start + n])
            start += n
    return [torch.cat(c).sort().values for c in chunks]


def target_split(y, train_n=1000, val_per_class=10, test_per_class=90, seed=0,
                 num_classes=10):
    """Per class: train_n/num_classes train, the next val_per_class val, the
    next test_per_class (0: the rest) test. Labels and seed decide it, so
    every corruption and tune shares it. {"train"|"val"|"test": idx}."""
    if train_n % num_classes or min(train_n, val_per_class) < 1 or test_per_class < 0:
        raise SystemExit(
            f"error: --train_n {train_n} must be a positive multiple of "
            f"{num_classes} (balanced classes), --val_per_class {val_per_class} "
            f"at least 1 and --test_per_class {test_per_class} >= 0")
    if (y < 0).any() or (y >= num_classes).any():
        raise SystemExit(f"error: labels outside 0..{num_classes - 1} in the "
                         "target pool; is this CIFAR-10?")
    per = (train_n // num_classes, val_per_class, test_per_class or None)
    idx = per_class_split(y, [[n] * num_classes for n in per], seed)
    return dict(zip(("train", "val", "test"), idx))


def flip_labels(y, num_classes=10):
    """CIFAR-Flip: y -> 9 - y, no fixed point (the paper's map is unpublished)."""
    return num_classes - 1 - y


def load_release(folder, corruption, severity, expect_labels=None):
    """The official CIFAR-10-C release (<folder>/<corruption>.npy, 5 severities
    x 10,000 test images, and labels.npy) as uint8 (10000,3,32,32)."""
    path = os.path.join(folder, f"{corruption}.npy")
    labels = os.path.join(folder, "labels.npy")
    if not os.path.isfile(path) or not os.path.isfile(labels):
        raise SystemExit(
            f"error: {path} or labels.npy missing; --cifar10c_dir must hold the "
            "official CIFAR-10-C release (https://zenodo.org/record/2535967)")
    x = np.load(path, mmap_mode="r")
    if x.shape != (50000, 32, 32, 3):
        raise SystemExit(f"error: {path} has shape {x.shape}, expected "
                         "(50000, 32, 32, 3)")
    rows = slice((severity - 1) * 10000, severity * 10000)
    y = torch.from_numpy(np.load(labels)[rows])
    if expect_labels is not None and not torch.equal(y.long(), expect_labels):
        raise SystemExit(
            f"error: labels.npy in {folder} does not match the CIFAR-10 test "
            "labels; the release stands in for the test split only (train "
            "without --holdout)")
    return torch.from_numpy(np.array(x[rows])).permute(0, 3, 1, 2)


def shifted_pool(pool, shift, severity=5, seed=0, cache_dir=None, device="cpu",
                 release_dir=None):
    """The pool under a shift: "cifar_flip" (flipped labels) or a corruption,
    generated on device in chunks (or read from the release). Cached keyed by
    (corruption, severity, seed, pool, device type). CPU tensors."""
    x, y = pool
    if shift == "cifar_flip":
        return x, flip_labels(y)
    if release_dir:
        return load_release(release_dir, shift, severity, y).contiguous(), y
    device = torch.device(device)
    key = hashlib.sha1(x.numpy().tobytes()).hexdigest()[:10]
    name = f"{shift}_s{severity}_seed{seed}_{key}_{device.type}.pt"
    path = os.path.join(cache_dir, name) if cache_dir else None
    xc = common.load_cache(path) if path else None
    if xc is None:
        g = torch.Generator(device=device).manual_seed(seed)
        xc = torch.cat([corrupt(xb.to(device), shift, severity, generator=g).cpu()
                        for xb in x.split(2000)])
        if path:
            save_cache(xc, path)
    return xc, y


def cifar_target(args, holdout, dev):
    """For finetune.py: prints the data protocol and returns a function
    corruption -> ({"train"|"val"|"test": (x, y)}, clean test split), on dev."""
    d = load_cifar10(args.data_dir, args.cache_dir)
    _, pool = source_and_pool(d, holdout)
    idx = target_split(pool[1], args.train_n, args.val_per_class,
                       args.test_per_class, args.split_seed)
    shift = "labels y -> 9 - y"
    if args.data == "cifar_c":
        how = (f"read from {args.cifar10c_dir}" if args.cifar10c_dir
               else f"generated (seed {args.corruption_seed})")
        shift = f"corruptions at severity {args.severity}, {how}"
    print(f"target: {args.data}, {shift}; pool {len(pool[1]):,d} images (test "
          f"split + {holdout} held out); split (seed {args.split_seed}) per "
          f"class: train {args.train_n // 10}, val {args.val_per_class}, test "
          f"{args.test_per_class or 'the rest'}")
    clean = tuple(t.to(dev) for t in d["test"])

    def load(c):
        shift = args.data if args.data == "cifar_flip" else c
        xs, ys = shifted_pool(pool, shift, args.severity, args.corruption_seed,
                              args.cache_dir, dev, args.cifar10c_dir or None)
        return {s: (xs[i].to(dev), ys[i].to(dev)) for s, i in idx.items()}, clean
    return load


def gallery(x, path, names, seed=0, scale=2):
    """A labelled PNG: a row per (corruption, image), columns clean and
    severities 1..5. x: uint8 (n,3,32,32)."""
    from PIL import Image, ImageDraw  # torchvision's own dependency
    from torchvision.utils import make_grid
    rows = []
    for name in names:  # n rows of 6
        sev = [corrupt(x, name, s, seed=seed) for s in range(1, 6)]
        rows += list(torch.stack([x] + sev, 1))
    grid = make_grid(torch.cat(rows), nrow=6, padding=1, pad_value=255)
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    cell, left, top = 33 * scale, 120, 14
    out = Image.new("RGB", (img.width + left, img.height + top), "white")
    out.paste(img, (left, top))
    draw = ImageDraw.Draw(out)
    heads = ["clean"] + [f"severity {s}" for s in range(1, 6)]
    for j, label in enumerate(heads):
        draw.text((left + j * cell + 2, 1), label, fill="black")
    for i, name in enumerate(names):  # against the first of its n rows
        draw.text((2, top + i * len(x) * cell + cell // 2 - 5), name, fill="black")
    common.atomic_save(out, path, lambda im, tmp: im.save(tmp, format="PNG"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data",
                   help="folder holding (or to receive) cifar-10-batches-py")
    p.add_argument("--cache_dir", default="data/cache", help="decoded tensors")
    p.add_argument("--gallery", default="", help="write a PNG of the corruptions")
    p.add_argument("--images", default="3,7", help="test-image indices shown")
    p.add_argument("--corruption", default="all", help="a name, list or preset")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = parse_names(args.corruption)
    d = load_cifar10(args.data_dir, args.cache_dir)
    for split, (x, y) in d.items():
        per = torch.bincount(y, minlength=10).tolist()
        print(f"{split}: {tuple(x.shape)} {x.dtype}, labels per class {per}")
    if args.gallery:
        n = len(d["test"][0])
        try:
            idx = [int(i) for i in args.images.split(",")]
            assert idx and all(0 <= i < n for i in idx)
        except (ValueError, AssertionError):
            raise SystemExit(f"error: --images {args.images!r} must be a comma "
                             f"list of test-image indices in 0..{n - 1}")
        common.check_writable(args.gallery, "--gallery")
        gallery(d["test"][0][idx], args.gallery, names, args.seed)
        print(f"wrote {args.gallery}: rows {args.corruption} x images {idx}")


if __name__ == "__main__":
    common.run(main)
