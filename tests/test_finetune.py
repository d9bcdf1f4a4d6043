"""finetune.py on tiny synthetic data (CPU, no network, no dataset): which parameters move, the
prefix cache's equivalence, the selection rule, bad input, and end-to-end runs of every --tune family."""
import copy
import glob
import itertools
import json
import os

import pytest
import torch
import torch.nn.functional as F

import corruptions
import data
import finetune as FT
import model as M
import finetune as P
import rgn
from tinydata import make_images, result_file, untagged, tune_names, one_lr


pytestmark = pytest.mark.usefixtures("small_net")  # conftest.py: the narrow ResNet-26 everywhere here
QUIET = dict(log=lambda s: None)
KEYS = {"objective", "data", "corruption", "severity", "tune", "seed", "args", "trained", "prefix_stage",
        "history", "selected", "test_acc", "val_acc", "source_acc", "source_acc_before", "snr", "seconds",
        "torch", "device", "metric", "test_avg_acc", "variant", "changed", "code"}


def tiny_args(*extra):
    return P.parse_args(["--epochs", "1", "--batch_size", "16", "--device", "cpu", *extra])


def tiny_splits(n_train=32, n_val=16, n_test=16):
    x, y = (torch.from_numpy(a) for a in make_images(n_train + n_val + n_test, seed=3))
    y = 9 - y  # a shift the source has not seen, so the loss has somewhere to go
    a, b = n_train, n_train + n_val
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return M.build_model().eval()


def tune(source, names, args, lr=1e-2, cache=True, l1_lambda=0.0):
    """One finetune() call as run() makes it; returns (tuned model, history entry, best state)."""
    k = M.first_stage(names) if cache else 0
    splits = {s: (M.prefix(source, x, k), y) for s, (x, y) in tiny_splits().items()}
    net = copy.deepcopy(source)
    h, best = one_lr(net, names, splits, lr, args, start=k, l1_lambda=l1_lambda)
    return net, h, best


@pytest.mark.parametrize("spec, cache", [("layer2", True), ("layer2", False), ("fc", True), ("layer1", True),
                                         ("layer2.0.,fc.", True)])
def test_only_the_tuned_parameters_move(source, spec, cache):
    names = tune_names(source, spec)
    net, h, best = tune(source, names, tiny_args("--tune", spec), cache=cache)
    assert len(h["epochs"]) == 2 and h["epochs"][1]["train_loss"] is not None
    src = dict(source.named_parameters())
    for n, p in net.named_parameters():
        if n in names:  # Adam moves every tensor that gets a gradient
            assert not torch.equal(p, src[n]), f"{n} is tuned but did not change"
        else:
            assert torch.equal(p, src[n]), f"{n} is frozen but changed"
    assert set(best) == set(names)
    # the prefix list: the first unit of layer2 and the head, not the rest of layer2
    if spec == "layer2.0.,fc.":
        prefixes = {n.split(".")[0] + "." + n.split(".")[1] for n in names}
        assert prefixes == {"layer2.0", "fc.weight", "fc.bias"}


def test_prefix_list_and_blocks_resolve():
    net = M.build_model()
    assert tune_names(net, "layer1,fc") == M.resolve_tune(net, "layer1") + M.resolve_tune(net, "fc")
    assert M.first_stage(tune_names(net, "layer2.0.,fc.")) == 2 and tune_names(net, "none") == []
    assert len(tune_names(net, "auto_rgn")) == len(list(net.parameters()))


