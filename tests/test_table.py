"""table.py on hand-made results: means, sample stds, Cross-Val's choice (per corruption, ties in block
order), incomplete cells, the Avg Rank rule on the paper's own table, "no data" columns and the Figure-2
numbers."""
import json
import os
import re

import pytest

import table


PAPER = {  # PROTOCOL.md section 7, columns in table.COLUMNS order
    "all": (79.9, 50.7, 92.8, 79.3, 85.9, 88.0, 82.2),
    "l1": (81.7, 48.8, 93.4, 78.4, 84.2, 87.6, 82.6),
    "auto_snr": (80.9, 49.9, 93.5, 77.3, 17.3, 86.3, 78.5),
    "auto_rgn": (81.4, 51.2, 93.5, 80.6, 87.7, 88.0, 82.2)}


def put(folder, data, corruption, tune, seed, test, val=0.0, **args):
    r = {"data": data, "corruption": corruption, "tune": tune, "seed": seed, "test_acc": test, "val_acc": val,
         "args": {"epochs": 15, **args}}
    with open(os.path.join(folder, f"{data}-{corruption}-{tune}-s{seed}.json"), "w") as f:
        json.dump(r, f)


@pytest.fixture
def cifar(tmp_path):
    """CIFAR-C, 2 corruptions x 3 seeds, and CIFAR-F with one seed. Numbers chosen so that each rule, done
    wrong, gives a different answer (population std, Cross-Val per dataset, ties to the later block...)."""
    d = str(tmp_path)
    for s in range(3):
        for c, base in (("frost", 70), ("snow", 80)):
            put(d, "cifar_c", c, "none", s, 50.0)
            put(d, "cifar_c", c, "all", s, base + s)  # per seed 75, 76, 77: mean 76, sample std 1
            put(d, "cifar_c", c, "layer3", s, 10.0, val=10.0)
        # frost: layer1 and layer2 tie on val, the first (layer1) counts; snow: fc has the best val
        put(d, "cifar_c", "frost", "layer1", s, 60.0 + s, val=90.0)
        put(d, "cifar_c", "frost", "layer2", s, 99.0, val=90.0)
        put(d, "cifar_c", "frost", "fc", s, 98.0, val=20.0)
        put(d, "cifar_c", "snow", "layer1", s, 97.0, val=30.0)
        put(d, "cifar_c", "snow", "layer2", s, 96.0, val=40.0)
        put(d, "cifar_c", "snow", "fc", s, 86.0, val=95.0)
    put(d, "cifar_c", "frost", "l1", 0, 81.0)  # one run of six: flagged, not silently averaged
    put(d, "cifar_flip", "clean", "none", 0, 0.0)
    put(d, "cifar_flip", "clean", "fc", 0, 93.8, val=90.0)
    put(d, "cifar_flip", "clean", "all", 0, 85.9)
    put(d, "cifar_flip", "clean", "auto_rgn", 0, 87.7)
    # a killed run's temp
    (tmp_path / "cifar_c-snow-l1-s1.json.tmp4242").write_text('{"data": "cifar_c", "corr')
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a result: skipped with a warning
    return tmp_path


