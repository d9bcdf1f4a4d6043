"""
CIFAR-10 as uint8 tensors, the distribution shifts of the paper generated on the device, and the target splits.
The ImageNet family (ImageNet-C, Living-17 / Entity-30, Waterbirds, CelebA) is read from the user's folders in
their standard layouts into the same uint8 form, at 224 px (PROTOCOL section 8).

    python data.py --data_dir data                      # download (first use) and cache CIFAR-10, print its sizes
    python data.py --gallery gallery.png                # every corruption at every severity on two test images
"""
import argparse
import csv
import glob
import hashlib
import json
import os
import pickle
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from corruptions import CORRUPTIONS
from model import atomic_save

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _digest(obj):
    """sha1 of every tensor's bytes in obj (a tensor, or dicts / tuples of them), in order, without copies."""
    h = hashlib.sha1()
    stack = [obj]
    while stack:
        o = stack.pop(0)
        if isinstance(o, torch.Tensor):
            h.update(o.contiguous().view(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            stack = list(o.values()) + stack
        elif isinstance(o, (list, tuple)):
            stack = list(o) + stack
    return h.hexdigest()


def _save_cache(obj, path):
    """obj with its checksum, atomically (model.atomic_save): a cache that changes on disk is caught on load."""
    atomic_save({"sha1": _digest(obj), "data": obj}, path)


def _load_cache(path):
    """A cache file's content, or None (then the caller rebuilds it) when it is missing, unreadable or its bytes
    no longer match the checksum written with it."""
    if not os.path.isfile(path):
        return None
    try:
        c = torch.load(path, weights_only=True)
        if c["sha1"] == _digest(c["data"]):
            return c["data"]
    except Exception:
        pass
    print(f"note: the cache {path} is unreadable or fails its checksum; rebuilding it")
    return None


def _file_digest(paths):
    """sha1 of the files' contents: a cache keyed by it follows any change to them, whatever their times say."""
    h = hashlib.sha1()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


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
            raise SystemExit(f"error: {path} is not a CIFAR-10 python batch ({type(e).__name__}); replace it with the "
                             f"file from the official archive {CIFAR_URL}")
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y) or ((y < 0) | (y > 9)).any():
            raise SystemExit(f"error: {path} holds data of shape {x.shape} and {len(y)} labels in {y.min(initial=0)}"
                             f"..{y.max(initial=0)}; expected (N, 3072) images and N labels in 0..9")
        xs.append(x.reshape(-1, 3, 32, 32))  # any number of images per file
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar10(data_dir="data", cache_dir="data/cache", download=True):
    """{"train": (x, y), "test": (x, y)} with x uint8 (N,3,32,32), y int64 (N,), on the CPU.

    Reads <data_dir>/cifar-10-batches-py (whatever number of images each batch file holds); when that folder is
    missing, downloads the official archive through torchvision. The decoded tensors are cached in cache_dir
    (None: no cache) with a checksum, keyed by the files' contents, so a reload takes a fraction of a second."""
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
    cache = os.path.join(cache_dir, f"cifar10_{_file_digest(files)[:12]}.pt") if cache_dir else None
    out = _load_cache(cache) if cache else None
    if out is None:
        out = {"train": _read_batches(folder, [os.path.basename(f) for f in train_files]),
               "test": _read_batches(folder, ["test_batch"])}
        if cache:
            _save_cache(out, cache)
    return out


# -----------------------------------------------------------------------------
# on-device batches, airbench style: the whole split lives on the device, augmentation is tensor ops on the batch

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
    return xp[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def batches(x, y, batch_size, shuffle=False, augment=False, generator=None, drop_last=False):
    """Yield (x, y) minibatches of a split already on its device; a fresh randperm per call when shuffling."""
    n = len(x)
    order = torch.randperm(n, generator=generator, device=x.device) if shuffle else torch.arange(n, device=x.device)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        xb = x[idx]
        yield (crop_flip(xb, generator=generator) if augment else xb), y[idx]


# -----------------------------------------------------------------------------
# corruptions (CIFAR-10-C): the functions live in corruptions.py; here the names, the checks and the uint8 contract

PAPER14 = ("frost", "gaussian_blur", "gaussian_noise", "glass_blur", "impulse_noise", "jpeg_compression", "motion_blur",
           "pixelate", "saturate", "shot_noise", "snow", "spatter", "speckle_noise", "zoom_blur")
ALL19 = tuple(sorted(PAPER14 + ("brightness", "contrast", "defocus_blur", "elastic_transform", "fog")))
# the 15 of Hendrycks & Dietterich (2019), the unsupervised table's (PROTOCOL section 9)
STANDARD15 = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")


def _parse_names(spec, presets, valid, what):
    """A preset name, one name or a comma list -> tuple of names; one clear line for an unknown name."""
    names = presets.get(spec) or tuple(n for n in spec.split(",") if n)
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SystemExit(f"error: unknown {what} {','.join(bad) or spec!r}; valid: {', '.join(presets)} or any of "
                         f"{', '.join(valid)}")
    return names


def parse_corruptions(spec):
    """CIFAR-10-C: 'paper14' (the supervised table's), 'standard15' (the unsupervised table's: the 15 of Hendrycks &
    Dietterich), 'all19', one name or a comma list -> tuple of names."""
    return _parse_names(spec, {"paper14": PAPER14, "standard15": STANDARD15, "all19": ALL19}, ALL19, "corruption")


def corrupt(x, name, severity, seed=0, generator=None):
    """Corrupt a uint8 batch (N,3,32,32) on any device; the same (seed, name, severity) gives the same images on
    the same device. Returns uint8, truncated like the reference's np.uint8."""
    parse_corruptions(name)
    if severity not in range(1, 6):
        raise SystemExit(f"error: severity {severity} is outside 1..5")
    g = generator or torch.Generator(device=x.device).manual_seed(seed)
    out = CORRUPTIONS[name](x.float() / 255, severity, g)
    return out if out.dtype == torch.uint8 else (out.clamp(0, 1) * 255).floor().to(torch.uint8)


# -----------------------------------------------------------------------------
# target data (PROTOCOL section 4): a labelled pool, a shift applied to it, and per-class train/val/test indices

def source_and_pool(d, holdout=0):
    """(source train x, y) and the target pool (x, y). The pool is the test split (the paper); holdout > 0 also
    moves the last `holdout` training images into it, for small copies of CIFAR-10 whose test split is too small
    for the paper's per-class counts. The source model must then be trained with the same holdout."""
    (xt, yt), (xs, ys) = d["train"], d["test"]
    if not 0 <= holdout < len(xt):
        raise SystemExit(f"error: --holdout {holdout} must be in 0..{len(xt) - 1}: the training split has {len(xt):,d} "
                         f"images and some must stay for source training")
    if holdout:
        return (xt[:-holdout], yt[:-holdout]), (torch.cat([xs, xt[-holdout:]]), torch.cat([ys, yt[-holdout:]]))
    return (xt, yt), (xs, ys)


def target_split(y, train_n=1000, val_per_class=10, test_per_class=90, seed=0, num_classes=10):
    """Per class, a seeded shuffle: train_n/num_classes for training, the next val_per_class for validation, the
    next test_per_class (0: all the rest) for test; disjoint by construction, as consecutive slices of one shuffle.
    Depends on labels and seed only, so every corruption and tune option shares it.
    Returns {"train": idx, "val": idx, "test": idx} (int64, sorted)."""
    if train_n % num_classes or min(train_n, val_per_class) < 1 or test_per_class < 0:
        raise SystemExit(f"error: --train_n {train_n} must be a positive multiple of {num_classes} (balanced classes), "
                         f"--val_per_class {val_per_class} at least 1 and --test_per_class {test_per_class} >= 0")
    if (y < 0).any() or (y >= num_classes).any():
        raise SystemExit(f"error: labels outside 0..{num_classes - 1} in the target pool; is this CIFAR-10?")
    k = train_n // num_classes
    g = torch.Generator().manual_seed(seed)
    out = {"train": [], "val": [], "test": []}
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) < k + val_per_class + max(test_per_class, 1):
            raise SystemExit(f"error: class {c} has {len(idx)} images in the target pool, fewer than train_n/"
                             f"{num_classes} + val + test = {k}+{val_per_class}+{test_per_class}; lower --train_n, "
                             f"--val_per_class or --test_per_class")
        idx = idx[torch.randperm(len(idx), generator=g)]
        for split, (a, b) in {"train": (0, k), "val": (k, k + val_per_class),
                              "test": (k + val_per_class, k + val_per_class + test_per_class if test_per_class
                                       else len(idx))}.items():
            out[split].append(idx[a:b])
    return {s: torch.cat(v).sort().values for s, v in out.items()}


def flip_labels(y, num_classes=10):
    """CIFAR-Flip: y -> 9 - y, a permutation without fixed points (the paper's exact map is unpublished)."""
    return num_classes - 1 - y


def load_release(folder, corruption, severity, expect_labels=None):
    """Images of the official CIFAR-10-C release (<folder>/<corruption>.npy: (50000,32,32,3) uint8, severities 1..5
    in blocks of 10,000 test images, and labels.npy) as uint8 (10000,3,32,32)."""
    path = os.path.join(folder, f"{corruption}.npy")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, "labels.npy")):
        raise SystemExit(f"error: {path} or labels.npy missing; --cifar10c_dir must hold the official CIFAR-10-C "
                         f"release (https://zenodo.org/record/2535967)")
    x = np.load(path, mmap_mode="r")
    if x.shape != (50000, 32, 32, 3):
        raise SystemExit(f"error: {path} has shape {x.shape}, expected (50000, 32, 32, 3)")
    y = torch.from_numpy(np.load(os.path.join(folder, "labels.npy"))[(severity - 1) * 10000:severity * 10000])
    if expect_labels is not None and not torch.equal(y.long(), expect_labels):
        raise SystemExit(f"error: labels.npy in {folder} does not match the CIFAR-10 test labels; the release "
                         f"stands in for the test split only (train without --holdout)")
    return torch.from_numpy(np.array(x[(severity - 1) * 10000:severity * 10000])).permute(0, 3, 1, 2)


