"""
Label-free adaptation on the target test images (PROTOCOL.md section 9), finetune.py --objective memo | entropy.
Only images come in; the labels are read once, after every prediction is made, to score them.

MEMO (Zhang, Levine, Finn 2022) as the paper ran it for its unsupervised table: for every test image, from the
source weights (episodic), 32 AugMix copies, one plain SGD step at lr 0.005 on the entropy of their mean
prediction, then predict the original image. Surgically, only the --tune block takes the step.
    python finetune.py --objective memo --tune layer1          # one row: 15 corruptions, severity 5
    python finetune.py --objective memo --tune layer1+layer2   # "first two blocks"
The AugMix is MEMO's CIFAR one (after Hendrycks et al. 2020): a random crop (zero pad 4) + flip; 3 chains of
1-3 ops drawn from 9, each at severity 1 of 10 (magnitude uniform in [0.1, 1] x the op's range / 10);
Dirichlet(1, 1, 1) chain weights and a Beta(1, 1) mix with the cropped image. torchvision's AugMix draws
magnitudes from bins and at severity 1 its geometric ops are the identity, so the ops are written here,
batched over all copies at once.

TENT-style stream (Wang et al. 2021): the test split in a seeded order, in batches; each batch is predicted,
then drives Adam steps on the prediction entropy (continual), or the model restarts from the source for each
batch (--episodic). --ent_copies N: the entropy of each image's mean prediction over N crop+flip copies
instead.
    python finetune.py --objective entropy --tune layer1
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
        return (f"MEMO: per test image (order: seed {args.seed}), from the source weights, "
                f"{args.memo_copies} AugMix copies, one SGD step at lr {args.memo_lr:g} on the entropy of "
                "their mean prediction; no label read")
    return (f"entropy stream (order: seed {args.seed}), batches of {args.ent_batch_size}, " +
            ("each adapted from the source, then predicted" if args.episodic else
             "each predicted, then adapted on")
            + f"; {args.ent_steps} Adam step(s) at lr {args.ent_lr:g} on the " +
            (f"marginal entropy over {args.ent_copies} crop+flip copies" if args.ent_copies else
             "prediction entropy")
            + "; no label read")


def run(args, source, names, test, clean, k, acc_before, log=print):
    """The test split (x, y[, groups]) in a --seed order, adapted on without its labels (a stream, or per
    image for memo), then scored. k: stages computed once before the stream (0 for memo and copies: they
    augment images). Returns (history [{"lr", "lambda": None, "stream": per-batch records}], selection, source
    accuracy of the model the stream left: memo's every image starts from the source again)."""
    x, y = test[:2]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed)).to(x.device)
    net = copy.deepcopy(source)
    if args.objective == "memo":
        preds, stream = memo(net, names, x[order], args, log=log)
    else:
        preds, stream = adapt_stream(net, names, prefix(source, x[order], k), args, start=k, log=log)
    hit = (preds == y[order]).float() * 100  # the scoring, the only place labels are read
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

def entropy(logits, n_aug=0):
    """Mean entropy (nats) of the softmax of (B, C) logits: TENT's loss. n_aug > 0: the rows are n_aug
    copy-major blocks of the same images, scored by the entropy of each image's mean prediction."""
    logp = logits.float().log_softmax(1)
    if n_aug:
        logp = logp.view(n_aug, -1, logp.shape[1]).logsumexp(0) - math.log(n_aug)  # log mean softmax, (B, C)
    return -(logp.exp() * logp).sum(1).mean()


@torch.no_grad()
def predict(model, x, start=0):
    model.eval()
    with autocast(x.device):
        out = model(x, start=start).float()
    return out.argmax(1), entropy(out).item()


