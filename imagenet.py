"""
The ImageNet family (PROTOCOL.md section 8) from your folders (README "The
ImageNet family"): ImageNet-C, Living-17 and Entity-30 (BREEDS), Waterbirds
and CelebA as uint8 (N,3,size,size) tensors.
"""
import csv
import hashlib
import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from common import load_cache
from data import STANDARD15, parse_names, per_class_split, save_cache, target_split

IMAGENET_C15 = STANDARD15  # ImageNet-C has the same 15 standard types
IMAGENET_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # also there
FAMILY = ("imagenet_c", "living17", "entity30", "waterbirds", "celeba", "tiny_breeds")
CACHE_MAX_BYTES = 2 << 30  # bigger sets are decoded each time: disk is not free
IMAGE_EXTS = (".jpeg", ".jpg", ".png")
# BREEDS (Santurkar et al. 2021) as the robustness library builds them:
# superclasses at this level below the WordNet root, inside this subtree
# (None: all), with this many subclasses (half source, half target)
BREEDS = {"living17": (5, "n00004258", 4), "entity30": (4, None, 8),
          "tiny_breeds": (4, None, 4)}  # ours, from Tiny-ImageNet's 200 classes
# Tiny-ImageNet-200 (cs231n.stanford.edu/tiny-imagenet-200.zip): 64 px, train/<wnid>/images/,
# val/images/ + val/val_annotations.txt, wnids.txt. Some copies carry these two classes too.
TINY_EXTRA, TINY_N = ("n02480855", "n10148035"), 200
BREEDS_FILES = ("dataset_class_info.json", "class_hierarchy.txt", "node_names.txt")


