"""
The paper's two automatic ways of choosing what to fine-tune (Lee et al. 2023, section 5; PROTOCOL section 6).

Auto-RGN: Adam with one learning rate per parameter tensor, lr * RGN / max(RGN), where the relative gradient
norm RGN = ||g|| / ||theta|| (Frobenius) is averaged over `measure_steps` minibatches each epoch. A drop-in
for Adam:

    opt = AutoRGN(model.named_parameters(), lr=1e-3, weight_decay=1e-4, steps_per_epoch=16)
    for epoch in range(15):
        for x, y in batches:
            F.cross_entropy(model(x), y).backward(); opt.step(); opt.zero_grad()

With steps_per_epoch the epoch's first 5 training batches are measured and trained on (step k <= 5 uses the
mean of batches 1..k). The authors' scheme (anniesch/surgical-finetuning, main.py), finetune.py's default:
call opt.new_epoch(), then opt.measure() instead of step() on 5 extra batches at the epoch-start weights. As
in their code, norm layers stay frozen (opt.frozen; include_norm=True trains them) and Adam's moments restart
every epoch (keep_state=True keeps them).

Auto-SNR keeps the tensors scoring >= a threshold (snr_select): eb_scores() is the authors' criterion
(finetune.py's default, re-selected every epoch); snr_scores() the signal-to-noise ratio of per-example
gradients (torch.func).
"""
import re

import torch
from torch.func import functional_call, grad, vmap

# bn1, layer1.0.bn3, layer1.0.downsample.1 (torchvision), norm, norm1, layernorm, ln_1, gn: weight or bias of
# a norm
NORM_NAME = re.compile(r"(^|\.)((bn|ln|gn)[\d_]*|\w*norm\w*|downsample\.1)\.(weight|bias)$")


def norm_param_names(model):
    """Names of the parameters of every normalisation module (BatchNorm, GroupNorm, LayerNorm, ...), by
    type."""
    return {f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if "Norm" in type(m).__name__
            for pn, _ in m.named_parameters(recurse=False)}


def is_norm(name, p, norm_names=None):
    if norm_names is not None:
        return name in norm_names
    # norm affine parameters are per-channel vectors
    return p.dim() == 1 and NORM_NAME.search(name) is not None


class AutoRGN(torch.optim.Adam):
    """Adam, one param group per tensor, group lr = lr * multiplier. opt.multipliers: name -> latest
    multiplier."""

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
        # replaced by the first measurement, before any update
        self.multipliers = dict.fromkeys(self.names, 1.0)
        self.new_epoch()

    def new_epoch(self):
        """Start an epoch: measure afresh on its first batches; forget Adam's moments unless keep_state."""
        self._steps, self._measured, self._rgn_sum = 0, 0, None
        if not self.keep_state:
            self.state.clear()

    @torch.no_grad()
    def measure(self):
        """Add the current gradients to this epoch's mean RGN and set the rates from it; moves no
        parameter."""
        ps = [g["params"][0] for g in self.param_groups]
        zero = torch.zeros((), device=ps[0].device)  # a tensor without a gradient
        g_norm = torch.stack([p.grad.float().norm() if p.grad is not None else zero for p in ps])
        p_norm = torch.stack([p.float().norm() for p in ps])
        # a tensor at zero (a zero-initialised bias) has no scale to be relative to: RGN = inf -> multiplier
        # 1, and it stays out of the max so it cannot shrink every other rate to nothing
        rgn = torch.where(p_norm > 0, g_norm / p_norm, torch.inf)  # (T,) one per tensor
        self._rgn_sum = rgn if self._rgn_sum is None else self._rgn_sum + rgn
        self._measured += 1
        mean = self._rgn_sum / self._measured  # mean RGN so far this epoch, (T,)
        top = mean.masked_fill(~mean.isfinite(), 0.0).max().clamp_min(1e-30)
        for g, n, m in zip(self.param_groups, self.names, (mean / top).clamp_max(1.0).tolist()):
            g["lr"], self.multipliers[n] = self.base_lr * m, m

    def step(self, closure=None):
        loss = None
        if closure is not None:  # the gradients must exist before they are measured
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
        # frozen norms still get gradients from backward; do not let them pile up
        for p in self._frozen_params:
            p.grad = None


def block_multipliers(multipliers, blocks):
    """Mean multiplier per block of a prefix table (model.BLOCKS[arch]), over the block's tensors, for one log
    line."""
    out = {}
    for b, prefixes in blocks.items():
        ms = [m for n, m in multipliers.items() if n.startswith(tuple(prefixes))]
        if ms:
            out[b] = sum(ms) / len(ms)
    return out


def snr_scores(model, loss_fn, x, y, names=None, chunk_size=None):
    """Auto-SNR score in [0, 1] per tensor in names (default: every trainable one), from one batch x, y of N
    >= 2 examples. Per entry SNR = mean_n(g)^2 / var_n(g) (unbiased var over the N per-example gradients;
    entries with zero variance count 0), averaged over the tensor's entries, then min-max normalised across
    the tensors. loss_fn(logits, targets) -> scalar sees one example at a time. Put BatchNorm nets in eval()
    first."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = [n for n, p in model.named_parameters() if p.requires_grad] if names is None else list(names)
    scored = {n: params[n] for n in names}
    fixed = {**{n: p for n, p in params.items() if n not in scored}, **dict(model.named_buffers())}

    def example_loss(scored, xi, yi):  # vmap strips the batch dim; the model wants it back: (1, ...)
        return loss_fn(functional_call(model, {**fixed, **scored}, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    # name -> (N, *shape)
    g = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(scored, x, y)
    raw = {}
    for n, gn in g.items():
        mean, var = gn.mean(0), gn.var(0)
        raw[n] = torch.where(var > 0, mean.square() / var, torch.zeros_like(var)).mean().item()
    lo, hi = min(raw.values()), max(raw.values())
    return {n: (s - lo) / (hi - lo) if hi > lo else 1.0 for n, s in raw.items()}


def eb_scores(loss_fn, batches, named):
    """The authors' Auto-SNR criterion (their "eb-criterion", main.py get_lr_weights): for each minibatch (x,
    y) the minibatch gradient g of every tensor in named [(name, param)] is scored by mean(g^2 / (var(g, dim
    0) + 1e-8)), the variance over the tensor's first dimension (output channels / classes; unbiased), and the
    scores are averaged over the minibatches. A classifier head's gradient sums to zero over the classes, so
    its score is at most (C-1)/C: with the 0.95 threshold a 10-class head never trains. loss_fn(x, y) ->
    scalar. Returns {name: score}."""
    sums, k = dict.fromkeys((n for n, _ in named), 0.0), 0
    for k, (x, y) in enumerate(batches, 1):
        grads = torch.autograd.grad(loss_fn(x, y), [p for _, p in named])
        for (n, _), g in zip(named, grads):
            g = g.float()
            sums[n] += (g.square() / (g.var(0, keepdim=True) + 1e-8)).mean().nan_to_num().item()
    return {n: v / max(k, 1) for n, v in sums.items()}


def snr_select(scores, threshold):
    """Names whose normalised SNR is >= threshold: these train at the base lr, the rest are frozen."""
    return [n for n, s in scores.items() if s >= threshold]
