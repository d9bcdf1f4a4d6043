"""
The paper's table (PROTOCOL.md section 7), Figure 2 as numbers and the claims.

    python table.py                          # results/*.json -> results/table.md
    python table.py --results results/paper  # our measured runs (RESULTS.md)

A cell is the mean (sample std, n - 1) over seeds of target test accuracy; a seed's value is its mean
over the column's corruptions (a seed that ran only some of them stays out of the cells; its pairs count
in the intervals). Cross-Val: per (dataset, seed), the block whose val accuracy averaged over the
corruptions is best (ties: block order), at its test accuracy. Avg Rank ranks Full FT, L1, Auto-SNR and
Auto-RGN on the rounded means (ties share the better rank). A cell missing some (corruption, seed) that
its column has elsewhere, or a Cross-Val missing a block, is marked *. Only *.json is read.
"""
import argparse
import glob
import json
import math
import os
import pathlib
import re
import statistics
from collections import Counter

import common
import model

COLUMNS = {"CIFAR-C": "cifar_c", "IN-C": "imagenet_c", "Living-17": "living17",
           "Entity-30": "entity30", "CIFAR-F": "cifar_flip", "Waterbirds": "waterbirds",
           "CelebA": "celeba"}  # column -> --data
# Another published source (finetune.py --ckpt resnet56) gets columns of its own, beside the
# paper's and out of Avg Rank
SOURCES = {"resnet56": "RN56"}
EXTRA = {f"{c} {n}": f"{d}@{s}" for s, n in SOURCES.items()
         for c, d in (("CIFAR-C", "cifar_c"), ("CIFAR-F", "cifar_flip"))}
EXTRA["Tiny-BREEDS"] = "tiny_breeds"  # our feature-level shift (imagenet.py)
ROWS = {"No Adaptation": "none", "Cross-Val": "crossval", "Full Fine-Tuning": "all",
        "L1 Regularize": "l1", "Auto-SNR": "auto_snr", "Auto-RGN": "auto_rgn",
        "Cross-Val per corruption (extra)": "crossval_c"}
ROW_OF = {t: row for row, t in ROWS.items()}
RANKED = ("all", "l1", "auto_snr", "auto_rgn")  # what Avg Rank compares
VARIATIONS = ("lrs", "split_seed")  # the authors' protocol (PROTOCOL.md section 5): claims too
SAME = ("ckpt", "epochs", "train_n", "val_per_class", "test_per_class", "split_seed",
        "batch_size", "wd", "lrs")  # a column mixing these says so


def blocks():
    """Cross-Val's candidates in tie-break order: every network's blocks."""
    nets = ("resnet50", *model.BLOCKS)
    return tuple(dict.fromkeys(b for a in nets for b in model.BLOCKS[a]))


def settings(r, skip=()):
    return ",".join(f"{k}={v}" for k, v in sorted((r.get("changed") or {}).items())
                    if k not in skip)


def load(folder):
    """{(data, corruption, tune, seed): result} and notes on skipped files.
    Only the protocol's runs fill the paper's rows: a method variant or other
    settings get a tune of their own, named by them ("all[lrs=...]"), and no
    verdict; memo / entropy a data of their own."""
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
        acc = r["test_acc"]
        if not (isinstance(acc, (int, float)) and math.isfinite(acc)):
            notes.append(f"skipped {path}: its test_acc {acc!r} is not a finite number")
            continue
        rs.append((path, r))
    res = {}
    for path, r in rs:
        src = (r.get("changed") or {}).get("ckpt")
        src = src if src in SOURCES else None  # then its own columns
        tags = [r["variant"]] if r.get("variant") else []
        skip = ("ckpt",) if src else ()
        tags += [settings(r, skip)] if settings(r, skip) else []
        r["main_settings"] = not tags
        tune = r["tune"] + "".join(f"[{g}]" for g in tags)
        data = r["data"] + (f"@{src}" if src else "")
        if r.get("objective", "ce") != "ce":  # "cifar_c/memo": tables of its own
            data = f"{data}/{r['objective']}"
        key = (data, r["corruption"], tune, r["seed"])
        if key in res:
            notes.append(f"skipped {path}: a second result for {key}")
            continue
        res[key] = r
    return res, notes


