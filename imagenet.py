"""
The paper's ImageNet family (PROTOCOL.md section 8): ImageNet-C, Living-17 and Entity-30 (BREEDS), Waterbirds,
CelebA, read from the user's folders (--data_dir; README "The ImageNet family") into uint8 (N,3,size,size)
tensors.
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
from corruptions import STANDARD15, parse_names
from data import per_class_split, save_cache, target_split

IMAGENET_C15 = STANDARD15  # ImageNet-C has the same 15 standard types
IMAGENET_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # the release's 4 extra folders
FAMILY = ("imagenet_c", "living17", "entity30", "waterbirds", "celeba")
CACHE_MAX_BYTES = 2 << 30  # bigger sets are decoded again each time: decoding is fast, disk is not free
IMAGE_EXTS = (".jpeg", ".jpg", ".png")
# BREEDS (Santurkar et al. 2021) as the robustness library builds them: superclasses at this level below the
# WordNet root n00001740, inside this subtree (None: all), with this many subclasses (half source, half
# target)
BREEDS = {"living17": (5, "n00004258", 4), "entity30": (4, None, 8)}
BREEDS_FILES = ("dataset_class_info.json", "class_hierarchy.txt", "node_names.txt")


def _read_image(path, size):
    """uint8 (3,size,size) by the standard ImageNet eval transform: shorter side to size*256/224, center
    crop."""
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
    cached there as one checksummed file keyed by the files' paths, sizes, inodes and nanosecond times and by
    size. A file that cannot be read or decoded stops with one line naming it."""
    n, cache = len(paths), None
    if cache_dir and n * 3 * size * size <= CACHE_MAX_BYTES:
        for p in paths:
            if not os.path.isfile(p):
                _read_image(p, size)  # raises the one-line error naming it
        stats = [(os.path.abspath(p), s.st_size, s.st_mtime_ns, s.st_ino) for p in paths
                 for s in [os.stat(p)]]
        # thousands of files: stat, not content
        key = hashlib.sha1(repr((stats, size)).encode()).hexdigest()[:16]
        cache = os.path.join(cache_dir, f"images_{n}x{size}_{key}.pt")
        cached = load_cache(cache)
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
        save_cache(x, cache)
    return x


def parse_imagenet_c(spec):
    """'paper15' (the 15 standard types), 'all19' (and the 4 extra) or a comma list -> tuple of names."""
    valid = IMAGENET_C15 + IMAGENET_C_EXTRA
    return parse_names(spec, {"paper15": IMAGENET_C15, "all19": valid}, valid,
                       "ImageNet-C corruption")


