"""
The paper's two ways of choosing what to fine-tune (section 5 of the paper;
PROTOCOL.md section 6).

Auto-RGN: Adam with a learning rate per tensor, lr * RGN / max(RGN), where
RGN = ||g|| / ||theta||, averaged over `measure_steps` minibatches an epoch.
A drop-in for Adam; here the epoch's first 5 batches are measured:

    opt = AutoRGN(model.named_parameters(), lr=1e-3, steps_per_epoch=16)
    for epoch in range(15):
        for x, y in batches:
            F.cross_entropy(model(x), y).backward(); opt.step(); opt.zero_grad()

The authors' scheme (finetune.py's default): opt.new_epoch(), then
opt.measure() instead of step() on 5 extra batches at the epoch-start
weights. As there, norms stay frozen and Adam restarts every epoch.
Auto-SNR: eb_scores() is the authors' criterion, snr_scores() the SNR of
per-example gradients; snr_select() keeps tensors scoring >= a threshold.
"""
import re

import torch
from torch.func import functional_call, grad, vmap

# a norm's parameter by name: bn1, layer1.0.downsample.1, norm1, ln_1, gn
NORM_NAME = re.compile(r"(^|\.)((bn|ln|gn)[\d_]*|\w*norm\w*|downsample\.1)\.(weight|bias)$")


def norm_param_names(model):
    """The parameters of every normalisation module, by its type."""
    return {f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if "Norm" in type(m).__name__
            for pn, _ in m.named_parameters(recurse=False)}


def is_norm(name, p, norm_names=None):
    if norm_names is not None:
        return name in norm_names
    return p.dim() == 1 and NORM_NAME.search(name) is not None  # vectors


class AutoRGN(torch.optim.Adam):
    """Adam, a param group per tensor at lr * its multiplier (.multipliers)."""

    def __init__(self, named_params, lr=1e-3, weight_decay=0.0, steps_per_epoch=None, measure_steps=5,
                 include_norm=False, keep_state=False, norm_names=None, **adam_kw):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.frozen = [n for n, p in named if not include_norm and is_norm(n, p, norm_names)]
        tuned = [(n, p) for n, p in named if n not in set(self.frozen)]
        self._frozen_params = [p for n, p in named if n in set(self.frozen)]
        super().__init__([{"params": [p]} for _, p in tuned], lr=lr, weight_decay=weight_decay, **adam_kw)
        self.names = [n for n, _ in tuned]  # parallel to self.param_groups
        self.base_lr, self.steps_per_epoch, self.measure_steps = lr, steps_per_epoch, measure_steps
        self.keep_state = keep_state
        self.multipliers = dict.fromkeys(self.names, 1.0)  # until measured
        self.new_epoch()

    def new_epoch(self):
        """Measure afresh; forget Adam's moments unless keep_state."""
        self._steps, self._measured, self._rgn_sum = 0, 0, None
        if not self.keep_state:
            self.state.clear()

    @torch.no_grad()
    def measure(self):
        """Add the gradients to the epoch's mean RGN, set the rates; no step."""
        ps = [g["params"][0] for g in self.param_groups]
        zero = torch.zeros((), device=ps[0].device)  # a tensor without a gradient
        g_norm = torch.stack([p.grad.float().norm() if p.grad is not None else zero for p in ps])
        p_norm = torch.stack([p.float().norm() for p in ps])
        # a tensor at zero (a fresh bias) has no scale: RGN = inf -> rate 1,
        # kept out of the max so that it cannot shrink every other rate
        rgn = torch.where(p_norm > 0, g_norm / p_norm, torch.inf)  # (T,) one per tensor
        self._rgn_sum = rgn if self._rgn_sum is None else self._rgn_sum + rgn
        self._measured += 1
        mean = self._rgn_sum / self._measured  # mean RGN so far this epoch, (T,)
        top = mean.masked_fill(~mean.isfinite(), 0.0).max().clamp_min(1e-30)
        mult = (mean / top).clamp_max(1.0).tolist()
        for g, n, m in zip(self.param_groups, self.names, mult):
            g["lr"], self.multipliers[n] = self.base_lr * m, m

    def step(self, closure=None):
        loss = None
        if closure is not None:  # gradients before they are measured
            with torch.enable_grad():
                loss = closure()
        if self.steps_per_epoch and self._steps == self.steps_per_epoch:
            self.new_epoch()
        if self._measured < self.measure_steps:
            self.measure()
        self._steps += 1
        super().step()
        return loss

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        for p in self._frozen_params:  # frozen norms get gradients too
            p.grad = None


def block_multipliers(multipliers, blocks):
    """Mean multiplier per block of model.BLOCKS[arch]."""
    out = {}
    for b, prefixes in blocks.items():
        ms = [m for n, m in multipliers.items() if n.startswith(tuple(prefixes))]
        if ms:
            out[b] = sum(ms) / len(ms)
    return out


def snr_scores(model, loss_fn, x, y, names=None, chunk_size=None):
    """Our Auto-SNR score in [0, 1] per tensor (default: trainable ones) from
    N >= 2 examples: per entry mean(g)^2 / var(g) of per-example gradients
    (0 where var is 0), averaged, min-max normalised across tensors."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = [n for n, p in model.named_parameters() if p.requires_grad] if names is None else list(names)
    scored = {n: params[n] for n in names}
    fixed = {**{n: p for n, p in params.items() if n not in scored}, **dict(model.named_buffers())}

    def example_loss(scored, xi, yi):  # vmap strips the batch dim: (1, ...)
        out = functional_call(model, {**fixed, **scored}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
    g = per(scored, x, y)  # {name: (N, ...)}
    raw = {}
    for n, gn in g.items():
        mean, var = gn.mean(0), gn.var(0)
        snr = torch.where(var > 0, mean.square() / var, torch.zeros_like(var))
        raw[n] = snr.mean().item()
    lo, hi = min(raw.values()), max(raw.values())
    return {n: (s - lo) / (hi - lo) if hi > lo else 1.0 for n, s in raw.items()}


def eb_scores(loss_fn, batches, named):
    """The authors' Auto-SNR ("eb-criterion", their get_lr_weights): a tensor
    scores mean(g^2 / (var(g, dim 0) + 1e-8)) of its minibatch gradient g,
    averaged over the batches. A head's gradient sums to zero over the
    classes: its score is at most (C-1)/C, so a 10-class head never trains."""
    sums, k = dict.fromkeys((n for n, _ in named), 0.0), 0
    for k, (x, y) in enumerate(batches, 1):
        grads = torch.autograd.grad(loss_fn(x, y), [p for _, p in named])
        for (n, _), g in zip(named, grads):
            g = g.float()
            score = g.square() / (g.var(0, keepdim=True) + 1e-8)
            sums[n] += score.mean().nan_to_num().item()
    return {n: v / max(k, 1) for n, v in sums.items()}


def snr_select(scores, threshold):
    """The names scoring >= threshold: they train, the rest are frozen."""
    return [n for n, s in scores.items() if s >= threshold]