def test_means_stds_crossval_and_flags(cifar):
    res, notes = table.load(str(cifar))
    assert len(res) == 3 * 2 * 6 + 1 + 4 and len(notes) == 1 and "notes.json" in notes[0]
    s = table.summarize(res)
    c = s["cells"]
    assert c[("Full Fine-Tuning", "CIFAR-C")] == pytest.approx((76.0, 1.0, 3, True))  # sample std, not 0.816
    assert c[("No Adaptation", "CIFAR-C")] == (50.0, 0.0, 3, True)
    # Cross-Val per (dataset, seed), PROTOCOL.md section 5: val averaged over frost and snow is layer1 60,
    # layer2 65, layer3 10, fc 57.5 -> layer2 for the whole column, test (99 + 96) / 2 in every seed
    assert c[("Cross-Val", "CIFAR-C")] == (97.5, 0.0, 3, True) and s["picks"]["CIFAR-C"] == {"layer2": 3}
    # the extra row, per (corruption, seed): frost -> layer1 (tie on val with layer2, first wins), snow -> fc
    mean, std, n, complete = c[("Cross-Val per corruption (extra)", "CIFAR-C")]
    assert (mean, n, complete) == (pytest.approx((61 + 86) / 2), 3, True) and std == pytest.approx(1 / 2)
    assert c[("L1 Regularize", "CIFAR-C")] == (81.0, None, 1, False)
    assert c[("Auto-SNR", "CIFAR-C")] is None and "IN-C" not in s["grid"]
    assert s["grid"]["CIFAR-C"] == (["frost", "snow"], [0, 1, 2])
    # Figure 2: layer1 - all per (corruption, seed): frost 60+s - (70+s) = -10, snow 97 - (80+s):
    # mean +3.0, sd 14.26 over 6 pairs, t(5) = 2.571: +3.0 [-12.0, +18.0]
    mean, lo, hi, complete = s["fig2"][("layer1", "CIFAR-C")]
    assert (mean, lo, hi) == pytest.approx((3.0, -11.962, 17.962), abs=1e-3) and complete
    assert s["fig2"][("fc", "CIFAR-F")] == (pytest.approx(7.9), None, None, True)  # one pair
    # ranks: CIFAR-C all alone (l1's cell is incomplete: left out); CIFAR-F all 85.9 vs rgn 87.7
    assert s["ranks"] == {"Full Fine-Tuning": 1.5, "L1 Regularize": None, "Auto-SNR": None,
                          "Auto-RGN": 1.0}


def test_a_seed_with_some_corruptions_counts_in_the_pairs_not_the_means(cifar):
    """Seed 3 ran frost alone: its seed mean (frost only) would drag the column's mean and std, so the
    means keep seeds 0-2; the Figure-2 pairs take it in, and the seeds' note says so."""
    for t, v in (("none", 50.0), ("all", 40.0), ("layer1", 90.0), ("layer2", 10.0), ("layer3", 10.0),
                 ("fc", 10.0)):
        put(str(cifar), "cifar_c", "frost", t, 3, v)
    res, _ = table.load(str(cifar))
    s = table.summarize(res)
    assert s["cells"][("Full Fine-Tuning", "CIFAR-C")] == pytest.approx((76.0, 1.0, 3, True))
    assert s["cells"][("L1 Regularize", "CIFAR-C")] == (81.0, None, 1, False)
    assert s["fig2"][("layer1", "CIFAR-C")][0] == pytest.approx((6 * 3.0 + 50) / 7)
    assert ("- CIFAR-C: seeds 0, 1, 2, 3 (3 on some corruptions only: in the intervals, not the means); "
            "2 corruption(s)") in table.render(res, [], "r")


def test_crossval_needs_every_block(cifar):
    os.remove(cifar / "cifar_c-snow-layer2-s2.json")
    res, _ = table.load(str(cifar))
    cells = table.summarize(res)["cells"]
    # seed 2 lacks a candidate on snow, so its choice is made on frost alone (layer1, tied with layer2 on val
    # and first in order: test 62); flagged as not complete
    mean, _, n, complete = cells[("Cross-Val", "CIFAR-C")]
    assert (mean, n, complete) == (pytest.approx((97.5 + 97.5 + 62) / 3), 3, False)
    # per corruption, seed 2 keeps frost only (layer1, 62): the seeds' values are (60+86)/2, (61+86)/2, 62
    mean, _, n, complete = cells[("Cross-Val per corruption (extra)", "CIFAR-C")]
    assert not complete and n == 3 and mean == pytest.approx(((60 + 86) / 2 + (61 + 86) / 2 + 62) / 3)


def test_crossval_missing_a_block_is_marked(cifar):
    res, _ = table.load(str(cifar))
    cells = table.summarize(res)["cells"]
    # CIFAR-F ran fc alone of the four blocks: its Cross-Val picks from one block and says so (*)
    assert cells[("Cross-Val", "CIFAR-F")] == (93.8, None, 1, False)
    assert cells[("Cross-Val", "CIFAR-C")][3] and cells[("Full Fine-Tuning", "CIFAR-F")][3]
    md = table.render(res, [], "r")
    assert "| Cross-Val | 97.5 (0.0) | no data | no data | no data | 93.8 (-)* |" in md


