"""What happens when things go wrong: divergence, bad sizes and numbers, corrupt caches, broken files, kills,
stale or quick results. Each test is one failure a careful user met; each must end in one clear line (or a
correct recovery), with nothing half-written and no good file replaced."""
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints as CK
import common as C
import data
import finetune as FT
import model as M
import finetune as P
import table
import train as T
from tinydata import write_cifar


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# conftest.py: the narrow ResNet-26 (the resume test opts out)
pytestmark = pytest.mark.usefixtures("small_net")


def ft(tiny, out, *extra):
    root, src = tiny
    return ["--ckpt", src, "--data_dir", str(root), "--cache_dir", str(root / "cache"), "--device", "cpu",
            "--data", "cifar_flip", "--train_n", "50", "--val_per_class", "2", "--test_per_class", "3",
            "--epochs", "2", "--batch_size", "25", "--out_dir", str(out), *extra]


def one_line(e):
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


# 1. divergence ----------------------------------------------------------------------------------------------

def test_diverging_finetune_stops_with_one_line_and_writes_nothing(tiny, tmp_path):
    with pytest.raises(SystemExit) as e:
        FT.main(ft(tiny, tmp_path / "res", "--tune", "all", "--lrs", "1e30"))
    msg = one_line(e)
    assert "diverged" in msg and "lr 1e+30" in msg and "--lrs" in msg
    assert not os.path.exists(tmp_path / "res") or not os.listdir(tmp_path / "res")


def test_diverging_source_training_keeps_the_good_checkpoint(tiny, tmp_path):
    root, src = tiny
    good = tmp_path / "good.pt"
    good.write_bytes(open(src, "rb").read())
    with pytest.raises(SystemExit) as e:
        T.main(["--data_dir", str(root), "--cache_dir", str(root / "cache"), "--epochs", "3", "--limit", "40",
                "--batch_size", "20", "--device", "cpu", "--lr", "1e12", "--out", str(good)])
    assert "diverged" in one_line(e) and good.read_bytes() == open(src, "rb").read()


def test_a_nan_checkpoint_is_refused(tiny, tmp_path):
    net, ckpt = CK.load_checkpoint(tiny[1])
    with torch.no_grad():
        net.fc.weight[0, 0] = math.nan
    bad = str(tmp_path / "nan.pt")
    CK.save_checkpoint(bad, net, T.parse_args([]), {})
    with pytest.raises(SystemExit) as e:
        CK.load_checkpoint(bad)
    assert "non-finite" in one_line(e) and "fc.weight" in str(e.value.code)


# 2. sizes and numbers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, says", [
    (["--val_per_class", "-5"], "--val_per_class"), (["--val_per_class", "0"], "--val_per_class"),
    (["--test_per_class", "-1"], "--test_per_class"), (["--lrs=-1e-3"], "--lrs"), (["--lrs", "nan"], "--lrs"),
    (["--lrs", "inf"], "--lrs"), (["--epochs", "0"], "--epochs"), (["--corruption", ""], "--corruption"),
    (["--wd", "nan"], "--wd"), (["--l1_lambdas", "-1"], "--l1_lambdas"), (["--tune", "fc,none"], "'none'")])
def test_bad_numbers_fail_before_any_work(tiny, tmp_path, bad, says):
    with pytest.raises(SystemExit) as e:
        FT.main(ft(tiny, tmp_path / "res", *bad))
    assert says in one_line(e) and not os.path.exists(tmp_path / "res")


def test_test_per_class_0_means_all_the_rest_and_splits_never_overlap():
    y = torch.arange(10).repeat(30)  # 30 images a class
    idx = data.target_split(y, train_n=50, val_per_class=2, test_per_class=0, seed=1)
    assert [len(idx[s]) for s in ("train", "val", "test")] == [50, 20, 230]
    every = torch.cat(list(idx.values()))
    assert len(every.unique()) == len(every) == 300  # disjoint, and together every image
    assert all((y[idx[s]].bincount() == n).all() for s, n in (("train", 5), ("val", 2), ("test", 23)))


@pytest.mark.parametrize("holdout", [160, 500, -1])
def test_holdout_must_leave_training_images(tiny, holdout):
    d = data.load_cifar10(str(tiny[0]), None)
    with pytest.raises(SystemExit) as e:
        data.source_and_pool(d, holdout)
    assert "--holdout" in one_line(e)


