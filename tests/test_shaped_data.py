"""ImageNet-shaped synthetic data: any shape, generated per index, deterministic, nothing held in memory."""

import pickle

import pytest
import torch

from gencnp import ImageNetShapedDataModule
from gencnp.data.shaped import ShapedImages


@pytest.mark.parametrize("k,size,chans", [(1000, 224, 3), (7, 19, 1)])
def test_items_have_the_asked_shape_and_are_the_same_on_every_read(k, size, chans):
    ds = ShapedImages(10**6, num_classes=k, image_size=size, in_chans=chans)
    assert len(ds) == 10**6
    for i in (0, 1, 999_999):
        x, y = ds[i]
        assert x.shape == (chans, size, size) and x.dtype == torch.float32 and int(y) == i % k
        assert torch.equal(ds[i][0], x)
    assert not torch.equal(ds[0][0], ds[k][0])  # same class, other noise
    # nothing per image is stored: the data set pickles to a few hundred bytes whatever n is
    assert len(pickle.dumps(ds)) < 1000
    with pytest.raises(IndexError, match="out of range"):
        ds[10**6]


def test_splits_share_the_class_patterns_and_differ_in_noise():
    dm = ImageNetShapedDataModule(num_classes=5, image_size=12, n_train=40, n_test=10, val_size=8)
    train, test = dm.split("train"), dm.split("test")
    assert len(train) == 32 and len(dm.split("val")) == 8 and len(test) == 10
    assert dm.class_names[3] == "class_0003" and dm.input_shape == (3, 12, 12)
    a, b = dm.split("train").dataset, test
    assert torch.equal(a.pattern(2), b.pattern(2)) and not torch.equal(a[2][0], b[2][0])


def test_the_class_is_learnable_from_the_pattern():
    ds = ShapedImages(400, num_classes=4, image_size=16, in_chans=3)
    xs = torch.stack([ds[i][0] for i in range(400)])
    ys = torch.tensor([int(ds[i][1]) for i in range(400)])
    pats = torch.stack([ds.pattern(k) for k in range(4)])
    nearest = torch.einsum("nchw,kchw->nk", xs, pats).argmax(1)  # matched filter
    assert float((nearest == ys).float().mean()) > 0.9


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"in_chans must be 1 \(grey\) or 3"):
        ImageNetShapedDataModule(in_chans=2)
    with pytest.raises(ValueError, match=r"num_classes=1 is out of range: expected an integer >= 2"):
        ImageNetShapedDataModule(num_classes=1)