def adapt_stream(model, names, x, args, start=0, log=print):
    """Entropy minimisation of the named parameters of model (in place) over the stream x (images when start
    == 0, else stage-`start` activations) in order. Returns (predictions (N,), [{"batch", "n", "entropy" of
    the scored predictions, "seconds"}])."""
    params = freeze_except(model, names)
    src, opt, g = [p.detach().clone() for p in params], None, torch.Generator(x.device).manual_seed(args.seed)

    def new_opt():  # auto_rgn: per-tensor rates measured on the first 5 steps after each reset, norms frozen
        if args.tune != "auto_rgn":
            return torch.optim.Adam(params, args.ent_lr)
        o = rgn.AutoRGN([(n, p) for n, p in model.named_parameters() if p.requires_grad], args.ent_lr,
                        include_norm=args.rgn_include_norm, norm_names=rgn.norm_param_names(model))
        freeze_except(model, o.names)
        return o
    preds, stream, t0, nb = [], [], time.time(), math.ceil(len(x) / args.ent_batch_size)
    for i, xb in enumerate(x.split(args.ent_batch_size)):
        if names and (opt is None or args.episodic):  # episodic: the source weights and fresh Adam moments
            with torch.no_grad():
                for p, p0 in zip(params, src):
                    p.copy_(p0)
            opt = new_opt()
        if not args.episodic:  # continual: scored before any update on this batch
            pred, ent = predict(model, xb, start)
        for _ in range(args.ent_steps if names else 0):
            model.train(args.bn == "train")  # TENT proper on a BatchNorm net: --bn train (batch statistics)
            xa = torch.cat([crop_flip(xb, generator=g)
                            for _ in range(args.ent_copies)]) if args.ent_copies else xb
            with autocast(x.device):
                loss = entropy(model(xa, start=start), args.ent_copies)
            finite(loss, f"stream batch {i + 1}", "Try a smaller --ent_lr.")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if args.episodic:
            pred, ent = predict(model, xb, start)
        preds.append(pred)
        stream.append({"batch": i, "n": len(xb), "entropy": ent, "seconds": time.time() - t0})
        if (i + 1) % max(nb // 10, 1) == 0 or i + 1 == nb:  # about ten lines a stream
            el = time.time() - t0
            log(f"  stream {i + 1}/{nb} | entropy {ent:.3f} | {fmt_time(el)}, ETA "
                f"{fmt_time(el / (i + 1) * (nb - i - 1))}")
    return torch.cat(preds), stream


# -----------------------------------------------------------------------------
# MEMO: its CIFAR AugMix as batched uint8 tensor ops, then one step per image

def _uniform(n, gen, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=gen.device)


def _signed(v, gen):  # each op flips its direction with probability 1/2
    return torch.where(_uniform(len(v), gen) > 0.5, -v, v)


def _level(n, gen):  # MEMO's rand_lvl(1): uniform(0.1, 1), a magnitude on the 0..10 scale
    return _uniform(n, gen, 0.1, 1.0)


def autocontrast(x, gen):  # per image and channel: stretch [min, max] to [0, 255], PIL's arithmetic (float64)
    lo, hi = x.amin((2, 3), keepdim=True).double(), x.amax((2, 3), keepdim=True).double()
    scale = 255 / (hi - lo).clamp_min(1)
    # int() truncates, as PIL's lookup table does
    out = (x * scale - lo * scale).clamp(0, 255).to(torch.uint8)
    return torch.where(hi > lo, out, x)


def equalize(x, gen):
    """PIL's ImageOps.equalize per image and channel, batched: a lookup table from each histogram's cumulative
    sum, with step = (pixels - count of the last used level) // 255; step 0 leaves the channel as it is."""
    flat = x.reshape(-1, x.shape[2] * x.shape[3]).long()  # (N*C, H*W)
    hist = torch.zeros(len(flat), 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))  # (N*C, 256) histograms
    last = hist.gather(1, flat.amax(1, keepdim=True))  # count of the highest level present, (N*C, 1)
    step = (flat.shape[1] - last) // 255
    lut = ((hist.cumsum(1) - hist + step // 2) // step.clamp_min(1)).clamp_max(255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))
    return lut.gather(1, flat).to(torch.uint8).view_as(x)


def posterize(x, gen):  # 4 - int(level * 4 / 10) = 4 bits whatever the level
    return x & 0xF0


def solarize(x, gen):  # invert pixels >= 256 - int(level * 256 / 10), i.e. >= 231..254
    thr = (256 - (_level(len(x), gen) * 25.6).floor()).view(-1, 1, 1, 1)
    return torch.where(x >= thr, 255 - x, x)


def _affine(x, theta):
    """Bilinear resampling of uint8 (N,3,H,W) by (N,2,3) maps from output to input in normalised coordinates,
    as PIL's transform(..., BILINEAR, fillcolor=128) in MEMO: on an RGB image that fill is (128, 0, 0), dark
    red."""
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
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    return _affine(x, theta)


def _shear(x, gen, axis):  # level * 0.3 / 10; PIL's origin is the top-left corner, hence the offset
    s, theta = _signed(_level(len(x), gen) * 0.03, gen), _eye(len(x), x.device)
    theta[:, axis, 1 - axis], theta[:, axis, 2] = s, s
    return _affine(x, theta)


def _translate(x, gen, axis):  # int(level * (32 / 3) / 10) = 0 or 1 pixel
    px = _signed((_level(len(x), gen) * x.shape[-1] / 30).floor(), gen)
    theta = _eye(len(x), x.device)
    theta[:, axis, 2] = 2 * px / x.shape[-1]
    return _affine(x, theta)


OPS = (autocontrast, equalize, rotate, solarize, lambda x, g: _shear(x, g, 0), lambda x, g: _shear(x, g, 1),
       lambda x, g: _translate(x, g, 0), lambda x, g: _translate(x, g, 1), posterize)


def augmix(x, gen, width=3):
    """AugMix copies of uint8 images x (N,3,H,W): float (N,3,H,W) in the model's normalised input space."""
    x = crop_flip(x, 4, gen)
    n, norm = len(x), (lambda im: im.float() / 127.5 - 1.0)  # the model's (x / 255 - 0.5) / 0.5
    # Exp(1) draws, normalised: Dirichlet(1..)
    w = -_uniform(n * width, gen).clamp_min(1e-12).log().view(n, width)
    w, m = w / w.sum(1, keepdim=True), _uniform(n, gen).view(n, 1, 1, 1)  # Beta(1, 1) = uniform
    mix = torch.zeros(x.shape, device=x.device)
    for i in range(width):
        xa, depth = x.clone(), torch.randint(1, 4, (n,), generator=gen, device=x.device)
        for step in range(3):
            op = torch.randint(len(OPS), (n,), generator=gen, device=x.device)
            for k, f in enumerate(OPS):  # each op once, on every copy that drew it at this step
                idx = ((depth > step) & (op == k)).nonzero().squeeze(1)
                if len(idx):
                    xa[idx] = f(xa[idx], gen)
        mix += w[:, i].view(n, 1, 1, 1) * norm(xa)
    return m * norm(x) + (1 - m) * mix  # as MEMO writes it: m weights the cropped image


def marginal_entropy(logits):
    """Entropy (nats) of the mean softmax over the rows of (copies, C) logits: MEMO's loss."""
    logp = logits.float().log_softmax(1).logsumexp(0) - math.log(len(logits))
    return -(logp.exp() * logp).sum()


def memo(model, names, x, args, log=print, chunk=32):
    """Predictions (N,) for uint8 images x: each by the source model after one SGD step (lr args.memo_lr) on
    the marginal entropy of args.memo_copies AugMix copies of that image, taken by the named parameters only,
    then undone. Also per-chunk records {"batch", "n" images, "entropy" (mean loss), "seconds"}."""
    params = freeze_except(model, names)
    src = [p.detach().clone() for p in params]
    gen = torch.Generator(device=x.device).manual_seed(args.seed)
    model.eval()  # MEMO adapts in eval mode; GroupNorm keeps no statistics anyway
    preds, records, t0, k = [], [], time.time(), args.memo_copies
    for c, xc in enumerate(x.split(chunk)):
        # all copies of the chunk's images drawn at once: (n * k, 3, H, W), image-major
        xa = augmix(xc.repeat_interleave(k, 0), gen) if names else None
        losses = []
        for i in range(len(xc)):
            if names:
                with autocast(x.device):
                    loss = marginal_entropy(model(xa[i * k:(i + 1) * k]).float())
                losses.append(finite(loss, f"test image {len(preds) + 1}", "Try a smaller --memo_lr."))
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.data.sub_(args.memo_lr * g)  # plain SGD: no momentum, no weight decay
            with torch.no_grad(), autocast(x.device):
                preds.append(model(xc[i:i + 1]).float().argmax(1))
            with torch.no_grad():  # episodic: back to the source weights for the next image
                for p, p0 in zip(params, src):
                    p.copy_(p0)
        el = time.time() - t0
        records.append({"batch": c, "n": len(xc), "entropy": sum(losses) / len(losses) if losses else None,
                        "seconds": el})
        done, n = sum(r["n"] for r in records), math.ceil(len(x) / chunk)
        if (c + 1) % max(n // 10, 1) == 0 or c + 1 == n:  # about ten lines a corruption
            eta = fmt_time(el / done * (len(x) - done))
            log(f"  memo {done}/{len(x)} images | {fmt_time(el)}, ETA {eta}")
    return torch.cat(preds), records
