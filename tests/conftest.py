"""One CPU thread for every test and the processes they start: the models here are tiny, and two threads on a
busy 2-core machine spend more time waiting on each other than computing."""
import os


os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402

import model as M  # noqa: E402
import train as T  # noqa: E402
from tinydata import narrow_resnet26, write_cifar  # noqa: E402


@pytest.fixture(scope="module")
def small_net():
    """Every ResNet-26 built while it is active (train.py, load_checkpoint, finetune.py) is tinydata's narrow
    one; a module opts in with pytestmark = pytest.mark.usefixtures("small_net")."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(M.ARCHS, "resnet26", narrow_resnet26)
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_net):
    """A tiny CIFAR folder (160 train, 60 test; 120 images = 12 per class in the pool) and a 1-epoch source
    trained with a holdout of 60: (folder, checkpoint path)."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, train_sizes=(80, 80), test_size=60)
    ckpt = str(root / "src.pt")
    T.main(["--data_dir", str(root), "--cache_dir", str(root / "cache"), "--holdout", "60", "--epochs", "1",
            "--limit", "40", "--batch_size", "20", "--device", "cpu", "--out", ckpt])
    return root, ckpt
