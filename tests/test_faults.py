"""The second round of faults: each case a careful user tried, rerun as
written, gives one line, the right exit code and no lost or misleading
output: finite divergence, damaged checkpoints and state, full disks,
Ctrl-C, bad indices, flags that do not apply, quick runs and ties in the
table, progress, and the offline first run."""
import errno
import json
import os

import pytest
import torch

import checkpoints
import common
import data
import finetune
import table
import train

pytestmark = pytest.mark.usefixtures("small_net")


def one_line(e):
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


def tiny_train(tiny, out, *extra):
    root, _ = tiny
    return train.main(["--data_dir", str(root), "--cache_dir", str(root / "cache"),
                       "--holdout", "60", "--epochs", "1", "--limit", "40",
                       "--batch_size", "20", "--device", "cpu", "--out", str(out), *extra])


def test_a_finite_explosion_is_divergence_and_keeps_out(tiny, tmp_path):
    good = tmp_path / "good.pt"
    good.write_bytes(open(tiny[1], "rb").read())
    with pytest.raises(SystemExit) as e:
        tiny_train(tiny, good, "--lr", "1e6", "--epochs", "2")
    assert "diverged" in one_line(e) and good.read_bytes() == open(tiny[1], "rb").read()
    assert not os.path.exists(f"{good}.state")


def test_a_flipped_weight_fails_the_checkpoint_checksum(tiny, tmp_path):
    ck = torch.load(tiny[1], weights_only=True)
    ck["state_dict"]["fc.weight"][0, 0] = 1.7e37  # one exponent byte, checksum kept
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as e:
        checkpoints.load_checkpoint(str(tmp_path / "bad.pt"))
    assert "checksum" in one_line(e) and "bad.pt" in str(e.value.code)


def test_resume_without_state_or_with_a_damaged_one(tiny, tmp_path):
    out = tmp_path / "src.pt"
    with pytest.raises(SystemExit) as e:
        tiny_train(tiny, out, "--resume")
    assert "no " in one_line(e) and ".state" in str(e.value.code)
    open(f"{out}.state", "wb").write(open(tiny[1], "rb").read()[:100])  # truncated
    with pytest.raises(SystemExit) as e:
        tiny_train(tiny, out, "--resume")
    assert "damaged" in one_line(e) and not out.exists()


def full_disk(real):
    def write(obj, path, *a, **k):  # half a file, then no space
        open(path, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def test_a_full_disk_costs_the_cache_not_the_run(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common.torch, "save", full_disk(torch.save))
    d = data.load_cifar10(str(tiny[0]), str(tmp_path / "cache"))
    assert len(d["test"][0]) == 60 and "warning: cannot write the cache" in capsys.readouterr().out
    assert not os.listdir(tmp_path / "cache")  # no temp file left


def test_a_result_that_cannot_be_written_is_printed_whole(tiny, tmp_path, monkeypatch,
                                                          capsys):
    def no_space(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common, "write_json", no_space)
    root, src = tiny
    with pytest.raises(SystemExit) as e:
        finetune.main(["--ckpt", src, "--data_dir", str(root), "--cache_dir", str(root / "c"),
                       "--device", "cpu", "--data", "cifar_flip", "--tune", "fc", "--train_n",
                       "50", "--val_per_class", "2", "--test_per_class", "3", "--epochs", "1",
                       "--out_dir", str(tmp_path)])
    assert "cannot write" in one_line(e)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1]
    assert json.loads(line)["tune"] == "fc" and "test_acc" in json.loads(line)


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        common.run(interrupted)
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.startswith("interrupted:") and err.count("\n") == 1


def test_gallery_indices_and_table_out_are_one_line(tiny, tmp_path):
    with pytest.raises(SystemExit) as e:
        data.main(["--data_dir", str(tiny[0]), "--cache_dir", "", "--gallery",
                   str(tmp_path / "g.png"), "--images", "99999"])
    assert "--images" in one_line(e) and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv, flag", [
    (["--data", "cifar_flip", "--corruption", "fog"], "--corruption"),
    (["--data", "cifar_flip", "--severity", "3"], "--severity"),
    (["--data", "living17", "--cifar10c_dir", "x"], "--cifar10c_dir"),
    (["--data", "cifar_c", "--image_size", "64"], "--image_size")])
def test_a_flag_that_does_not_apply_is_refused(argv, flag):
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(argv)
    assert f"{flag} does not apply" in one_line(e)


def put(folder, tune, test, val, **changed):
    r = {"data": "cifar_flip", "corruption": "clean", "tune": tune, "seed": 0,
         "test_acc": test, "val_acc": val, "changed": changed, "args": {}}
    name = f"cifar_flip-clean-{tune}-s0{'-q' if changed else ''}.json"
    json.dump(r, open(os.path.join(folder, name), "w"))


def test_quick_runs_get_their_own_rows_and_a_tie_is_a_tie(tmp_path):
    for t in ("layer1", "fc", "all"):
        put(str(tmp_path), t, 60.0, 50.0, epochs=1, train_n=20)  # quick runs only
    md = table.main(["--results", str(tmp_path)])
    assert "| fc[epochs=1,train_n=20] | 60.0 (-) |" in md
    claims = [ln for ln in md.splitlines() if ln.startswith("- CIFAR-F")]
    assert "| Full Fine-Tuning | - |" in md and claims == ["- CIFAR-F: seeds 0; 1 corruption(s): "
                                                           "clean; Cross-Val picked nothing"]
    for t, acc in (("layer1", 50.0), ("fc", 60.0), ("all", 60.0)):  # protocol runs
        put(str(tmp_path), t, acc, 50.0)
    md = table.main(["--results", str(tmp_path)])
    assert "- CIFAR-F: fc - all +0.0 [one pair] (1 pair); the paper: above all -> not " \
           "resolved" in md  # a tie never holds


def test_progress_says_where_and_the_eta(tiny, tmp_path, monkeypatch, capsys):
    clock = iter(range(0, 10 ** 6, 7))  # every look at the clock: 7 s later
    monkeypatch.setattr(finetune.time, "time", lambda: next(clock))
    root, src = tiny
    finetune.main(["--ckpt", src, "--data_dir", str(root), "--cache_dir", str(root / "c"),
                   "--device", "cpu", "--data", "cifar_flip", "--tune", "all", "--lrs",
                   "1e-3,1e-4", "--train_n", "50", "--val_per_class", "2",
                   "--test_per_class", "3", "--epochs", "3", "--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "lr 1/2, epoch 1/3 | val" in out and "ETA" in out


def test_a_local_copy_of_the_papers_file_is_the_papers_model(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"the paper's bytes")
    url, _, name = checkpoints.KNOWN["paper"]
    monkeypatch.setitem(checkpoints.KNOWN, "paper", (url, checkpoints.sha256(str(path)), name))
    args = finetune.parse_args(["--ckpt", str(path), "--corruption", "fog"])
    assert os.path.basename(finetune.result_path(args, "fog")) == "cifar_c-fog-layer1-s0.json"


def test_no_cifar_names_data_dir(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as e:
        data.load_cifar10(str(tmp_path / "none"), None)
    assert "--data_dir" in one_line(e)