def test_avg_rank_on_the_papers_table(tmp_path):
    for tune, accs in PAPER.items():
        for data, acc in zip(table.COLUMNS.values(), accs):
            put(str(tmp_path), data, "x", tune, 0, acc)
    res, _ = table.load(str(tmp_path))
    ranks = table.summarize(res)["ranks"]  # PROTOCOL.md section 7: recomputed from the rounded cells
    assert {k: round(v, 2) for k, v in ranks.items()} == {"Full Fine-Tuning": 2.43, "L1 Regularize": 2.57,
                                                          "Auto-SNR": 3.29, "Auto-RGN": 1.29}
    md = table.render(res, [], str(tmp_path))
    assert "| Full Fine-Tuning | 79.9 (-) | 50.7 (-) |" in md and "| 2.43 |" in md and "no data" not in md


def test_main_writes_markdown(cifar, capsys):
    put(str(cifar), "cifar_flip", "clean", "l1", 0, 84.2, epochs=3)  # a result of another protocol
    md = table.main(["--results", str(cifar)])
    assert (cifar / "table.md").read_text() == md and md in capsys.readouterr().out
    lines = md.splitlines()
    assert lines[2] == ("| Method | CIFAR-C | IN-C | Living-17 | Entity-30 | CIFAR-F | Waterbirds | CelebA "
                        "| Avg Rank |")
    rows = [ln.split(" | ")[0][2:] for ln in lines[4:10]]
    assert rows == ["No Adaptation", "Cross-Val", "Full Fine-Tuning", "L1 Regularize", "Auto-SNR", "Auto-RGN"]
    assert lines[6] == ("| Full Fine-Tuning | 76.0 (1.0) | no data | no data | no data | 85.9 (-) | no data "
                        "| no data | 1.50 |")
    assert "| L1 Regularize | 81.0 (-)* |" in md and "| Auto-SNR | - |" in md
    assert "results differ in epochs: 15, 3" in md and "Cross-Val picked layer2 x3" in md
    assert "| layer1 | +3.0 [-12.0, +18.0] | - |" in md  # favoured on the mean, not resolved
    assert "| all (absolute) | 76.0 (1.0) | 85.9 (-) |" in md
    assert sorted(p.name for p in cifar.glob("table.md*")) == ["table.md"]


def test_no_results_is_one_clear_error(tmp_path):
    (tmp_path / "a.json.tmp1").write_text("{")
    with pytest.raises(SystemExit, match="no finetune.py results"):
        table.main(["--results", str(tmp_path)])


def test_variants_and_memo_get_their_own_rows(tmp_path):
    d = str(tmp_path)
    put(d, "cifar_flip", "clean", "auto_snr", 0, 17.0)
    r = {"data": "cifar_flip", "corruption": "clean", "tune": "auto_snr", "seed": 0, "test_acc": 90.0,
         "val_acc": 0, "variant": "snr_per_example", "args": {"epochs": 15}}
    (tmp_path / "cifar_flip-clean-auto_snr-s0-snr_per_example.json").write_text(json.dumps(r))
    for t, acc in (("none", 60.0), ("layer1+layer2", 75.0)):
        for c in ("fog", "snow"):
            m = {"data": "cifar_c", "corruption": c, "tune": t, "seed": 0, "test_acc": acc + (c == "fog"),
                 "val_acc": None, "objective": "memo", "args": {}}
            (tmp_path / f"cifar_c-{c}-{t}-s0-memo.json").write_text(json.dumps(m))
    md = table.render(*table.load(d), d)
    # the default criterion's cell
    assert "| Auto-SNR | no data | no data | no data | no data | 17.0 (-) |" in md
    assert "| auto_snr[snr_per_example] | 90.0 (-) |" in md  # the variant: its own row, never averaged in
    assert "## Unsupervised: MEMO" in md
    assert "| layer1+layer2 | 75.5 (-) |" in md and "| none | 60.5 (-) |" in md


def test_beside_the_paper_verdicts_and_claims(cifar):
    md = table.main(["--results", str(cifar)])
    # CIFAR-F all is 85.9, the paper's 85.9 (0.4): reproduces; CIFAR-C no adaptation 50.0 vs 52.6: differs
    row = ("| Full Fine-Tuning | 76.0 (1.0) | 79.9 (0.7) | differs (-3.9) | 85.9 (-) | 85.9 (0.4) "
           "| reproduces (+0.0) |")
    assert row in md
    assert "| No Adaptation | 50.0 (0.0) | 52.6 (0.0) | differs (-2.6) |" in md
    # CIFAR-C: layer2 is closest to layer1 (-18.5 on the mean), its interval covers 0: not resolved;
    # CIFAR-F: one seed, one pair each: no interval, nothing resolved
    line = [ln for ln in md.splitlines() if ln.startswith("- CIFAR-C: layer1 - layer2 -18.5 [")]
    assert line and line[0].split(" -> ")[1].startswith("not resolved")
    assert "- CIFAR-F: auto_rgn - all +1.8 [one pair] (1 pair); the paper: at or above all -> " \
           "not resolved" in md