def shifted_pool(pool, shift, severity=5, seed=0, cache_dir=None, device="cpu", release_dir=None):
    """The target pool under a shift: "cifar_flip" (clean images, flipped labels) or a corruption name, generated
    here or, with release_dir, read from the official CIFAR-10-C release (whose images replace the pool's).
    Generated on `device` in chunks; cached on disk keyed by (corruption, severity, seed, pool, device type), so a
    sweep generates each once. Returns CPU tensors."""
    x, y = pool
    if shift == "cifar_flip":
        return x, flip_labels(y)
    if release_dir:
        return load_release(release_dir, shift, severity, expect_labels=y).contiguous(), y
    device = torch.device(device)
    key = hashlib.sha1(x.numpy().tobytes()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"{shift}_s{severity}_seed{seed}_{key}_{device.type}.pt") if cache_dir else None
    xc = _load_cache(path) if path else None
    if xc is None:
        g = torch.Generator(device=device).manual_seed(seed)
        xc = torch.cat([corrupt(xb.to(device), shift, severity, generator=g).cpu() for xb in x.split(2000)])
        if path:
            _save_cache(xc, path)
    return xc, y


# -----------------------------------------------------------------------------
# the ImageNet family (PROTOCOL section 8): the user's folders in their standard layouts -> uint8 (N,3,size,size)
# for ResNet-50 (normalised inside the model); target splits that depend on labels, groups and seed only