def test_train_epochs_0_and_a_bad_lr_are_errors():
    for bad in (["--epochs", "0"], ["--lr", "nan"], ["--lr", "-0.1"]):
        with pytest.raises(SystemExit) as e:
            T.parse_args(bad)
        assert e.value.code == 2  # argparse's error: one usage line and the message


# 3. strict JSON and the table -------------------------------------------------------------------------------

def test_results_are_strict_json_and_a_bad_file_is_named_not_fatal(tmp_path):
    assert C.tidy({"a": math.nan, "b": [1.0, math.inf], "c": "x"}) == {"a": None, "b": [1.0, None], "c": "x"}
    good = {"data": "cifar_flip", "corruption": "clean", "tune": "fc", "seed": 0, "test_acc": 90.0,
            "val_acc": 1}
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text(json.dumps({**good, "tune": "all", "test_acc": math.nan}))  # bare NaN
    md = table.main(["--results", str(tmp_path)])
    assert "skipped" in md and "bad.json" in md and "not a finite number" in md
    assert (tmp_path / "table.md").exists()


# 4. caches --------------------------------------------------------------------------------------------------

def test_a_corrupted_pool_cache_is_rebuilt(tmp_path, capsys):
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    pool = (x, torch.arange(20) % 10)
    want, _ = data.shifted_pool(pool, "gaussian_noise", 5, 0, str(tmp_path), "cpu")
    path, = [p for p in tmp_path.iterdir() if p.suffix == ".pt"]
    raw = bytearray(path.read_bytes())
    i = raw.find(want[0, 0, 0].numpy().tobytes()[:16])  # a run of pixels inside the stored tensor
    raw[i:i + 16] = bytes(255 - b for b in raw[i:i + 16])
    path.write_bytes(bytes(raw))
    got, _ = data.shifted_pool(pool, "gaussian_noise", 5, 0, str(tmp_path), "cpu")
    assert torch.equal(got, want) and "fails its checksum" in capsys.readouterr().out


