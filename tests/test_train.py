import os

import pytest
import torch

import checkpoints as CK
import model as M
import train
from tinydata import write_cifar


@pytest.mark.usefixtures("small_net")
def test_smoke_run_writes_loadable_checkpoint(tmp_path, capsys):
    write_cifar(tmp_path, train_sizes=(40, 40), test_size=30)
    out = tmp_path / "ck" / "src.pt"
    net = train.main(["--data_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"), "--epochs", "2",
                      "--batch_size", "16", "--device", "cpu", "--out", str(out)])
    log = capsys.readouterr().out
    assert "epoch   2/2" in log and "img/s" in log and "ETA" in log
    assert os.listdir(out.parent) == ["src.pt"]  # no temp file left behind
    ckpt = torch.load(out, weights_only=True)  # plain types only
    assert ckpt["version"] == CK.CKPT_VERSION and ckpt["arch"] == "resnet26" and ckpt["args"]["epochs"] == 2
    assert 0 <= ckpt["metrics"]["test_acc"] <= 100
    loaded, _ = CK.load_checkpoint(str(out))
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), loaded.eval()(x))
    # training moved the weights away from a fresh init
    assert not torch.equal(loaded.fc.weight, M.build_model().fc.weight)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_corrupt_checkpoint_is_one_clear_line(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint cut in half
        CK.save_checkpoint(str(path), M.build_model(), train.parse_args([]), {})
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        CK.load_checkpoint(str(path))
    assert str(e.value).startswith("error:") and "\n" not in str(e.value) and "retrain" in str(e.value)


def test_missing_checkpoint_names_the_command(tmp_path):
    with pytest.raises(SystemExit, match="python train.py"):
        CK.load_checkpoint(str(tmp_path / "none.pt"))


def test_bad_flag_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--epochs", "-3"])
    out = capsys.readouterr()
    assert e.value.code != 0 and "--epochs" in out.err and not out.out


def test_small_mode_defaults_and_overrides():
    a = train.parse_args(["--small"])
    assert (a.epochs, a.limit, a.milestones) == (15, 4000, "10,13")
    assert train.parse_args(["--small", "--epochs", "3"]).epochs == 3
    assert train.parse_args([]).milestones == "50,65"


def test_a_source_lands_where_finetune_looks_for_it():
    # README: "python train.py --data tiny_breeds && python finetune.py --data tiny_breeds ..."
    import finetune
    assert train.parse_args([]).out == "ckpt/source.pt"
    for data in set(train.RECIPES) - {"cifar10"}:
        assert train.parse_args(["--data", data]).out == finetune.PROTOCOL[data]["ckpt"], data
    assert train.parse_args(["--data", "celeba", "--out", "x.pt"]).out == "x.pt"
