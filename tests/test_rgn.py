import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
from rgn import AutoRGN, block_multipliers, is_norm, norm_param_names, snr_scores, snr_select


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors here are tiny: one thread avoids spinning against other jobs on shared cores
    (10x on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Tiny(nn.Module):
    """Two Linear layers with a norm between them, named like the ResNets' norms (bn1) and
    final norm (norm)."""

    def __init__(self, d_in=4, d_hid=8, d_out=3):
        super().__init__()
        self.fc1, self.bn1, self.fc2 = nn.Linear(d_in, d_hid), nn.LayerNorm(d_hid), nn.Linear(d_hid, d_out)
        self.norm = nn.GroupNorm(1, d_out)
        for p in (self.bn1.bias, self.norm.bias):  # off zero, where RGN is undefined (tested apart)
            nn.init.normal_(p, 0.0, 0.1)

    def forward(self, x):
        return self.norm(self.fc2(torch.tanh(self.bn1(self.fc1(x)))))


def batches(n, bs=8, d_in=4, seed=0):
    """A fixed, learnable toy problem: the class is the argmax of the first 3 input features."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, bs, d_in, generator=g)
    return [(x, x[:, :3].argmax(1)) for x in xs]


def rgn_now(net, names):
    """||g|| / ||theta|| of each named tensor from the gradients in place, by hand."""
    ps = dict(net.named_parameters())
    return torch.tensor([(ps[n].grad.norm() / ps[n].norm()).item() for n in names])


def test_measure_matches_hand_computation_and_max_is_one():
    torch.manual_seed(0)
    net = Tiny()
    opt = AutoRGN(net.named_parameters(), lr=1e-2)
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert opt.names == names and sorted(opt.frozen) == ["bn1.bias", "bn1.weight", "norm.bias", "norm.weight"]
    before = [p.clone() for p in net.parameters()]
    rgns = []
    for x, y in batches(5):  # measure() only: the authors' scheme, gradients at fixed weights
        F.cross_entropy(net(x), y).backward()
        rgns.append(rgn_now(net, names))
        opt.measure()
        opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    want = torch.stack(rgns).mean(0)
    want = want / want.max()
    got = torch.tensor([opt.multipliers[n] for n in names])
    assert torch.allclose(got, want, rtol=1e-5) and max(opt.multipliers.values()) == 1.0
    assert len(set(opt.multipliers.values())) == 4  # distinct rates, not a uniform 1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx((1e-2 * want).tolist(), rel=1e-5)


def test_step_measures_first_batches_then_holds_and_updates_like_adam():
    torch.manual_seed(0)
    net = Tiny()
    opt = AutoRGN(net.named_parameters(), lr=1e-2, steps_per_epoch=8, include_norm=True)
    names = opt.names
    assert len(names) == 8 and opt.frozen == []
    rgns = []
    for i, (x, y) in enumerate(batches(9)):
        F.cross_entropy(net(x), y).backward()
        if i in (0, 8):  # first step of epoch 1 and 2: the new measurement has one batch
            rgns = []
        rgns.append(rgn_now(net, names))
        if i == 0:  # the update of step 1 must be Adam's with group lr = lr * (this batch's RGN / max)
            twin = [p.detach().clone().requires_grad_() for p in net.parameters()]
            for t, p in zip(twin, net.parameters()):
                t.grad = p.grad.clone()
            m0 = rgn_now(net, names) / rgn_now(net, names).max()
            groups = [{"params": [t], "lr": 1e-2 * m} for t, m in zip(twin, m0.tolist())]
            ref = torch.optim.Adam(groups, lr=1e-2)
            ref.step()
        before = dict(opt.multipliers)
        opt.step()
        opt.zero_grad()
        want = torch.stack(rgns[:5]).mean(0)
        assert torch.allclose(torch.tensor([opt.multipliers[n] for n in names]), want / want.max(), rtol=1e-5)
        if 5 <= i < 8:  # measurement over: the rates hold for the rest of the epoch
            assert opt.multipliers == before
        if i == 0:
            assert all(torch.allclose(t, p) for t, p in zip(twin, net.parameters()))


@pytest.mark.parametrize("mode", ["steps_per_epoch", "new_epoch"])
def test_plain_loop_loss_goes_down(mode):
    torch.manual_seed(0)
    net, data = Tiny(), batches(8, bs=32)
    opt = AutoRGN(net.named_parameters(), lr=3e-2, weight_decay=1e-4,
                  steps_per_epoch=8 if mode == "steps_per_epoch" else None)
    mean_loss = lambda: sum(F.cross_entropy(net(x), y).item() for x, y in data) / len(data)
    first = mean_loss()
    for _ in range(6):
        if mode == "new_epoch":
            opt.new_epoch()
        for x, y in data:
            F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert mean_loss() < 0.7 * first


@pytest.mark.parametrize("keep_state", [False, True])
def test_adam_state_reset_each_epoch_unless_keep_state(keep_state):
    torch.manual_seed(0)
    net = Tiny()
    opt = AutoRGN(net.named_parameters(), lr=1e-2, steps_per_epoch=3, keep_state=keep_state)
    w = net.fc1.weight
    for i, (x, y) in enumerate(batches(4)):
        F.cross_entropy(net(x), y).backward()
        g = w.grad.clone()
        opt.step()
        opt.zero_grad()
    st = opt.state[w]  # after the first step of epoch 2
    assert st["step"].item() == (4 if keep_state else 1)
    fresh = torch.allclose(st["exp_avg"], 0.1 * g)  # (1 - beta1) * g: moments restarted from zero
    assert fresh != keep_state


def test_new_epoch_restarts_measurement_and_state():
    torch.manual_seed(0)
    net = Tiny()
    opt = AutoRGN(net.named_parameters(), lr=1e-2, measure_steps=2)
    data = batches(4)
    for x, y in data[:3]:
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    held = dict(opt.multipliers)
    opt.new_epoch()
    # rates stay until the next measurement replaces them
    assert len(opt.state) == 0 and opt.multipliers == held
    F.cross_entropy(net(data[3][0]), data[3][1]).backward()
    want = rgn_now(net, opt.names)
    opt.step()
    assert torch.allclose(torch.tensor(list(opt.multipliers.values())), want / want.max(), rtol=1e-5)


@pytest.mark.parametrize("include_norm", [False, True])
def test_norm_params_frozen_by_default_trained_with_include_norm(include_norm):
    torch.manual_seed(0)
    net = Tiny()
    norms = {n: p.clone() for n, p in net.named_parameters() if "norm" in n or "bn" in n}
    opt = AutoRGN(net.named_parameters(), lr=1e-2, include_norm=include_norm)
    for x, y in batches(3):
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    ps = dict(net.named_parameters())
    assert all(ps[n].grad is None for n in norms)  # zero_grad clears the frozen ones too
    for n, p0 in norms.items():
        assert torch.equal(ps[n], p0) != include_norm, n
        assert (n in opt.multipliers) == include_norm


def test_zero_norm_tensor_trains_at_base_lr_and_leaves_the_max_alone():
    torch.manual_seed(0)
    net = Tiny()
    nn.init.zeros_(net.fc2.bias)  # ||theta|| = 0: RGN has no scale
    opt = AutoRGN(net.named_parameters(), lr=1e-2)
    x, y = batches(1)[0]
    F.cross_entropy(net(x), y).backward()
    want = rgn_now(net, ["fc1.weight", "fc1.bias", "fc2.weight"])
    opt.step()
    assert opt.multipliers["fc2.bias"] == 1.0 and net.fc2.bias.abs().sum() > 0
    got = torch.tensor([opt.multipliers[n] for n in ["fc1.weight", "fc1.bias", "fc2.weight"]])
    assert torch.allclose(got, want / want.max(), rtol=1e-5)


def test_norm_rule_fits_resnet26_and_torchvision_names():
    net = M.build_model("resnet26")
    by_type = norm_param_names(net)
    by_name = {n for n, p in net.named_parameters() if is_norm(n, p)}
    assert by_type == by_name and "norm.weight" in by_type and "layer3.3.bn2.bias" in by_type
    vec, mat = torch.zeros(4), torch.zeros(4, 4, 1, 1)
    cases = [("bn1.weight", vec, True), ("layer1.0.bn3.bias", vec, True),
             ("layer4.2.conv3.weight", mat, False), ("layer1.0.downsample.1.weight", vec, True),
             ("layer1.0.downsample.0.weight", mat, False), ("fc.bias", vec, False),
             ("encoder.ln_1.weight", vec, True), ("fc.weight", mat, False)]
    for n, p, want in cases:
        assert is_norm(n, p) == want, n
    assert is_norm("fc.bias", vec, norm_names={"fc.bias"})  # an explicit set wins over the name rule


def test_block_multipliers_average_per_block():
    mult = {"conv1.weight": 0.2, "layer1.0.conv1.weight": 0.4, "layer2.0.conv1.weight": 0.5,
            "fc.weight": 1.0, "fc.bias": 0.5}
    got = block_multipliers(mult, M.BLOCKS["resnet26"])
    assert got == pytest.approx({"layer1": 0.3, "layer2": 0.5, "fc": 0.75})  # layer3 has none: left out


def test_snr_matches_per_example_loop_and_normalises():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    names = [n for n, _ in net.named_parameters()]
    per_ex = {n: [] for n in names}
    for xi, yi in zip(x, y):  # per-example gradients, one backward each
        grads = torch.autograd.grad(F.cross_entropy(net(xi[None]), yi[None]), list(net.parameters()))
        for n, g in zip(names, grads):
            per_ex[n].append(g)
    raw = {}
    for n, gs in per_ex.items():
        g = torch.stack(gs)  # (N, *shape)
        raw[n] = (g.mean(0) ** 2 / g.var(0, unbiased=True)).mean().item()
    lo, hi = min(raw.values()), max(raw.values())
    scores = snr_scores(net, F.cross_entropy, x, y, names)
    for n in names:
        assert scores[n] == pytest.approx((raw[n] - lo) / (hi - lo), abs=1e-5), n
    assert min(scores.values()) == 0.0 and max(scores.values()) == 1.0
    assert snr_scores(net, F.cross_entropy, x, y, names, chunk_size=2) == pytest.approx(scores, abs=1e-6)
    # normalised within the scored tensors
    sub = snr_scores(net, F.cross_entropy, x, y, ["0.weight", "2.bias"])
    assert sorted(sub.values()) == [0.0, 1.0]
    mid = sorted(scores.values())[1]
    assert snr_select(scores, mid) == [n for n in names if scores[n] >= mid]
    assert len(snr_select(scores, mid)) == 3
    assert snr_select(scores, 1.0) == [max(scores, key=scores.get)] and snr_select(scores, 0.0) == names


def test_snr_on_resnet26_uint8_images():
    torch.manual_seed(0)
    net = M.build_model("resnet26")
    x, y = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), torch.tensor([1, 5, 7])
    scores = snr_scores(net, F.cross_entropy, x, y, chunk_size=3)
    assert list(scores) == [n for n, _ in net.named_parameters()]
    assert min(scores.values()) == 0.0 and max(scores.values()) == 1.0


def test_eb_scores_match_hand_computation_and_a_head_cannot_pass():
    # The authors' criterion: per minibatch, mean over entries of g^2 / (var of g over dim 0 + 1e-8), averaged
    # over the minibatches. A softmax head's gradient sums to zero over the classes, so its score is at most
    # (C-1)/C.
    from rgn import eb_scores
    torch.manual_seed(0)
    net = Tiny(d_out=3)
    named = [(n, p) for n, p in net.named_parameters() if n.startswith(("fc1.", "fc2."))]
    bs = batches(5)
    got = eb_scores(lambda x, y: F.cross_entropy(net(x), y), bs, named)
    want = dict.fromkeys(got, 0.0)
    for x, y in bs:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for n, p in named:
            g = p.grad
            want[n] += ((g * g) / (torch.var(g, dim=0, keepdim=True) + 1e-8)).mean().item() / 5
    assert got == pytest.approx(want, rel=1e-5)
    head = nn.Linear(6, 10)
    x, y = torch.randn(16, 6), torch.randint(0, 10, (16,))
    s = eb_scores(lambda x, y: F.cross_entropy(head(x), y), [(x, y)], list(head.named_parameters()))
    assert max(s.values()) <= 0.9 + 1e-6 and min(s.values()) > 0.8  # 0.9 exactly, up to the 1e-8
