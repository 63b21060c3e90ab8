from pathlib import Path

import pytest
import torch
from conftest import FASHION

from gencnp.data.modules import CIFAR10DataModule, FashionMNISTDataModule, ImageFolderDataModule, SyntheticDataModule


def test_synthetic_items_carry_region_masks():
    dm = SyntheticDataModule(num_classes=3, image_size=12, pattern_size=4, n_train=300, n_test=60, val_size=50)
    dm.setup()
    x, y, region = dm.split("train")[0]
    assert x.shape == (1, 12, 12) and region.shape == (1, 12, 12)
    assert region.sum() == 16  # the 4x4 pattern
    assert len(dm.split("train")) == 250 and len(dm.split("val")) == 50 and len(dm.split("test")) == 60
    assert dm.num_classes == 3 and dm.class_names == ["pattern_0", "pattern_1", "pattern_2"]


def test_synthetic_patterns_are_class_specific_and_seeded():
    a = SyntheticDataModule(n_train=200, n_test=40, val_size=40)
    b = SyntheticDataModule(n_train=200, n_test=40, val_size=40)
    a.setup(), b.setup()
    xa, ya, ra = a.split("train")[3]
    xb, yb, rb = b.split("train")[3]
    assert torch.equal(xa, xb) and ya == yb and torch.equal(ra, rb)
    # Inside the region the pattern dominates: mean |x| is larger there than on the noise.
    assert xa[ra.bool()].abs().mean() > 2 * xa[~ra.bool()].abs().mean()


def test_validation_is_a_seeded_holdout_of_train():
    dm = SyntheticDataModule(n_train=300, n_test=50, val_size=60, seed=3)
    dm.setup()
    train_idx, val_idx = set(dm.train_set.indices), set(dm.val_set.indices)
    assert not train_idx & val_idx and len(train_idx | val_idx) == 300


def test_fashion_mnist_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="does not exist.*apt-get install -y dataset-fashion-mnist.*download: true"
    ):
        FashionMNISTDataModule(data_dir=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty or lacks the IDX files"):
        FashionMNISTDataModule(data_dir=str(empty))
    assert list(empty.iterdir()) == []


def test_fashion_mnist_unset_falls_back_and_names_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("GENCNP_FASHION_MNIST", str(tmp_path / "no_debian"))
    with pytest.raises(FileNotFoundError, match="tried .*no_debian.*tvroot"):
        FashionMNISTDataModule(torchvision_root=str(tmp_path / "tvroot"))


@pytest.mark.skipif(
    not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)"
)
def test_fashion_mnist_loader():
    dm = FashionMNISTDataModule(batch_size=32)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.split("train")), len(dm.split("val")), len(dm.split("test"))) == (55000, 5000, 10000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and y.dtype == torch.long
    assert abs(float(dm.split("test")[0][0].mean())) < 3
    assert dm.class_names[9] == "Ankle boot"


def test_imagefolder_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no 'train' folder"):
        ImageFolderDataModule(root=str(tmp_path))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="is empty"):
        ImageFolderDataModule(root=str(tmp_path))


def test_imagefolder_reads_images(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (20, 20), (i * 30, 0, 0)).save(d / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, val_size=2, batch_size=4)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and dm.class_names == ["a", "b"] and dm.num_classes == 2


def test_cifar10_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR10DataModule(data_dir=str(tmp_path))
    assert Path(tmp_path).exists() and list(Path(tmp_path).iterdir()) == []
