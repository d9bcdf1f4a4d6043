"""sweep.sh end to end on tiny generated data: a SIGKILL of the whole sweep
mid-way and the re-run that finishes only the missing runs (nothing repeated,
nothing lost), two workers that never run a run twice, a failing run, the
family columns' flags, and slurm/submit.sh against a stand-in sbatch. Each
(dataset, tune, seed) is one finetune.py process (~3 s, mostly imports)."""
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import train
from tinydata import untag, write_cifar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ["cifar_c-gaussian_noise-fc-s0", "cifar_c-shot_noise-fc-s0",
        "cifar_c-gaussian_noise-all-s0", "cifar_c-shot_noise-all-s0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Knobs for a 4-run grid (2 corruptions x fc, all) on a tiny CIFAR
    folder and a tiny source from train.main."""
    root = tmp_path_factory.mktemp("sweep")
    write_cifar(root, train_sizes=(20,), test_size=40)
    train.main(["--data_dir", str(root), "--cache_dir", str(root / "cache"), "--epochs", "1",
                "--limit", "20", "--device", "cpu", "--out", str(root / "src.pt")])
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    return {**os.environ, "PATH": path, "DATA_DIR": str(root), "CACHE": str(root / "cache"),
            "CKPT": str(root / "src.pt"), "RESULTS": str(root / "results"), "SEEDS": "0",
            "CORRUPTIONS": "gaussian_noise shot_noise", "DATASETS": "cifar_c",
            "METHODS": "fc all", "DEVICE": "cpu", "OMP_NUM_THREADS": "1", "JOBS": "1",
            "EXTRA": "--epochs 1 --train_n 20 --val_per_class 1 --test_per_class 1 "
                     "--batch_size 16 --lrs 1e-2"}


def sweep(env, *args, **knobs):
    return subprocess.run(["bash", "sweep.sh", *args], cwd=REPO, env={**env, **knobs},
                          capture_output=True, text=True)


def results(folder):
    if not os.path.isdir(folder):
        return {}
    out = {}
    for f in os.listdir(folder):
        if f.endswith(".json"):
            try:  # a temp file may be renamed between the listing and the stat
                out[untag(f)[:-5]] = os.stat(os.path.join(folder, f)).st_mtime_ns
            except FileNotFoundError:
                pass
    return out


def test_kill_then_resume_repeats_nothing_loses_nothing_and_says_what_failed(env, tmp_path):
    log = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(["bash", "sweep.sh"], cwd=REPO, env=env, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while not results(env["RESULTS"]) and p.poll() is None and time.time() - t0 < 60:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # the whole sweep, finetune.py included
    p.wait()
    before = results(env["RESULTS"])
    assert 1 <= len(before) < len(RUNS), (tmp_path / "first.log").read_text()
    # a half-written temp file of the killed run is neither read nor a result
    stale = os.path.join(env["RESULTS"], RUNS[-1] + ".json.tmp99999")
    open(stale, "w").write('{"data": "cifar_c", "corruption": "shot_no')
    logs = os.path.join(env["RESULTS"], "logs")

    def made():  # result lines in the logs (appended to, run after run)
        return sum("result: test" in line for f in os.listdir(logs)
                   for line in open(os.path.join(logs, f)))
    made_before = made()
    # again, with two workers and a --tune that fails in between
    second = sweep(env, JOBS="2", METHODS="fc no_such_block all")
    assert second.returncode == 1 and "SOME FAILED" in second.stdout
    assert "tune=no_such_block seed=0: FAILED" in second.stdout
    after = results(env["RESULTS"])
    assert sorted(after) == sorted(RUNS)  # nothing lost
    assert all(after[r] == t for r, t in before.items())  # nothing repeated
    assert made() - made_before == len(RUNS) - len(before)  # each made once
    assert "| Full Fine-Tuning |" in open(os.path.join(env["RESULTS"], "table.md")).read()
    assert not os.path.exists(os.path.join(env["RESULTS"], ".locks"))


def test_family_columns_get_their_folders_and_missing_ones_are_said(env, tmp_path):
    """A stand-in python records each call: Living-17 gets --data_dir and
    --breeds_dir and layer4; Waterbirds without its folder is left out."""
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = sweep(env, "runs", PATH=f"{fake.parent}{os.pathsep}{env['PATH']}",
                DATASETS="living17 waterbirds", IMAGENET_DIR=str(tmp_path / "imagenet"),
                BREEDS_DIR="/b", METHODS="layer3 fc", RESULTS=str(tmp_path / "r"))
    assert out.returncode == 0 and "no data: waterbirds" in out.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split("--tune ")[1].split()[0] for c in calls] == ["layer3", "layer4", "fc"]
    assert all(f"--data_dir {tmp_path}/imagenet" in c and "--breeds_dir /b" in c for c in calls)


def test_bad_step_and_dataset_are_one_line(env):
    assert sweep(env, "everything").returncode == 2
    out = sweep(env, "runs", DATASETS="cifar_x")
    assert out.returncode == 2 and "unknown dataset 'cifar_x'" in out.stderr


def test_slurm_submits_sources_then_an_array_of_workers(env, tmp_path):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/jobs\necho 4$(wc -l < {tmp_path}/jobs)\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = subprocess.run(["bash", "slurm/submit.sh"], cwd=REPO, capture_output=True, text=True,
                         env={**env, "PATH": f"{fake.parent}{os.pathsep}{env['PATH']}",
                              "JOBS": "3", "RESULTS": str(tmp_path / "r")})
    assert out.returncode == 0, out.stderr
    src, array = (tmp_path / "jobs").read_text().splitlines()
    assert "--wrap bash" in src and "sweep.sh sources" in src
    assert "--dependency=afterok:41" in array and "--array=1-3" in array
    assert "slurm/array.sbatch" in array
