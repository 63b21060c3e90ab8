"""ImageNet-shaped synthetic data: any number of classes, image side and channels, generated per index.

No ImageNet copy can be had offline, so scale checks (1,000 classes, 224 pixels) run on this stand-in. Image ``i`` is
a pure function of ``(seed, i)``: its class is ``i mod K`` (balanced classes) and its pixels are the class's smooth
pattern (a ``grid x grid`` random map per channel, seeded by the class alone, upsampled bilinearly) plus i.i.d.
Gaussian noise seeded by ``(seed, i)``. Nothing is held in memory: a data set of a million 224-pixel images costs
nothing until an item is read, and every read of item ``i`` returns the same tensor.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from gencnp.data.base import ImageDataModule

__all__ = ["ShapedImages", "ImageNetShapedDataModule"]

_MIX = 1_000_003  # seeds (seed, i) -> seed * _MIX + i: distinct for i < _MIX and any seed


class ShapedImages(Dataset):
    """``n`` images ``[C, S, S]`` with labels ``i mod num_classes``, generated when read.

    Args:
        grid: side of each class's pattern before upsampling (low frequency: survives pooling and resizing).
        signal / noise: std of the class pattern and of the per-image noise (the class is learnable when
            ``signal`` is comparable to ``noise``; a random target is at chance).
        seed: the noise seed (train and test differ by it); pattern_seed: the class patterns (shared by the splits).
    """

    def __init__(
        self,
        n: int,
        num_classes: int = 1000,
        image_size: int = 224,
        in_chans: int = 3,
        grid: int = 4,
        signal: float = 1.0,
        noise: float = 1.0,
        seed: int = 0,
        pattern_seed: int = 1234,
    ):
        if n < 1 or num_classes < 2 or grid < 1:
            raise ValueError(f"ShapedImages needs n >= 1, num_classes >= 2, grid >= 1; got {n}, {num_classes}, {grid}.")
        self.n, self.num_classes, self.image_size, self.in_chans = n, num_classes, image_size, in_chans
        self.grid, self.signal, self.noise, self.seed, self.pattern_seed = grid, signal, noise, seed, pattern_seed

    def __len__(self) -> int:
        return self.n

    def pattern(self, k: int) -> torch.Tensor:
        """The smooth pattern ``[C, S, S]`` of class ``k`` (unit std before ``signal``)."""
        g = torch.Generator().manual_seed(self.pattern_seed * _MIX + k)
        small = torch.randn(1, self.in_chans, self.grid, self.grid, generator=g)
        size = (self.image_size, self.image_size)
        return torch.nn.functional.interpolate(small, size=size, mode="bilinear", align_corners=False)[0]

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} images.")
        y = i % self.num_classes
        g = torch.Generator().manual_seed(self.seed * _MIX + i)
        s = self.image_size
        x = self.signal * self.pattern(y) + self.noise * torch.randn(self.in_chans, s, s, generator=g)
        return x, torch.tensor(y)


class ImageNetShapedDataModule(ImageDataModule):
    """ImageNet-shaped synthetic data (``ShapedImages``): ``num_classes`` classes of ``in_chans x image_size^2``
    images, train/val/test generated per index from different seeds (validation a holdout of train).

    The defaults are ImageNet-1k's shape (1,000 classes, 3 x 224 x 224) at a size a CPU can read in a minute.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        image_size: int = 224,
        in_chans: int = 3,
        n_train: int = 4096,
        n_test: int = 512,
        grid: int = 4,
        signal: float = 1.0,
        noise: float = 1.0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 512,
        seed: int = 0,
        predict_split: str = "test",
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, val_size, seed, predict_split)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self._set_shape(in_chans, image_size, "ImageNetShapedDataModule")
        self.num_classes = num_classes
        self.class_names = [f"class_{k:04d}" for k in range(num_classes)]
        self.n_train, self.n_test = n_train, n_test
        self._kw = dict(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, grid=grid, signal=signal, noise=noise
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate", "predict"):
            self._holdout(ShapedImages(self.n_train, seed=self.seed, **self._kw))
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = ShapedImages(self.n_test, seed=self.seed + 10_000, **self._kw)
