"""The ImageNet family end to end on tiny fake folders (tests/fakefolders.py) and a tiny ResNet-50-shaped net
at 32 px: train.py and finetune.py as a user runs them, BatchNorm kept in eval mode (only the tuned block
moves, bit for bit, and the prefix cache stays exact), the worst-group metric, and bad folders failing with
one line."""
import copy
import json

import pytest
import torch

import checkpoints as CK
import imagenet as family
import finetune as FT
import model as M
import finetune as P
import train as T
from fakefolders import make_breeds_info, make_imagenet, make_imagenet_c, make_waterbirds
from tinydata import result_file, tiny_resnet50, untagged, tune_names, one_lr


QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module", autouse=True)
def small_net():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(M.ARCHS, "resnet50", tiny_resnet50)
        yield


def common(tmp, *extra):
    return ["--device", "cpu", "--cache_dir", str(tmp / "cache"), "--image_size", "32", "--weights", "none",
            "--epochs", "1", "--batch_size", "8", *extra]


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb")
    make_waterbirds(str(root / "wb"), {"train": (6, 2, 2, 6), "val": (5, 5, 5, 5), "test": (3, 4, 2, 3)})
    return root


def test_waterbirds_source_then_surgical_fc_reports_worst_group(waterbirds, tmp_path):
    """train.py's waterbirds recipe (1 epoch here), then finetune.py tunes fc; the cells are worst-group
    accuracy, selected on worst-group val accuracy."""
    ckpt = tmp_path / "wb.pt"
    T.main(["--data", "waterbirds", "--data_dir", str(waterbirds / "wb"), "--out", str(ckpt),
            "--device", "cpu", "--cache_dir", str(tmp_path / "cache"), "--image_size", "32",
            "--weights", "none", "--epochs", "1", "--batch_size", "8"])
    argv = common(tmp_path, "--data", "waterbirds", "--data_dir", str(waterbirds / "wb"), "--ckpt", str(ckpt),
                  "--train_n", "12", "--val_per_class", "2", "--out_dir", str(tmp_path / "res"))
    res, = FT.main(argv + ["--tune", "fc"])
    saved = CK.load_checkpoint(str(ckpt))[1]
    assert saved["arch"] == "resnet50" and saved["num_classes"] == 2 and saved["args"]["data"] == "waterbirds"
    out = json.loads(open(result_file(tmp_path / "res", "waterbirds-clean-fc-s0.json")).read())
    assert out["metric"] == "worst-group accuracy" and out["source_acc"] is None
    # PROTOCOL.md section 8
    assert [h["lr"] for h in out["history"]] == [5e-3, 1e-3, 5e-4] and out["args"]["epochs"] == 1
    for h in out["history"]:
        for e in h["epochs"]:  # 4 groups of the test split: 3, 4, 2, 3 images
            if e["test_acc"] is None:  # test is scored only where selection can land
                continue
            assert len(e["test_group_acc"]) == 4 and e["test_acc"] == min(e["test_group_acc"])
            assert e["test_avg_acc"] == pytest.approx(sum(e["test_group_acc"]) / 4)
    sel = out["selected"]
    assert out["test_acc"] == sel["test_acc"]
    assert out["test_avg_acc"] == sel["test_avg_acc"] == res["test_avg_acc"]
    # fc: everything before the head computed once
    assert out["prefix_stage"] == len(M.STAGES["resnet50"]) - 1


@pytest.mark.parametrize("tune", ["layer1", "layer3", "layer4"])
def test_batchnorm_stays_in_eval_only_the_block_moves(tune):
    """--bn eval (default): every tensor outside the tuned block, BatchNorm running statistics included, is
    bit for bit the source's after training, and the prefix cache gives the same run as no cache."""
    torch.manual_seed(0)
    source = tiny_resnet50(3).eval()
    x, y = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8), torch.arange(24) % 3
    target = {"train": (x[:16], y[:16]), "val": (x[16:20], y[16:20]), "test": (x[20:], y[20:])}
    args = P.parse_args(["--data", "living17", "--tune", tune, "--epochs", "2", "--batch_size", "8",
                         "--device", "cpu"])
    names = tune_names(source, tune)
    runs = []
    for cache in (True, False):
        k = M.frozen_stages(source, names, target, args.prefix_cache_gb) if cache else 0
        splits = {s: (M.prefix(source, x, k), y) for s, (x, y) in target.items()}
        net = copy.deepcopy(source)
        h, _ = one_lr(net, names, splits, 1e-2, args, start=k)
        runs.append(h)
        before, after = source.state_dict(), net.state_dict()
        moved = {n for n in before if not torch.equal(before[n], after[n])}
        assert moved and all(n.startswith(M.BLOCKS["resnet50"][tune]) for n in moved)
        assert not any("running" in n for n in moved)  # eval mode: the statistics are the source's
    k = M.frozen_stages(source, names, target, args.prefix_cache_gb)
    assert k == M.first_stage(names, "resnet50")
    for a, b in zip(runs[0]["epochs"][1:], runs[1]["epochs"][1:]):
        assert a["val_acc"] == b["val_acc"] and a["test_acc"] == b["test_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-6)


def test_prefix_cache_over_budget_runs_whole():
    torch.manual_seed(0)
    source = tiny_resnet50(3).eval()
    x, y = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8), torch.arange(12) % 3
    target = {"train": (x[:4], y[:4]), "val": (x[4:8], y[4:8]), "test": (x[8:], y[8:])}
    names = tune_names(source, "layer4")
    k = M.first_stage(names, "resnet50")
    one = M.prefix(source, x[:1], k)
    every = 12 * one.numel() * one.element_size()  # bytes of all splits' activations
    for gb, want in ((every / 2 ** 30, k), (0.9 * every / 2 ** 30, 0)):
        args = P.parse_args(["--data", "living17", "--tune", "layer4", "--device", "cpu",
                             "--prefix_cache_gb", str(gb)])
        assert M.frozen_stages(source, names, target, args.prefix_cache_gb) == want


