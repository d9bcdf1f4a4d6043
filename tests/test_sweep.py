"""sweep.sh end to end on tiny generated data: a SIGKILL of the whole sweep
mid-way and the re-run that finishes only the missing runs (nothing repeated,
nothing lost), two workers that never run a run twice, a failing run, the
family columns' flags, and slurm/submit.sh against a stand-in sbatch. Each
(dataset, tune, seed) is one finetune.py process (~3 s, mostly imports)."""
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import common
import table
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


def test_kill_then_resume_repeats_nothing_and_loses_nothing(env, tmp_path):
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
    second = sweep(env, "runs", JOBS="2")  # again, with two workers
    assert second.returncode == 0, second.stdout + second.stderr
    after = results(env["RESULTS"])
    why = f"before {sorted(before)}, made before {made_before}\n{second.stdout}"  # if it fails
    assert sorted(after) == sorted(RUNS), why  # nothing lost
    assert all(after[r] == t for r, t in before.items()), why  # nothing repeated
    assert made() - made_before == len(RUNS) - len(before), why  # each made once
    assert "| all[" in table.main(["--results", env["RESULTS"]])  # quick runs: rows of their own
    locks = os.path.join(env["RESULTS"], ".locks")
    assert not os.path.exists(locks), os.listdir(locks)


def hammer(folder):  # claims of finished runs, as a worker skipping them makes
    for k in range(1000):
        with common.claim(os.path.join(folder, f"r{k % 4}.json")) as mine:
            assert not mine


def test_workers_skipping_done_runs_do_not_trip_over_the_lock_folder(tmp_path):
    """Each claimer removes the lock folder when it empties; another one may be
    between making the folder and opening its lock in it at that moment."""
    for k in range(4):
        (tmp_path / f"r{k}.json").write_text("{}")
    procs = [multiprocessing.get_context("fork").Process(target=hammer, args=(str(tmp_path),))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert not (tmp_path / ".locks").exists()


def stand_in(tmp_path, name, script):
    fake = tmp_path / "bin" / name
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return f"{fake.parent}{os.pathsep}{os.environ['PATH']}"


def test_family_columns_get_their_folders_and_failures_are_said(env, tmp_path):
    """A stand-in python records each call: Living-17 gets --data_dir,
    --breeds_dir and layer4; Waterbirds without its folder is left out; a
    failing run is reported, the rest go on."""
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    path = stand_in(tmp_path, "python", f'echo "$@" >> {tmp_path}/calls\n'
                    'case "$*" in *"--tune fc"*) exit 1;; esac\n')
    out = sweep(env, "runs", PATH=path, DATASETS="living17 waterbirds",
                IMAGENET_DIR=str(tmp_path / "imagenet"), BREEDS_DIR="/b",
                METHODS="layer3 fc all", RESULTS=str(tmp_path / "r"))
    assert out.returncode == 1 and "no data: waterbirds" in out.stdout
    assert "living17 tune=fc seed=0: FAILED" in out.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    tunes = [c.split("--tune ")[1].split()[0] for c in calls]
    assert tunes == ["layer3", "layer4", "fc", "all"]
    assert all(f"--data_dir {tmp_path}/imagenet" in c and "--breeds_dir /b" in c for c in calls)


def test_bad_step_and_dataset_are_one_line(env):
    assert sweep(env, "everything").returncode == 2
    out = sweep(env, "runs", DATASETS="cifar_x")
    assert out.returncode == 2 and "unknown dataset 'cifar_x'" in out.stderr


def test_slurm_submits_sources_then_an_array_of_workers(env, tmp_path):
    path = stand_in(tmp_path, "sbatch", f'echo "$@" >> {tmp_path}/jobs\n'
                    f'echo 4$(wc -l < {tmp_path}/jobs)\n')
    out = subprocess.run(["bash", "slurm/submit.sh"], cwd=REPO, capture_output=True, text=True,
                         env={**env, "PATH": path, "JOBS": "3", "RESULTS": str(tmp_path / "r")})
    assert out.returncode == 0, out.stderr
    src, array = (tmp_path / "jobs").read_text().splitlines()
    assert "--wrap bash" in src and "sweep.sh sources" in src
    assert "--dependency=afterok:41" in array and "--array=1-3" in array
    assert "slurm/array.sbatch" in array