@pytest.mark.parametrize("spec", ["layer2", "fc"])
def test_prefix_cache_matches_plain_path(source, spec):
    # Tolerance: train/val/test losses within 1e-5 relative (only the frozen prefix's batching differs, in
    # float32 rounding); accuracies identical.
    args = tiny_args("--tune", spec, "--epochs", "2")
    names = tune_names(source, spec)
    assert M.first_stage(names) > 0
    net_c, hc, _ = tune(source, names, args, cache=True)
    net_p, hp, _ = tune(source, names, args, cache=False)
    for ec, ep in zip(hc["epochs"], hp["epochs"], strict=True):
        assert ec["val_acc"] == ep["val_acc"] and ec["test_acc"] == ep["test_acc"]
        for key in ("train_loss", "val_loss", "test_loss"):
            if ec[key] is not None:
                assert ec[key] == pytest.approx(ep[key], rel=1e-5), key
    for (n, a), b in zip(net_c.named_parameters(), net_p.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), n
    _, again, _ = tune(source, names, args, cache=True)  # and the same seed gives the same run, bit for bit
    assert [e["train_loss"] for e in again["epochs"]] == [e["train_loss"] for e in hc["epochs"]]


def test_kept_state_is_the_selected_epoch(source, monkeypatch):
    # Scripted val accuracies (epochs 0..4): the best, 50, comes first at epoch 2, then ties and drops. The
    # state finetune() keeps must be the model after epoch 2 exactly, not the last or a later tie.
    vals, measure = iter([90, 30, 50, 50, 40]), M.evaluate

    def scripted(model, split, start=0):
        m = measure(model, split, start)
        return {**m, "acc": next(vals)} if split[0] is scripted.val else m
    names = tune_names(source, "fc")
    k = M.first_stage(names)
    splits = {s: (M.prefix(source, x, k), y) for s, (x, y) in tiny_splits().items()}
    scripted.val = splits["val"][0]
    monkeypatch.setattr(M, "evaluate", scripted)
    h, best = one_lr(copy.deepcopy(source), names, splits, 1e-1, tiny_args("--epochs", "4"), start=k)
    assert [e["val_acc"] for e in h["epochs"]] == [90, 30, 50, 50, 40] and FT.select([h])["epoch"] == 2
    monkeypatch.undo()
    net = copy.deepcopy(source)
    one_lr(net, names, splits, 1e-1, tiny_args("--epochs", "2"), start=k)
    assert all(torch.equal(best[n], p) for n, p in net.named_parameters() if n in names)
    assert not torch.equal(best["fc.weight"], source.fc.weight)


def test_run_reports_the_selected_model(source, tmp_path, monkeypatch):
    # Two lrs with scripted val accuracies: lr 0.1 at epoch 1 wins (60). The clean accuracy must be measured
    # on that model, and the JSON must say so.
    vals, measure, clean_fc = iter([10, 60, 40, 10, 50, 55]), M.evaluate, []

    def scripted(model, split, start=0):
        if len(split[0]) == 20:  # the clean split: remember which head it saw
            clean_fc.append(model.fc.weight.detach().clone())
        m = measure(model, split, start)
        return {**m, "acc": next(vals)} if len(split[0]) == 12 else m
    monkeypatch.setattr(M, "evaluate", scripted)
    target, clean = tiny_splits(n_val=12), tiny_splits(n_train=0, n_val=0, n_test=20)["test"]
    args = tiny_args("--tune", "fc", "--lrs", "1e-1,1e-2", "--epochs", "2", "--out_dir", str(tmp_path))
    res = FT.run(args, source, target, clean, "clean", 0.0, **QUIET)
    assert (res["selected"]["lr"], res["selected"]["epoch"], res["val_acc"]) == (0.1, 1, 60)
    saved = json.loads(open(result_file(tmp_path, "cifar_c-clean-fc-s0.json")).read())
    assert saved["selected"] == res["selected"]
    monkeypatch.undo()
    net = copy.deepcopy(source)
    one_lr(net, tune_names(source, "fc"), target, 0.1, tiny_args("--epochs", "1"))
    assert len(clean_fc) == 1 and torch.allclose(clean_fc[0], net.fc.weight, rtol=1e-5, atol=1e-7)