def whole(grid):
    """The seeds of grid [(corruption, seed)] that have all its corruptions (all, if none has)."""
    cs, seeds = {c for c, _ in grid}, {s for _, s in grid}
    return {s for s in seeds if all((c, s) in grid for c in cs)} or seeds


def cell(vals, grid):
    """{(corruption, seed): acc} -> (mean over seeds of the seed means, std or None, seeds,
    complete) or None, over the seeds whole(grid) keeps."""
    by_seed, full = {}, whole(grid)
    for (_, s), v in vals.items():
        by_seed.setdefault(s, []).append(v)
    m = [sum(v) / len(v) for s, v in by_seed.items() if s in full]
    if not m:
        return None
    std = statistics.stdev(m) if len(m) > 1 else None
    return sum(m) / len(m), std, len(m), all(k in vals for k in grid if k[1] in full)


def summarize(res):
    """{"cells": {(row, column): cell}, "fig2": {(block, column): cell}, "ranks": {row: avg rank},
    "picks": {column: Counter of blocks}, "grid": {column: (corruptions, seeds)}, "part": {column:
    seeds left out of the cells}, "tunes": {column: {tune: cell}}}. A column's expected grid is what
    its main-settings results cover."""
    out = {"cells": {}, "fig2": {}, "picks": {}, "grid": {}, "tunes": {}, "rgn": {}, "part": {}}
    for col, data in {**COLUMNS, **EXTRA}.items():
        rs = {k[1:]: r for k, r in res.items() if k[0] == data}  # (c, tune, seed)
        if not rs:
            continue
        grid = sorted({(c, s) for (c, _, s), r in rs.items() if r.get("main_settings", True)}
                      or {(c, s) for c, _, s in rs})
        out["grid"][col] = (sorted({c for c, _ in grid}), sorted({s for _, s in grid}))
        out["part"][col] = sorted({s for _, s in grid} - whole(grid))
        acc = {t: {(c, s): r["test_acc"] for (c, t_, s), r in rs.items() if t_ == t}
               for t in {k[1] for k in rs}}
        cands = [b for b in blocks() if b in acc]  # the blocks this column has
        acc["crossval"], acc["crossval_c"], picks = {}, {}, Counter()
        for s in sorted({s for _, s in grid}):  # one block per (column, seed)
            cs = [c for c, s_ in grid if s_ == s and all((c, b, s) in rs for b in cands)]
            if cands and cs:
                val = {b: sum(rs[(c, b, s)]["val_acc"] for c in cs) / len(cs) for b in cands}
                best = max(cands, key=lambda b: (val[b], -cands.index(b)))
                acc["crossval"].update({(c, s): rs[(c, best, s)]["test_acc"] for c in cs})
                picks[best] += 1
                out["rgn"].setdefault(col, {})[s] = best  # Cross-Val's pick per seed
        for c, s in grid:  # the extra row: a choice per (corruption, seed)
            if cands and all((c, b, s) in rs for b in cands):
                best = max(cands, key=lambda b: (rs[(c, b, s)]["val_acc"], -cands.index(b)))
                acc["crossval_c"][(c, s)] = rs[(c, best, s)]["test_acc"]
        out["picks"][col] = picks
        out["tunes"][col] = {t: cell(a, grid) for t, a in acc.items()
                             if not t.startswith("crossval")}
        partial = not {"layer1", "layer2", "layer3", "fc"} <= set(cands)  # a block never ran
        for row, tune in ROWS.items():  # a partial Cross-Val: marked not complete
            c = cell(acc.get(tune, {}), grid)
            out["cells"][(row, col)] = c and (*c[:3], c[3] and not (partial and "crossval" in tune))
        full = acc.get("all", {})
        for b in blocks():  # Figure 2: per (corruption, seed) differences to all
            d = [v - full[k] for k, v in sorted(acc.get(b, {}).items()) if k in full]
            out["fig2"][(b, col)] = (*interval(d), len(d) == len(grid)) if d else None
    ranks = {t: [] for t in RANKED}
    for col in [c for c in out["grid"] if c in COLUMNS]:
        means = {t: round(c[0], 1) for t in RANKED  # complete cells only
                 if (c := out["cells"][(ROW_OF[t], col)]) and c[3]}
        for t, v in means.items():  # 1 + how many are strictly better
            ranks[t].append(1 + sum(u > v for u in means.values()))
    out["ranks"] = {ROW_OF[t]: sum(r) / len(r) if r else None for t, r in ranks.items()}
    return out


