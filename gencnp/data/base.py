"""The base of gencnp's data modules: image conversion, the tensor dataset, resumable epoch-seeded loaders, and
``ImageDataModule`` (loaders, the seeded validation holdout, distributed samplers). ``gencnp.data.modules`` re-exports it.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from gencnp.settings import check_settings, init_args

__all__ = [
    "LUMA",
    "check_in_chans",
    "check_image_size",
    "convert_images",
    "converted_stats",
    "TensorImageDataset",
    "EpochSampler",
    "ResumableDataLoader",
    "ImageDataModule",
]

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of RGB -> grey


def check_in_chans(in_chans: int | None, what: str) -> None:
    if in_chans is not None and in_chans not in (1, 3):
        raise ValueError(f"{what}: in_chans must be 1 (grey) or 3 (RGB), got {in_chans}.")


def check_image_size(image_size: int | None, what: str) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(
            f"{what}: image_size must be a positive int (the side images are resized to), got {image_size!r}."
        )


def convert_images(img: torch.Tensor, in_chans: int | None = None, image_size: int | None = None) -> torch.Tensor:
    """Float images ``[C, H, W]`` or ``[N, C, H, W]`` in ``[0, 1]`` with ``in_chans`` channels (grey repeated to
    RGB, RGB to grey by luminance) resized to ``image_size`` squares (bilinear, antialiased when shrinking)."""
    single = img.dim() == 3
    x = img[None] if single else img
    c = x.shape[1]
    if in_chans is not None and in_chans != c:
        if c == 1 and in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c == 3 and in_chans == 1:
            x = (x * torch.tensor(LUMA, dtype=x.dtype).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {c}-channel images to {in_chans} channels; use in_chans 1 or 3.")
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = torch.nn.functional.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=image_size < x.shape[-1]
        )
    return x[0] if single else x


def converted_stats(mean, std, c: int, in_chans: int | None) -> tuple[list[float], list[float]]:
    """Per-channel normalisation statistics after ``convert_images``'s channel conversion."""
    m = [float(v) for v in torch.as_tensor(mean, dtype=torch.float64).reshape(-1).expand(c)]
    s = [float(v) for v in torch.as_tensor(std, dtype=torch.float64).reshape(-1).expand(c)]
    if in_chans is None or in_chans == c:
        return m, s
    if c == 1:
        return m * in_chans, s * in_chans
    return [sum(w * v for w, v in zip(LUMA, m))], [sum(w * v for w, v in zip(LUMA, s))]