def test_l1_penalty_keeps_weights_near_the_source(source):
    names = tune_names(source, "fc")
    args = tiny_args("--tune", "l1", "--epochs", "5")
    dist = {}
    for lam in (0.0, 1.0):
        net, h, _ = tune(source, names, args, lr=1e-2, l1_lambda=lam)
        pairs = zip(net.fc.parameters(), source.fc.parameters())
        dist[lam] = sum((p - q).abs().sum().item() for p, q in pairs)
    assert dist[1.0] < 0.5 * dist[0.0]


def _h(lr, vals, lam=None):
    return {"lr": lr, "lambda": lam, "epochs": [{"epoch": e, "val_acc": v, "test_acc": 100 * lr + e}
                                                for e, v in enumerate(vals)]}


def test_select_rule():
    hist = [_h(1e-3, [95, 40, 70, 70]), _h(1e-4, [95, 70, 60]), _h(1e-5, [95, 65, 69])]
    sel = FT.select(hist)  # 70 three times: the first seen is lr 1e-3, epoch 2; epoch 0 (95) never counts
    assert (sel["run"], sel["lr"], sel["epoch"], sel["val_acc"], sel["test_acc"]) == (0, 1e-3, 2, 70, 0.1 + 2)
    hist[1]["epochs"][2]["val_acc"] = 71  # a strictly better later lr wins
    assert (FT.select(hist)["lr"], FT.select(hist)["epoch"]) == (1e-4, 2)
    assert FT.select([_h(1e-3, [50])], min_epoch=0)["epoch"] == 0  # tune none: the source model
    assert FT.select([_h(1e-3, [10, 20], lam=1e-4), _h(1e-3, [10, 30], lam=1e-3)])["lambda"] == 1e-3


# -----------------------------------------------------------------------------
# end to end through main() on a tiny CIFAR folder

def ft_argv(tiny, out, *extra, ckpt=None):
    root, src = tiny
    return ["--ckpt", ckpt or src, "--data_dir", str(root), "--cache_dir", str(root / "cache"),
            "--device", "cpu", "--train_n", "50", "--val_per_class", "2", "--test_per_class", "3",
            "--epochs", "1", "--batch_size", "25", "--out_dir", str(out), *extra]


@pytest.fixture
def fake_corruptions(monkeypatch):
    noise = lambda x, s, g: x + 0.1 * s * torch.randn(x.shape, generator=g, device=x.device)  # noqa: E731
    monkeypatch.setitem(corruptions.CORRUPTIONS, "gaussian_noise", noise)
    monkeypatch.setitem(corruptions.CORRUPTIONS, "shot_noise", noise)


def test_end_to_end_flip_fc(tiny, tmp_path):
    res, = FT.main(ft_argv(tiny, tmp_path, "--data", "cifar_flip", "--tune", "fc", "--lrs", "1e-2,1e-3",
                           "--epochs", "2"))
    path = result_file(tmp_path, "cifar_flip-clean-fc-s0.json")
    saved = json.loads(open(path).read())
    assert set(saved) == KEYS and os.listdir(tmp_path) == [os.path.basename(path)]  # no temp file left behind
    assert saved["trained"]["params"] == 16 * 10 + 10
    assert saved["prefix_stage"] == list(M.STAGES["resnet26"]).index("head")
    assert [h["lr"] for h in saved["history"]] == [1e-2, 1e-3]
    assert all([e["epoch"] for e in h["epochs"]] == [0, 1, 2] for h in saved["history"])
    sel = FT.select(saved["history"])
    assert saved["selected"] == {k: v for k, v in sel.items() if k != "run"}
    assert saved["test_acc"] == sel["test_acc"]
    assert saved["selected"]["epoch"] >= 1 and 0 <= saved["source_acc"] <= 100
    assert res["test_acc"] == saved["test_acc"] and saved["args"]["tune"] == "fc"