IMAGENET_C15 = STANDARD15  # ImageNet-C has the same 15 standard types
IMAGENET_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # the release's 4 extra folders
FAMILY = ("imagenet_c", "living17", "entity30", "waterbirds", "celeba")
# imagenet_c: the release's 1000 wnid folders. The loaders return the count they find (fewer in a partial copy)
NUM_CLASSES = {"imagenet_c": 1000, "living17": 17, "entity30": 30, "waterbirds": 2, "celeba": 2}
FOLDER_FLAGS = {"imagenet_c": "--imagenet_c_dir", "living17": "--imagenet_dir", "entity30": "--imagenet_dir",
                "waterbirds": "--waterbirds_dir", "celeba": "--celeba_dir"}
CACHE_MAX_BYTES = 2 << 30  # bigger sets are decoded again each time: decoding is fast, disk is not free
IMAGE_EXTS = (".jpeg", ".jpg", ".png")
# BREEDS (Santurkar et al. 2021) as the robustness library builds them: superclasses at this level below the
# WordNet root n00001740, inside this subtree (None: all), with this many subclasses (half source, half target)
BREEDS = {"living17": (5, "n00004258", 4), "entity30": (4, None, 8)}
BREEDS_FILES = ("dataset_class_info.json", "class_hierarchy.txt", "node_names.txt")