class TensorImageDataset(Dataset):
    """In-memory images ``uint8 [N, H, W, C]`` or float ``[N, C, H, W]`` normalised on access.

    ``in_chans``/``image_size`` convert channels and resize on access (``convert_images``); ``mean``/``std`` are
    those of the stored images and follow the channel conversion.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: float | list,
        std: float | list,
        in_chans: int | None = None,
        image_size: int | None = None,
    ):
        self.images = images
        self.labels = labels.long()
        c = images.shape[1]
        self.in_chans = None if in_chans == c else in_chans
        self.image_size = None if image_size == images.shape[-1] and images.shape[-2] == image_size else image_size
        mean, std = converted_stats(mean, std, c, in_chans)
        c = len(mean)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1).clone()
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1).clone()

    def __len__(self) -> int:
        return len(self.labels)

    def _convert(self, img: torch.Tensor) -> torch.Tensor:
        img = img.float()
        if self.images.dtype == torch.uint8:
            img = img / 255.0
        if self.in_chans is not None or self.image_size is not None:
            img = convert_images(img, self.in_chans, self.image_size)
        return (img - self.mean) / self.std

    def __getitem__(self, i: int):
        return self._convert(self.images[i]), self.labels[i]

    def __getitems__(self, idx: list[int]):
        # Batched access: one gather instead of per-item indexing (the default collate stacks the list).
        index = torch.as_tensor(idx)
        xs = self._convert(self.images[index])
        ys = self.labels[index]
        return list(zip(xs.unbind(0), ys.unbind(0)))


class EpochSampler(DistributedSampler):
    """One process's share of a dataset in an order fixed by ``(seed, epoch)`` alone, for one process too.

    Lightning calls ``set_epoch`` before every training epoch, so the data order of an epoch does not depend on the
    global random state: a run resumed from a checkpoint sees the batches an uninterrupted run would. ``skip`` drops
    that many leading indices from the next iteration only (mid-epoch resume, see ``ResumableDataLoader``).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` whose position inside an epoch goes into every checkpoint.

    Lightning stores ``state_dict()`` (``{"epoch", "batches"}``: batches handed out so far in that epoch) in each
    checkpoint and calls ``load_state_dict`` on resume. When the resumed epoch is the saved one, the batches already
    trained on are skipped without being loaded, so resuming from a mid-epoch ``last.ckpt`` (``val_check_interval``
    below 1) trains on exactly the remaining batches of an uninterrupted run. Needs an ``EpochSampler``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError(f"ResumableDataLoader needs an EpochSampler, got {type(self.sampler).__name__}.")
        self._position: dict[str, int | None] = {"epoch": None, "batches": 0}
        self._resume: dict | None = None

    def state_dict(self) -> dict[str, int | None]:
        return dict(self._position)

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def __iter__(self):
        # A generator: this body runs at the first next(), after Lightning's set_epoch, not at iter().
        epoch = self.sampler.epoch
        skip, resume, self._resume = 0, self._resume, None
        if resume is not None and resume.get("epoch") == epoch and 0 < int(resume.get("batches") or 0) < len(self):
            skip = int(resume["batches"])
            self.sampler.skip = skip * self.batch_size  # batches are consecutive runs of the sampler's indices
        self._position = {"epoch": epoch, "batches": skip}
        for batch in super().__iter__():
            self._position["batches"] += 1
            yield batch


class ImageDataModule(L.LightningDataModule):
    """Shared loaders, the seeded validation holdout and distributed samplers.

    Under several processes, training uses a ``DistributedSampler`` and evaluation an unrepeated one, so
    no sample is counted twice in validation, test or predict (Lightning's default pads by repeating).
    Training batches come from an ``EpochSampler`` (order fixed by ``seed_everything``, ``seed`` and the epoch, one
    process included) through a ``ResumableDataLoader``, so a run resumed from any checkpoint continues exactly.
    """

    num_classes: int
    class_names: list[str]
    in_chans: int
    image_size: int

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        predict_split: str = "test",
    ):
        super().__init__()
        check_settings(self, init_args(self))  # this class's and the subclass's settings (gencnp.settings.RULES)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if predict_split not in ("train", "val", "test"):
            raise ValueError(f"predict_split must be 'train', 'val' or 'test', got '{predict_split}'.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.predict_split = predict_split
        self.train_set = self.val_set = self.test_set = None
        self._train_resume: dict | None = None

    def _set_shape(self, in_chans: int, image_size: int, what: str) -> None:
        """Check and set ``in_chans`` and ``image_size`` (the data is converted to them); ``what`` names the module."""
        check_in_chans(in_chans, what)
        check_image_size(image_size, what)
        self.in_chans, self.image_size = in_chans, image_size

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    def _holdout(self, full: Dataset) -> None:
        n = len(full)
        if not 0 < self.val_size < n:
            raise ValueError(
                f"val_size must be between 1 and {n - 1} (the train split has {n} images), got {self.val_size}."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_set = Subset(full, sorted(perm[: self.val_size]))
        self.train_set = Subset(full, sorted(perm[self.val_size :]))

    def split(self, name: str) -> Dataset:
        """The dataset of a named split ('train', 'val' or 'test'), set up on demand."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split '{name}'; expected 'train', 'val' or 'test'.")
        if getattr(self, f"{name}_set") is None:
            self.setup("fit" if name in ("train", "val") else "test")
        return getattr(self, f"{name}_set")

    def _distributed(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def loader(self, dataset: Dataset, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        world, rank = self._distributed()
        sampler, loader_cls = None, DataLoader
        if shuffle:
            # seed_everything's seed (PL_GLOBAL_SEED) and the data seed fix the order, not the global random state.
            seed = self.seed + int(os.environ.get("PL_GLOBAL_SEED", "0") or 0)
            sampler, loader_cls = EpochSampler(dataset, world, rank, shuffle=True, seed=seed), ResumableDataLoader
        elif world > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return loader_cls(
            dataset,
            batch_size=batch_size or (self.batch_size if shuffle else self.eval_batch_size),
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self.loader(self.split("train"), shuffle=True)
        if self._train_resume is not None:  # the first training loader after a checkpoint was restored
            loader.load_state_dict(self._train_resume)
            self._train_resume = None
        return loader

    def state_dict(self) -> dict:
        """The training loader's position in its epoch; Lightning stores it in every checkpoint.

        Lightning restores the data module before ``configure_optimizers`` builds the training loader (to count
        ``estimated_stepping_batches``), but restores its own copy of loader states only afterwards, too late for
        that loader; this copy reaches it in time.
        """
        trainer = getattr(self, "trainer", None)
        loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
        return {"train_position": loader.state_dict()} if isinstance(loader, ResumableDataLoader) else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_resume = state_dict.get("train_position")

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.split("val"))

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.split("test"))

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.split(self.predict_split))