def test_end_to_end_corruptions_none(tiny, tmp_path, fake_corruptions, capsys):
    results = FT.main(ft_argv(tiny, tmp_path, "--data", "cifar_c",
                              "--corruption", "gaussian_noise,shot_noise", "--tune", "none"))
    assert untagged(tmp_path) == ["cifar_c-gaussian_noise-none-s0.json", "cifar_c-shot_noise-none-s0.json"]
    for r in results:
        assert r["selected"]["epoch"] == 0 and r["trained"]["params"] == 0
        assert r["test_acc"] == r["history"][0]["epochs"][0]["test_acc"]
        assert r["source_acc"] == r["source_acc_before"]
    assert "mean over 2 corruptions" in capsys.readouterr().out


def test_missing_checkpoint_names_the_train_command(tiny, tmp_path):
    """Source training takes minutes to hours: never started silently; the error line says what to run."""
    ckpt = str(tmp_path / "new" / "src.pt")
    with pytest.raises(SystemExit) as e:
        FT.main(ft_argv(tiny, tmp_path / "res", "--data", "cifar_flip", "--tune", "none", ckpt=ckpt))
    msg = str(e.value.code)
    assert msg.startswith("error: no checkpoint at") and f"python train.py --data cifar10 --out {ckpt}" in msg
    assert "\n" not in msg and not os.path.exists(ckpt) and not glob.glob(str(tmp_path / "res" / "*.json"))


@pytest.mark.parametrize("method", ["auto_rgn", "auto_snr", "auto_snr_pe", "l1"])
def test_automatic_methods_end_to_end(tiny, tmp_path, method):
    extra = {"auto_rgn": [], "auto_snr": ["--epochs", "2"],
             "auto_snr_pe": ["--snr", "per_example", "--snr_n", "8", "--snr_threshold", "0.3"],
             "l1": ["--l1_lambdas", "1e-4,1e-3"]}[method]
    tune = method.replace("_pe", "")
    res, = FT.main(ft_argv(tiny, tmp_path, "--data", "cifar_flip", "--tune", tune, "--lrs", "1e-3", *extra))
    # a variant never overwrites the default's file
    suffix = "-snr_per_example" if method == "auto_snr_pe" else ""
    assert untagged(tmp_path) == [f"cifar_flip-clean-{tune}-s0{suffix}.json"]
    n_all = len(list(M.build_model().parameters()))
    # every tensor but the norms trains; one multiplier line per epoch, the top one at 1
    if method == "auto_rgn":
        assert all("bn" not in n and not n.startswith("norm.") for n in res["trained"]["names"])
        (mults,), = [h["rgn"] for h in res["history"]]
        assert set(mults) == {"layer1", "layer2", "layer3", "fc"} and 0 < max(mults.values()) <= 1
    # the authors' criterion: candidates are the non-norm tensors, chosen every epoch;
    if method == "auto_snr":
        # a 10-class head's score is at most 0.9 < 0.95, so fc never trains
        assert all("bn" not in n and not n.startswith("norm.") for n in res["trained"]["names"])
        per_epoch, = [h["snr"] for h in res["history"]]
        assert len(per_epoch) == 2 and all(e["fc"] == 0 for e in per_epoch)
        assert res["snr"] == {"criterion": "eb", "threshold": 0.95} and res["variant"] is None
    if method == "auto_snr_pe":
        scores, chosen = res["snr"]["scores"], res["snr"]["selected"]
        assert len(scores) == n_all and 0 < len(chosen) < n_all and res["trained"]["names"] == chosen
        assert all((scores[n] >= 0.3) == (n in chosen) for n in scores)
        assert res["variant"] == "snr_per_example"
    if method == "l1":
        assert [h["lambda"] for h in res["history"]] == [1e-4, 1e-3]
        assert res["selected"]["lambda"] in (1e-4, 1e-3) and res["trained"]["tensors"] == n_all


@pytest.mark.parametrize("bad, says", [
    (["--tune", "layer9"], "--tune"), (["--tune", "layer2,bogus."], "bogus."),
    (["--tune", "fc,auto_rgn"], "auto_rgn"), (["--corruption", "gaussian_nois"], "unknown corruption"),
    (["--train_n", "1000"], "train_n"), (["--lrs", "1e-3,x"], "--lrs")])
