"""
The paper's table (PROTOCOL.md section 7) and its Figure 2 as numbers, from finetune.py's JSON results.

    python table.py                          # reads results/*.json, writes results/table.md, prints it
    python table.py --results results/small  # sweep.sh runs this at its end
    python table.py --results results/paper --readme README.md  # also refresh the README's copies

A README holds a copy of a section of table.md between `<!-- table.py: <heading start> -->` and
`<!-- end -->`: --readme rewrites each copy from the section whose heading starts with those words, so the
README's numbers are the committed results' (tests/test_table.py checks that they are).

A cell is mean (std) over seeds of target-test accuracy (%). A seed's value in a column with several
corruptions (CIFAR-C, IN-C) is the mean over the corruptions present. std is the sample standard deviation (n
- 1 divisor; the paper does not say which it used), "-" with one seed. Rows (finetune.py --tune): No
Adaptation = none, Full Fine-Tuning = all, L1 Regularize = l1, Auto-SNR = auto_snr, Auto-RGN = auto_rgn;
Cross-Val = for each (dataset, seed) the block among layer1/layer2/layer3/(layer4)/fc whose val_acc averaged
over the column's corruptions is best (ties: that order), at its test_acc (PROTOCOL.md section 5). An extra row
chooses per corruption instead. "All runs" lists every tune present, blocks and method variants (finetune.py's
non-default method flags) included. Avg Rank: in each column with data, rank Full FT, L1, Auto-SNR and
Auto-RGN by their means rounded as printed (1 = best, ties share the better rank), then average over the
columns where the method has a value. A cell lacking some (corruption, seed) run that its column has for
another method is marked * (not complete). Only *.json files are read: finetune.py's temp files
(name.json.tmpPID) of killed runs never are.
"""
import argparse
import glob
import json
import math
import os
import statistics
from collections import Counter

import common
import model

COLUMNS = {"CIFAR-C": "cifar_c", "IN-C": "imagenet_c", "Living-17": "living17", "Entity-30": "entity30",
           # column -> finetune.py --data
           "CIFAR-F": "cifar_flip", "Waterbirds": "waterbirds", "CelebA": "celeba"}
ROWS = {"No Adaptation": "none", "Cross-Val": "crossval", "Full Fine-Tuning": "all", "L1 Regularize": "l1",
        "Auto-SNR": "auto_snr", "Auto-RGN": "auto_rgn", "Cross-Val per corruption (extra)": "crossval_c"}
ROW_OF = {t: row for row, t in ROWS.items()}
def blocks():
    """Cross-Val's candidates in tie-break order: every block of every
    network in model.BLOCKS, ResNet-50's order first."""
    nets = ("resnet50", *model.BLOCKS)
    return tuple(dict.fromkeys(b for a in nets for b in model.BLOCKS[a]))
RANKED = ("all", "l1", "auto_snr", "auto_rgn")  # the methods Avg Rank compares
SAME = ("ckpt", "epochs", "train_n", "val_per_class", "test_per_class", "split_seed", "batch_size", "wd",
        "lrs")


def settings(r):
    return ",".join(f"{k}={v}" for k, v in sorted((r.get("changed") or {}).items()))