def test_a_claim_needs_its_interval_on_the_claimed_side(tmp_path):
    """Means that favour a claim are not enough: paired differences that straddle 0 leave it
    not resolved; clear ones hold or fail, on all the pairs and on each seed's."""
    d = str(tmp_path)
    for s, (rgn, fc, l1) in enumerate(((-0.6, 20, -30), (1.0, 21, -31), (3.3, 22, -29))):
        for c, shift in (("frost", 0.0), ("snow", 5.0)):  # CIFAR-C: two corruptions a seed
            put(d, "cifar_c", c, "all", s, 70.0 + shift)
            put(d, "cifar_c", c, "auto_rgn", s, 70.0 + shift + rgn - (0.1 if c == "snow" else 0))
            put(d, "cifar_c", c, "layer1", s, 70.0 + shift + fc)
            put(d, "cifar_c", c, "fc", s, 70.0 + shift + l1)
    lines = table.main(["--results", d]).splitlines()
    rgn = [ln for ln in lines if ln.startswith("- CIFAR-C: auto_rgn - all")][0]
    assert rgn.startswith("- CIFAR-C: auto_rgn - all +1.2 [") and "(6 pairs)" in rgn
    assert " -> not resolved (seed 0 fails, seed 1 holds, seed 2 holds)" in rgn
    best = [ln for ln in lines if ln.startswith("- CIFAR-C: layer1 - all +21.0")]
    assert len(best) == 2 and all(" -> holds (seed 0 holds," in ln for ln in best)
    assert any(ln.startswith("- CIFAR-C: layer1 - all") and "(6 pairs, the closest)" in ln
               for ln in best)


def test_claims_are_checked_again_under_each_variation(cifar):
    def var(c, t, s, acc, changed):  # a run with non-default settings ("changed"), as finetune.py writes it
        r = {"data": "cifar_c", "corruption": c, "tune": t, "seed": s, "test_acc": acc, "val_acc": 0.0,
             "changed": changed, "args": {"epochs": 15}}
        name = f"cifar_c-{c}-{t}-s{s}-p{abs(hash(json.dumps(changed, sort_keys=True))) % 10**8}.json"
        (cifar / name).write_text(json.dumps(r))
    grid = {"lrs": "1e-1,1e-3"}
    for c, (all_, rgn, l1) in {"frost": (70.0, 72.0, 69.0), "snow": (80.0, 77.0, 80.0)}.items():
        var(c, "all", 0, all_, grid), var(c, "auto_rgn", 0, rgn, grid), var(c, "layer1", 0, l1, grid)
    var("frost", "all", 5, 60.0, {"split_seed": 1})  # a seed the protocol runs do not have
    var("frost", "auto_rgn", 5, 60.0, {"split_seed": 1})
    var("snow", "auto_rgn", 5, 99.0, {"split_seed": 1})  # all lacks snow here: not paired, left out
    md = table.main(["--results", str(cifar)])
    # under the grid: layer1 - all: -1 and 0, t(1) = 12.7: -0.5 [-6.9, +5.9]; split 1: one pair
    assert ("- CIFAR-C[lrs=1e-1,1e-3]: layer1 - all -0.5 [-6.9, +5.9] (2 pairs); the paper: above "
            "all -> not resolved") in md
    assert "- CIFAR-C[lrs=1e-1,1e-3]: auto_rgn - all -0.5 [-32.3, +31.3] (2 pairs)" in md
    assert ("- CIFAR-C[split_seed=1]: auto_rgn - all +0.0 [one pair] (1 pair); the paper: at or "
            "above all -> not resolved") in md
    assert "CIFAR-C[split_seed=1]: layer1" not in md  # no layer1 run under that split
    # the protocol runs' own cells and claims are unchanged by the variations beside them: seed 5 is no
    # missing run of theirs
    assert "| Full Fine-Tuning | 76.0 (1.0) | no data |" in md and "- CIFAR-C: seeds 0, 1, 2;" in md
    assert "- CIFAR-C: layer1 - layer2 -18.5 [" in md and "- CIFAR-F: auto_rgn - all +1.8" in md