def test_bad_input_fails_with_one_line(tiny, tmp_path, fake_corruptions, bad, says):
    with pytest.raises(SystemExit) as e:
        FT.main(ft_argv(tiny, tmp_path, "--corruption", "gaussian_noise", *bad))
    msg = str(e.value.code)
    assert msg.startswith("error:") and says in msg and "\n" not in msg
    assert not glob.glob(str(tmp_path / "*"))


def test_unreadable_checkpoint_fails_with_one_line(tiny, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        FT.main(ft_argv(tiny, tmp_path / "res", "--data", "cifar_flip", "--tune", "fc", ckpt=str(bad)))
    assert "not a readable checkpoint" in str(e.value.code) and "\n" not in str(e.value.code)
    assert not os.path.exists(tmp_path / "res")


def test_test_split_scored_only_where_selection_can_land(source, tmp_path, monkeypatch):
    # The same run with the test split scored every epoch and only at new val records: the same selection, the
    # same test accuracy, the same val curve; far fewer test passes.
    target = tiny_splits(n_val=12)
    calls, measure = [], M.evaluate

    def counting(model, split, start=0):
        calls.append(len(split[0]))
        return measure(model, split, start)
    monkeypatch.setattr(M, "evaluate", counting)
    out = {}
    for every in (True, False):
        calls.clear()
        args = tiny_args("--tune", "layer2", "--lrs", "1e-1,1e-2,1e-3", "--epochs", "4",
                         "--out_dir", str(tmp_path), *(["--test_every_epoch"] if every else []))
        out[every] = FT.run(args, source, target, None, "clean", 0.0, **QUIET), calls.count(16)
    (full, n_full), (lean, n_lean) = out[True], out[False]
    assert lean["selected"] == full["selected"] and lean["test_acc"] == full["test_acc"]
    lean_epochs = [e for h in lean["history"] for e in h["epochs"]]
    full_epochs = [f for h in full["history"] for f in h["epochs"]]
    assert [e["val_acc"] for e in lean_epochs] == [f["val_acc"] for f in full_epochs]
    assert n_full == 1 + 3 * 4 and n_lean < n_full  # epoch 0 once, then every epoch of every lr
    scored = [e for h in lean["history"] for e in h["epochs"][1:] if e["test_acc"] is not None]
    assert all(e["test_acc"] == f["test_acc"] for e, f in zip(lean_epochs, full_epochs)
               if e["test_acc"] is not None)
    assert 1 + len(scored) == n_lean


def test_auto_rgn_measures_at_the_epoch_start_weights(source):
    # the authors' scheme: the epoch's rates are the RGN of 5 probe batches (their own
    # shuffle, seed + 1) at the weights the epoch starts from, computed here by hand, before any step.
    args = tiny_args("--tune", "auto_rgn", "--epochs", "1", "--batch_size", "4")
    splits = tiny_splits()
    names = [n for n in tune_names(source, "auto_rgn") if n not in rgn.norm_param_names(source)]
    net = copy.deepcopy(source)
    ps = dict(net.named_parameters())
    gm, sums = torch.Generator().manual_seed(args.seed + 1), torch.zeros(len(names))
    for x, y in itertools.islice(data.batches(*splits["train"], 4, shuffle=True, generator=gm), 5):
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), [ps[n] for n in names])
        sums += torch.tensor([(g.norm() / ps[n].norm()).item() for n, g in zip(names, grads)])
    want = dict(zip(names, (sums / sums.max()).tolist()))
    h, _ = one_lr(copy.deepcopy(source), tune_names(source, "auto_rgn"), splits, 1e-3, args)
    got = h["rgn"][0]
    for b, prefixes in M.BLOCKS["resnet26"].items():
        ms = [m for n, m in want.items() if n.startswith(prefixes)]
        assert got[b] == pytest.approx(sum(ms) / len(ms), rel=1e-4), b
