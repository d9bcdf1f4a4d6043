"""finetune.py --objective entropy on tiny synthetic data (CPU): no target label is read before the stream has
been predicted, only the tuned block moves, each batch is scored before its own update, the entropy itself,
and one end-to-end run through main()."""
import copy
import json

import pytest
import torch

import corruptions
import finetune as FT
import model as M
import finetune as P
import rgn
import train as T
import unsupervised as U
from tinydata import make_images, result_file, write_cifar, tune_names


pytestmark = pytest.mark.usefixtures("small_net")  # conftest.py: the narrow ResNet-26 everywhere here
QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def source():
    """A briefly trained net (10 steps), so that its predictions vary over the stream and entropy steps
    change them."""
    torch.manual_seed(0)
    net = M.build_model()
    x, y = (torch.from_numpy(a) for a in make_images(32, seed=1))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(10):
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    return net.eval()


def ent_args(*extra):
    # lr 0.05: large enough that one step on 16 images changes this net's predictions,
    # so the order tests can fail
    return P.parse_args(["--objective", "entropy", "--ent_batch_size", "16", "--ent_lr", "5e-2",
                         "--device", "cpu", *extra])


def stream_images(n=48):
    return torch.from_numpy(make_images(n, seed=5)[0])


class Trap(torch.Tensor):
    """Labels whose every use (indexing, comparison, len, .to, ...) raises while armed."""
    armed = True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if cls.armed:
            raise AssertionError(f"a target label was read: {getattr(func, '__name__', func)}")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_no_label_is_read_before_the_stream_is_predicted(source, monkeypatch, tmp_path):
    x, y = (torch.from_numpy(a) for a in make_images(48, seed=5))
    Trap.armed = True
    with pytest.raises(AssertionError, match="label was read"):  # the trap works
        _ = y.as_subclass(Trap)[0]

    class Never(torch.Tensor):  # train and val labels are not needed at all: never readable
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            raise AssertionError("a train/val label was read")
    target = {"train": (x[:16], y[:16].as_subclass(Never)), "val": (x[:8], y[:8].as_subclass(Never)),
              "test": (x, y.as_subclass(Trap))}
    adapt, calls = U.adapt_stream, []

    def adapt_then_disarm(*a, **kw):  # labels become readable only once every prediction exists
        calls.append(a[2].shape)
        out = adapt(*a, **kw)
        Trap.armed = False
        return out
    monkeypatch.setattr(U, "adapt_stream", adapt_then_disarm)
    try:
        res = FT.run(ent_args("--tune", "all", "--out_dir", str(tmp_path)), source, target,
                     (x[:8], y[:8]), "gaussian_noise", 12.5, **QUIET)
    finally:
        Trap.armed = True
    assert calls == [x.shape] and 0 <= res["test_acc"] <= 100
    streamed = sum(b["acc"] * b["n"] for b in res["history"][0]["stream"]) / 48
    assert res["test_acc"] == pytest.approx(streamed, abs=1e-3)


@pytest.mark.parametrize("spec, cache", [("layer1", False), ("layer2", True), ("fc", True),
                                         ("auto_rgn", False), ("layer3", False)])
def test_only_the_tuned_block_changes(source, spec, cache):
    names = tune_names(source, spec)
    k = M.first_stage(names) if cache else 0
    net = copy.deepcopy(source)
    x = M.prefix(source, stream_images(), k)
    U.adapt_stream(net, names, x, ent_args("--tune", spec), start=k, **QUIET)
    src = dict(source.named_parameters())
    norms = rgn.norm_param_names(source)
    for n, p in net.named_parameters():
        # auto_rgn keeps the norms at the source
        moves = n in names and not (spec == "auto_rgn" and n in norms)
        why = "tuned but unchanged" if moves else "frozen but changed"
        assert torch.equal(p, src[n]) != moves, f"{n}: {why}"


def test_each_batch_is_scored_before_its_own_update(source):
    # Continual: batch i's predictions and their entropy must be those of the model adapted on batches 0..i-1
    # only (batch 0: the source's), bit for bit. Predicting after the update (peeking) changes them at this
    # lr, as adapting on a batch, then predicting it, shows.
    names, x, args = tune_names(source, "layer2"), stream_images(), ent_args("--tune", "layer2")
    preds, stream = U.adapt_stream(copy.deepcopy(source), names, x, args, **QUIET)
    assert [b["n"] for b in stream] == [16, 16, 16] and preds.shape == (48,)
    for i in range(3):
        net = copy.deepcopy(source)
        if i:
            U.adapt_stream(net, names, x[:16 * i], args, **QUIET)
        pred, ent = U.predict(net, x[16 * i:16 * (i + 1)])
        assert torch.equal(preds[16 * i:16 * (i + 1)], pred) and stream[i]["entropy"] == ent, f"batch {i}"
    peeker = copy.deepcopy(source)  # adapted on batch 0, then predicting it: not what was scored
    U.adapt_stream(peeker, names, x[:16], args, **QUIET)
    peek, peeked = U.predict(peeker, x[:16])
    assert not torch.equal(peek, preds[:16]) and peeked < stream[0]["entropy"] - 0.01