def _read_image(path, size, crop=True):
    """uint8 (3,size,size): shorter side to size*256/224, center crop (crop=False: the
    whole image resized, Tiny-ImageNet's)."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2 import functional as F
    try:
        x = decode_image(read_file(path), mode=ImageReadMode.RGB)  # grey, RGBA too
    except Exception as e:
        why = "is missing"
        if os.path.isfile(path):
            why = f"cannot be decoded ({type(e).__name__})"
        raise SystemExit(f"error: image {path} {why}; the dataset folder is "
                         "incomplete, extract it again")
    if x.shape[1:] == (size, size):
        return x  # ImageNet-C's images are 224x224 crops already
    if not crop:
        return F.resize(x, [size, size], antialias=True)
    x = F.resize(x, round(size * 256 / 224), antialias=True)  # bilinear
    return F.center_crop(x, size)


def read_images(paths, size=224, cache_dir=None, threads=8, crop=True):
    """uint8 (N,3,size,size), decoded in threads. With cache_dir, a set of at
    most CACHE_MAX_BYTES is cached, keyed by the files' paths, sizes, inodes
    and times (thousands of files: stat, not content)."""
    n, cache = len(paths), None
    if cache_dir and n * 3 * size * size <= CACHE_MAX_BYTES:
        for p in paths:
            if not os.path.isfile(p):
                _read_image(p, size)  # raises the one-line error naming it
        stats = [(os.path.abspath(p), s.st_size, s.st_mtime_ns, s.st_ino)
                 for p in paths for s in [os.stat(p)]]
        key = hashlib.sha1(repr((stats, size) + ((crop,) if not crop else ())).encode())
        key = key.hexdigest()[:16]
        cache = os.path.join(cache_dir, f"images_{n}x{size}_{key}.pt")
        cached = load_cache(cache)
        if cached is not None:
            return cached
    x = torch.empty((n, 3, size, size), dtype=torch.uint8)  # no second copy
    import torchvision.io  # noqa: F401  imported here: 8 threads importing it at once
    import torchvision.transforms.v2  # noqa: F401  can fail half-initialised
    pool = ThreadPoolExecutor(threads)
    try:  # map re-raises a worker's SystemExit
        for i, img in enumerate(pool.map(_read_image, paths, [size] * n, [crop] * n)):
            x[i] = img
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, stop at once
    if cache:
        save_cache(x, cache)
    return x


def parse_imagenet_c(spec):
    """'paper15' (the standard 15), 'all19' or a comma list -> names."""
    valid = IMAGENET_C15 + IMAGENET_C_EXTRA
    return parse_names(spec, {"paper15": IMAGENET_C15, "all19": valid}, valid,
                       "ImageNet-C corruption")


def _class_images(folders_per_class):
    """(paths, y): each class's folders' images, by name; y: the class's index."""
    paths, y = [], []
    for k, folders in enumerate(folders_per_class):
        for folder in folders:
            if not os.path.isdir(folder):
                raise SystemExit(f"error: class folder {folder} is missing")
            names = sorted(e.name for e in os.scandir(folder)
                           if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
            if not names:
                raise SystemExit(f"error: class folder {folder} holds no "
                                 ".jpeg/.jpg/.png image")
            paths += [os.path.join(folder, f) for f in names]
            y += [k] * len(names)
    return paths, torch.tensor(y, dtype=torch.int64)


def imagenet_c_files(root, corruption, severity=5):
    """(paths, y, wnids) of <root>/<corruption>/<severity>/<wnid>/*.JPEG; y:
    the sorted wnids' index (torchvision's, with all 1000 there)."""
    layout = "the release layout <root>/<corruption>/<severity 1..5>/<wnid>/*.JPEG"
    if not os.path.isdir(root):
        raise SystemExit(f"error: ImageNet-C folder {root} does not exist; "
                         f"expected {layout}")
    folder = os.path.join(root, corruption, str(severity))
    if not os.path.isdir(folder):
        there = sorted(d for d in os.listdir(root)
                       if os.path.isdir(os.path.join(root, d)))
        odd = [d for d in there if d not in IMAGENET_C15 + IMAGENET_C_EXTRA]
        odd = f" ({', '.join(odd)}: not ImageNet-C names)" if odd else ""
        raise SystemExit(f"error: {folder} is missing; {root} holds the corruption "
                         f"folders {', '.join(there) or 'none'}{odd}; expected {layout}")
    wnids = sorted(d for d in os.listdir(folder)
                   if os.path.isdir(os.path.join(folder, d)))
    if not wnids:
        raise SystemExit(f"error: {folder} holds no <wnid> class folder; "
                         f"expected {layout}")
    return (*_class_images([[os.path.join(folder, w)] for w in wnids]), wnids)


def _pairs(path, sep, fmt):
    """A two-field text file's non-empty lines as [a, b]."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                rows.append(line.strip().split(sep, 1) if sep else line.split())
                if len(rows[-1]) != 2:
                    raise SystemExit(f"error: {path} line {i} is malformed "
                                     f"({line.strip()[:60]!r}); expected {fmt}")
    return rows


def breeds_classes(name, info_dir, only=None):
    """The superclasses of "living17" / "entity30" from the BREEDS-Benchmarks
    files, split as the robustness library's split="rand": (superclass wnids,
    source wnids per superclass, target wnids per superclass, names). only: the
    classes to build from (Tiny-ImageNet's), instead of ImageNet's 1000."""
    if name not in BREEDS:
        raise SystemExit(f"error: unknown BREEDS dataset {name!r}; valid: "
                         f"{', '.join(BREEDS)}")
    level_of, ancestor, n_sub = BREEDS[name]
    info, edges_file, names_file = (os.path.join(info_dir or "", f) for f in BREEDS_FILES)
    for f in (info, edges_file, names_file):
        if not os.path.isfile(f):
            raise SystemExit(
                f"error: BREEDS file {f} is missing; --breeds_dir must hold "
                f"{', '.join(BREEDS_FILES)} of github.com/MadryLab/"
                "BREEDS-Benchmarks (imagenet_class_hierarchy/modified)")
    try:
        with open(info) as f:
            leaves = {c[1] for c in json.load(f) if isinstance(c[1], str)}
    except (ValueError, TypeError, KeyError, IndexError):
        leaves = None
    if not leaves:
        raise SystemExit(f"error: {info} is malformed; expected a JSON list "
                         "of [class_number, wnid, name, ...]")
    if only is not None:
        unknown = sorted(set(only) - leaves)
        if unknown:
            raise SystemExit(f"error: class {unknown[0]} is not an ImageNet class of {info}; "
                             "is --data_dir Tiny-ImageNet-200?")
        leaves = set(only)
    parents = defaultdict(list)
    for p, c in _pairs(edges_file, None, "one 'parent_wnid child_wnid' edge per line"):
        parents[c].append(p)
    kids, todo, seen = defaultdict(set), list(leaves), set(leaves)  # above a leaf
    while todo:
        w = todo.pop()
        for p in parents[w]:
            kids[p].add(w)
            if p not in seen:
                seen.add(p)
                todo.append(p)
    # level: the LONGEST path from the root (BREEDS' rule)
    depth, level, todo = 0, {}, {"n00001740"}
    while todo:
        if depth > len(kids):
            raise SystemExit(f"error: {edges_file} has a cycle")
        level.update(dict.fromkeys(todo, depth))
        depth, todo = depth + 1, {c for n in todo for c in kids[n]}

    def down(n, stop=()):  # n and below, not below the nodes in stop
        out, todo = {n}, [n]
        while todo:
            new = kids[todo.pop()] - out
            out |= new
            todo += [c for c in new if c not in stop]
        return out

    def under(n):  # the leaves below n (BREEDS' leaves_reachable)
        return down(n, leaves) & leaves
    within = down(ancestor) if ancestor else level
    supers = [n for n in sorted(level) if level[n] == level_of and n in within
              and len(under(n)) >= n_sub]
    if not supers:
        raise SystemExit(f"error: no {name} superclass in {edges_file}: none at "
                         f"level {level_of} has {n_sub} classes of {info} below it")
    rng = np.random.RandomState(2)  # BREEDS' seed, one stream over them
    source, target = [], []
    for s in supers:
        while len(kids[s]) == 1:  # down single-child chains
            s = next(iter(kids[s]))
        pool = sorted(w for c in kids[s] for w in under(c))  # duplicates stay
        pick = [str(w) for w in rng.choice(pool, n_sub, replace=False)]
        source.append(pick[:n_sub // 2])
        target.append(pick[n_sub // 2:])
    names = dict(_pairs(names_file, "\t", "'wnid<TAB>name' per line"))
    return supers, source, target, [names.get(s, s) for s in supers]


def breeds_files(name, imagenet_dir, info_dir):
    """<imagenet_dir>/{train,val}/<wnid>/*.JPEG -> {"source_train",
    "source_test", "target_train", "target_test"}: (paths, y = superclass);
    *_train from ImageNet train, *_test from val; target: unseen subclasses."""
    if name == "tiny_breeds":
        return tiny_files(imagenet_dir, info_dir)
    _, source, target, _ = breeds_classes(name, info_dir)
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(imagenet_dir, split)):
            raise SystemExit(
                f"error: {os.path.join(imagenet_dir, split)} is missing; --data_dir "
                "must hold ImageNet as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    return {f"{domain}_{part}": _class_images(
                [[os.path.join(imagenet_dir, split, w) for w in ws] for ws in subs])
            for domain, subs in (("source", source), ("target", target))
            for part, split in (("train", "train"), ("test", "val"))}


def tiny_files(root, info_dir):
    """breeds_files() of Tiny-ImageNet-200: train from train/<wnid>/images/, test from
    val/images/ by val/val_annotations.txt; the official 200 classes (extras dropped)."""
    layout = ("the tiny-imagenet-200 folder: wnids.txt, train/<wnid>/images/*.JPEG, "
              "val/images/*.JPEG, val/val_annotations.txt")
    for need in ("wnids.txt", "train", os.path.join("val", "images"),
                 os.path.join("val", "val_annotations.txt")):
        if not os.path.exists(os.path.join(root, need)):
            raise SystemExit(f"error: {os.path.join(root, need)} is missing; --data_dir must "
                             f"be {layout}")
    wnids = open(os.path.join(root, "wnids.txt")).read().split()
    extra = [w for w in wnids if w in TINY_EXTRA]
    wnids = sorted(set(wnids) - set(TINY_EXTRA))
    if extra:
        print(f"note: {root} holds {', '.join(extra)} beyond the official {TINY_N}: dropped")
    if len(wnids) != TINY_N:
        raise SystemExit(f"error: {root}/wnids.txt lists {len(wnids)} classes, not the "
                         f"official {TINY_N}; --data_dir must be {layout}")
    val = defaultdict(list)
    ann = os.path.join(root, "val", "val_annotations.txt")
    for i, line in enumerate(open(ann), 1):
        f = line.split("\t")
        if len(f) < 2 or (f[1] not in wnids and f[1] not in TINY_EXTRA):
            raise SystemExit(f"error: {ann} line {i}: unknown class {f[1] if len(f) > 1 else f[0]!r}"
                             "; expected '<file>\t<wnid of wnids.txt>\t...'")
        val[f[1]].append(os.path.join(root, "val", "images", f[0]))
    _, source, target, _ = breeds_classes("tiny_breeds", info_dir, wnids)

    def train(subs):
        return _class_images([[os.path.join(root, "train", w, "images") for w in ws]
                              for ws in subs])

    def test(subs):
        pairs = [(p, k) for k, ws in enumerate(subs) for w in ws for p in sorted(val[w])]
        return [p for p, _ in pairs], torch.tensor([k for _, k in pairs], dtype=torch.int64)
    return {"source_train": train(source), "source_test": test(source),
            "target_train": train(target), "target_test": test(target)}


def _pick(value, allowed, path, where, column):
    """Position of value in allowed ("-1"/"1" -> 0/1)."""
    if (value or "").strip() not in allowed:
        raise SystemExit(f"error: {path}, {where}: {column} is {value!r}; "
                         f"expected one of {', '.join(allowed)}")
    return allowed.index(value.strip())


def group_files(name, root):
    """Waterbirds (root: the released folder) or CelebA (torchvision's root)
    -> {"train"|"val"|"test": (paths, y, g)}: y the label (waterbird;
    blond), g = 2*y + a the group, a the spurious attribute (water; male)."""
    if name not in ("waterbirds", "celeba"):
        raise SystemExit(f"error: unknown group dataset {name!r}")
    rows, split_values = [], ("0", "1", "2")  # (file, train/val/test, y, a)
    if name == "waterbirds":
        path, folder = os.path.join(root, "metadata.csv"), root
        need = ("img_filename", "y", "split", "place")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} is missing; --data_dir must be the "
                             "released Waterbirds folder")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in need if c not in (reader.fieldnames or [])]
            if missing:
                raise SystemExit(f"error: {path} lacks the column {', '.join(missing)};"
                                 f" expected the columns {', '.join(need)}")
            rows = [(r["img_filename"], *(
                _pick(r[c], split_values[:n], path, f"line {i}", c)
                for c, n in (("split", 3), ("y", 2), ("place", 2))))
                for i, r in enumerate(reader, 2)]
    else:
        names = ("list_attr_celeba.txt", "list_eval_partition.txt")
        attr, part = (os.path.join(root, "celeba", f) for f in names)
        folder = os.path.join(root, "celeba", "img_align_celeba")
        for f in (attr, part):
            if not os.path.isfile(f):
                raise SystemExit(f"error: {f} is missing; --data_dir must be "
                                 "torchvision's CelebA root")
        with open(attr) as f:
            f.readline()  # the image count
            cols = f.readline().split()
            missing = [c for c in ("Blond_Hair", "Male") if c not in cols]
            if missing:
                raise SystemExit(f"error: {attr} lacks the attribute column "
                                 f"{', '.join(missing)}")
            fields = [(c, cols.index(c) + 1) for c in ("Blond_Hair", "Male")]
            ya = {}  # file -> (blond, male) as 0/1; field 0 is the file
            for i, v in enumerate((line.split() for line in f), 3):
                if v and len(v) != len(cols) + 1:
                    raise SystemExit(f"error: {attr} line {i} has {len(v)} fields;"
                                     f" expected <file> and {len(cols)} values")
                if v:
                    ya[v[0]] = tuple(_pick(v[j], ("-1", "1"), attr, f"line {i}", c)
                                     for c, j in fields)
        for file, split in _pairs(part, None, "'<file> <0|1|2>' per line"):
            if file not in ya:
                raise SystemExit(f"error: {file} of {part} has no line in {attr}")
            k = _pick(split, split_values, part, file, "the partition")
            rows.append((file, k, *ya[file]))
    out = {}
    for k, split in enumerate(("train", "val", "test")):
        sel = [r for r in rows if r[1] == k]
        y, a = (torch.tensor([r[j] for r in sel], dtype=torch.int64) for j in (2, 3))
        out[split] = ([os.path.join(folder, r[0]) for r in sel], y, 2 * y + a)
    return out


def _check_family(name, root):
    if name not in FAMILY:
        raise SystemExit(f"error: unknown dataset {name!r}")
    if not root:
        raise SystemExit(f"error: no folder given for {name}; pass --data_dir")


def family_source(name, root, info_dir=None, size=224, cache_dir=None, limit=0):
    """({"train": (x, y), "test": (x, y) or None}, classes) to train a source
    on: BREEDS' source subclasses, the groups' train split (no test). limit:
    a seeded subset of at most that many training images."""
    if name == "imagenet_c":
        raise SystemExit("error: imagenet_c has no source training: its source is "
                         "torchvision's ResNet-50 (finetune.py --ckpt imagenet)")
    _check_family(name, root)
    if name in BREEDS:
        f = breeds_files(name, root, info_dir)
        (paths, y), test = f["source_train"], f["source_test"]
    else:
        (paths, y, _), test = group_files(name, root)["train"], None
    k = int(y.max()) + 1 if name in BREEDS else 2  # a partial hierarchy: < 17
    if 0 < limit < len(paths):
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(paths), generator=g)[:limit].sort().values
        paths, y = [paths[i] for i in idx.tolist()], y[idx]
    crop = name != "tiny_breeds"  # Tiny-ImageNet's 64 px images are resized whole
    test = None if test is None else (read_images(test[0], size, cache_dir, crop=crop), test[1])
    return {"train": (read_images(paths, size, cache_dir, crop=crop), y), "test": test}, k


def family_target(name, root, info_dir=None, corruption=None, severity=5,
                  train_n=None, val_per_class=None, test_per_class=None, seed=0,
                  size=224, cache_dir=None):
    """Target data (PROTOCOL.md section 8), decoding only what it returns:
    {"train"|"val"|"test": (x, y), "groups": {"val"|"test": g} or None,
    "source_test", "num_classes", "counts"}. None takes the protocol's value;
    test_per_class 0: all (not for imagenet_c)."""
    _check_family(name, root)
    groups = source_test = None
    if name == "imagenet_c":  # the same files for every corruption
        parse_imagenet_c(corruption or "")
        paths, y, wnids = imagenet_c_files(root, corruption, severity)
        k = len(wnids)
        idx = target_split(y, 5 * k if train_n is None else train_n,
                           10 if val_per_class is None else val_per_class,
                           10 if test_per_class is None else test_per_class, seed,
                           num_classes=k)
        split = {s: (paths, y, idx[s]) for s in ("train", "val", "test")}
    else:  # living17 / entity30: per superclass; waterbirds / celeba: per group
        if name in BREEDS:  # train, val: ImageNet train; test: its val
            f = breeds_files(name, root, info_dir)
            (paths, y), (tpaths, ty) = f["target_train"], f["target_test"]
            g, tg, k = y, ty, int(f["source_train"][1].max()) + 1
            n = 850 if train_n is None else train_n
            counts = [[n // k + (c < n % k) for c in range(k)],  # spread
                      [10 if val_per_class is None else val_per_class] * k]
            xs, ys = f["source_test"]
            source_test = (read_images(xs, size, cache_dir, crop=name != "tiny_breeds"), ys)
        else:  # group-balanced, drawn from the val split (our reading)
            s, k, n = group_files(name, root), 2, 400 if train_n is None else train_n
            if n % 4:
                raise SystemExit(f"error: --train_n {n} must be a multiple of 4 "
                                 "(the same count for each of 4 groups)")
            (paths, y, g), (tpaths, ty, tg) = s["val"], s["test"]
            counts = [[n // 4] * 4, [30 if val_per_class is None else val_per_class] * 4]
        tr, va = per_class_split(g, counts, seed)
        te, = per_class_split(tg, [[test_per_class or None] * len(counts[0])], seed,
                              ("--test_per_class",))
        split = {"train": (paths, y, tr), "val": (paths, y, va), "test": (tpaths, ty, te)}
        groups = None if name in BREEDS else {"val": g[va], "test": tg[te]}
    crop = name != "tiny_breeds"
    out = {s: (read_images([p[i] for i in idx.tolist()], size, cache_dir, crop=crop), y[idx])
           for s, (p, y, idx) in split.items()}
    return {**out, "groups": groups, "source_test": source_test, "num_classes": k,
            "counts": {s: len(v[1]) for s, v in out.items()}}


def imagenet_target(args, num_classes, dev):
    """data.cifar_target() for the ImageNet family: a function corruption ->
    ({split: (x, y[, groups])} on dev, the source test split or None);
    waterbirds / celeba carry their group ids as a third tensor."""
    said = []

    def load(c):
        t = family_target(args.data, args.data_dir, args.breeds_dir,
                          c if args.data == "imagenet_c" else None, args.severity,
                          args.train_n, args.val_per_class, args.test_per_class,
                          args.split_seed, args.image_size, args.cache_dir)
        if t["num_classes"] != num_classes:
            fix = "--ckpt imagenet needs all 1000 ImageNet classes"
            if args.ckpt != "imagenet":
                fix = f"retrain {args.ckpt} on it"
            raise SystemExit(
                f"error: {args.data_dir} has {t['num_classes']} classes but the "
                f"source model has {num_classes} outputs; {fix}")
        groups = t["groups"] or {}
        if not said:
            said.append(1)
            sizes = ", ".join(f"{s} {t[s][1].numel():,d}" for s in ("train", "val", "test"))
            print(f"target: {args.data} from {args.data_dir}, {t['num_classes']} "
                  f"classes, {args.image_size} px; split (seed {args.split_seed}) "
                  f"per {'group' if groups else 'class'}: {sizes}"
                  + ("; metric: worst-group accuracy" if groups else ""))
        splits = {s: tuple(v.to(dev) for v in (*t[s], *([groups[s]] if s in groups else [])))
                  for s in ("train", "val", "test")}
        src = t["source_test"] and tuple(v.to(dev) for v in t["source_test"])
        return splits, src
    return load
