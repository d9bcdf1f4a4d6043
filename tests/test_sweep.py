"""sweep.sh end to end on tiny generated data: the run list, a real SIGKILL of the whole sweep mid-way, the
re-run that finishes only the missing runs, and the table at the end. Each run is a real finetune.py process
(~5 s on a busy CPU, mostly imports), so that grid is three runs. Then JOBS over (fake) GPUs and a failing
run, with a stand-in for finetune.py."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import train
from tinydata import untag, write_cifar


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ["cifar_c-gaussian_noise-none-s0", "cifar_c-gaussian_noise-fc-s0", "cifar_c-gaussian_noise-all-s0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Knobs for a 3-run grid on a tiny CIFAR folder (4 test images a class: 2 train, 1 val, 1 test) and a
    tiny checkpoint from train.main (1 epoch on 20 images)."""
    root = tmp_path_factory.mktemp("sweep")
    write_cifar(root, train_sizes=(20,), test_size=40)
    train.main(["--data_dir", str(root), "--cache_dir", str(root / "cache"), "--epochs", "1", "--limit", "20",
                "--device", "cpu", "--out", str(root / "src.pt")])
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
            "DATA_DIR": str(root), "CACHE": str(root / "cache"), "CKPT": str(root / "src.pt"),
            "RESULTS": str(root / "results"), "SEEDS": "0", "CORRUPTIONS": "gaussian_noise",
            "DATASETS": "cifar_c", "METHODS": "none fc all", "DEVICE": "cpu", "OMP_NUM_THREADS": "1",
            "SMALL": "0", "EXTRA": ("--epochs 1 --train_n 20 --val_per_class 1 --test_per_class 1 "
                                    "--batch_size 16 --lrs 1e-2")}


def sweep(env, *args, jobs=1):
    return subprocess.run(["bash", "sweep.sh", *args], cwd=REPO, env={**env, "JOBS": str(jobs)},
                          capture_output=True, text=True)


def results(env):
    folder = env["RESULTS"]
    if not os.path.isdir(folder):
        return {}
    out = {}
    for f in os.listdir(folder):
        try:  # a temp file may be renamed into its result between the listing and the stat
            out[f] = os.stat(os.path.join(folder, f))
        except FileNotFoundError:
            continue
    return {f: st for f, st in out.items() if ".json" in f}


