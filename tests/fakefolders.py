"""Tiny fake datasets in the on-disk layouts data.py reads for the ImageNet family: the ImageNet-C release,
ImageNet in the ImageFolder layout with the three BREEDS hierarchy files, Waterbirds and CelebA. The images
are small 40x48 JPEGs (not square, so the loaders resize and crop them) whose colour carries the class, so a
net could learn them; everything is deterministic. Each builder returns what a test needs to know about what
it wrote."""
import json
import os

import torch


H, W = 40, 48  # px

CELEBA_ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
                "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
                "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes "
                "No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling "
                "Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
                "Wearing_Necktie Young").split()


def colour(label):
    """A distinct RGB colour per small integer label, as a uint8 (3,) tensor."""
    rgb = [(70 * label + 40) % 256, (150 * label + 90) % 256, (230 * label + 20) % 256]
    return torch.tensor(rgb, dtype=torch.uint8)


def write_image(path, label, seed=0, background=None, h=H, w=W):
    """Write a JPEG (or a lossless PNG when path ends in .png): the colour of `label` with mild seeded noise,
    inside an 8 px border of the colour of `background` when given. Returns the uint8 (3,h,w) image before
    encoding."""
    from torchvision.io import write_jpeg, write_png
    g = torch.Generator().manual_seed(seed)
    x = colour(label).long()[:, None, None] + torch.randint(-12, 13, (3, h, w), generator=g)
    if background is not None:
        inner = x[:, 8:-8, 8:-8].clone()
        x[:] = colour(background + 7).long()[:, None, None]
        x[:, 8:-8, 8:-8] = inner
    x = x.clamp(0, 255).to(torch.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    (write_png if path.lower().endswith(".png") else write_jpeg)(x, path)
    return x


def make_imagenet_c(root, corruptions=("fog", "snow"), severities=(5,),
                    wnids=("n03000002", "n01000001", "n02000003"), per_class=6):
    """<root>/<corruption>/<severity>/<wnid>/ILSVRC2012_val_<8 digits>.JPEG, per_class images per wnid, with
    the same file names under every corruption and severity (as in the release); every third one ends in
    lower-case .jpeg. Colour = the wnid's position in sorted(wnids) (the label the loader gives). Returns
    {wnid: [names]}."""
    files = {}
    for k, w in enumerate(sorted(wnids)):
        files[w] = [f"ILSVRC2012_val_{k * per_class + j + 1:08d}" + (".jpeg" if j % 3 == 2 else ".JPEG")
                    for j in range(per_class)]
    for ci, c in enumerate(corruptions):
        for s in severities:
            for k, w in enumerate(sorted(wnids)):
                for j, name in enumerate(files[w]):
                    write_image(os.path.join(root, c, str(s), w, name), k, seed=1000 * ci + 100 * s + j)
    return files


def make_imagenet(root, wnids, n_train=4, n_val=2, label_of=None):
    """ImageNet in the ImageFolder layout: <root>/train/<wnid>/<wnid>_<j>.JPEG (n_train each) and
    <root>/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG (n_val each). Colour = label_of[wnid] (default: the
    wnid's position in wnids). Returns root."""
    for k, w in enumerate(wnids):
        label = k if label_of is None else label_of[w]
        for j in range(n_train):
            write_image(os.path.join(root, "train", w, f"{w}_{j}.JPEG"), label, seed=j)
        for j in range(n_val):
            name = f"ILSVRC2012_val_{k * n_val + j + 1:08d}.JPEG"
            write_image(os.path.join(root, "val", w, name), label, seed=50 + j)
    return root


# A small BREEDS hierarchy (parent, child). Root n00001740 (level 0) -> physical (1) -> living n00004258 (2)
# -> organism (3) -> A, B (4) -> superclasses (5). S3 hangs under B (level 5) and also directly under organism
# (level 4): only the longest-path rule puts it at level 5. S1 has a single child T (and a dead-end branch D
# with no ImageNet class below it, pruned), so its split is drawn from the leaves under T's children U1, U2.
_NODES = {"physical": "n10000001", "abstract": "n10000002", "organism": "n10000003", "A": "n10000004",
          "B": "n10000005", "S1": "n10000011", "S2": "n10000012", "S3": "n10000013", "S4": "n10000014",
          "T": "n10000021", "U1": "n10000022", "U2": "n10000023", "D": "n10000029", "X2": "n10000006",
          "X3": "n10000007", "X4": "n10000008", "X5": "n10000009", "living": "n00004258", "root": "n00001740"}
_EDGES = [("root", "physical"), ("root", "abstract"), ("physical", "living"), ("living", "organism"),
          ("organism", "A"), ("organism", "B"), ("A", "S1"), ("A", "S2"), ("B", "S3"), ("organism", "S3"),
          ("B", "S4"), ("S1", "T"), ("S1", "D"), ("T", "U1"), ("T", "U2"),
          ("abstract", "X2"), ("X2", "X3"), ("X3", "X4"), ("X4", "X5")]  # X5: level 5 but not living
_LEAVES = {"U1": 3, "U2": 2, "S2": 4, "S3": 4, "S4": 3, "B": 1, "X5": 4}  # ImageNet classes under each node


def make_breeds_info(info_dir):
    """Write dataset_class_info.json, class_hierarchy.txt and node_names.txt of the small hierarchy above.
    Returns {"leaves": all leaf wnids, "living17" / "entity30": {"superclasses": wnids in label order,
    "leaves": {superclass: sorted leaf wnids}, "names": [...]}}: living17 finds S1, S2, S3 (S4 has 3 < 4
    leaves; X5 is not living), entity30 finds A (9 leaves) and B (8)."""
    leaves, edges = {}, [(_NODES[p], _NODES[c]) for p, c in _EDGES]
    n = 0
    for node, count in _LEAVES.items():
        leaves[node] = [f"n2{n + i:07d}" for i in range(count)]
        edges += [(_NODES[node], w) for w in leaves[node]]
        n += count
    every = sorted(w for ws in leaves.values() for w in ws)
    os.makedirs(info_dir, exist_ok=True)
    with open(os.path.join(info_dir, "dataset_class_info.json"), "w") as f:
        json.dump([[i, w, f"class {w}", [f"{w} name"]] for i, w in enumerate(every)], f)
    with open(os.path.join(info_dir, "class_hierarchy.txt"), "w") as f:
        f.writelines(f"{p} {c}\n" for p, c in edges)
    with open(os.path.join(info_dir, "node_names.txt"), "w") as f:
        f.writelines(f"{w}\t{name} node\n" for name, w in _NODES.items())
    s1 = leaves["U1"] + leaves["U2"]
    living = {"S1": s1, "S2": leaves["S2"], "S3": leaves["S3"]}
    entity = {"A": s1 + leaves["S2"], "B": leaves["S3"] + leaves["S4"] + leaves["B"]}
    facts = {"leaves": every}
    for name, sub in (("living17", living), ("entity30", entity)):
        facts[name] = {"superclasses": [_NODES[s] for s in sub], "names": [f"{s} node" for s in sub],
                       "leaves": {_NODES[s]: sorted(v) for s, v in sub.items()}}
    return facts


def _rows(counts, seed):
    """(split, y, a) per image: counts[split] = images of groups g = 2*y + a = 0..3; shuffled,
    deterministic."""
    rows = [(k, g // 2, g % 2) for k, split in enumerate(("train", "val", "test")) for g in range(4)
            for _ in range(counts[split][g])]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order]


def make_waterbirds(root, counts=None):
    """The released Waterbirds folder: <root>/metadata.csv (img_id, img_filename, y, split, place,
    place_filename) and <root>/<species>/<file>.jpg. counts = {"train"|"val"|"test": images per group 0..3
    (g = 2*y + place)}. Returns the rows written as dicts with img_filename and int y, split, place."""
    counts = counts or {"train": (4, 2, 2, 4), "val": (6, 6, 6, 6), "test": (3, 3, 3, 3)}
    out = []
    for i, (split, y, place) in enumerate(_rows(counts, seed=1)):
        name = f"{'001.Black_footed_Albatross' if y else '100.Brown_Pelican'}/bird_{i:04d}.jpg"
        write_image(os.path.join(root, name), y, seed=i, background=place)
        out.append({"img_filename": name, "y": y, "split": split, "place": place})
    with open(os.path.join(root, "metadata.csv"), "w") as f:
        f.write("img_id,img_filename,y,split,place,place_filename\n")
        f.writelines(f"{i + 1},{r['img_filename']},{r['y']},{r['split']},{r['place']},/o/ocean/{i:08d}.jpg\n"
                     for i, r in enumerate(out))
    return out


def make_celeba(root, counts=None):
    """torchvision's CelebA root: <root>/celeba/list_attr_celeba.txt (count, the 40 attribute names,
    "<file> v1 ... v40" with -1/1, padded like the release), list_eval_partition.txt ("<file> <0|1|2>") and
    img_align_celeba/. counts as in make_waterbirds, groups g = 2*Blond_Hair + Male. Returns rows: dicts
    with file, split, y, male."""
    counts = counts or {"train": (4, 2, 2, 4), "val": (6, 6, 6, 6), "test": (3, 3, 3, 3)}
    folder = os.path.join(root, "celeba")
    g = torch.Generator().manual_seed(2)
    out, attr_lines = [], []
    for i, (split, y, male) in enumerate(_rows(counts, seed=3)):
        name = f"{i + 1:06d}.jpg"
        write_image(os.path.join(folder, "img_align_celeba", name), 2 * y + male, seed=i)
        v = (torch.randint(0, 2, (len(CELEBA_ATTRS),), generator=g) * 2 - 1).tolist()
        v[CELEBA_ATTRS.index("Blond_Hair")], v[CELEBA_ATTRS.index("Male")] = 2 * y - 1, 2 * male - 1
        attr_lines.append(f"{name} " + " ".join(f"{a:2d}" for a in v) + "\n")
        out.append({"file": name, "split": split, "y": y, "male": male})
    with open(os.path.join(folder, "list_attr_celeba.txt"), "w") as f:
        f.write(f"{len(out)}\n" + " ".join(CELEBA_ATTRS) + " \n")
        f.writelines(attr_lines)
    with open(os.path.join(folder, "list_eval_partition.txt"), "w") as f:
        f.writelines(f"{r['file']} {r['split']}\n" for r in out)
    return out


def make_tiny(root, wnids, n_train=4, n_val=2, extra=()):
    """Tiny-ImageNet-200's layout: wnids.txt, train/<wnid>/images/<wnid>_<j>.JPEG (and a
    boxes file), val/images/val_<i>.JPEG with val/val_annotations.txt. extra: classes a copy
    may carry beyond the official ones. Colour = the class's position. Returns root."""
    every = list(wnids) + list(extra)
    os.makedirs(os.path.join(root, "val", "images"), exist_ok=True)
    with open(os.path.join(root, "wnids.txt"), "w") as f:
        f.write("\n".join(every))
    lines = []
    for k, w in enumerate(every):
        for j in range(n_train):
            write_image(os.path.join(root, "train", w, "images", f"{w}_{j}.JPEG"), k % 9, seed=j,
                        h=64, w=64)
        open(os.path.join(root, "train", w, f"{w}_boxes.txt"), "w").close()
        for j in range(n_val):
            name = f"val_{len(lines)}.JPEG"
            write_image(os.path.join(root, "val", "images", name), k % 9, seed=70 + j, h=64, w=64)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63\n")
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        f.writelines(lines)
    return root
