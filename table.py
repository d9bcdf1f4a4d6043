"""
The paper's table (PROTOCOL.md section 7), its Figure 2 as numbers and its
claims, from finetune.py's result files.

    python table.py                          # results/*.json -> results/table.md
    python table.py --results results/paper  # our measured runs (RESULTS.md)

A cell is the mean (sample std, n - 1) over seeds of target test accuracy; a
seed's value is its mean over the column's corruptions. Cross-Val: per
(dataset, seed), the block whose val accuracy averaged over the corruptions
is best (ties: block order), at its test accuracy. Avg Rank ranks Full FT,
L1, Auto-SNR and Auto-RGN on the rounded means (ties share the better rank).
A cell missing some (corruption, seed) that its column has elsewhere is
marked *. Only *.json is read: a killed run's temp file never is.
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

COLUMNS = {"CIFAR-C": "cifar_c", "IN-C": "imagenet_c", "Living-17": "living17",
           "Entity-30": "entity30", "CIFAR-F": "cifar_flip", "Waterbirds": "waterbirds",
           "CelebA": "celeba"}  # column -> --data
ROWS = {"No Adaptation": "none", "Cross-Val": "crossval", "Full Fine-Tuning": "all",
        "L1 Regularize": "l1", "Auto-SNR": "auto_snr", "Auto-RGN": "auto_rgn",
        "Cross-Val per corruption (extra)": "crossval_c"}
ROW_OF = {t: row for row, t in ROWS.items()}
RANKED = ("all", "l1", "auto_snr", "auto_rgn")  # what Avg Rank compares
SAME = ("ckpt", "epochs", "train_n", "val_per_class", "test_per_class", "split_seed",
        "batch_size", "wd", "lrs")  # a column mixing these says so


def blocks():
    """Cross-Val's candidates in tie-break order: every network's blocks."""
    nets = ("resnet50", *model.BLOCKS)
    return tuple(dict.fromkeys(b for a in nets for b in model.BLOCKS[a]))


def settings(r):
    return ",".join(f"{k}={v}" for k, v in sorted((r.get("changed") or {}).items()))


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
            keys = {"data", "corruption", "tune", "seed", "test_acc"}
            if not isinstance(r, dict) or not keys <= set(r):
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
        tags = [r["variant"]] if r.get("variant") else []
        tags += [settings(r)] if settings(r) else []
        r["main_settings"] = not tags
        tune = r["tune"] + "".join(f"[{g}]" for g in tags)
        data = r["data"]
        if r.get("objective", "ce") != "ce":  # "cifar_c/memo": tables of its own
            data = f"{data}/{r['objective']}"
        key = (data, r["corruption"], tune, r["seed"])
        if key in res:
            notes.append(f"skipped {path}: a second result for {key}")
            continue
        res[key] = r
    return res, notes


def cell(vals, n_expected):
    """{(corruption, seed): acc} -> (mean over seeds of the seed means, std
    or None, seeds, complete) or None."""
    by_seed = {}
    for (_, s), v in vals.items():
        by_seed.setdefault(s, []).append(v)
    if not by_seed:
        return None
    m = [sum(v) / len(v) for v in by_seed.values()]
    std = statistics.stdev(m) if len(m) > 1 else None
    return sum(m) / len(m), std, len(m), len(vals) == n_expected


def summarize(res):
    """{"cells": {(row, column): cell}, "fig2": {(block, column): cell},
    "ranks": {row: avg rank}, "picks": {column: Counter of blocks},
    "grid": {column: (corruptions, seeds)}, "tunes": {column: {tune: cell}}}.
    A column's expected grid is what its main-settings results cover."""
    out = {"cells": {}, "fig2": {}, "picks": {}, "grid": {}, "tunes": {}}
    for col, data in COLUMNS.items():
        rs = {k[1:]: r for k, r in res.items() if k[0] == data}  # (c, tune, seed)
        if not rs:
            continue
        grid = sorted({(c, s) for (c, _, s), r in rs.items() if r.get("main_settings", True)}
                      or {(c, s) for c, _, s in rs})
        out["grid"][col] = (sorted({c for c, _ in grid}), sorted({s for _, s in grid}))
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
        for c, s in grid:  # the extra row: a choice per (corruption, seed)
            if cands and all((c, b, s) in rs for b in cands):
                best = max(cands, key=lambda b: (rs[(c, b, s)]["val_acc"], -cands.index(b)))
                acc["crossval_c"][(c, s)] = rs[(c, best, s)]["test_acc"]
        out["picks"][col] = picks
        out["tunes"][col] = {t: cell(a, len(grid)) for t, a in acc.items()
                             if not t.startswith("crossval")}
        for row, tune in ROWS.items():
            out["cells"][(row, col)] = cell(acc.get(tune, {}), len(grid))
        full = acc.get("all", {})
        for b in blocks():  # Figure 2: per (corruption, seed) differences to all
            diff = {k: v - full[k] for k, v in acc.get(b, {}).items() if k in full}
            out["fig2"][(b, col)] = cell(diff, len(grid))
        out["fig2"][("all", col)] = out["cells"][("Full Fine-Tuning", col)]
    ranks = {t: [] for t in RANKED}
    for col in out["grid"]:
        means = {t: round(c[0], 1) for t in RANKED if (c := out["cells"][(ROW_OF[t], col)])}
        for t, v in means.items():  # 1 + how many are strictly better
            ranks[t].append(1 + sum(u > v for u in means.values()))
    out["ranks"] = {ROW_OF[t]: sum(r) / len(r) if r else None for t, r in ranks.items()}
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
    cols = list(COLUMNS)
    lines = [f"# Target-test accuracy (%), mean (std) over seeds: {len(res)} results in "
             f"{folder}", ""] + head("Method", cols + ["Avg Rank"])
    for row in ROWS:
        r = s["ranks"].get(row)
        cells = [fmt(s["cells"][(row, c)]) if c in s["grid"] else "no data" for c in cols]
        lines.append(f"| {row} | {' | '.join(cells)} | {'-' if r is None else f'{r:.2f}'} |")
    lines += ["", "std: sample standard deviation over seeds. * = not complete: some "
              "(corruption, seed) runs that the column has for other methods are missing "
              "here; the cell averages what there is."]
    for col, (cs, seeds) in s["grid"].items():
        ranked = sorted(s["picks"][col].items(), key=lambda x: blocks().index(x[0]))
        picks = ", ".join(f"{b} x{n}" for b, n in ranked)
        lines.append(f"- {col}: seeds {', '.join(map(str, seeds))}; {len(cs)} "
                     f"corruption(s): {', '.join(cs)}; Cross-Val picked {picks or 'nothing'}")
    if any(r.get("metric", "accuracy") != "accuracy" for r in res.values()):
        lines.append("- Waterbirds, CelebA: worst-group test accuracy (the paper's metric "
                     "there), selected on worst-group val accuracy; each result's "
                     "test_avg_acc holds the average over the 4 groups.")
    for key in SAME:  # protocols averaged together in a column: say so
        for col, data in COLUMNS.items():
            seen = sorted({repr(v) for k, r in res.items() if k[0] == data
                           and r["main_settings"]
                           and (v := r.get("args", {}).get(key)) not in ("", None)})
            if len(seen) > 1:
                notes.append(f"{col} results differ in {key}: {', '.join(seen)}")
    lines += [f"- warning: {n}" for n in notes]
    dcols = [c for c in cols if c in s["grid"]]
    lines += ["", "## Each block relative to full fine-tuning (the paper's Figure 2 as "
              "numbers)", "", "Accuracy minus Full Fine-Tuning's, per (corruption, seed), "
              "then as above; the last row is Full Fine-Tuning itself.", ""]
    lines += head("Tune", dcols)
    for b in blocks() + ("all",):
        cells = " | ".join(fmt(s["fig2"][(b, c)], sign=b != "all") for c in dcols)
        lines.append(f"| {b if b != 'all' else 'all (absolute)'} | {cells} |")
    order = ("none",) + blocks() + RANKED
    tunes = sorted({t for c in dcols for t in s["tunes"][c]},
                   key=lambda t: (order.index(t) if t in order else len(order), t))
    lines += ["", "## All runs: every tune, absolute (blocks, comma lists, method "
              "variants)", ""] + head("Tune", dcols)
    for t in tunes:
        lines.append(f"| {t} | {' | '.join(fmt(s['tunes'][c].get(t)) for c in dcols)} |")
    return "\n".join(lines + unsupervised(res) + versus_paper(s, res)) + "\n"