def load(folder):
    """{(data, corruption, tune, seed): result} from folder/*.json, and notes on files it could not use. Per
    --data the protocol's results (or, with none, the most common settings) fill the rows; a method variant or
    results of other settings (finetune.py's "changed") get a tune of their own, e.g. "all[lrs=...]"."""
    rs, notes = [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
            if not isinstance(r, dict) or not {"data", "corruption", "tune", "seed", "test_acc"} <= set(r):
                raise KeyError("the keys of a result")
            settings(r)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            notes.append(f"skipped {path}: not a finetune.py result ({type(e).__name__})")
            continue
        if not (isinstance(r["test_acc"], (int, float)) and math.isfinite(r["test_acc"])):
            notes.append(f"skipped {path}: its test_acc {r['test_acc']!r} is not a finite number")
            continue
        rs.append((path, r))
    main = {}
    for d in {r["data"] for _, r in rs}:
        seen = Counter(settings(r) for _, r in rs if r["data"] == d)
        main[d] = "" if "" in seen else seen.most_common(1)[0][0]
    res = {}
    for path, r in rs:
        tags = [r["variant"]] if r.get("variant") else []
        tags += [settings(r)] if settings(r) != main[r["data"]] else []
        r["main_settings"] = not tags
        key = (r["data"], r["corruption"], r["tune"] + "".join(f"[{g}]" for g in tags), r["seed"])
        if r.get("objective", "ce") != "ce":  # --objective memo / entropy: "cifar_c/memo", own tables
            key = (f"{r['data']}/{r['objective']}", *key[1:])
        if key in res:
            notes.append(f"skipped {path}: a second result for {key}")
            continue
        res[key] = r
    return res, notes


def cell(vals, n_expected):
    """vals {(corruption, seed): acc} -> (mean over seeds of each seed's mean over corruptions, sample std or
    None, number of seeds, complete) or None when empty. complete: every expected (corruption, seed) is
    there."""
    by_seed = {}
    for (_, s), v in vals.items():
        by_seed.setdefault(s, []).append(v)
    if not by_seed:
        return None
    m = [sum(v) / len(v) for v in by_seed.values()]
    return sum(m) / len(m), statistics.stdev(m) if len(m) > 1 else None, len(m), len(vals) == n_expected


def summarize(res):
    """The numbers behind both tables: {"cells": {(row, column): cell}, "fig2": {(block, column): cell},
    "ranks": {row: avg rank or None}, "picks": {column: Counter of Cross-Val's blocks}, "grid": {column:
    (corruptions, seeds)}, "tunes": {column: {tune: cell}} for every tune run}. A column's expected grid is
    every (corruption, seed) its results of the main settings have (a variation's runs add none)."""
    out = {"cells": {}, "fig2": {}, "picks": {}, "grid": {}, "tunes": {}}
    for col, data in COLUMNS.items():
        rs = {k[1:]: r for k, r in res.items() if k[0] == data}  # (corruption, tune, seed) -> result
        if not rs:
            continue
        grid = sorted({(c, s) for (c, _, s), r in rs.items() if r.get("main_settings", True)}
                      or {(c, s) for c, _, s in rs})
        out["grid"][col] = (sorted({c for c, _ in grid}), sorted({s for _, s in grid}))
        acc = {t: {(c, s): r["test_acc"] for (c, t_, s), r in rs.items() if t_ == t}
               for t in {k[1] for k in rs}}
        cands = [b for b in blocks() if b in acc]  # Cross-Val: among the blocks this column has
        acc["crossval"], acc["crossval_c"], picks = {}, {}, Counter()
        for s in sorted({s for _, s in grid}):  # PROTOCOL.md section 5: one block per (column, seed), by the val
            # accuracy averaged over the column's corruptions that have every candidate (a part-done sweep:
            # the cell is then marked incomplete)
            cs = [c for c, s_ in grid if s_ == s and all((c, b, s) in rs for b in cands)]
            if cands and cs:
                mean_val = {b: sum(rs[(c, b, s)]["val_acc"] for c in cs) / len(cs) for b in cands}
                best = max(cands, key=lambda b: (mean_val[b], -cands.index(b)))
                acc["crossval"].update({(c, s): rs[(c, best, s)]["test_acc"] for c in cs})
                picks[best] += 1
        for c, s in grid:  # the extra row: each (corruption, seed) its own choice
            if cands and all((c, b, s) in rs for b in cands):
                best = max(cands, key=lambda b: (rs[(c, b, s)]["val_acc"], -cands.index(b)))
                acc["crossval_c"][(c, s)] = rs[(c, best, s)]["test_acc"]
        out["picks"][col] = picks
        out["tunes"][col] = {t: cell(a, len(grid)) for t, a in acc.items() if not t.startswith("crossval")}
        for row, tune in ROWS.items():
            out["cells"][(row, col)] = cell(acc.get(tune, {}), len(grid))
        for b in blocks():  # Figure 2: paired per (corruption, seed) differences to full fine-tuning
            diff = {k: v - acc["all"][k] for k, v in acc.get(b, {}).items() if k in acc.get("all", {})}
            out["fig2"][(b, col)] = cell(diff, len(grid))
        out["fig2"][("all", col)] = out["cells"][("Full Fine-Tuning", col)]
    ranks = {t: [] for t in RANKED}
    for col in out["grid"]:
        means = {t: round(c[0], 1) for t in RANKED if (c := out["cells"][(ROW_OF[t], col)])}
        for t, v in means.items():  # 1 + how many are strictly better: ties share the better rank
            ranks[t].append(1 + sum(u > v for u in means.values()))
    out["ranks"] = {ROW_OF[t]: sum(r) / len(r) if r else None for t, r in ranks.items()}
    return out


def fmt(c, sign=False):
    if c is None:
        return "-"
    mean, std, _, complete = c
    spread = "-" if std is None else f"{std:.1f}"
    return f"{mean:{'+' if sign else ''}.1f} ({spread}){'' if complete else '*'}"


def render(res, notes, folder):
    """Markdown: the main table, notes, and Figure 2 as numbers."""
    s = summarize(res)
    cols = list(COLUMNS)
    head = [f"| Method | {' | '.join(cols)} | Avg Rank |", "|---" * (len(cols) + 2) + "|"]
    lines = [f"# Target-test accuracy (%), mean (std) over seeds: {len(res)} results in {folder}", ""] + head
    for row in ROWS:
        r = s["ranks"].get(row)
        cells = [fmt(s["cells"][(row, c)]) if c in s["grid"] else "no data" for c in cols]
        lines.append(f"| {row} | {' | '.join(cells)} | {'-' if r is None else f'{r:.2f}'} |")
    lines += ["", "std: sample standard deviation over seeds. * = not complete: some (corruption, seed) runs "
                  "that the column has for other methods are missing here; the cell averages what there is."]
    for col, (cs, seeds) in s["grid"].items():
        ranked = sorted(s["picks"][col].items(), key=lambda x: blocks().index(x[0]))
        picks = ", ".join(f"{b} x{n}" for b, n in ranked)
        lines.append(f"- {col}: seeds {', '.join(map(str, seeds))}; {len(cs)} corruption(s): "
                     f"{', '.join(cs)}; Cross-Val picked {picks or 'nothing'}")
    if any(r.get("metric", "accuracy") != "accuracy" for r in res.values()):
        lines.append("- Waterbirds, CelebA: worst-group test accuracy (the paper's metric there), selected "
                     "on worst-group val accuracy; each result's test_avg_acc holds the average over the 4 "
                     "groups.")
    for key in SAME:  # results of different protocols in one column would be averaged together: say so
        for col, data in COLUMNS.items():
            # other settings: rows of their own; "" or None (older results): the --data default
            seen = sorted({repr(v) for k, r in res.items() if k[0] == data and r["main_settings"]
                           and (v := r.get("args", {}).get(key)) not in ("", None)})
            if len(seen) > 1:
                notes.append(f"{col} results differ in {key}: {', '.join(seen)}")
    lines += [f"- warning: {n}" for n in notes]
    data_cols = [c for c in cols if c in s["grid"]]
    lines += ["", "## Each block relative to full fine-tuning (the paper's Figure 2 as numbers)", "",
              "Accuracy minus Full Fine-Tuning's, per (corruption, seed), then as above; the last row is "
              "Full "
              "Fine-Tuning itself.", "", f"| Tune | {' | '.join(data_cols)} |", "|---" * (len(data_cols) + 1)
              + "|"]
    for b in blocks() + ("all",):
        lines.append(f"| {b if b != 'all' else 'all (absolute)'} | "
                     f"{' | '.join(fmt(s['fig2'][(b, c)], sign=b != 'all') for c in data_cols)} |")
    order = ("none",) + blocks() + ("all", "l1", "auto_snr", "auto_rgn")
    tunes = sorted({t for c in data_cols for t in s["tunes"][c]},
                   key=lambda t: (order.index(t) if t in order else len(order), t))
    lines += ["", "## All runs: every tune, absolute (blocks, comma lists, method variants)", "",
              f"| Tune | {' | '.join(data_cols)} |", "|---" * (len(data_cols) + 1) + "|"]
    for t in tunes:
        lines.append(f"| {t} | {' | '.join(fmt(s['tunes'][c].get(t)) for c in data_cols)} |")
    return "\n".join(lines + unsupervised(res) + versus_paper(s, res)) + "\n"


# The paper's cells (Lee et al. 2023, Table 1 and the unsupervised table; PROTOCOL.md sections 7 and 9): (mean,
# std)
PAPER = {("No Adaptation", "CIFAR-C"): (52.6, 0), ("Cross-Val", "CIFAR-C"): (82.8, 0.6),
         ("Full Fine-Tuning", "CIFAR-C"): (79.9, 0.7), ("L1 Regularize", "CIFAR-C"): (81.7, 0.6),
         ("Auto-SNR", "CIFAR-C"): (80.9, 0.7), ("Auto-RGN", "CIFAR-C"): (81.4, 0.6),
         ("No Adaptation", "CIFAR-F"): (0, 0), ("Cross-Val", "CIFAR-F"): (93.8, 0.1),
         ("Full Fine-Tuning", "CIFAR-F"): (85.9, 0.4), ("L1 Regularize", "CIFAR-F"): (84.2, 1.2),
         ("Auto-SNR", "CIFAR-F"): (17.3, 0.7), ("Auto-RGN", "CIFAR-F"): (87.7, 2.8)}
PAPER_MEMO = {"none": 67.8, "layer1": 75.4, "layer1+layer2": 75.5, "all": 69.7, "fc": 67.8}


def verdict(ours, paper):
    """Reproduces when within 2 points or within the seed spread (the larger of the two stds)."""
    if ours is None:
        return "not run"
    gap = ours[0] - paper[0]
    ok = abs(gap) <= max(2.0, ours[1] or 0.0, paper[1])
    return f"{'reproduces' if ok else 'differs'} ({gap:+.1f})"


def versus_paper(s, res):
    """Markdown lines: our CIFAR cells beside the paper's with a verdict each, and the paper's claims
    checked."""
    cols = [c for c in ("CIFAR-C", "CIFAR-F") if c in s["grid"]]
    if not cols:
        return []
    head = " | ".join(f"{c} ours | {c} paper | verdict" for c in cols)
    lines = ["", "## Beside the paper (CIFAR columns)", "", "Reproduces = within 2 points or within the seed "
             "spread (the larger std).", "", f"| Method | {head} |",
             "|---" * (3 * len(cols) + 1) + "|"]
    for row in list(ROWS)[:6]:
        cells = []
        for c in cols:
            ours, paper = s["cells"][(row, c)], PAPER[(row, c)]
            cells += [fmt(ours), f"{paper[0]:.1f} ({paper[1]:.1f})", verdict(ours and ours[:2], paper)]
        lines.append(f"| {row} | {' | '.join(cells)} |")
    lines += ["", "Claims (each on the (corruption, seed) runs that every compared tune has):"]
    for c, want in (("CIFAR-C", "layer1"), ("CIFAR-F", "fc")):  # the best block, and not below tuning all
        m, n = paired(res, COLUMNS[c], blocks() + ("all",))
        if want in m and len(m) > 1:
            best = max(m, key=m.get)
            lines.append(f"- {c}: best {best} ({', '.join(f'{b} {v:.1f}' for b, v in m.items())}; {n} runs "
                         f"each); the paper: {want}, above every other block and full fine-tuning -> "
                         + settle(res, COLUMNS[c], tuple(m), lambda m: max(m, key=m.get) == want))
    for c in cols:  # the best block against all alone too: its pairs are there before the other blocks' are
        lines += against_all(res, c, "", "layer1" if c == "CIFAR-C" else "fc")
        lines += against_all(res, c, "", "auto_rgn")
    for c in cols:  # both claims again under each protocol variation that was run, e.g. "[lrs=...]"
        d = COLUMNS[c]
        for tag in sorted({k[2][k[2].index("["):] for k in res if k[0] == d and "[" in k[2]}):
            lines += against_all(res, c, tag, "layer1" if c == "CIFAR-C" else "fc")
            lines += against_all(res, c, tag, "auto_rgn")
    m, n = paired(res, "cifar_c/memo", ("layer1", "all", "none", "fc"))
    if len(m) == 4:
        def order(m):
            return m["layer1"] > m["all"] > m["none"] and abs(m["none"] - m["fc"]) <= 2
        lines.append(f"- MEMO: layer1 {m['layer1']:.1f}, all {m['all']:.1f}, none {m['none']:.1f}, fc "
                     f"{m['fc']:.1f} ({n} corruptions); the paper: layer1 > all > none ~ fc (75.4 / 69.7 / "
                     f"67.8 / 67.8) -> " + settle(res, "cifar_c/memo", tuple(m), order))
    return lines


def against_all(res, column, tag, tune):
    """A claim line: tune (a paper's best block, above full fine-tuning; or Auto-RGN, at or above it) against
    all, both with tag (a variation: "[lrs=...]"), on the runs both have; [] when either has none."""
    a, b = tune + tag, "all" + tag
    m, n = paired(res, COLUMNS[column], (a, b))
    if len(m) < 2:
        return []
    rgn = tune == "auto_rgn"
    name, want = ("Auto-RGN", "at or above") if rgn else (f"{tune} (the paper's best)", "above")
    def ok(m):
        return round(m[a], 1) >= round(m[b], 1) if rgn else round(m[a], 1) > round(m[b], 1)
    return [f"- {column}{tag}: {name} {m[a]:.1f} vs full fine-tuning {m[b]:.1f} ({n} runs each); the paper: "
            f"{want} -> " + settle(res, COLUMNS[column], (a, b), ok)]


def settle(res, data, tunes, ok):
    """A claim's verdict: "holds" or "fails" by ok({tune: mean}) on the runs every tune has; with more than
    one seed, also the verdict on each seed's own runs, e.g. "holds (seed 0 holds, seed 1 fails)", so a
    claim that only one seed carries shows it. A seed missing one of the tunes is left out of that list."""
    m, _ = paired(res, data, tunes)
    word = {True: "holds", False: "fails"}
    per = [(s, paired(res, data, tunes, seed=s)[0]) for s in sorted({k[3] for k in res if k[0] == data})]
    per = [f"seed {s} {word[bool(ok(ms))]}" for s, ms in per if len(ms) == len(m)]
    return word[bool(ok(m))] + (f" ({', '.join(per)})" if len(per) > 1 else "")


def paired(res, data, tunes, seed=None):
    """({tune: mean test accuracy}, n) over the (corruption, seed) pairs that every tune present has (of one
    seed, if given); tunes with no result are left out."""
    acc = {t: {(k[1], k[3]): r["test_acc"] for k, r in res.items()
               if k[0] == data and k[2] == t and seed in (None, k[3])}
           for t in tunes}
    acc = {t: a for t, a in acc.items() if a}
    common = set.intersection(*(set(a) for a in acc.values())) if acc else set()
    if not common:
        return {}, 0
    return {t: sum(a[k] for k in common) / len(common) for t, a in acc.items()}, len(common)


# row order
UNSUP_TUNES = ("none", "layer1", "layer1+layer2", "layer2", "layer3", "layer4", "fc", "all", "auto_rgn")
# its columns after the mean, when present
UNSUP_NAMED = ("gaussian_noise", "jpeg_compression", "motion_blur")
UNSUP_TITLES = {"memo": "MEMO per test image: AugMix copies, one SGD step, from the source every time "
                        "(--objective memo)",
                "entropy": "entropy minimisation on the unlabelled target test stream (--objective entropy)"}


def unsupervised(res):
    """Markdown lines of the unsupervised tables (finetune.py --objective memo / entropy, cifar_c): a row per
    tune, columns the mean over the corruptions present and the named ones, cells mean (std) over seeds; [] if
    none."""
    lines = []
    for objective, title in UNSUP_TITLES.items():
        # (c, tune, seed)
        rs = {k[1:]: r["test_acc"] for k, r in res.items() if k[0] == f"cifar_c/{objective}"}
        if not rs:
            continue
        grid = {(c, s) for c, _, s in rs}
        cs, tunes = sorted({c for c, _ in grid}), {t for _, t, _ in rs}
        every = sorted(c for c in cs if all((c, t, s) in rs for t in tunes for c_, s in grid if c_ == c))
        named = [c for c in UNSUP_NAMED if c in cs]
        lines += ["", f"## Unsupervised: {title}", "",
                  f"CIFAR-C accuracy (%) on the adapted images. \"paired\": the mean over the {len(every)} "
                  f"corruption(s) every tune has ({', '.join(every) or 'none'}); \"all run\": over whatever "
                  f"each tune has of the {len(cs)} present ({', '.join(cs)}).", "",
                  f"| Tune | paired | all run | {' | '.join(named)} |", "|---" * (len(named) + 3) + "|"]
        for t in [t for t in UNSUP_TUNES if t in tunes] + sorted(tunes - set(UNSUP_TUNES)):
            acc = {(c, s): v for (c, t_, s), v in rs.items() if t_ == t}
            cells = [cell({k: v for k, v in acc.items() if k[0] in every}, sum(g[0] in every for g in grid)),
                     cell(acc, len(grid))] + [cell({k: v for k, v in acc.items() if k[0] == c},
                                                   sum(g[0] == c for g in grid)) for c in named]
            lines.append(f"| {t} | {' | '.join(map(fmt, cells))} |")
    return lines


def write(text, path):
    with open(path, "w") as f:
        f.write(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="folder of finetune.py's JSON results")
    p.add_argument("--out", default="", help="markdown file to write (default <results>/table.md)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    res, notes = load(args.results)
    if not res:
        raise SystemExit(f"error: no finetune.py results (*.json) in {args.results}")
    md = render(res, notes, args.results)
    out = args.out or os.path.join(args.results, "table.md")
    common.check_writable(out, "--out")
    common.atomic_save(md, out, write=write)
    print(md, end="")
    print(f"written to {out}")
    return md


if __name__ == "__main__":
    main()