def rgn_rates(res, s):
    """{column: ({block: Auto-RGN's mean first-epoch rate multiplier}, runs where the
    largest is Cross-Val's pick, runs)}: the paper's reason for Auto-RGN, checked."""
    out = {}
    for col, data in {**COLUMNS, **EXTRA}.items():
        firsts, agree = [], 0
        for k, r in [(k, r) for k, r in res.items() if k[0] == data and k[2] == "auto_rgn"]:
            h = next((h for h in r.get("history", []) if h.get("lr") == r["selected"]["lr"]
                      and h.get("rgn")), None)  # the selected lr's
            if not h:
                continue
            firsts.append(h["rgn"][0])
            agree += max(h["rgn"][0], key=h["rgn"][0].get) == s["rgn"].get(col, {}).get(k[3])
        if firsts:
            bs = [b for b in blocks() if any(b in f for f in firsts)]
            out[col] = ({b: sum(f[b] for f in firsts if b in f) / len(firsts) for b in bs},
                        agree, len(firsts))
    return out


def fmt(c, sign=False):
    if c is None:
        return "-"
    mean, std, _, complete = c
    spread = "-" if std is None else f"{std:.1f}"
    return f"{mean:{'+' if sign else ''}.1f} ({spread}){'' if complete else '*'}"