# The paper's CIFAR cells (its Table 1; PROTOCOL.md section 7): (mean, std)
PAPER = {(row, col): v for col, vals in (
    ("CIFAR-C", ((52.6, 0), (82.8, 0.6), (79.9, 0.7), (81.7, 0.6), (80.9, 0.7), (81.4, 0.6))),
    ("CIFAR-F", ((0, 0), (93.8, 0.1), (85.9, 0.4), (84.2, 1.2), (17.3, 0.7), (87.7, 2.8))))
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
    if not cols:
        return []
    lines = ["", "## Beside the paper (CIFAR columns)", "", "Reproduces = within 2 "
             "points or within the seed spread (the larger std).", ""]
    lines += head("Method", [x for c in cols for x in (f"{c} ours", f"{c} paper",
                                                       "verdict")])
    for row in list(ROWS)[:6]:
        cells = []
        for c in cols:
            ours, paper = s["cells"][(row, c)], PAPER[(row, c)]
            cells += [fmt(ours), f"{paper[0]:.1f} ({paper[1]:.1f})",
                      verdict(ours and ours[:2], paper)]
        lines.append(f"| {row} | {' | '.join(cells)} |")
    lines += ["", "Claims (each on the (corruption, seed) runs that every compared tune "
              "has):"]
    for c, want in (("CIFAR-C", "layer1"), ("CIFAR-F", "fc")):  # the best block
        m, n = paired(res, COLUMNS[c], blocks() + ("all",))
        if want in m and len(m) > 1:
            each = ", ".join(f"{b} {v:.1f}" for b, v in m.items())

            def best(m, want=want):  # on the printed values: a tie is a tie
                top = max(round(v, 1) for b, v in m.items() if b != want)
                return above(round(m[want], 1), top)
            lines.append(f"- {c}: best {max(m, key=m.get)} ({each}; {n} runs each); the "
                         f"paper: {want}, above every other block and full fine-tuning -> "
                         + settle(res, COLUMNS[c], tuple(m), best))
    runs = [(c, "") for c in cols]  # then again under each variation run
    runs += [(c, t) for c in cols for t in sorted(
        {k[2][k[2].index("["):] for k in res if k[0] == COLUMNS[c] and "[" in k[2]})]
    for c, tag in runs:
        lines += against_all(res, c, tag, "layer1" if c == "CIFAR-C" else "fc")
        lines += against_all(res, c, tag, "auto_rgn")
    m, n = paired(res, "cifar_c/memo", ("layer1", "all", "none", "fc"))
    if len(m) == 4:
        def order(m):
            return m["layer1"] > m["all"] > m["none"] and abs(m["none"] - m["fc"]) <= 2
        lines.append(f"- MEMO: layer1 {m['layer1']:.1f}, all {m['all']:.1f}, none "
                     f"{m['none']:.1f}, fc {m['fc']:.1f} ({n} corruptions); the paper: "
                     "layer1 > all > none ~ fc (75.4 / 69.7 / 67.8 / 67.8) -> "
                     + settle(res, "cifar_c/memo", tuple(m), order))
    return lines


def against_all(res, column, tag, tune):
    """A claim line: tune (the paper's best block: above all; Auto-RGN: at or
    above) against all, both with tag ("[lrs=...]"), on the runs both have."""
    a, b = tune + tag, "all" + tag
    m, n = paired(res, COLUMNS[column], (a, b))
    if len(m) < 2:
        return []
    rgn = tune == "auto_rgn"
    name, want = ("Auto-RGN", "at or above") if rgn else (f"{tune} (the paper's best)",
                                                          "above")

    def ok(m):
        x, y = round(m[a], 1), round(m[b], 1)
        return x >= y if rgn else above(x, y)
    return [f"- {column}{tag}: {name} {m[a]:.1f} vs full fine-tuning {m[b]:.1f} ({n} "
            f"runs each); the paper: {want} -> " + settle(res, COLUMNS[column], (a, b), ok)]


def above(x, y):
    """True, False, or None for a tie."""
    return None if x == y else x > y


def settle(res, data, tunes, ok):
    """"holds", "fails" or "ties" by ok({tune: mean}) on the runs every tune
    has, and with several seeds each seed's own: "ties (seed 0 holds, ...)"."""
    m, _ = paired(res, data, tunes)
    word = {True: "holds", False: "fails", None: "ties"}
    seeds = sorted({k[3] for k in res if k[0] == data})
    per = [(s, paired(res, data, tunes, seed=s)[0]) for s in seeds]
    per = [f"seed {s} {word[ok(ms)]}" for s, ms in per if len(ms) == len(m)]
    return word[ok(m)] + (f" ({', '.join(per)})" if len(per) > 1 else "")


def paired(res, data, tunes, seed=None):
    """({tune: mean test accuracy}, n) over the (corruption, seed) pairs every
    tune present has (of one seed, if given)."""
    acc = {t: {(k[1], k[3]): r["test_acc"] for k, r in res.items()
               if k[0] == data and k[2] == t and seed in (None, k[3])} for t in tunes}
    acc = {t: a for t, a in acc.items() if a}
    both = set.intersection(*(set(a) for a in acc.values())) if acc else set()
    if not both:
        return {}, 0
    return {t: sum(a[k] for k in both) / len(both) for t, a in acc.items()}, len(both)


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
                            sum(keep(g[0]) for g in grid))
            cells = [part(lambda c: c in every), cell(acc, len(grid))]
            cells += [part(lambda c, n=n: c == n) for n in named]
            lines.append(f"| {t} | {' | '.join(map(fmt, cells))} |")
    return lines


def write(text, path):
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="folder of result files")
    p.add_argument("--out", default="", help="default: <results>/table.md")
    args = p.parse_args(argv)
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
    common.run(main)