def test_living17_train_then_finetune(tmp_path):
    """BREEDS: train.py on the source subclasses from (here random) init, then finetune.py on the unseen
    target subclasses, with the source accuracy kept measured on ImageNet val images of the source
    subclasses."""
    facts = make_breeds_info(str(tmp_path / "breeds"))
    make_imagenet(str(tmp_path / "imagenet"), facts["leaves"], n_train=4, n_val=2)
    folders = ["--data_dir", str(tmp_path / "imagenet"), "--breeds_dir", str(tmp_path / "breeds")]
    ckpt = str(tmp_path / "l17.pt")
    T.main(common(tmp_path, "--data", "living17", "--out", ckpt, *folders))
    assert CK.load_checkpoint(ckpt)[1]["num_classes"] == len(facts["living17"]["superclasses"])
    res, = FT.main(common(tmp_path, "--data", "living17", "--ckpt", ckpt, "--tune", "layer4",
                          "--train_n", "6", "--val_per_class", "2", "--lrs", "1e-3",
                          "--out_dir", str(tmp_path / "res"), *folders))
    assert res["tune"] == "layer4" and res["metric"] == "accuracy" and res["test_avg_acc"] is None
    assert 0 <= res["source_acc_before"] <= 100 and res["severity"] is None
    assert res["args"]["wd"] == 0.0  # PROTOCOL.md section 8 for BREEDS
    assert {n.split(".")[0] for n in res["trained"]["names"]} == {"layer4"}


def test_imagenet_c_two_corruptions_and_the_1000_class_check(tmp_path):
    make_imagenet_c(str(tmp_path / "inc"), corruptions=("fog", "snow"), per_class=6)
    argv = common(tmp_path, "--data", "imagenet_c", "--data_dir", str(tmp_path / "inc"),
                  "--corruption", "fog,snow", "--train_n", "6", "--val_per_class", "2",
                  "--test_per_class", "2", "--lrs", "1e-3", "--out_dir", str(tmp_path / "res"),
                  "--tune", "fc")
    # --ckpt imagenet: the ImageNet head, 3 classes here
    with pytest.raises(SystemExit, match="needs all 1000"):
        FT.main(argv)
    ckpt = str(tmp_path / "in3.pt")
    CK.save_checkpoint(ckpt, tiny_resnet50(3), T.parse_args(["--data", "waterbirds"]), {})
    fog, snow = FT.main(argv + ["--ckpt", ckpt])
    assert (fog["corruption"], snow["corruption"], fog["severity"]) == ("fog", "snow", 5)
    assert untagged(tmp_path / "res") == ["imagenet_c-fog-fc-s0.json", "imagenet_c-snow-fc-s0.json"]


def test_wrong_arch_and_missing_folder_are_one_line(tmp_path, waterbirds):
    cifar_ckpt = str(tmp_path / "r26.pt")
    CK.save_checkpoint(cifar_ckpt, M.build_model("resnet26"), T.parse_args([]), {})
    with pytest.raises(SystemExit, match="needs a resnet50 source"):
        FT.main(common(tmp_path, "--data", "waterbirds", "--data_dir", str(waterbirds / "wb"),
                       "--ckpt", cifar_ckpt))
    with pytest.raises(SystemExit, match="metadata.csv is missing") as e:
        T.main(["--data", "waterbirds", "--data_dir", str(tmp_path / "nowhere"),
                "--out", str(tmp_path / "new.pt"), "--device", "cpu", "--weights", "none"])
    assert "\n" not in str(e.value) and not (tmp_path / "new.pt").exists()
    # no silent training
    with pytest.raises(SystemExit, match="python train.py --data waterbirds --data_dir") as e:
        FT.main(common(tmp_path, "--data", "waterbirds", "--data_dir", str(waterbirds / "wb"),
                       "--ckpt", str(tmp_path / "new.pt")))
    with pytest.raises(SystemExit, match="layer4"):
        P.parse_args(["--data", "cifar_c", "--tune", "layer4"])  # ResNet-26 has three blocks
    assert family.FAMILY == tuple(d for d in P.PROTOCOL if not d.startswith("cifar"))