def head(first, cols):
    return [f"| {first} | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]


def render(res, notes, folder):
    """The markdown of table.md."""
    s = summarize(res)
    cols = list(COLUMNS) + [c for c in EXTRA if c in s["grid"]]
    lines = [f"# Target-test accuracy (%), mean (std) over seeds: {len(res)} results in "
             f"{folder}", ""] + head("Method", cols + ["Avg Rank"])
    for row in ROWS:
        r = s["ranks"].get(row)
        cells = [fmt(s["cells"][(row, c)]) if c in s["grid"] else "no data" for c in cols]
        lines.append(f"| {row} | {' | '.join(cells)} | {'-' if r is None else f'{r:.2f}'} |")
    lines += ["", "std: sample standard deviation over seeds. * = not complete: some "
              "(corruption, seed) runs that the column has for other methods, or (Cross-Val) "
              "a block it picks from, are missing here; Avg Rank leaves it out."]
    for col, (cs, seeds) in s["grid"].items():
        ranked = sorted(s["picks"][col].items(), key=lambda x: blocks().index(x[0]))
        picks = ", ".join(f"{b} x{n}" for b, n in ranked)
        few = ", ".join(map(str, s["part"][col]))
        few = f" ({few} on some corruptions only: in the intervals, not the means)" if few else ""
        lines.append(f"- {col}: seeds {', '.join(map(str, seeds))}{few}; {len(cs)} "
                     f"corruption(s): {', '.join(cs)}; Cross-Val picked {picks or 'nothing'}")
    if any(r.get("metric", "accuracy") != "accuracy" for r in res.values()):
        lines.append("- Waterbirds, CelebA: worst-group test accuracy (the paper's metric there), "
                     "selected on worst-group val; test_avg_acc: the 4 groups' average.")
    for key in SAME:  # protocols averaged together in a column: say so
        for col, data in {**COLUMNS, **EXTRA}.items():
            seen = sorted({repr(v) for k, r in res.items() if k[0] == data
                           and r["main_settings"]
                           and (v := r.get("args", {}).get(key)) not in ("", None)})
            if len(seen) > 1:
                notes.append(f"{col} results differ in {key}: {', '.join(seen)}")
    lines += [f"- warning: {n}" for n in notes]
    dcols = [c for c in cols if c in s["grid"]]
    lines += ["", "## Each block relative to full fine-tuning (the paper's Figure 2 as "
              "numbers)", "", "Test accuracy minus Full Fine-Tuning's over the (corruption, "
              "seed) runs both have: mean [95% t interval]; the last row is Full Fine-Tuning "
              "itself, mean (std).", ""]
    lines += head("Tune", dcols)
    for b in blocks():
        cells = [(fmt_ci(*f[:3]) + ("" if f[3] else "*")) if (f := s["fig2"][(b, c)]) else "-"
                 for c in dcols]
        lines.append(f"| {b} | {' | '.join(cells)} |")
    full = [fmt(s["cells"][("Full Fine-Tuning", c)]) for c in dcols]
    lines.append(f"| all (absolute) | {' | '.join(full)} |")
    rates = rgn_rates(res, s)
    if rates:
        bs = [b for b in blocks() if any(b in v[0] for v in rates.values())]
        lines += ["", "## Auto-RGN's rate per block (the paper's reason for it, checked)", "",
                  "Auto-RGN's first-epoch lr multiplier (RGN / the largest RGN), mean over each "
                  "block's tensors and the runs, at the selected lr; the last column: runs whose "
                  "largest block is the one Cross-Val picks.", ""]
        lines += head("Column", bs + ["largest = Cross-Val's pick"])
        for c, (m, agree, n) in rates.items():
            cells = [f"{m[b]:.2f}" if b in m else "-" for b in bs] + [f"{agree} of {n} runs"]
            lines.append(f"| {c} | {' | '.join(cells)} |")
    order = ("none",) + blocks() + RANKED
    tunes = sorted({t for c in dcols for t in s["tunes"][c]},
                   key=lambda t: (order.index(t) if t in order else len(order), t))
    lines += ["", "## All runs: every tune, absolute (blocks, comma lists, method "
              "variants)", ""] + head("Tune", dcols)
    for t in tunes:
        lines.append(f"| {t} | {' | '.join(fmt(s['tunes'][c].get(t)) for c in dcols)} |")
    return "\n".join(lines + unsupervised(res) + versus_paper(s, res)) + "\n"


# The paper's cells (its Table 1; PROTOCOL.md section 7): (mean, std); BREEDS' beside Tiny-BREEDS
PAPER = {(row, col): v for col, vals in (
    ("CIFAR-C", ((52.6, 0), (82.8, 0.6), (79.9, 0.7), (81.7, 0.6), (80.9, 0.7), (81.4, 0.6))),
    ("CIFAR-F", ((0, 0), (93.8, 0.1), (85.9, 0.4), (84.2, 1.2), (17.3, 0.7), (87.7, 2.8))),
    ("Living-17", ((80.7, 1.8), (93.2, 0.3), (92.8, 0.7), (93.4, 0.5), (93.5, 0.2), (93.5, 0.3))),
    ("Entity-30", ((58.6, 1.1), (81.2, 0.6), (79.3, 0.6), (78.4, 0.1), (77.3, 0.3), (80.6, 1.2))))
    for row, v in zip(ROWS, vals)}


def verdict(ours, paper):
    """Reproduces: within 2 points or within the larger seed std."""
    if ours is None:
        return "not run"
    gap = ours[0] - paper[0]
    ok = abs(gap) <= max(2.0, ours[1] or 0.0, paper[1])
    return f"{'reproduces' if ok else 'differs'} ({gap:+.1f})"


def versus_paper(s, res):
    """Our CIFAR cells beside the paper's, and the paper's claims checked."""
    cols = [c for c in ("CIFAR-C", "CIFAR-F") if c in s["grid"]]
    more = [c for c in EXTRA if c in s["grid"]]  # claims for another source too
    if not cols + more:
        return []
    lines = ["", "## Beside the paper (CIFAR columns)"]
    if cols:
        lines += ["", "Reproduces = within 2 points or within the seed spread (the larger std).",
                  ""] + head("Method", [x for c in cols for x in (f"{c} ours", f"{c} paper",
                                                                    "verdict")])
    for row in list(ROWS)[:6] if cols else []:
        cells = []
        for c in cols:
            ours, paper = s["cells"][(row, c)], PAPER[(row, c)]
            cells += [fmt(ours), f"{paper[0]:.1f} ({paper[1]:.1f})",
                      verdict(ours and ours[:2], paper)]
        lines.append(f"| {row} | {' | '.join(cells)} |")
    if "Tiny-BREEDS" in more:  # our data, not theirs: the pattern compares, not the level
        lines += ["", "Tiny-BREEDS (ours) beside the paper's feature-level columns (other data, "
                  "network and scale):", ""]
        lines += head("Method", ["Tiny-BREEDS ours", "Living-17 paper", "Entity-30 paper"])
        for row in list(ROWS)[:6]:
            paper = [f"{PAPER[(row, c)][0]:.1f} ({PAPER[(row, c)][1]:.1f})"
                     for c in ("Living-17", "Entity-30")]
            lines.append(f"| {row} | {fmt(s['cells'][(row, 'Tiny-BREEDS')])} | "
                         f"{' | '.join(paper)} |")
    lines += ["", "Claims, each on the paired differences over the (corruption, seed) runs both "
              "sides have: mean [95% t interval]. holds: the interval is on the claimed side; "
              "fails: on the other; not resolved: it covers 0."]
    data, cols = {**COLUMNS, **EXTRA}, cols + more
    runs = [(c, "") for c in cols]  # then under the authors' variations that were run
    runs += [(c, t) for c in cols for t in sorted(
        {k[2][k[2].index("["):] for k in res if k[0] == data[c] and "[" in k[2]})
        if set(re.findall(r"(?:\[|,)(\w+)=", t)) <= set(VARIATIONS)]
    for c, tag in runs:
        best = "layer1" if c.startswith("CIFAR-C") else "fc"
        others = [b for b in blocks() + ("all",) if b != best]
        want = "above every other block and all"
        if c == "Tiny-BREEDS":  # a middle block: the better of layer2 and layer3 against all
            mids = [(sum(d) / len(d), b) for b in ("layer2", "layer3")
                    if (d := diffs(res, data[c], b + tag, "all" + tag))]
            best, others = max(mids or [(0, "layer2")])[1], ["layer1", "fc", "all"]
            want = "a middle block above layer1, fc and all"
        if not tag:  # the best block above the others, and above all
            lines += claim(res, data[c], c, best, others, want)
        lines += claim(res, data[c], c + tag, best + tag, ["all" + tag], "above all")
        lines += claim(res, data[c], c + tag, "auto_rgn" + tag, ["all" + tag], "at or above all")
    pairs = (("layer1", "all"), ("all", "none"), ("fc", "none"))  # MEMO's ordering
    if all(diffs(res, "cifar_c/memo", a, b) for a, b in pairs):
        cis = [interval(diffs(res, "cifar_c/memo", a, b)) for a, b in pairs]
        each = "; ".join(f"{a} - {b} {fmt_ci(*ci)}" for (a, b), ci in zip(pairs, cis))
        n = len(diffs(res, "cifar_c/memo", "layer1", "all"))
        lines.append(f"- MEMO: {each} ({n} pairs); the paper: layer1 > all > none (75.4 / 69.7 "
                     f"/ 67.8), fc ~ none -> {judge([ci[1:] for ci in cis[:2]])}")
    return lines


# t quantiles (0.975) for 1..30 degrees of freedom; beyond, z with a first-order correction
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def interval(d):
    """Mean of the paired differences d and its 95% t interval (None with one pair)."""
    m = sum(d) / len(d)
    if len(d) < 2:
        return m, None, None
    df = len(d) - 1
    t = T975[df - 1] if df <= len(T975) else 1.96 + (1.96 ** 3 + 1.96) / (4 * df)
    h = t * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - h, m + h


def judge(cis):
    """holds when every interval is above 0, fails when one is below, else not resolved."""
    if any(hi is not None and hi < 0 for lo, hi in cis):
        return "fails"
    if all(lo is not None and lo > 0 for lo, hi in cis):
        return "holds"
    return "not resolved"


def fmt_ci(m, lo, hi):
    return f"{m:+.1f}" + (f" [{lo:+.1f}, {hi:+.1f}]" if lo is not None else " [one pair]")


def diffs(res, data, a, b, seed=None):
    """a's test accuracy minus b's, per (corruption, seed) both have."""
    acc = {t: {(k[1], k[3]): r["test_acc"] for k, r in res.items()
               if k[0] == data and k[2] == t and seed in (None, k[3])} for t in (a, b)}
    return [acc[a][k] - acc[b][k] for k in sorted(acc[a]) if k in acc[b]]


def claim(res, data, column, tune, others, want):
    """A claim line: tune above (or at or above) each of others, judged on the paired
    differences, then on each seed's alone. Names print without a variation's tag."""
    others = [o for o in others if diffs(res, data, tune, o)]
    if not others:
        return []
    cis = {o: interval(diffs(res, data, tune, o)) for o in others}
    worst = min(others, key=lambda o: cis[o][0])  # the closest competitor
    n = len(diffs(res, data, tune, worst))
    per = []
    seeds = sorted({k[3] for k in res if k[0] == data and k[2] == tune})
    for s in seeds if len(seeds) > 1 else []:  # a seed lacking a side or with one pair: out
        ds = [diffs(res, data, tune, o, s) for o in others]
        if min(map(len, ds)) > 1:
            per.append(f"seed {s} {judge([interval(d)[1:] for d in ds])}")
    name = f"{tune.split('[')[0]} - {worst.split('[')[0]}"
    closest = (" pair" if n == 1 else " pairs") + (", the closest" if len(others) > 1 else "")
    return [f"- {column}: {name} {fmt_ci(*cis[worst])} ({n}{closest}); the paper: "
            f"{want} -> {judge([ci[1:] for ci in cis.values()])}"
            + (f" ({', '.join(per)})" if per else "")]


UNSUP_TUNES = ("none", "layer1", "layer1+layer2", "layer2", "layer3", "layer4", "fc",
               "all", "auto_rgn")  # row order
UNSUP_NAMED = ("gaussian_noise", "jpeg_compression", "motion_blur")  # columns shown
UNSUP_TITLES = {
    "memo": "MEMO per test image: AugMix copies, one SGD step, from the source every "
            "time (--objective memo)",
    "entropy": "entropy minimisation on the unlabelled target test stream (--objective "
               "entropy)"}


def unsupervised(res):
    """The label-free tables (cifar_c, --objective memo / entropy)."""
    lines = []
    for objective, title in UNSUP_TITLES.items():
        rs = {k[1:]: r["test_acc"] for k, r in res.items() if k[0] == f"cifar_c/{objective}"}
        if not rs:
            continue
        grid = {(c, s) for c, _, s in rs}
        cs, tunes = sorted({c for c, _ in grid}), {t for _, t, _ in rs}
        every = sorted(c for c in cs if all((c, t, s) in rs for t in tunes
                                            for c_, s in grid if c_ == c))
        named = [c for c in UNSUP_NAMED if c in cs]
        lines += ["", f"## Unsupervised: {title}", "", f"CIFAR-C accuracy (%) on the "
                  f"adapted images. \"paired\": the mean over the {len(every)} corruption(s) "
                  f"every tune has ({', '.join(every) or 'none'}); \"all run\": over whatever "
                  f"each tune has of the {len(cs)} present ({', '.join(cs)}).", ""]
        lines += head("Tune", ["paired", "all run"] + named)
        for t in [t for t in UNSUP_TUNES if t in tunes] + sorted(tunes - set(UNSUP_TUNES)):
            acc = {(c, s): v for (c, t_, s), v in rs.items() if t_ == t}

            def part(keep):
                return cell({k: v for k, v in acc.items() if keep(k[0])},
                            {g for g in grid if keep(g[0])})
            cells = [part(lambda c: c in every), cell(acc, grid)]
            cells += [part(lambda c, n=n: c == n) for n in named]
            lines.append(f"| {t} | {' | '.join(map(fmt, cells))} |")
    return lines


def figure(res, s, path):
    """The paper's Figure 2 from our runs: a panel per column, a bar per block, its test
    accuracy minus full fine-tuning's with the 95% interval as the error bar."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    cols = [c for c in s["grid"] if any(s["fig2"].get((b, c)) for b in blocks())]
    if not cols:
        raise SystemExit("error: --figure needs results of blocks and of all in one column")
    rates = rgn_rates(res, s)
    rows = 2 if any(c in rates for c in cols) else 1
    fig, axes = plt.subplots(rows, len(cols), figsize=(3.2 * len(cols), 2.8 * rows),
                             squeeze=False)
    for ax, c in zip(axes[-1], cols if rows == 2 else []):  # the lower row: Auto-RGN's rates
        m = rates.get(c, ({}, 0, 0))[0]
        ax.bar(list(m) or [""], list(m.values()) or [0], color="#999933")  # none: empty
        ax.set_ylim(0, 1)
        ax.set_title(f"{c}: Auto-RGN's rate" + ("" if m else " (not run)"), fontsize=9)
        ax.tick_params(labelsize=8)
    for ax, c in zip(axes[0], cols):
        bs = [b for b in blocks() if s["fig2"].get((b, c))]
        f = [s["fig2"][(b, c)] for b in bs]  # (mean, low, high, complete)
        m = [x[0] for x in f]
        err = [[x[0] - x[1] if x[1] is not None else 0 for x in f],
               [x[2] - x[0] if x[2] is not None else 0 for x in f]]
        colour = ["#4477aa" if x[1] is not None and x[1] > 0 else "#cc6677" if x[2] is not None
                  and x[2] < 0 else "#bbbbbb" for x in f]  # above, below, not resolved
        ax.bar(bs, m, yerr=err, capsize=3, color=colour)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(c, fontsize=10)
        ax.tick_params(labelsize=8)
    for ax, label in zip(axes[:, 0], ("accuracy - full fine-tuning (%)", "lr multiplier, first epoch")):
        ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    common.atomic_save(fig, path, lambda f, tmp: f.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="folder of result files")
    p.add_argument("--out", default="", help="default: <results>/table.md")
    p.add_argument("--figure", default="", help="also draw Figure 2 to this PNG")
    args = p.parse_args(argv)
    res, notes = load(args.results)
    if not res:
        raise SystemExit(f"error: no finetune.py results (*.json) in {args.results}")
    md = render(res, notes, args.results)
    out = args.out or os.path.join(args.results, "table.md")
    common.check_writable(out, "--out")
    common.atomic_save(md, out, lambda t, tmp: pathlib.Path(tmp).write_text(t))
    print(md, end="")
    print(f"written to {out}")
    if args.figure:
        common.check_writable(args.figure, "--figure")
        figure(res, summarize(res), args.figure)
        print(f"figure: {args.figure}")
    return md


if __name__ == "__main__":
    common.run(main)
