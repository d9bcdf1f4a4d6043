"""
Compare our generated CIFAR-10-C against statistics of the reference generator (Hendrycks & Dietterich 2019).

    python check_corruptions.py --ref ../shared/reference/cifar10c_reference_stats.json \
        --data_dir ../shared/data/cifar10-sample

Corrupts the test images at every severity, computes five statistics per (corruption, severity) and prints
them next to the reference's, flagging mad outside the tolerance (15%, 30% for frost, whose photographs we
replace). Statistics on the 0..255 scale (these definitions reproduce the reference's numbers for contrast and
noise):
  mad         mean |corrupted - clean|
  mean_shift  mean(corrupted) - mean(clean)
  std_ratio   per image std(corrupted) / std(clean), averaged over images      (contrast)
  hf_ratio    mean |Laplacian of the channel mean| over all images, corrupted / clean (blur < 1 < noise)
  sat_ratio   mean HSV saturation ratio, corrupted / clean
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

import data


# (N,3,H,W) float -> 4-neighbour Laplacian of the channel mean, interior pixels (N,1,H-2,W-2)
def _laplacian(x):
    k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    return F.conv2d(x.mean(1, keepdim=True), k)


def _saturation(x):  # HSV saturation (max - min) / max, 0 for black
    mx, mn = x.amax(1), x.amin(1)
    return torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-8), torch.zeros_like(mx))


def corruption_stats(clean, corrupted):
    """clean, corrupted: uint8 (N,3,H,W). Returns the five statistics as floats."""
    x, c = clean.double(), corrupted.double()
    return {"mad": (c - x).abs().mean().item(), "mean_shift": (c.mean() - x.mean()).item(),
            "std_ratio": (c.flatten(1).std(1) / x.flatten(1).std(1)).mean().item(),
            "hf_ratio": (_laplacian(c).abs().mean() / _laplacian(x).abs().mean()).item(),
            "sat_ratio": (_saturation(c).mean() / _saturation(x).mean()).item()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True,
                   help="reference statistics json: {corruption: {severity: {stat: v}}}")
    p.add_argument("--data_dir", default="data", help="folder holding cifar-10-batches-py")
    p.add_argument("--corruption", default="all19", help="one name, a comma list, paper14 or all19")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=0.15,
                   help="relative tolerance on mad (frost gets twice this)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        ref = json.load(open(args.ref))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read reference stats {args.ref}: {e}")
    clean = data.load_cifar10(args.data_dir)["test"][0]
    names, bad, worst = data.parse_corruptions(args.corruption), 0, (0.0, "")
    print(f"{'corruption':18s} sev {'mad':>13s} {'mean_shift':>13s} {'std_ratio':>11s} {'hf_ratio':>11s} "
          f"{'sat_ratio':>11s}   (ours/ref)")
    for name in names:
        for sev in range(1, 6):
            s = corruption_stats(clean, data.corrupt(clean, name, sev, seed=args.seed))
            r = ref[name][str(sev)]
            tol = args.tol * (2 if name == "frost" else 1)
            dev = abs(s["mad"] / r["mad"] - 1)
            ok, bad, worst = dev <= tol, bad + (dev > tol), max(worst, (dev, f"{name} {sev}"))
            print(f"{name:18s} {sev:3d} {s['mad']:6.1f}/{r['mad']:<6.1f} "
                  f"{s['mean_shift']:+6.1f}/{r['mean_shift']:<+6.1f} "
                  f"{s['std_ratio']:5.2f}/{r['std_ratio']:<5.2f} {s['hf_ratio']:5.2f}/{r['hf_ratio']:<5.2f} "
                  f"{s['sat_ratio']:5.2f}/{r['sat_ratio']:<5.2f} {'' if ok else '  <- mad off'}")
    print(f"{len(names) * 5 - bad}/{len(names) * 5} (corruption, severity) pairs within tolerance on mad; "
          f"largest mad deviation {100 * worst[0]:.1f}% ({worst[1]})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