def test_an_unset_flag_recorded_by_older_results_is_no_difference(tmp_path):
    d = str(tmp_path)  # "" was how results once recorded the --data default that newer ones write out
    put(d, "cifar_c", "frost", "all", 0, 70.0, lrs="", wd=1e-4)
    put(d, "cifar_c", "snow", "all", 0, 72.0, lrs="1e-3,1e-4,1e-5", wd=1e-4)
    put(d, "cifar_c", "fog", "all", 0, 74.0, lrs="1e-3,1e-4,1e-5", wd=0.0)
    md = table.main(["--results", d])
    assert "differ in lrs" not in md
    assert "CIFAR-C results differ in wd: 0.0, 0.0001" in md  # a real difference is still named


def test_an_unwritable_out_is_one_line(cifar):
    with pytest.raises(SystemExit) as e:
        table.main(["--results", str(cifar), "--out", "/proc/x/table.md"])
    assert str(e.value.code).startswith("error: --out") and "\n" not in str(e.value.code)


def test_the_documents_show_the_committed_results():
    """results/paper/table.md is what the committed JSONs render to, and every results table
    in README.md and RESULTS.md (first column Method, Tune or Column) is one of it, verbatim,
    and so is every note line under the main table ("std: ...", "- <column>: seeds ...")."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res, notes = table.load(os.path.join(here, "results", "paper"))
    md = table.render(res, notes, "results/paper")
    fix = "stale: python table.py --results results/paper"
    assert open(os.path.join(here, "results", "paper", "table.md")).read() == md, fix
    for doc in ("README.md", "RESULTS.md"):
        blocks, block = [], []
        for line in open(os.path.join(here, doc)).read().splitlines() + [""]:
            if line.startswith("|"):
                block.append(line)
            elif block:
                blocks.append("\n".join(block))
                block = []
        ours = [b for b in blocks if b.startswith(("| Method |", "| Tune |", "| Column |"))]
        assert ours and all(b in md for b in ours), f"{doc}'s tables are {fix}"
        assert len(set(ours)) == len(ours), f"{doc} shows a table twice: one has overwritten another"
        said = [l for l in open(os.path.join(here, doc)).read().splitlines()
                 if l.startswith("std: sample standard") or re.match(r"- [\w -]+: seeds \d", l)]
        assert all(l in md.splitlines() for l in said), f"{doc}'s table notes are {fix}"


def test_the_figure_draws_from_results(cifar):
    table.main(["--results", str(cifar), "--figure", str(cifar / "fig" / "figure2.png")])
    png = (cifar / "fig" / "figure2.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert sorted(p.name for p in (cifar / "fig").iterdir()) == ["figure2.png"]  # no temp file


def test_tiny_breeds_a_middle_block_beside_the_papers_breeds_columns(tmp_path):
    """The feature-level claim: the better middle block against layer1, fc and all, on paired
    seeds; our cells beside the paper's Living-17 and Entity-30 (no verdict: other data)."""
    d = str(tmp_path)
    for s in range(3):
        accs = {"none": 40.0, "layer1": 60.0 + s, "layer2": 70.0 + s, "layer3": 75.0 + 2 * s,
                "fc": 55.0, "all": 65.0 - s, "auto_rgn": 64.0 + s}
        for t, a in accs.items():
            put(d, "tiny_breeds", "clean", t, s, a)
    md = table.main(["--results", d])
    assert "| Full Fine-Tuning | 64.0 (1.0) | 92.8 (0.7) | 79.3 (0.6) |" in md
    # layer3 - all: +10, +13, +16 (mean +13); layer3 - layer1: +15, +16, +17; - fc: +20, +22, +24
    line = [ln for ln in md.splitlines() if ln.startswith("- Tiny-BREEDS: layer3 - all +13.0 [")]
    assert len(line) == 2 and line[0].endswith("(3 pairs, the closest); the paper: a middle block "
                                               "above layer1, fc and all -> holds")  # no per-seed
    # auto_rgn - all: -1, +1, +3, t(2) = 4.303: +1.0 [-4.0, +6.0]
    assert ("- Tiny-BREEDS: auto_rgn - all +1.0 [-4.0, +6.0] (3 pairs); the paper: at or above all "
            "-> not resolved") in md
