"""Streaming shards (litdata): an ImageFolder converted and read back gives ImageFolderDataModule's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gencnp import GenCNP, ImageFolderDataModule

pytest.importorskip("litdata")
from gencnp.data.shards import ShardDataModule, convert_imagefolder, main  # noqa: E402


def image_folder(root, classes=("ant", "bee", "cat"), n_train=6, n_test=2):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.slow
def test_shards_read_back_as_the_image_folder(tmp_path):
    src = image_folder(tmp_path / "folder")
    out = convert_imagefolder(str(src), str(tmp_path / "shards"))
    kw = dict(image_size=16, in_chans=3, val_size=4, batch_size=4)
    shards, folder = ShardDataModule(str(out), **kw), ImageFolderDataModule(str(src), **kw)
    assert shards.class_names == folder.class_names == ["ant", "bee", "cat"]
    for split in ("train", "val", "test"):
        a, b = shards.split(split), folder.split(split)
        assert len(a) == len(b)
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0]) and int(a[i][1]) == int(b[i][1])
    x, y = next(iter(shards.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.long
    # GEN-CNP's swap probes are indices into the shard-backed train split
    model = GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=3,
        in_chans=3,
        image_size=16,
        generator={"d": 8},
        controls={"swap_probes_per_class": 1, "probe_filter": "label"},
    )
    model.attach_probe_data(shards.split("train"))
    index = model.probe_index[model.probe_index >= 0]
    assert len(index) == 3 and all(int(shards.split("train")[int(i)][1]) == c for c, i in enumerate(index))
    with pytest.raises(FileExistsError, match="not empty"):
        main([str(src), str(out)])


def test_a_folder_without_shards_says_how_to_convert(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m gencnp.data.shards IMAGEFOLDER"):
        ShardDataModule(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no 'train' folder"):
        convert_imagefolder(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