def _class_images(folders_per_class):
    """(paths, y int64): the images of each class's folders, by name within a folder; y = the class's
    position."""
    paths, y = [], []
    for k, folders in enumerate(folders_per_class):
        for folder in folders:
            if not os.path.isdir(folder):
                raise SystemExit(f"error: class folder {folder} is missing; expected a folder of images")
            names = sorted(e.name for e in os.scandir(folder)
                           if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
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
        # e.g. pointed at a parent folder
        odd = [d for d in there if d not in IMAGENET_C15 + IMAGENET_C_EXTRA]
        raise SystemExit(f"error: {folder} is missing; {root} holds the corruption folders "
                         f"{', '.join(there) or 'none'}"
                         + (f" ({', '.join(odd)}: not ImageNet-C names)" if odd else "")
                         + f"; expected {layout}")
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
                    raise SystemExit(f"error: {path} line {i} is malformed ({line.strip()[:60]!r}); expected "
                                     f"{fmt}")
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
            raise SystemExit(f"error: BREEDS file {f} is missing; --breeds_dir must hold "
                             f"{', '.join(BREEDS_FILES)} "
                             f"of github.com/MadryLab/BREEDS-Benchmarks (imagenet_class_hierarchy/modified)")
    try:
        with open(info) as f:
            leaves = {c[1] for c in json.load(f) if isinstance(c[1], str)}  # the ImageNet classes
    except (ValueError, TypeError, KeyError, IndexError):
        leaves = None
    if not leaves:
        raise SystemExit(f"error: {info} is malformed; expected a JSON list of [class_number, wnid, name, "
                         "...]")
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
            raise SystemExit(f"error: {edges_file} has a cycle; expected a hierarchy of parent-child edges")
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
            raise SystemExit(f"error: {os.path.join(imagenet_dir, split)} is missing; --data_dir must hold "
                             f"ImageNet as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (torchvision's layout)")
    return {f"{domain}_{part}": _class_images([[os.path.join(imagenet_dir, split, w) for w in ws]
                                               for ws in subs])
            for domain, subs in (("source", source), ("target", target))
            for part, split in (("train", "train"), ("test", "val"))}


def _pick(value, allowed, path, where, column):
    """Position of value in allowed ("0"/"1" -> 0/1, "-1"/"1" -> 0/1); one line naming the file otherwise."""
    if (value or "").strip() not in allowed:
        raise SystemExit(f"error: {path}, {where}: {column} is {value!r}; expected one of "
                         f"{', '.join(allowed)}")
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
            raise SystemExit(f"error: {path} is missing; --data_dir must be the released Waterbirds folder "
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
        names = ("list_attr_celeba.txt", "list_eval_partition.txt")
        attr, part = (os.path.join(root, "celeba", f) for f in names)
        folder = os.path.join(root, "celeba", "img_align_celeba")
        for f in (attr, part):
            if not os.path.isfile(f):
                raise SystemExit(f"error: {f} is missing; --data_dir must be the CelebA root holding "
                                 "celeba/list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba/")
        with open(attr) as f:
            f.readline()  # the image count
            cols = f.readline().split()
            missing = [c for c in ("Blond_Hair", "Male") if c not in cols]
            if missing:
                raise SystemExit(f"error: {attr} lacks the attribute column {', '.join(missing)}; expected "
                                 "line 2 to name the 40 attributes, Blond_Hair and Male among them")
            # +1: field 0 is the file
            ya, fields = {}, [(c, cols.index(c) + 1) for c in ("Blond_Hair", "Male")]
            for i, v in enumerate((line.split() for line in f), 3):
                if v and len(v) != len(cols) + 1:
                    raise SystemExit(f"error: {attr} line {i} has {len(v)} fields; expected <file> and "
                                     f"{len(cols)} values -1/1")
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


def _check_family(name, root):
    if name not in FAMILY:
        raise SystemExit(f"error: unknown dataset {name!r}; valid: {', '.join(FAMILY)}")
    if not root:
        raise SystemExit(f"error: no folder given for {name}; pass --data_dir")


def family_source(name, root, info_dir=None, size=224, cache_dir=None, limit=0):
    """Source training data ({"train": (x, y), "test": (x, y) or None}, num_classes): living17 / entity30 the
    source subclasses (train: ImageNet train, test: ImageNet val); waterbirds / celeba the train split, no
    test. limit > 0: a seeded random subset of at most limit training images."""
    if name == "imagenet_c":
        raise SystemExit("error: imagenet_c has no source training: its source is torchvision's "
                         "ImageNet-pretrained ResNet-50 (finetune.py --ckpt imagenet)")
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
    """Target data for surgical fine-tuning (PROTOCOL.md section 8), decoding only the images it returns:
    {"train"|"val"|"test": (x, y), "groups": {"val"|"test": g} or None, "source_test": (x, y) or None,
    "num_classes": K, "counts": {split: n}}. Defaults for None: imagenet_c 5 / 10 / 10 per class; living17,
    entity30 train_n 850 over the superclasses, 10 val per superclass, all test; waterbirds, celeba 100 train
    and 30 val per group from the val split, all the test split. test_per_class 0 = all, except for
    imagenet_c."""
    _check_family(name, root)
    groups = source_test = None
    if name == "imagenet_c":  # target_split: the same files for every corruption (the release shares names)
        parse_imagenet_c(corruption or "")
        paths, y, wnids = imagenet_c_files(root, corruption, severity)
        k = len(wnids)
        idx = target_split(y, 5 * k if train_n is None else train_n,
                           10 if val_per_class is None else val_per_class,
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
                raise SystemExit(f"error: --train_n {n} must be a multiple of 4 (the same count for each of "
                                 "4 groups)")
            (paths, y, g), (tpaths, ty, tg) = s["val"], s["test"]
            counts = [[n // 4] * 4, [30 if val_per_class is None else val_per_class] * 4]
        tr, va = per_class_split(g, counts, seed)
        te, = per_class_split(tg, [[test_per_class or None] * len(counts[0])], seed, ("--test_per_class",))
        split = {"train": (paths, y, tr), "val": (paths, y, va), "test": (tpaths, ty, te)}
        groups = None if name in BREEDS else {"val": g[va], "test": tg[te]}
    out = {s: (read_images([p[i] for i in idx.tolist()], size, cache_dir), y[idx])
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
