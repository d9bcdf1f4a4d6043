"""
Label-free adaptation on the target test images (PROTOCOL.md section 9):
finetune.py --objective memo | entropy. The labels are read once, after every
prediction is made, to score them.

MEMO (Zhang, Levine, Finn 2022) as the paper ran it: for each test image,
from the source weights, 32 AugMix copies, one plain SGD step (lr 0.005) on
the entropy of their mean prediction, taken by the --tune block only, then
predict the image. Its CIFAR AugMix: crop (pad 4) + flip; 3 chains of 1-3 of
9 ops at severity 1 of 10; Dirichlet(1, 1, 1) chain weights; a Beta(1, 1)
mix with the cropped image. Written here batched over all copies: at
severity 1 torchvision's AugMix has identity geometric ops.

A TENT-style stream (Wang et al. 2021): the test split in a seeded order, in
batches, each predicted, then used for one Adam step on the prediction entropy
(continual: the steps accumulate over the stream).
"""
import copy
import math
import time

import torch
import torch.nn.functional as F

import rgn
from common import autocast, finite, fmt_time
from data import crop_flip
from model import evaluate, freeze_except, prefix


def describe(args):
    if args.objective == "memo":
        return (f"MEMO: per test image (order: seed {args.seed}), from the source, "
                f"{args.memo_copies} AugMix copies, one SGD step at lr {args.memo_lr:g} "
                "on the entropy of their mean prediction; no label read")
    return (f"entropy stream (order: seed {args.seed}), batches of {args.ent_batch_size}, "
            f"each predicted, then adapted on; one Adam step at lr {args.ent_lr:g} on the "
            "prediction entropy; no label read")


def run(args, source, names, test, clean, k, acc_before, log=print):
    """The test split in a --seed order, adapted on without labels, then
    scored. k: stages run once first (0 when images are augmented). Returns
    (history, selection, source accuracy of the model the stream left)."""
    x, y = test[:2]
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x), generator=g).to(x.device)
    net = copy.deepcopy(source)
    if args.objective == "memo":
        preds, stream = memo(net, names, x[order], args, log=log)
    else:
        xs = prefix(source, x[order], k)
        preds, stream = adapt_stream(net, names, xs, args, start=k, log=log)
    hit = (preds == y[order]).float() * 100  # the only place labels are read
    for b, h in zip(stream, hit.split([b["n"] for b in stream])):
        b["acc"] = h.mean().item()
    acc, source_acc = hit.mean().item(), acc_before
    lr = args.memo_lr if args.objective == "memo" else args.ent_lr
    if names and clean and args.objective != "memo":
        source_acc = evaluate(net, clean)["acc"]
    sel = {"lr": lr, "lambda": None, "epoch": None, "val_acc": None, "test_acc": acc}
    return [{"lr": lr, "lambda": None, "stream": stream}], sel, source_acc


# -----------------------------------------------------------------------------
# the TENT-style stream

def entropy(logits):
    """Mean entropy (nats) of the softmax of (B, C) logits, TENT's loss."""
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1).mean()


@torch.no_grad()
def predict(model, x, start=0):
    model.eval()
    with autocast(x.device):
        out = model(x, start=start).float()
    return out.argmax(1), entropy(out).item()


