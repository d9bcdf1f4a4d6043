"""The shape the project promises (README "Layout"): each file within its line budget, lines <= 110 columns,
every script's --help within 80 lines and nothing heavy at import."""
import contextlib
import glob
import importlib
import io
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGETS = {"model.py": 250, "data.py": 350, "finetune.py": 300, "train.py": 200, "rgn.py": 150,
           "sweep.sh": 80, "bench.py": 150, "corruptions.py": 500, "family.py": 400, "unsupervised.py": 350}
SCRIPTS = ("finetune", "train", "data", "model", "table", "bench", "check_corruptions")


@pytest.mark.parametrize("name, budget", BUDGETS.items())
def test_line_budgets(name, budget):
    with open(os.path.join(ROOT, name)) as f:
        assert len(f.read().splitlines()) <= budget


def test_lines_fit_110_columns():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
    files += [os.path.join(ROOT, "sweep.sh")] + glob.glob(os.path.join(ROOT, "slurm", "*.s*"))
    long = [f"{os.path.relpath(f, ROOT)}:{i}" for f in files for i, line in enumerate(open(f), 1)
            if len(line.rstrip("\n")) > 110]
    assert not long


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_short(script):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(["--help"])
    assert e.value.code == 0 and 10 < len(out.getvalue().splitlines()) <= 80