def test_list_kill_resume_table(env, tmp_path):
    listed = sweep(env, "--list")
    assert listed.returncode == 0 and 'METHODS="none fc all"' in listed.stderr
    lines = listed.stdout.splitlines()
    names = [os.path.basename(ln.split("\t")[0]) for ln in lines]
    assert [untag(n) for n in names] == [r + ".json" for r in RUNS] and all(n != untag(n) for n in names)
    assert "--data cifar_c --corruption gaussian_noise --tune fc --seed 0 --ckpt " in lines[1]

    # first sweep, one run at a time, killed (SIGKILL to its whole process group) once a result exists
    with open(tmp_path / "first.log", "w") as log:
        p = subprocess.Popen(["bash", "sweep.sh"], cwd=REPO, env={**env, "JOBS": "1"}, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while (not any(f.endswith(".json") for f in results(env)) and p.poll() is None
               and time.time() - t0 < 60):
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    before = {f: st for f, st in results(env).items() if f.endswith(".json")}
    assert 1 <= len(before) < len(RUNS), (tmp_path / "first.log").read_text()
    # a half-written temp of the run that was in flight must be neither read nor mistaken for a result
    stale = os.path.join(env["RESULTS"], names[-1] + ".tmp99999")
    with open(stale, "w") as f:
        f.write('{"data": "cifar_c", "corruption": "gaussian_no')

    second = sweep(env, jobs=2)
    assert second.returncode == 0, second.stdout + second.stderr
    progress = [ln for ln in second.stdout.splitlines() if re.match(r"\[\d+/\d+\] ", ln)]
    missing = len(RUNS) - len(before)
    assert f"{missing} runs to do, {len(before)} already done" in second.stdout
    line = r"tune=\w+ seed=0 \[p[0-9a-f]{8}\] -> [\d.]+% \(\d+s, ETA \d+s\)$"
    assert len(progress) == missing and all(re.search(line, ln) for ln in progress), progress
    assert {ln.split("/")[0] for ln in progress} == {f"[{k}" for k in range(1, missing + 1)}
    after = results(env)
    assert sorted(f for f in after if f.endswith(".json")) == sorted(names)
    for f, st in before.items():  # finished before the kill: not run again
        assert (after[f].st_ino, after[f].st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    md = open(os.path.join(env["RESULTS"], "table.md")).read()
    assert md in second.stdout
    for row in ("No Adaptation", "Cross-Val", "Full Fine-Tuning", "L1 Regularize", "Auto-SNR", "Auto-RGN"):
        assert f"| {row} | " in md
    assert "| CIFAR-C | IN-C |" in md and "no data" in md and "Cross-Val picked fc x1" in md
    logs = os.listdir(os.path.join(env["RESULTS"], "logs"))
    assert sorted(map(untag, logs)) == sorted(r + ".log" for r in RUNS)


FAKE_FT = '''"""Stands in for finetune.py (no torch): logs its GPU and times, sleeps, writes a result;
layer2 fails."""
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
for flag in ("--data", "--corruption", "--tune", "--seed", "--out_dir"):
    p.add_argument(flag, default="clean")
a, _ = p.parse_known_args()
t0 = time.time()
time.sleep(float(os.environ.get("FAKE_SLEEP", "0.4")))
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(f"{os.environ.get('CUDA_VISIBLE_DEVICES')} {t0} {time.time()}\\n")
if a.tune == "layer2":
    sys.exit("boom")
with open(os.path.join(a.out_dir, f"{a.data}-{a.corruption}-{a.tune}-s{a.seed}.json"), "w") as f:
    json.dump({"data": a.data, "corruption": a.corruption, "tune": a.tune, "seed": int(a.seed),
               "test_acc": 50.0, "val_acc": 50.0}, f)
'''


def fake_env(tmp_path):
    """Knobs for a sweep whose finetune.py runs are a stand-in (FAKE_FT) and whose machine has two fake GPUs;
    the run list itself still comes from the real finetune.py --result_paths."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (tmp_path / "fake_ft.py").write_text(FAKE_FT)
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    (bin_ / "python").write_text('#!/usr/bin/env bash\n'
                                 'if [[ $1 == */finetune.py && $2 != --result_paths ]]; then '
                                 f'shift; exec {sys.executable} {tmp_path / "fake_ft.py"} "$@"; fi\n'
                                 f'exec {sys.executable} "$@"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "runs.log"), SMALL="0",
               CKPT="paper", RESULTS=str(tmp_path / "results"), SEEDS="0", DATASETS="cifar_c",
               CORRUPTIONS="gaussian_noise", METHODS="none layer1 layer2 layer3 fc all l1 auto_snr",
               DEVICE="auto", EXTRA="", JOBS="4")
    return env


def test_jobs_spread_over_gpus_and_failures_are_reported(tmp_path):
    # A fake nvidia-smi with two GPUs and a python that runs a stand-in for finetune.py: JOBS=4 worker slots
    # must map to GPUs 0,1,0,1, so no GPU ever has more than two runs at once; a failed run is reported and
    # the rest go on.
    env = fake_env(tmp_path)
    r = subprocess.run(["bash", "sweep.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "SOME FAILED" in r.stdout and "| Full Fine-Tuning | 50.0 (-) |" in r.stdout
    assert re.search(r"\] cifar_c/gaussian_noise tune=layer2 seed=0 -> FAILED, see .*layer2-s0.log", r.stdout)
    assert len(list((tmp_path / "results").glob("*.json"))) == 7
    runs = [ln.split() for ln in (tmp_path / "runs.log").read_text().splitlines()]
    assert len(runs) == 8 and {gpu for gpu, _, _ in runs} == {"0", "1"}
    for gpu in "01":  # at most two at once on each GPU: count overlaps at every start
        spans = [(float(a), float(b)) for g, a, b in runs if g == gpu]
        assert max(sum(a <= s < b for a, b in spans) for s, _ in spans) <= 2


def test_family_columns_run_when_their_folder_is_there(env, tmp_path):
    """A Waterbirds folder present, CelebA and ImageNet-C absent: waterbirds runs (with layer4, ResNet-50's
    fourth block, and its own source checkpoint) are listed, the others say "no data"."""
    from fakefolders import make_waterbirds
    make_waterbirds(str(tmp_path / "wb"), {"train": (1, 1, 1, 1), "val": (1, 1, 1, 1), "test": (1, 1, 1, 1)})
    # Living-17 too: the ImageNet folder as --data_dir, plus --breeds_dir (--list only checks they are there)
    (tmp_path / "in" / "train").mkdir(parents=True)
    (tmp_path / "br").mkdir()
    (tmp_path / "br" / "class_hierarchy.txt").touch()
    fam = {**env, "DATASETS": "cifar_c waterbirds celeba imagenet_c living17",
           "WATERBIRDS_DIR": str(tmp_path / "wb"), "CELEBA_DIR": str(tmp_path / "none"),
           "IMAGENET_C_DIR": str(tmp_path / "none"),
           "IMAGENET_DIR": str(tmp_path / "in"), "BREEDS_DIR": str(tmp_path / "br"),
           "FAMILY_CKPT": str(tmp_path / "ck"), "METHODS": "layer3 fc", "SEEDS": "0 1",
           "RESULTS": str(tmp_path / "r")}
    listed = sweep(fam, "--list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    names = [untag(os.path.basename(ln.split("\t")[0])) for ln in lines]
    grid = (("cifar_c-gaussian_noise", ("layer3", "fc")), ("waterbirds-clean", ("layer3", "layer4", "fc")),
            ("living17-clean", ("layer3", "layer4", "fc")))
    assert names == [f"{d}-{t}-s{s}.json" for s in (0, 1) for d, ts in grid for t in ts]
    wb = [ln for ln in lines if "waterbirds-clean-fc-s0" in ln][0]
    assert f"--data waterbirds --tune fc --seed 0 --ckpt {tmp_path / 'ck' / 'waterbirds.pt'}" in wb
    # one folder flag per dataset, --data_dir (BREEDS adds --breeds_dir); the old per-dataset flags are gone
    assert f"--data_dir {tmp_path / 'wb'} " in wb and f"--data_dir {env['DATA_DIR']} " in listed.stdout
    assert not re.search(r"--(waterbirds|celeba|imagenet|imagenet_c)_dir", listed.stdout)
    breeds = [ln for ln in lines if "--breeds_dir" in ln]
    assert len(breeds) == 6 and all(f"--data_dir {tmp_path / 'in'} --breeds_dir {tmp_path / 'br'} " in ln
                                    for ln in breeds if "living17-clean" in ln)
    assert all("living17-clean" in ln for ln in breeds)
    assert listed.stderr.count("no data: celeba") == 1 and "no data: imagenet_c" in listed.stderr


def test_objective_memo_lists_its_own_files(env):
    # OBJECTIVE=memo: result names end in -memo, a comma-free block list (layer1+layer2) is one tune, and the
    # supervised results of the same grid do not count as done
    knobs = {**env, "OBJECTIVE": "memo", "METHODS": "none layer1+layer2"}
    listed = sweep(knobs, "--list").stdout.splitlines()
    outs = [untag(os.path.basename(line.split("\t")[0])) for line in listed]
    assert outs == ["cifar_c-gaussian_noise-none-s0-memo.json",
                    "cifar_c-gaussian_noise-layer1+layer2-s0-memo.json"]
    assert all("--objective memo" in line for line in listed)


def test_two_sweeps_on_one_folder_never_run_a_run_twice(tmp_path):
    # kill -9 the first sweep's shell only: its xargs and the run in flight live on, holding that run's lock.
    # A second sweep started at once skips the run in flight and shares the rest with the orphans:
    # each run once.
    env = {**fake_env(tmp_path), "FAKE_SLEEP": "0.5", "JOBS": "1", "METHODS": "none fc all"}
    p = subprocess.Popen(["bash", "sweep.sh"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    logs, t0 = tmp_path / "results" / "logs", time.time()
    while not (logs.is_dir() and any(logs.iterdir())) and time.time() - t0 < 30:  # the first run has started
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    second = subprocess.run(["bash", "sweep.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    t0 = time.time()
    while len(list((tmp_path / "results").glob("*.json"))) < 3 and time.time() - t0 < 30:  # the orphans' part
        time.sleep(0.1)
    time.sleep(1.0)  # anything still to start would have by now (a run takes 0.5 s)
    runs = (tmp_path / "runs.log").read_text().splitlines()
    assert len(runs) == 3 and len(list((tmp_path / "results").glob("*.json"))) == 3  # every run exactly once
    assert [d.name for d in (tmp_path / "results").glob(".sweep-*")] == []  # each sweep's lists are gone


@pytest.mark.parametrize("knob, value, says", [("METHODS", "none layer9", "layer9"),  # "fc,none": test_safety
                                               ("DATASETS", "cifar_cc", "unknown dataset 'cifar_cc'")])
def test_bad_knobs_are_one_line_and_queue_nothing(tmp_path, knob, value, says):
    env = {**fake_env(tmp_path), knob: value}
    r = subprocess.run(["bash", "sweep.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and says in errors[0]
    assert not (tmp_path / "runs.log").exists()


FAKE_SBATCH = '''"""Stands in for sbatch: records its arguments, answers a job id;
an array job's tasks run here, one by one."""
import os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SBATCH_LOG"], "a") as f:
    f.write(" ".join(args) + "\\n")
if "--wrap" in args:  # a source-training job: recorded, not run
    sys.exit(print("41;cluster"))
script = next(i for i, a in enumerate(args) if not a.startswith("--"))
tasks = next(a for a in args if a.startswith("--array="))[len("--array=1-"):].split("%")[0]
for i in range(1, int(tasks) + 1):
    subprocess.run(["bash", *args[script:]], env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i)})