def _read_image(path, size):
    """uint8 (3,size,size) by the standard ImageNet eval transform: shorter side to size*256/224, center crop."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2 import functional as F
    try:
        x = decode_image(read_file(path), mode=ImageReadMode.RGB)  # grey and RGBA files become RGB too
    except Exception as e:
        why = "is missing" if not os.path.isfile(path) else f"cannot be decoded ({type(e).__name__})"
        raise SystemExit(f"error: image {path} {why}; the dataset folder is incomplete, extract it again")
    if x.shape[1:] == (size, size):
        return x  # ImageNet-C release images are 224x224 crops already
    return F.center_crop(F.resize(x, round(size * 256 / 224), antialias=True), size)  # bilinear


def read_images(paths, size=224, cache_dir=None, threads=8):
    """uint8 (N,3,size,size), decoded in a thread pool. With cache_dir, a result of at most CACHE_MAX_BYTES is
    cached there as one checksummed file keyed by the files' paths, sizes, inodes and nanosecond times and by size.
    A file that cannot be read or
    decoded stops with one line naming it."""
    n, cache = len(paths), None
    if cache_dir and n * 3 * size * size <= CACHE_MAX_BYTES:
        for p in paths:
            if not os.path.isfile(p):
                _read_image(p, size)  # raises the one-line error naming it
        stats = [(os.path.abspath(p), s.st_size, s.st_mtime_ns, s.st_ino) for p in paths for s in [os.stat(p)]]
        key = hashlib.sha1(repr((stats, size)).encode()).hexdigest()[:16]  # thousands of files: stat, not content
        cache = os.path.join(cache_dir, f"images_{n}x{size}_{key}.pt")
        cached = _load_cache(cache)
        if cached is not None:
            return cached
    x = torch.empty((n, 3, size, size), dtype=torch.uint8)  # filled in place: no second copy of a large set
    pool = ThreadPoolExecutor(threads)
    try:
        for i, img in enumerate(pool.map(_read_image, paths, [size] * n)):  # re-raises a worker's SystemExit
            x[i] = img
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, stop at once rather than decode the rest
    if cache:
        _save_cache(x, cache)
    return x


def parse_imagenet_c(spec):
    """'paper15' (the 15 standard types), 'all19' (and the 4 extra) or a comma list -> tuple of names."""
    valid = IMAGENET_C15 + IMAGENET_C_EXTRA
    return _parse_names(spec, {"paper15": IMAGENET_C15, "all19": valid}, valid, "ImageNet-C corruption")


def _class_images(folders_per_class):
    """(paths, y int64): the images of each class's folders, by name within a folder; y = the class's position."""
    paths, y = [], []
    for k, folders in enumerate(folders_per_class):
        for folder in folders:
            if not os.path.isdir(folder):
                raise SystemExit(f"error: class folder {folder} is missing; expected a folder of .JPEG images")
            names = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
            if not names:
                raise SystemExit(f"error: class folder {folder} holds no .jpeg/.jpg/.png image")
            paths += [os.path.join(folder, f) for f in names]
            y += [k] * len(names)
    return paths, torch.tensor(y, dtype=torch.int64)


def imagenet_c_files(root, corruption, severity=5):
    """(paths, y, wnids) of the release layout <root>/<corruption>/<severity>/<wnid>/*.JPEG. Classes are the
    sorted wnid folders, so with all 1000 present y is torchvision's ImageNet class index."""
    layout = "the release layout <root>/<corruption>/<severity 1..5>/<wnid>/*.JPEG"
    if not os.path.isdir(root):
        raise SystemExit(f"error: ImageNet-C folder {root} does not exist; expected {layout}")
    folder = os.path.join(root, corruption, str(severity))
    if not os.path.isdir(folder):
        there = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        odd = [d for d in there if d not in IMAGENET_C15 + IMAGENET_C_EXTRA]  # e.g. pointed at a parent folder
        raise SystemExit(f"error: {folder} is missing; {root} holds the corruption folders {', '.join(there) or 'none'}"
                         + (f" ({', '.join(odd)}: not ImageNet-C names)" if odd else "") + f"; expected {layout}")
    wnids = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not wnids:
        raise SystemExit(f"error: {folder} holds no <wnid> class folder; expected {layout}")
    return (*_class_images([[os.path.join(folder, w)] for w in wnids]), wnids)


def _pairs(path, sep, fmt):
    """The non-empty lines of a two-field text file as [a, b]; one line naming the first malformed one."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                rows.append(line.strip().split(sep, 1) if sep else line.split())
                if len(rows[-1]) != 2:
                    raise SystemExit(f"error: {path} line {i} is malformed ({line.strip()[:60]!r}); expected {fmt}")
    return rows


def breeds_classes(name, info_dir):
    """BREEDS superclasses of "living17" / "entity30" from the three files of the BREEDS-Benchmarks repo
    (imagenet_class_hierarchy/modified), with the robustness library's split="rand". Returns (superclass wnids
    sorted, source wnids per superclass, target wnids per superclass, superclass names)."""
    if name not in BREEDS:
        raise SystemExit(f"error: unknown BREEDS dataset {name!r}; valid: {', '.join(BREEDS)}")
    level_of, ancestor, n_sub = BREEDS[name]
    info, edges_file, names_file = (os.path.join(info_dir or "", f) for f in BREEDS_FILES)
    for f in (info, edges_file, names_file):
        if not os.path.isfile(f):
            raise SystemExit(f"error: BREEDS file {f} is missing; --breeds_dir must hold {', '.join(BREEDS_FILES)} "
                             f"of github.com/MadryLab/BREEDS-Benchmarks (imagenet_class_hierarchy/modified)")
    try:
        with open(info) as f:
            leaves = {c[1] for c in json.load(f) if isinstance(c[1], str)}  # the ImageNet classes
    except (ValueError, TypeError, KeyError, IndexError):
        leaves = None
    if not leaves:
        raise SystemExit(f"error: {info} is malformed; expected a JSON list of [class_number, wnid, name, ...]")
    parents = defaultdict(list)
    for p, c in _pairs(edges_file, None, "one 'parent_wnid child_wnid' edge per line"):
        parents[c].append(p)
    kids, todo, seen = defaultdict(set), list(leaves), set(leaves)  # keep only the edges above some leaf
    while todo:
        w = todo.pop()
        for p in parents[w]:
            kids[p].add(w)
            if p not in seen:
                seen.add(p)
                todo.append(p)
    # level = the LONGEST path from the root: a node met again one step deeper moves down (BREEDS' rule)
    depth, level, todo = 0, {}, {"n00001740"}
    while todo:
        if depth > len(kids):
            raise SystemExit(f"error: {edges_file} has a cycle; expected a hierarchy of parent -> child edges")
        level.update(dict.fromkeys(todo, depth))
        depth, todo = depth + 1, {c for n in todo for c in kids[n]}

    def down(n, stop=()):  # n and the nodes below it, not going on below the nodes in stop
        out, todo = {n}, [n]
        while todo:
            new = kids[todo.pop()] - out
            out |= new
            todo += [c for c in new if c not in stop]
        return out

    def under(n):  # the leaves below n, and n if a leaf (BREEDS' leaves_reachable)
        return down(n, leaves) & leaves
    within = down(ancestor) if ancestor else level
    supers = [n for n in sorted(level) if level[n] == level_of and n in within and len(under(n)) >= n_sub]
    if not supers:
        raise SystemExit(f"error: no {name} superclass in {edges_file}: none at level {level_of} has {n_sub} "
                         f"classes of {info} below it; expected the BREEDS-Benchmarks files")
    rng = np.random.RandomState(2)  # BREEDS' seed: one stream over the superclasses in sorted order
    source, target = [], []
    for s in supers:
        while len(kids[s]) == 1:  # down single-child chains to the first real split
            s = next(iter(kids[s]))
        pool = sorted(w for c in kids[s] for w in under(c))  # duplicates stay, as in BREEDS
        pick = [str(w) for w in rng.choice(pool, n_sub, replace=False)]
        source.append(pick[:n_sub // 2])
        target.append(pick[n_sub // 2:])
    names = dict(_pairs(names_file, "\t", "'wnid<TAB>name' per line"))
    return supers, source, target, [names.get(s, s) for s in supers]


def breeds_files(name, imagenet_dir, info_dir):
    """ImageNet in the ImageFolder layout <imagenet_dir>/{train,val}/<wnid>/*.JPEG -> {"source_train",
    "source_test", "target_train", "target_test"}: (paths, y = superclass index); *_train from ImageNet train,
    *_test from its val; target = the subclasses the source never sees."""
    _, source, target, _ = breeds_classes(name, info_dir)
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(imagenet_dir, split)):
            raise SystemExit(f"error: {os.path.join(imagenet_dir, split)} is missing; --imagenet_dir must hold "
                             f"ImageNet as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (torchvision's layout)")
    return {f"{domain}_{part}": _class_images([[os.path.join(imagenet_dir, split, w) for w in ws] for ws in subs])
            for domain, subs in (("source", source), ("target", target))
            for part, split in (("train", "train"), ("test", "val"))}


def _pick(value, allowed, path, where, column):
    """Position of value in allowed ("0"/"1" -> 0/1, "-1"/"1" -> 0/1); one line naming the file otherwise."""
    if (value or "").strip() not in allowed:
        raise SystemExit(f"error: {path}, {where}: {column} is {value!r}; expected one of {', '.join(allowed)}")
    return allowed.index(value.strip())


def group_files(name, root):
    """Waterbirds (root: the released folder with metadata.csv) or CelebA (root: torchvision's CelebA root) ->
    {"train"|"val"|"test": (paths, y, g)}: y int64 the label (waterbird; blond), g = 2*y + a the group, a the
    spurious attribute (water background; male). read_images names an image that is missing."""
    if name not in ("waterbirds", "celeba"):
        raise SystemExit(f"error: unknown group dataset {name!r}; valid: waterbirds, celeba")
    rows, split_values = [], ("0", "1", "2")  # rows: (file, split 0/1/2 = train/val/test, y, a)
    if name == "waterbirds":
        path, need, folder = os.path.join(root, "metadata.csv"), ("img_filename", "y", "split", "place"), root
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} is missing; --waterbirds_dir must be the released Waterbirds folder "
                             f"(e.g. waterbird_complete95_forest2water2)")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in need if c not in (reader.fieldnames or [])]
            if missing:
                raise SystemExit(f"error: {path} lacks the column {', '.join(missing)}; expected the columns "
                                 f"{', '.join(need)} (others are ignored)")
            rows = [(r["img_filename"], *(_pick(r[c], split_values[:n], path, f"line {i}", c)
                                          for c, n in (("split", 3), ("y", 2), ("place", 2))))
                    for i, r in enumerate(reader, 2)]
    else:
        attr, part = (os.path.join(root, "celeba", f) for f in ("list_attr_celeba.txt", "list_eval_partition.txt"))
        folder = os.path.join(root, "celeba", "img_align_celeba")
        for f in (attr, part):
            if not os.path.isfile(f):
                raise SystemExit(f"error: {f} is missing; --celeba_dir must be torchvision's CelebA root holding "
                                 f"celeba/list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba/")
        with open(attr) as f:
            f.readline()  # the image count
            cols = f.readline().split()
            missing = [c for c in ("Blond_Hair", "Male") if c not in cols]
            if missing:
                raise SystemExit(f"error: {attr} lacks the attribute column {', '.join(missing)}; expected line 2 to "
                                 f"name the 40 attributes, Blond_Hair and Male among them")
            ya, fields = {}, [(c, cols.index(c) + 1) for c in ("Blond_Hair", "Male")]  # +1: field 0 is the file
            for i, v in enumerate((line.split() for line in f), 3):
                if v and len(v) != len(cols) + 1:
                    raise SystemExit(f"error: {attr} line {i} has {len(v)} fields; expected <file> and {len(cols)} "
                                     f"values -1/1")
                if v:  # file -> (blond, male) as 0/1
                    ya[v[0]] = tuple(_pick(v[j], ("-1", "1"), attr, f"line {i}", c) for c, j in fields)
        for file, split in _pairs(part, None, "'<file> <0|1|2>' per line"):
            if file not in ya:
                raise SystemExit(f"error: {file} of {part} has no line in {attr}")
            rows.append((file, _pick(split, split_values, part, file, "the partition"), *ya[file]))
    out = {}
    for k, split in enumerate(("train", "val", "test")):
        sel = [r for r in rows if r[1] == k]
        y, a = (torch.tensor([r[j] for r in sel], dtype=torch.int64) for j in (2, 3))
        out[split] = ([os.path.join(folder, r[0]) for r in sel], y, 2 * y + a)
    return out


def balanced_indices(labels, counts, seed=0, flags=("--train_n", "--val_per_class", "--test_per_class")):
    """Per value v = 0..K-1 of labels, a seeded shuffle (one generator, values in order) of its indices cut into
    consecutive chunks of counts[i][v] (None: all the rest). Returns one sorted int64 index tensor per chunk;
    flags[i] is the flag that sets chunk i, named when a value has too few items."""
    g = torch.Generator().manual_seed(seed)
    chunks = [[] for _ in counts]
    for v in range(len(counts[0])):
        idx = (labels == v).nonzero().flatten()
        idx, start = idx[torch.randperm(len(idx), generator=g)], 0
        for i, c in enumerate(counts):
            n = len(idx) - start if c[v] is None else c[v]
            if start + n > len(idx):
                raise SystemExit(f"error: class/group {v} has {len(idx)} images, fewer than the {start + n} asked "
                                 f"({'+'.join(str(c[v]) for c in counts[:i + 1])}); lower {' or '.join(flags[:i + 1])}")
            chunks[i].append(idx[start:start + n])
            start += n
    return [torch.cat(c).sort().values for c in chunks]


def _check_family(name, root):
    if name not in FAMILY:
        raise SystemExit(f"error: unknown dataset {name!r}; valid: {', '.join(FAMILY)}")
    if not root:
        raise SystemExit(f"error: no folder given for {name}; pass {FOLDER_FLAGS[name]}")


def family_source(name, root, info_dir=None, size=224, cache_dir=None, limit=0):
    """Source training data ({"train": (x, y), "test": (x, y) or None}, num_classes): living17 / entity30 the
    source subclasses (train: ImageNet train, test: ImageNet val); waterbirds / celeba the train split, no test.
    limit > 0: a seeded random subset of at most limit training images."""
    if name == "imagenet_c":
        raise SystemExit("error: imagenet_c has no source training: its source is torchvision's ImageNet-pretrained "
                         "ResNet-50 (finetune.py --ckpt imagenet)")
    _check_family(name, root)
    if name in BREEDS:
        f = breeds_files(name, root, info_dir)
        (paths, y), test = f["source_train"], f["source_test"]
    else:
        (paths, y, _), test = group_files(name, root)["train"], None
    k = int(y.max()) + 1 if name in BREEDS else 2  # a fake or partial hierarchy may give fewer than 17 / 30
    if 0 < limit < len(paths):
        idx = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        paths, y = [paths[i] for i in idx.tolist()], y[idx]
    test = None if test is None else (read_images(test[0], size, cache_dir), test[1])
    return {"train": (read_images(paths, size, cache_dir), y), "test": test}, k


def family_target(name, root, info_dir=None, corruption=None, severity=5, train_n=None, val_per_class=None,
                  test_per_class=None, seed=0, size=224, cache_dir=None):
    """Target data for surgical fine-tuning (PROTOCOL section 8), decoding only the images it returns:
    {"train"|"val"|"test": (x, y), "groups": {"val"|"test": g} or None, "source_test": (x, y) or None,
    "num_classes": K, "counts": {split: n}}. Defaults for None: imagenet_c 5 / 10 / 10 per class; living17,
    entity30 train_n 850 over the superclasses, 10 val per superclass, all test; waterbirds, celeba 100 train and
    30 val per group from the val split, all the test split. test_per_class 0 = all, except for imagenet_c."""
    _check_family(name, root)
    groups = source_test = None
    if name == "imagenet_c":  # target_split: the same files for every corruption (the release shares names)
        parse_imagenet_c(corruption or "")
        paths, y, wnids = imagenet_c_files(root, corruption, severity)
        k = len(wnids)
        idx = target_split(y, 5 * k if train_n is None else train_n, 10 if val_per_class is None else val_per_class,
                           10 if test_per_class is None else test_per_class, seed, num_classes=k)
        split = {s: (paths, y, idx[s]) for s in ("train", "val", "test")}
    else:  # living17 / entity30: per superclass; waterbirds / celeba: per group
        if name in BREEDS:  # train and val from ImageNet train of the target subclasses, test from its val
            f = breeds_files(name, root, info_dir)
            (paths, y), (tpaths, ty) = f["target_train"], f["target_test"]
            g, tg, k, n = y, ty, int(f["source_train"][1].max()) + 1, 850 if train_n is None else train_n
            counts = [[n // k + (c < n % k) for c in range(k)],  # the first n % k superclasses get one more
                      [10 if val_per_class is None else val_per_class] * k]
            source_test = (read_images(f["source_test"][0], size, cache_dir), f["source_test"][1])
        else:  # the group-balanced target distribution, drawn from the val split (our reading; README)
            s, k, n = group_files(name, root), 2, 400 if train_n is None else train_n
            if n % 4:
                raise SystemExit(f"error: --train_n {n} must be a multiple of 4 (the same count for each of 4 groups)")
            (paths, y, g), (tpaths, ty, tg) = s["val"], s["test"]
            counts = [[n // 4] * 4, [30 if val_per_class is None else val_per_class] * 4]
        tr, va = balanced_indices(g, counts, seed)
        te, = balanced_indices(tg, [[test_per_class or None] * len(counts[0])], seed, flags=("--test_per_class",))
        split = {"train": (paths, y, tr), "val": (paths, y, va), "test": (tpaths, ty, te)}
        groups = None if name in BREEDS else {"val": g[va], "test": tg[te]}
    out = {s: (read_images([p[i] for i in idx.tolist()], size, cache_dir), y[idx]) for s, (p, y, idx) in split.items()}
    return {**out, "groups": groups, "source_test": source_test, "num_classes": k,
            "counts": {s: len(v[1]) for s, v in out.items()}}


def gallery(x, path, names=ALL19, seed=0):
    """PNG grid: for each corruption a row per image, columns clean then severities 1..5. x: uint8 (n,3,32,32)."""
    from torchvision.io import write_png
    from torchvision.utils import make_grid
    rows = []
    for name in names:
        cols = [x] + [corrupt(x, name, s, seed=seed) for s in range(1, 6)]
        rows += list(torch.stack(cols, 1))  # n rows of 6 images each
    grid = make_grid(torch.cat(rows), nrow=6, padding=1, pad_value=255)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_png(grid, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data", help="folder holding (or to receive) cifar-10-batches-py")
    p.add_argument("--cache_dir", default="data/cache", help="where decoded and generated tensors are cached")
    p.add_argument("--gallery", default="", help="write a PNG of every corruption at every severity to this path")
    p.add_argument("--images", default="3,7", help="test-image indices shown in the gallery")
    p.add_argument("--corruption", default="all19", help="gallery rows: one name, a comma list, paper14 or all19")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    d = load_cifar10(args.data_dir, args.cache_dir)
    for split, (x, y) in d.items():
        print(f"{split}: {tuple(x.shape)} {x.dtype}, labels per class {torch.bincount(y, minlength=10).tolist()}")
    if args.gallery:
        idx = [int(i) for i in args.images.split(",")]
        gallery(d["test"][0][idx], args.gallery, parse_corruptions(args.corruption), args.seed)
        print(f"wrote {args.gallery}: rows {args.corruption} x images {idx}, columns clean + severities 1..5")


if __name__ == "__main__":
    main()
