"""Streaming shards for large real data sets (ImageNet-1k and the like), in Lightning's ``litdata`` format.

``convert_imagefolder`` turns an ImageFolder (``root/<split>/<class>/<image>``) into ``out/<split>/`` litdata chunks
(``litdata.optimize``: each item holds the image file's bytes, undecoded, and its class index) and
``out/classes.json``; ``ShardDataModule`` reads them through ``litdata.StreamingDataset``, which gives random access
by index (GEN-CNP's swap probes are training-split indices) and reads chunks, local or remote, on demand. Images are
decoded and transformed when read, exactly as ``ImageFolderDataModule`` does, so both give the same tensors.

Convert (``pip install 'gencnp[shards]'``)::

    python -m gencnp.data.shards /data/imagenet /data/imagenet_shards --num_workers 8

then use ``data: {class_path: gencnp.data.shards.ShardDataModule, init_args: {root: /data/imagenet_shards, image_size:
224}}``.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from gencnp.data.base import ImageDataModule
from gencnp.data.modules import check_image_folders

__all__ = ["convert_imagefolder", "ShardImages", "ShardDataModule", "main"]

SPLITS = ("train", "test")


def _litdata():
    try:
        import litdata
    except ImportError as err:  # an optional extra
        raise ImportError(
            "streaming shards need litdata: pip install 'gencnp[shards]' (or pip install litdata)."
        ) from err
    return litdata


def _read_item(entry: tuple[str, int]) -> dict:
    path, label = entry
    return {"data": Path(path).read_bytes(), "label": int(label)}


def convert_imagefolder(
    root: str, out: str, num_workers: int = 1, chunk_bytes: str = "64MB", splits: tuple[str, ...] = SPLITS
) -> Path:
    """Write litdata shards of ``root/<split>`` (``train`` and, when present, ``test``) to ``out/<split>``.

    The class list is ``root/train``'s folders (sorted, as torchvision's ``ImageFolder``), checked against every
    split before anything is written; items keep ``ImageFolder``'s order (class, then file name).

    Returns:
        ``out``.
    """
    from torchvision.datasets import ImageFolder

    src, dst = Path(root), Path(out)
    if not (src / "train").is_dir():
        raise FileNotFoundError(
            f"ImageFolder root '{src}' has no 'train' folder; expected {src}/train/<class>/<image>."
        )
    classes = check_image_folders(src)  # same classes in every split, no empty folder
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"shard folder '{dst}' is not empty; choose a new folder or remove it first.")
    ld = _litdata()
    for split in splits:
        if not (src / split).is_dir():
            continue
        entries = [(str(p), int(c)) for p, c in ImageFolder(str(src / split)).samples]
        ld.optimize(
            fn=_read_item,
            inputs=entries,
            output_dir=str(dst / split),
            chunk_bytes=chunk_bytes,
            num_workers=num_workers,
            mode="overwrite",
        )
    (dst / "classes.json").write_text(json.dumps({"classes": classes, "source": str(src)}, indent=1))
    return dst


class ShardImages(Dataset):
    """Random access to one split's shards: ``(image [C, S, S], label)``, decoded and transformed when read."""

    def __init__(self, folder: str, transform):
        self.folder, self.transform = str(folder), transform
        self._ds = None  # opened lazily, so the dataset pickles to DataLoader workers

    @property
    def ds(self):
        if self._ds is None:
            self._ds = _litdata().StreamingDataset(self.folder)
        return self._ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[int(i)]
        with Image.open(io.BytesIO(item["data"])) as im:
            img = im.convert("RGB")
        return self.transform(img), int(item["label"])

    def __getstate__(self):
        return {"folder": self.folder, "transform": self.transform, "_ds": None}


class ShardDataModule(ImageDataModule):
    """Images from litdata shards written by ``convert_imagefolder`` (``root/{train,test}``, ``root/classes.json``).

    Args:
        root: the shard folder; image_size, in_chans, mean, std: as ``ImageFolderDataModule``.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        in_chans: int = 3,
        mean: float | list[float] = 0.5,
        std: float | list[float] = 0.25,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 500,
        seed: int = 0,
        predict_split: str = "test",
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, val_size, seed, predict_split)
        self.root = Path(root)
        meta = self.root / "classes.json"
        if not meta.is_file() or not (self.root / "train").is_dir():
            raise FileNotFoundError(
                f"'{self.root}' holds no shards written by gencnp.data.shards (expected classes.json and train/); "
                f"convert an ImageFolder first: python -m gencnp.data.shards IMAGEFOLDER {self.root}."
            )
        self._set_shape(in_chans, image_size, "ShardDataModule")
        self.class_names = list(json.loads(meta.read_text())["classes"])
        self.num_classes = len(self.class_names)
        self.mean, self.std = mean, std

    def _split(self, name: str) -> ShardImages:
        c = self.in_chans
        tf = [T.Resize((self.image_size, self.image_size))] + ([T.Grayscale(1)] if c == 1 else [])
        tf += [
            T.ToTensor(),
            T.Normalize(
                [self.mean] * c if np.isscalar(self.mean) else self.mean,
                [self.std] * c if np.isscalar(self.std) else self.std,
            ),
        ]
        return ShardImages(str(self.root / name), T.Compose(tf))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate", "predict"):
            self._holdout(self._split("train"))
        if self.test_set is None and stage in (None, "test", "predict"):
            if not (self.root / "test").is_dir():
                raise FileNotFoundError(f"shard folder '{self.root}' has no test split; convert one with test/.")
            self.test_set = self._split("test")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Convert an ImageFolder (root/{train,test}/<class>/<image>) to shards.")
    p.add_argument("root", help="ImageFolder root")
    p.add_argument("out", help="new shard folder")
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--chunk_bytes", default="64MB")
    a = p.parse_args(argv)
    out = convert_imagefolder(a.root, a.out, a.num_workers, a.chunk_bytes)
    print(f"shards of '{a.root}' written to '{out}'")
    return out


if __name__ == "__main__":
    main()