print(42)
'''


def test_slurm_submit_trains_sources_first_then_runs_the_pending_list_as_an_array(tmp_path):
    # slurm/submit.sh with a stand-in sbatch, run from another folder so that the Waterbirds source
    # (ckpt/<data>.pt, relative) is missing: it is one job, trained with --data_dir <its folder>; the array of
    # ceil(4 runs / PER_TASK 3) = 2 tasks waits for it, and every task runs its slice through sweep.sh --one
    from fakefolders import make_waterbirds
    make_waterbirds(str(tmp_path / "wb"), {"train": (1, 1, 1, 1), "val": (1, 1, 1, 1), "test": (1, 1, 1, 1)})
    env = fake_env(tmp_path)
    # this interpreter, not "env python3": a pyenv shim would put its own python first on the tasks' PATH
    (tmp_path / "bin" / "sbatch").write_text(f"#!{sys.executable}\n{FAKE_SBATCH}")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    env.update(FAKE_SBATCH_LOG=str(tmp_path / "sbatch.log"), FAKE_SLEEP="0.05", DATASETS="cifar_c waterbirds",
               METHODS="none fc",
               WATERBIRDS_DIR=str(tmp_path / "wb"), PER_TASK="3", JOBS="5")
    submit = ["bash", os.path.join(REPO, "slurm", "submit.sh")]
    r = subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "4 runs submitted, after 1 source-model job" in r.stdout, r.stdout + r.stderr
    source, array = (tmp_path / "sbatch.log").read_text().splitlines()
    assert (f"train.py --data waterbirds --out ckpt/waterbirds.pt --data_dir {tmp_path / 'wb'} "
            "--cache_dir") in source
    assert array.startswith("--dependency=afterok:41 --kill-on-invalid-dep=yes --array=1-2%5 ")
    lists = list((tmp_path / "results").glob("slurm-runs-*.txt"))
    assert len(lists) == 1 and len(lists[0].read_text().splitlines()) == 4
    assert len(list((tmp_path / "results").glob("*.json"))) == 4 and r.stdout.count(" -> 50.00% (") == 4
    again = subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert len((tmp_path / "sbatch.log").read_text().splitlines()) == 2