def test_entropy_of_a_sure_and_an_unsure_prediction():
    assert U.entropy(torch.tensor([[30.0, 0.0, 0.0]])) == pytest.approx(0.0, abs=1e-6)
    assert U.entropy(torch.zeros(5, 10)) == pytest.approx(torch.log(torch.tensor(10.0)).item())


def test_end_to_end_through_main(tmp_path, monkeypatch):
    noise = lambda x, s, g: x + 0.1 * s * torch.randn(x.shape, generator=g, device=x.device)  # noqa: E731
    monkeypatch.setitem(corruptions.CORRUPTIONS, "gaussian_noise", noise)
    write_cifar(tmp_path, train_sizes=(80, 80), test_size=60)
    ckpt, cache = str(tmp_path / "src.pt"), str(tmp_path / "cache")
    T.main(["--data_dir", str(tmp_path), "--cache_dir", cache, "--holdout", "60", "--epochs", "1",
            "--limit", "40", "--batch_size", "20", "--device", "cpu", "--out", ckpt])
    argv = ["--ckpt", ckpt, "--data_dir", str(tmp_path), "--cache_dir", cache, "--device", "cpu",
            "--train_n", "50", "--val_per_class", "2", "--test_per_class", "5",
            "--corruption", "gaussian_noise", "--objective", "entropy", "--ent_batch_size", "16",
            "--out_dir", str(tmp_path / "res")]
    res, = FT.main(argv + ["--tune", "layer1"])
    path = result_file(tmp_path / "res", "cifar_c-gaussian_noise-layer1-s0-entropy.json")
    saved = json.loads(open(path).read())
    assert saved["objective"] == "entropy" and saved["val_acc"] is None
    assert saved["test_acc"] == res["test_acc"]
    assert [b["n"] for b in saved["history"][0]["stream"]] == [16, 16, 16, 2] and saved["prefix_stage"] == 0
    # lr 0 = no adaptation, another order
    none, = FT.main(argv + ["--tune", "fc", "--seed", "1", "--ent_lr", "0"])
    assert none["test_acc"] == pytest.approx(FT.main(argv + ["--tune", "none"])[0]["test_acc"])
    with pytest.raises(SystemExit, match="auto_snr or l1"):
        FT.main(argv + ["--tune", "l1"])


def test_table_keeps_entropy_results_apart(tmp_path):
    import table

    def put(corruption, tune, seed, acc, objective=None):
        r = {"data": "cifar_c", "corruption": corruption, "tune": tune, "seed": seed, "test_acc": acc,
             "val_acc": 0.0, "args": {}, **({"objective": objective} if objective else {})}
        (tmp_path / f"{corruption}-{tune}-{seed}-{objective}.json").write_text(json.dumps(r))
    for s in (0, 1):
        put("gaussian_noise", "none", s, 40.0)
        # same (data, corruption, tune, seed) as the one above
        put("gaussian_noise", "none", s, 50.0, "entropy")
        put("snow", "none", s, 60.0, "entropy")
        put("gaussian_noise", "layer1", s, 70.0 + 2 * s, "entropy")
    put("snow", "layer1", 0, 90.0, "entropy")  # seed 1 missing: the mean cell is flagged
    res, notes = table.load(str(tmp_path))
    assert notes == [] and len(res) == 9
    md = table.render(res, notes, str(tmp_path))
    assert "| No Adaptation | 40.0 (0.0) |" in md  # the supervised table sees only the supervised results
    lines = md.split("(--objective entropy)")[1].splitlines()
    assert "| Tune | paired | all run | gaussian_noise |" in lines
    assert "of the 2 present (gaussian_noise, snow)" in md
    # paired: gaussian_noise only (snow lacks layer1 seed 1);
    # all run: per seed (70 + 90) / 2 and 72 for layer1
    assert "| none | 50.0 (0.0) | 55.0 (0.0) | 50.0 (0.0) |" in lines
    assert "| layer1 | 71.0 (1.4) | 76.0 (5.7)* | 71.0 (1.4) |" in lines  # mean 76, std 4 * 2**.5