def test_cifar_cache_follows_the_content_not_the_file_times(tmp_path):
    folder = write_cifar(tmp_path, train_sizes=(20,), test_size=10)
    a = data.load_cifar10(str(tmp_path), str(tmp_path / "cache"))
    batch = os.path.join(folder, "test_batch")
    st = os.stat(batch)
    with open(batch, "rb") as f:
        d = pickle.load(f)
    d[b"labels"] = [9 - v for v in d[b"labels"]]  # same size, same time, other content
    with open(batch, "wb") as f:
        pickle.dump(d, f)
    os.utime(batch, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(batch) == st.st_size
    b = data.load_cifar10(str(tmp_path), str(tmp_path / "cache"))
    assert torch.equal(b["test"][1], 9 - a["test"][1])


# 5. late failures, resume -----------------------------------------------------------------------------------

def test_an_unwritable_output_fails_before_the_compute(tiny, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(FT.checkpoints, "load_source", lambda *a: pytest.fail("computed first"))
    with pytest.raises(SystemExit) as e:
        FT.main(ft(tiny, tmp_path / "afile" / "res", "--tune", "fc"))
    assert "--out_dir" in one_line(e) and "afile" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        T.main(["--out", str(tmp_path / "afile" / "src.pt")])
    assert "--out" in one_line(e)


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path):
    # train.py in a process of its own, with the narrow ResNet-26 as here; one thread everywhere
    write_cifar(tmp_path, train_sizes=(64,), test_size=20)
    argv = ["--data_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"), "--epochs", "10",
            "--batch_size", "16", "--device", "cpu", "--milestones", "4,7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, cut = str(tmp_path / "whole.pt"), str(tmp_path / "cut.pt")
    T.main(argv + ["--out", whole])  # the uninterrupted run, in this process
    train = [sys.executable, "-c", "import sys, model, tinydata, train; sys.argv[0] = 'train.py'; "
             "model.ARCHS['resnet26'] = tinydata.narrow_resnet26; train.main(sys.argv[1:])"]
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
    p = subprocess.Popen([*train, *argv, "--out", cut], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 60:  # kill -9 once a few epochs are saved
        if os.path.exists(cut + ".state") and torch.load(cut + ".state", weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(cut) and 2 <= torch.load(cut + ".state", weights_only=True)["epoch"] < 10
    r = subprocess.run([*train, *argv, "--out", cut, "--resume"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stdout + r.stderr
    a, b = (torch.load(f, weights_only=True)["state_dict"] for f in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit on the CPU
    assert not os.path.exists(cut + ".state")


# 6. one line instead of a traceback -------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "shape", "labels"])
def test_broken_cifar_files_are_one_line(tmp_path, damage):
    folder = write_cifar(tmp_path, train_sizes=(20,), test_size=10)
    path = os.path.join(folder, "data_batch_1")
    if damage == "truncated":
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[:len(raw) // 2])
    else:
        with open(path, "rb") as f:
            d = pickle.load(f)
        if damage == "shape":
            d[b"data"] = d[b"data"][:, :1000]
        else:
            d[b"labels"][3] = 12
        with open(path, "wb") as f:
            pickle.dump(d, f)
    with pytest.raises(SystemExit) as e:
        data.load_cifar10(str(tmp_path), None)
    assert "data_batch_1" in one_line(e)


def test_checkpoint_errors_say_what_is_wrong(tiny, tmp_path):
    net, _ = CK.load_checkpoint(tiny[1])
    ckpt = {"version": 7, "arch": "resnet26", "num_classes": 10, "state_dict": net.state_dict()}
    torch.save(ckpt, tmp_path / "v7.pt")
    with pytest.raises(SystemExit) as e:
        CK.load_checkpoint(str(tmp_path / "v7.pt"))
    assert "version-7" in one_line(e) and "AssertionError" not in str(e.value.code)
    five = M.ResNet26(5, n=2, widths=(8, 8, 16))
    CK.save_checkpoint(str(tmp_path / "five.pt"), five, T.parse_args([]), {})
    with pytest.raises(SystemExit) as e:
        FT.main(ft(tiny, tmp_path / "res", "--tune", "fc") + ["--ckpt", str(tmp_path / "five.pt")])
    assert "5 outputs" in one_line(e)
    with pytest.raises(SystemExit) as e:
        CK.load_checkpoint(str(tmp_path))
    assert "folder" in one_line(e)


# 8. a quick run never stands in for a protocol run; 9. orphan temp files ------------------------------------

def test_quick_runs_get_their_own_file_name():
    full, quick = P.parse_args([]), P.parse_args(["--epochs", "1"])
    assert P.result_path(full, "fog") == os.path.join("results", "cifar_c-fog-layer1-s0.json")
    assert P.result_path(quick, "fog") != P.result_path(full, "fog")
    same = P.parse_args(["--cpu_bf16", "--device", "cpu", "--out_dir", "results"])  # no number changes
    assert P.result_path(same, "fog") == P.result_path(full, "fog")


def test_orphan_temp_files_of_dead_writers_are_removed(tmp_path):
    path = str(tmp_path / "x.pt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for pid in (dead, str(os.getppid())):
        (tmp_path / f"x.pt.tmp{pid}").write_text("half")
    C.atomic_save({"a": 1}, path)
    assert sorted(os.listdir(tmp_path)) == ["x.pt", f"x.pt.tmp{os.getppid()}"]  # a live writer's stays


# 10. each result names the code that made it ----------------------------------------------------------------

def test_code_version_is_the_commit_and_says_dirty(tmp_path):
    assert C.code_version(str(tmp_path)) is None  # not a git checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "a"], check=True)
    head = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert C.code_version(str(tmp_path)) == head and len(head) == 40
    (tmp_path / "b.py").write_text("new, untracked\n")  # untracked files (results, caches) are not changes
    assert C.code_version(str(tmp_path)) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert C.code_version(str(tmp_path)) == head + "-dirty"


def test_device_name_says_which_cpu_and_whether_it_has_amx(tmp_path):
    cpu, unit = torch.device("cpu"), torch.backends.cpu.get_cpu_capability()
    core = "processor\t: {}\nmodel name\t: Some  CPU 9\nflags\t\t: fpu avx512f{}\n"
    (tmp_path / "amx").write_text(core.format(0, " amx_bf16 amx_tile") + "\n" + core.format(1, ""))
    (tmp_path / "plain").write_text(core.format(0, ""))
    assert C.device_name(cpu, str(tmp_path / "amx")) == f"cpu (Some  CPU 9, {unit}, AMX)"
    assert C.device_name(cpu, str(tmp_path / "plain")) == f"cpu (Some  CPU 9, {unit})"
    missing = C.device_name(cpu, str(tmp_path / "none"))  # not Linux: no cpuinfo, still a name and the unit
    assert missing.startswith("cpu (") and missing.endswith(f", {unit})") and "AMX" not in missing
