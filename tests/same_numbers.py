"""
Do two versions of the code give the same numbers? A fixed set of small runs
(every method, both objectives, bf16, the ImageNet family on fake folders, a
source training), driven through the scripts' main(argv) only, so any version
with the same flags can be compared. Narrow nets (tinydata) keep it fast.

    python tests/same_numbers.py --write before.json   # on the old code
    python tests/same_numbers.py --check before.json   # on the new: exit 1 if any differs

About 2-4 minutes on a 2-core CPU.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import fakefolders as fake  # noqa: E402
import finetune  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
from tinydata import narrow_resnet26, tiny_resnet50, write_cifar  # noqa: E402

TINY = ["--device", "cpu", "--epochs", "2", "--batch_size", "16"]
CIFAR_RUNS = {  # name -> finetune.py flags beyond the data and source
    "none": ["--tune", "none"],
    "layer1": ["--tune", "layer1"],
    "layer2": ["--tune", "layer2"],
    "layer3": ["--tune", "layer3"],
    "fc": ["--tune", "fc"],
    "all": ["--tune", "all"],
    "prefixes": ["--tune", "layer2.0.,fc."],
    "l1": ["--tune", "l1", "--l1_lambdas", "1e-4,1e-3"],
    "auto_rgn": ["--tune", "auto_rgn"],
    "auto_snr": ["--tune", "auto_snr"],
    "auto_snr_pe": ["--tune", "auto_snr", "--snr", "per_example", "--snr_n", "16"],
    "flip_fc": ["--data", "cifar_flip", "--tune", "fc"],
    "flip_all_bf16": ["--data", "cifar_flip", "--tune", "all", "--cpu_bf16"],
    "no_cache": ["--tune", "layer3", "--prefix_cache_gb", "0"],
    "memo": ["--objective", "memo", "--tune", "layer1", "--memo_copies", "4",
             "--test_per_class", "2"],
    "entropy": ["--objective", "entropy", "--tune", "layer1"],
    "entropy_rgn": ["--objective", "entropy", "--tune", "auto_rgn"],
}


def numbers(r):
    """What a result says, without times, paths and versions."""
    out = {k: r.get(k) for k in ("test_acc", "val_acc", "source_acc", "source_acc_before",
                                 "test_avg_acc", "selected")}
    out["trained"] = r["trained"]["params"]
    keep = ("epoch", "train_loss", "val_acc", "val_loss", "test_acc", "test_loss",
            "val_avg_acc", "test_avg_acc", "test_group_acc")
    out["history"] = [{**{k: h.get(k) for k in ("lr", "lambda", "rgn", "snr")},
                       "epochs": [{k: e.get(k) for k in keep} for e in h.get("epochs", [])],
                       "stream": [{k: b.get(k) for k in ("n", "entropy", "acc")}
                                  for b in h.get("stream", [])]}
                      for h in r["history"]]
    return out


def digest(path):
    ck = torch.load(path, weights_only=True)
    h = hashlib.sha1()
    for k, v in sorted(ck["state_dict"].items()):
        h.update(k.encode() + v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"weights": h.hexdigest(), "test_acc": ck["metrics"]["test_acc"]}


def run_all(tmp):
    model.ARCHS["resnet26"], model.ARCHS["resnet50"] = narrow_resnet26, tiny_resnet50
    out = {}
    cifar = os.path.join(tmp, "cifar")
    write_cifar(cifar, train_sizes=(200, 200), test_size=200)
    src = os.path.join(tmp, "src.pt")
    train.main(["--data_dir", cifar, "--cache_dir", os.path.join(tmp, "cache"),
                "--holdout", "100", "--epochs", "2", "--limit", "120",
                "--batch_size", "20", "--device", "cpu", "--out", src])
    out["train_cifar"] = digest(src)
    base = ["--data_dir", cifar, "--cache_dir", os.path.join(tmp, "cache"), "--ckpt", src,
            "--train_n", "100", "--val_per_class", "3",
            "--test_per_class", "10", *TINY]
    for name, flags in CIFAR_RUNS.items():
        c = [] if "cifar_flip" in flags else ["--corruption", "gaussian_noise"]
        argv = base + c + flags + ["--out_dir", os.path.join(tmp, "res", name)]
        out[name] = [numbers(r) for r in finetune.main(argv)]
    # the ImageNet family on fake folders, 32 px
    wb = os.path.join(tmp, "wb")
    fake.make_waterbirds(wb)
    wb_ckpt = os.path.join(tmp, "wb.pt")
    train.main(["--data", "waterbirds", "--data_dir", wb, "--out", wb_ckpt, "--epochs", "1",
                "--weights", "none", "--image_size", "32", "--batch_size", "8",
                "--device", "cpu"])
    out["train_waterbirds"] = digest(wb_ckpt)
    fam = ["--image_size", "32", "--cache_dir", "", *TINY]
    runs = {"waterbirds_fc": ["--data", "waterbirds", "--data_dir", wb, "--ckpt", wb_ckpt,
                              "--tune", "fc", "--train_n", "8", "--val_per_class", "2"],
            "waterbirds_layer4": ["--data", "waterbirds", "--data_dir", wb, "--ckpt", wb_ckpt,
                                  "--tune", "layer4", "--train_n", "8",
                                  "--val_per_class", "2"]}
    info = os.path.join(tmp, "breeds")
    facts = fake.make_breeds_info(info)
    imnet = fake.make_imagenet(os.path.join(tmp, "imagenet"), facts["leaves"], n_train=4)
    liv = os.path.join(tmp, "liv.pt")
    train.main(["--data", "living17", "--data_dir", imnet, "--breeds_dir", info, "--out", liv,
                "--epochs", "1", "--weights", "none", "--image_size", "32",
                "--batch_size", "8", "--device", "cpu"])
    out["train_living17"] = digest(liv)
    breeds = ["--data", "living17", "--data_dir", imnet, "--breeds_dir", info,
              "--ckpt", liv, "--train_n", "12", "--val_per_class", "1"]
    runs["living17_layer2"] = breeds + ["--tune", "layer2"]
    runs["living17_auto_rgn"] = breeds + ["--tune", "auto_rgn"]
    for name, flags in runs.items():
        argv = fam + flags + ["--out_dir", os.path.join(tmp, "res", name)]
        out[name] = [numbers(r) for r in finetune.main(argv)]
    return json.loads(json.dumps(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", help="record the numbers here")
    g.add_argument("--check", help="compare with the numbers recorded here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_all(tmp)
    if args.write:
        with open(args.write, "w") as f:
            json.dump(got, f, indent=1)
        print(f"{len(got)} runs recorded in {args.write}")
        return 0
    with open(args.check) as f:
        want = json.load(f)
    bad = [k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
    for k in bad:
        print(f"differs: {k}")
    print(f"{len(got) - len(bad)} of {len(want)} runs give the same numbers")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
