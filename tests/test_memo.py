"""MEMO (memo.py): the AugMix ops against PIL, the copies' properties, and the per-image episodic step: only
the tuned block takes it, every image starts from the source, and the predictions are the hand-computed
ones."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import finetune as P
import unsupervised as memo
from tinydata import make_images, narrow_resnet26, tune_names


@pytest.fixture(scope="module")
def images():
    x = torch.from_numpy(make_images(24, seed=5)[0])
    x[:6] = x[:6] // 3 + 50  # narrow histograms, where autocontrast and equalize do most
    x[6] = 77  # a flat image: both leave it alone
    return x


def pil(x, f):
    return torch.from_numpy(np.array(f(Image.fromarray(x.permute(1, 2, 0).numpy())))).permute(2, 0, 1)


@pytest.mark.parametrize("op, ref", [(memo.autocontrast, ImageOps.autocontrast),
                                     (memo.equalize, ImageOps.equalize),
                                     (memo.posterize, lambda im: ImageOps.posterize(im, 4))])
def test_point_ops_equal_pil(images, op, ref):
    out = op(images, torch.Generator())
    assert out.dtype == torch.uint8
    for i in range(len(images)):
        assert torch.equal(out[i], pil(images[i], ref)), i


def test_geometric_ops_match_pil_inside_the_border(images):
    # PIL's transform(AFFINE, BILINEAR, fillcolor=128) for a 1-pixel shift, a shear and a 2-degree turn: equal
    # to within rounding away from the 2-pixel border (PIL blends edge pixels differently)
    smooth = torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1).to(torch.uint8)
    a = np.deg2rad(2.0)
    cases = [((1, 0, 1, 0, 1, 0), [[1, 0, 2 / 32], [0, 1, 0]]),
             ((1, 0.03, 0, 0, 1, 0), [[1, 0.03, 0.03], [0, 1, 0]]),
             ((1, 0, 0, 0.03, 1, 0), [[1, 0, 0], [0.03, 1, 0.03]])]
    for coeffs, theta in cases:
        out = memo._affine(smooth, torch.tensor(theta).expand(len(smooth), 2, 3))
        for i in range(0, len(smooth), 5):
            ref = pil(smooth[i], lambda im: im.transform((32, 32), Image.AFFINE, coeffs,
                                                         resample=Image.BILINEAR, fillcolor=128)).int()
            assert (out[i].int() - ref)[:, 2:-2, 2:-2].abs().max() <= 1
            if coeffs[2] == 1:  # the column shifted in is MEMO's fill, (128, 0, 0) on an RGB image
                assert out[i, :, :, -1].tolist() == ref[:, :, -1].tolist()
    theta = torch.tensor([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0]], dtype=torch.float32)
    out = memo._affine(smooth, theta.expand(len(smooth), 2, 3))
    ref = pil(smooth[0], lambda im: im.rotate(2.0, resample=Image.BILINEAR, fillcolor=128)).int()
    assert (out[0].int() - ref)[:, 2:-2, 2:-2].abs().max() <= 1


def test_augmix_copies_are_seeded_varied_and_in_range(images):
    x = images[:4].repeat_interleave(8, 0)
    a = memo.augmix(x, torch.Generator().manual_seed(0))
    b = memo.augmix(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6  # the model's normalised input range
    assert len({tuple(c.flatten()[:64].tolist()) for c in a[:8]}) == 8  # copies of one image all differ


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return narrow_resnet26().eval()


def memo_args(*extra):
    return P.parse_args(["--objective", "memo", "--memo_copies", "4", "--device", "cpu", *extra])


@pytest.mark.parametrize("spec", ["layer1", "fc", "layer1+layer2", "none"])
def test_each_image_is_predicted_after_its_own_step_from_the_source(source, images, spec):
    args = memo_args("--tune", spec)
    names = tune_names(source, spec)
    x = images[:5]
    net = copy.deepcopy(source)
    preds, records = memo.memo(net, names, x, args, log=lambda s: None, chunk=2)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), source.parameters()))  # episodic: undone
    assert [r["n"] for r in records] == [2, 2, 1]
    # by hand: the same copies (same generator, same chunks), one SGD step on the named tensors, then predict
    gen, want = torch.Generator().manual_seed(args.seed), []
    for xc in x.split(2):
        xa = memo.augmix(xc.repeat_interleave(4, 0), gen) if names else None
        for i in range(len(xc)):
            m = copy.deepcopy(source)
            if names:
                ps = dict(m.named_parameters())
                loss = memo.marginal_entropy(m(xa[4 * i:4 * i + 4]))
                grads = torch.autograd.grad(loss, [ps[n] for n in names])
                with torch.no_grad():
                    for n, g in zip(names, grads):
                        ps[n] -= args.memo_lr * g
                moved = [n for n in names if not torch.equal(ps[n], dict(source.named_parameters())[n])]
                assert moved and set(moved) <= set(names)
            with torch.no_grad():
                want.append(m(xc[i:i + 1]).argmax(1))
    assert torch.equal(preds, torch.cat(want))


def test_memo_needs_a_block_and_cifar_c():
    for bad, says in ((["--tune", "auto_rgn"], "--objective memo"), (["--tune", "l1"], "--objective memo"),
                      (["--data", "cifar_flip"], "--objective memo"),
                      (["--memo_copies", "0"], "--memo_copies")):
        with pytest.raises(SystemExit) as e:
            P.parse_args(["--objective", "memo", *bad])
        assert says in str(e.value.code) and "\n" not in str(e.value.code)