def adapt_stream(model, names, x, args, start=0, log=print):
    """Entropy minimisation of model's named parameters, in place, over the
    stream x (stage-`start` inputs) in order. Returns (predictions (N,),
    [{"batch", "n", "entropy" of the scored predictions, "seconds"}])."""
    params, opt = freeze_except(model, names), None
    if names and args.tune == "auto_rgn":  # rates from the stream's first 5 steps
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = rgn.AutoRGN(named, args.ent_lr, norm_names=rgn.norm_param_names(model))
        freeze_except(model, opt.names)
    elif names:
        opt = torch.optim.Adam(params, args.ent_lr)
    preds, stream, t0, nb = [], [], time.time(), math.ceil(len(x) / args.ent_batch_size)
    for i, xb in enumerate(x.split(args.ent_batch_size)):
        pred, ent = predict(model, xb, start)  # scored before its own update
        if opt is not None:  # in eval mode: BatchNorm keeps its statistics
            with autocast(x.device):
                loss = entropy(model(xb, start=start))
            finite(loss, f"stream batch {i + 1}", "Try a smaller --ent_lr.")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        preds.append(pred)
        el = time.time() - t0
        stream.append({"batch": i, "n": len(xb), "entropy": ent, "seconds": el})
        if (i + 1) % max(nb // 10, 1) == 0 or i + 1 == nb:  # ten lines a stream
            eta = fmt_time(el / (i + 1) * (nb - i - 1))
            log(f"stream {i + 1}/{nb} | entropy {ent:.3f} | ETA {eta}")
    return torch.cat(preds), stream


# -----------------------------------------------------------------------------
# MEMO: its CIFAR AugMix as batched uint8 ops, then one step per image

def _uniform(n, gen, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=gen.device)


def _signed(v, gen):  # each op flips its direction with probability 1/2
    return torch.where(_uniform(len(v), gen) > 0.5, -v, v)


def _level(n, gen):  # MEMO's rand_lvl(1): uniform(0.1, 1), on a 0..10 scale
    return _uniform(n, gen, 0.1, 1.0)


def autocontrast(x, gen):  # [min, max] -> [0, 255] per channel, as PIL
    lo = x.amin((2, 3), keepdim=True).double()
    hi = x.amax((2, 3), keepdim=True).double()
    scale = 255 / (hi - lo).clamp_min(1)
    out = (x * scale - lo * scale).clamp(0, 255).to(torch.uint8)  # truncated
    return torch.where(hi > lo, out, x)


def equalize(x, gen):
    """PIL's equalize per image and channel: a lookup table from the
    cumulative histogram, step = (pixels - count of the top level) // 255."""
    flat = x.reshape(-1, x.shape[2] * x.shape[3]).long()  # (N*C, H*W)
    hist = torch.zeros(len(flat), 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))  # (N*C, 256) histograms
    last = hist.gather(1, flat.amax(1, keepdim=True))  # (N*C, 1)
    step = (flat.shape[1] - last) // 255
    lut = ((hist.cumsum(1) - hist + step // 2) // step.clamp_min(1)).clamp_max(255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))
    return lut.gather(1, flat).to(torch.uint8).view_as(x)


def posterize(x, gen):  # 4 - int(level * 4 / 10) = 4 bits whatever the level
    return x & 0xF0


def solarize(x, gen):  # invert pixels >= 256 - int(level * 25.6)
    thr = (256 - (_level(len(x), gen) * 25.6).floor()).view(-1, 1, 1, 1)
    return torch.where(x >= thr, 255 - x, x)


def _affine(x, theta):
    """Bilinear resampling by (N,2,3) maps, output to input, as PIL's
    transform(..., BILINEAR, fillcolor=128) in MEMO: on RGB, (128, 0, 0)."""
    fill = torch.tensor([128.0, 0.0, 0.0], device=x.device).view(1, 3, 1, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float() - fill, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False) + fill
    return out.round().clamp(0, 255).to(torch.uint8)


def _eye(n, dev):
    return torch.eye(2, 3, device=dev).repeat(n, 1, 1)


def rotate(x, gen):  # int(level * 30 / 10) = 0..2 degrees
    a = _signed((_level(len(x), gen) * 3).floor(), gen) * math.pi / 180
    theta = _eye(len(x), x.device)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
    theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    return _affine(x, theta)


def _shear(x, gen, axis):  # level * 0.03; PIL's origin is the top left
    s, theta = _signed(_level(len(x), gen) * 0.03, gen), _eye(len(x), x.device)
    theta[:, axis, 1 - axis], theta[:, axis, 2] = s, s
    return _affine(x, theta)


def _translate(x, gen, axis):  # int(level * (32 / 3) / 10) = 0 or 1 pixel
    px = _signed((_level(len(x), gen) * x.shape[-1] / 30).floor(), gen)
    theta = _eye(len(x), x.device)
    theta[:, axis, 2] = 2 * px / x.shape[-1]
    return _affine(x, theta)


OPS = (autocontrast, equalize, rotate, solarize, lambda x, g: _shear(x, g, 0),
       lambda x, g: _shear(x, g, 1), lambda x, g: _translate(x, g, 0),
       lambda x, g: _translate(x, g, 1), posterize)


def augmix(x, gen, width=3):
    """AugMix copies of uint8 x (N,3,H,W): float, normalised as the model's."""
    x = crop_flip(x, 4, gen)
    n, norm = len(x), (lambda im: im.float() / 127.5 - 1.0)
    w = -_uniform(n * width, gen).clamp_min(1e-12).log().view(n, width)  # Exp(1)
    w = w / w.sum(1, keepdim=True)  # normalised: Dirichlet(1, 1, 1)
    m = _uniform(n, gen).view(n, 1, 1, 1)  # Beta(1, 1)
    mix = torch.zeros(x.shape, device=x.device)
    for i in range(width):
        xa, depth = x.clone(), torch.randint(1, 4, (n,), generator=gen, device=x.device)
        for step in range(3):
            op = torch.randint(len(OPS), (n,), generator=gen, device=x.device)
            for k, f in enumerate(OPS):  # each op once, on the copies that drew it
                idx = ((depth > step) & (op == k)).nonzero().squeeze(1)
                if len(idx):
                    xa[idx] = f(xa[idx], gen)
        mix += w[:, i].view(n, 1, 1, 1) * norm(xa)
    return m * norm(x) + (1 - m) * mix  # as MEMO: m weights the cropped image


def marginal_entropy(logits):
    """Entropy of the mean softmax over (copies, C) logits: MEMO's loss."""
    logp = logits.float().log_softmax(1).logsumexp(0) - math.log(len(logits))
    return -(logp.exp() * logp).sum()


def memo(model, names, x, args, log=print, chunk=32):
    """Predictions (N,) of uint8 x, each after one SGD step of the named
    parameters on its copies' marginal entropy, then undone; and per-chunk
    records {"batch", "n", "entropy" (mean loss), "seconds"}."""
    params = freeze_except(model, names)
    src = [p.detach().clone() for p in params]
    gen = torch.Generator(device=x.device).manual_seed(args.seed)
    model.eval()  # MEMO adapts in eval mode
    preds, records, t0, k = [], [], time.time(), args.memo_copies
    for c, xc in enumerate(x.split(chunk)):
        # the chunk's copies at once: (n * k, 3, H, W), image-major
        xa = augmix(xc.repeat_interleave(k, 0), gen) if names else None
        losses = []
        for i in range(len(xc)):
            if names:
                with autocast(x.device):
                    loss = marginal_entropy(model(xa[i * k:(i + 1) * k]).float())
                where = f"test image {len(preds) + 1}"
                losses.append(finite(loss, where, "Try a smaller --memo_lr."))
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.data.sub_(args.memo_lr * g)  # plain SGD
            with torch.no_grad(), autocast(x.device):
                preds.append(model(xc[i:i + 1]).float().argmax(1))
            with torch.no_grad():  # back to the source for the next image
                for p, p0 in zip(params, src):
                    p.copy_(p0)
        el = time.time() - t0
        ent = sum(losses) / len(losses) if losses else None
        records.append({"batch": c, "n": len(xc), "entropy": ent, "seconds": el})
        done, n = sum(r["n"] for r in records), math.ceil(len(x) / chunk)
        if (c + 1) % max(n // 10, 1) == 0 or c + 1 == n:  # ten lines a corruption
            eta = fmt_time(el / done * (len(x) - done))
            log(f"memo {done}/{len(x)} images | ETA {eta}")
    return torch.cat(preds), records
