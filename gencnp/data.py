"""LightningDataModules: Fashion-MNIST, CIFAR-10, ImageFolder and a synthetic set with ground-truth regions.

Every module exposes ``num_classes``, ``class_names``, ``in_chans`` and ``image_size``, and takes ``image_size``
(images are resized, bilinear with antialiasing) and ``in_chans`` (a grey channel repeated to RGB, or RGB turned
grey by luminance) so RGB and 224-pixel models run on Fashion-MNIST; validation is a seeded holdout of the train
split (never the test split). Paths are checked in the constructor so bad
input fails before a Trainer creates any directory.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from gencnp.settings import check_settings, init_args

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of RGB -> grey


def check_in_chans(in_chans: int | None, what: str) -> None:
    if in_chans is not None and in_chans not in (1, 3):
        raise ValueError(f"{what}: in_chans must be 1 (grey) or 3 (RGB), got {in_chans}.")


def check_image_size(image_size: int | None, what: str) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"{what}: image_size must be a positive int (the side images are resized to), got {image_size!r}.")


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
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                            antialias=image_size < x.shape[-1])  # fmt: skip
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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float | list, std: float | list,
                 in_chans: int | None = None, image_size: int | None = None):  # fmt: skip
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


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"IDX file {path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}.")
    return arr.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz", root / "FashionMNIST" / "raw" / stem,
                      root / "FashionMNIST" / "raw" / f"{stem}.gz"):  # fmt: skip
        if candidate.is_file():
            return candidate
    return None


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

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0,
                 val_size: int = 5000, seed: int = 0, predict_split: str = "test"):  # fmt: skip
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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    def _holdout(self, full: Dataset) -> None:
        n = len(full)
        if not 0 < self.val_size < n:
            raise ValueError(f"val_size must be between 1 and {n - 1} (the train split has {n} images), got {self.val_size}.")
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
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

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


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (60k train, 10k test, 28x28 grey, 10 classes).

    Args:
        image_size: side the 28x28 images are resized to (e.g. 224 for ImageNet-sized models).
        in_chans: 1 (grey, stored) or 3 (the grey channel repeated, for RGB models).
        data_dir: folder with the IDX files (plain or gzip, flat or torchvision's ``FashionMNIST/raw``).
            When set it must exist. When unset: the Debian package's folder, then ``torchvision_root``.
        torchvision_root: torchvision's root folder, used when ``data_dir`` is unset.
        download: let torchvision download into ``torchvision_root`` when nothing is found locally.
    """

    num_classes = 10
    class_names = FASHION_MNIST_CLASSES
    in_chans = 1
    image_size = 28
    mean = 0.2860
    std = 0.3530

    def __init__(self, data_dir: str | None = None, torchvision_root: str = "data", download: bool = False,
                 batch_size: int = 128, eval_batch_size: int | None = 512, num_workers: int = 0,
                 val_size: int = 5000, seed: int = 0, predict_split: str = "test", image_size: int = 28,
                 in_chans: int = 1):  # fmt: skip
        super().__init__(batch_size, eval_batch_size, num_workers, val_size, seed, predict_split)
        check_in_chans(in_chans, "FashionMNISTDataModule")
        check_image_size(image_size, "FashionMNISTDataModule")
        self.in_chans, self.image_size = in_chans, image_size
        self.data_dir = data_dir
        self.torchvision_root = torchvision_root
        self.download = download
        self.root = self.locate()

    def locate(self) -> Path | None:
        """Find the IDX files now, so a bad path fails before anything touches disk."""
        how = (
            "Get the data with `apt-get install -y dataset-fashion-mnist` (files land in "
            f"{DEBIAN_FASHION_MNIST}), or set `download: true` to let torchvision fetch it into "
            f"`torchvision_root` (now '{self.torchvision_root}'), or point `data_dir` at a folder holding "
            "train-images-idx3-ubyte(.gz) and the three other IDX files."
        )
        if self.data_dir is not None:
            root = Path(self.data_dir)
            if not root.is_dir():
                raise FileNotFoundError(f"Fashion-MNIST data_dir '{root}' does not exist. {how}")
            if not all(_find_idx(root, stem) for pair in FASHION_FILES.values() for stem in pair):
                raise FileNotFoundError(f"Fashion-MNIST data_dir '{root}' is empty or lacks the IDX files. {how}")
            return root
        tried = []
        for root in (Path(os.environ.get("GENCNP_FASHION_MNIST", DEBIAN_FASHION_MNIST)), Path(self.torchvision_root)):
            tried.append(str(root))
            if all(_find_idx(root, stem) for pair in FASHION_FILES.values() for stem in pair):
                return root
        if self.download:
            return None  # torchvision downloads in prepare_data
        raise FileNotFoundError(f"Fashion-MNIST not found (tried {', '.join(tried)}). {how}")

    def prepare_data(self) -> None:
        if self.root is None:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(self.torchvision_root, train=train, download=True)

    def _load(self, split: str) -> TensorImageDataset:
        root = self.root or Path(self.torchvision_root)
        img_stem, lbl_stem = FASHION_FILES[split]
        images = torch.from_numpy(_read_idx(_find_idx(root, img_stem)).copy()).unsqueeze(1)
        labels = torch.from_numpy(_read_idx(_find_idx(root, lbl_stem)).astype(np.int64))
        return TensorImageDataset(images, labels, self.mean, self.std, self.in_chans, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate", "predict"):
            self._holdout(self._load("train"))
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = self._load("test")


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from a local torchvision root (``cifar-10-batches-py`` inside ``data_dir``); ``image_size`` resizes
    the 32x32 images, ``in_chans: 1`` turns them grey."""

    num_classes = 10
    class_names = CIFAR10_CLASSES
    in_chans = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 128,
                 eval_batch_size: int | None = 512, num_workers: int = 0, val_size: int = 5000, seed: int = 0,
                 predict_split: str = "test", image_size: int = 32, in_chans: int = 3):  # fmt: skip
        super().__init__(batch_size, eval_batch_size, num_workers, val_size, seed, predict_split)
        check_in_chans(in_chans, "CIFAR10DataModule")
        check_image_size(image_size, "CIFAR10DataModule")
        self.in_chans, self.image_size = in_chans, image_size
        self.data_dir = data_dir
        self.download = download
        if not download and not (Path(data_dir) / "cifar-10-batches-py").is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 not found: '{Path(data_dir) / 'cifar-10-batches-py'}' does not exist. Extract "
                "cifar-10-python.tar.gz into data_dir, or set `download: true`."
            )

    def _load(self, train: bool) -> TensorImageDataset:
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(self.data_dir, train=train, download=self.download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return TensorImageDataset(images, torch.as_tensor(ds.targets), self.mean, self.std, self.in_chans, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate", "predict"):
            self._holdout(self._load(True))
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = self._load(False)


def _image_files(folder: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _listing(paths: list, limit: int = 6) -> str:
    return ", ".join(f"'{p}'" for p in paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_image_folders(root: Path, splits: tuple[str, ...] = ("train", "test")) -> list[str]:
    """The class list of ``root/train`` after checking every split's class folders against it; raises on the first
    problem, naming the folders or files.

    Raises:
        FileNotFoundError: a class folder of ``train/`` holds no images.
        ValueError: another split lacks a class folder of ``train/``, has one ``train/`` lacks, holds a class folder
            without images (indices would shift: class k of one split would be class k+1 of another), or holds
            zero-byte image files.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    for split in splits:
        folder = root / split
        if not folder.is_dir():
            continue
        here = sorted(p.name for p in folder.iterdir() if p.is_dir())
        missing, extra = sorted(set(classes) - set(here)), sorted(set(here) - set(classes))
        if split != "train" and (missing or extra):
            parts = ([f"lacks the class folders {_listing([folder / c for c in missing])} that train/ has"] if missing else []) + (
                [f"has class folders {_listing([folder / c for c in extra])} that train/ lacks"] if extra else [])  # fmt: skip
            raise ValueError(
                f"ImageFolder '{folder}' " + " and ".join(parts) + f": its class indices would not match train/'s "
                f"{classes} (labels silently shifted). Give every split the same class folders (an empty class is "
                "not allowed either), or remove the extra ones."
            )
        files = {c: _image_files(folder / c) for c in here}
        empty = [folder / c for c, fs in files.items() if not fs]
        if empty:
            kind = FileNotFoundError if split == "train" else ValueError
            raise kind(
                f"ImageFolder class folders {_listing(empty)} hold no images ({', '.join(IMG_EXTENSIONS)}): every "
                "class folder of every split needs at least one image. Add images, or remove the folder from every "
                "split (and set num_classes to the classes that remain)."
            )
        zero = [f for fs in files.values() for f in fs if f.stat().st_size == 0]
        if zero:
            raise ValueError(
                f"ImageFolder '{folder}' holds {len(zero)} empty (zero-byte) image file(s): {_listing(zero)}. Copy "
                "them again or delete them; nothing was run."
            )
    return classes


def _named_loader(path: str):
    """torchvision's default image loader, with the file's name in its errors (a truncated JPEG says only
    'Truncated File Read')."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise ValueError(
            f"image file '{path}' cannot be decoded ({type(err).__name__}: {err}); replace or delete it."
        ) from err


class ImageFolderDataModule(ImageDataModule):
    """Your own images: ``root/<split>/<class>/*.png`` (torchvision ``ImageFolder`` layout).

    Args:
        root: folder holding ``train/`` and, optionally, ``test/``; validation is held out of ``train/``.
        image_size: images are resized to a square of this side.
        in_chans: 1 (converted to grey) or 3 (RGB).
    """

    def __init__(self, root: str, image_size: int = 64, in_chans: int = 3, mean: float | list[float] = 0.5,
                 std: float | list[float] = 0.25, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 0, val_size: int = 500, seed: int = 0, predict_split: str = "test"):  # fmt: skip
        super().__init__(batch_size, eval_batch_size, num_workers, val_size, seed, predict_split)
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.root = Path(root)
        train = self.root / "train"
        if not train.is_dir():
            raise FileNotFoundError(
                f"ImageFolder root '{self.root}' has no 'train' folder; expected {self.root}/train/<class>/<image> "
                "(and optionally test/<class>/<image>)."
            )
        n_images = sum(1 for p in train.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not any(p.is_dir() for p in train.iterdir()) or n_images == 0:
            raise FileNotFoundError(
                f"ImageFolder '{train}' is empty: expected one sub-folder per class with images ({', '.join(IMG_EXTENSIONS)})."
            )
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}.")
        self.class_names = check_image_folders(self.root)  # same classes in every split, no empty folder or file
        self.num_classes = len(self.class_names)
        self.image_size = image_size
        self.in_chans = in_chans
        self.mean, self.std = mean, std

    def _folder(self, split: str):
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder

        tf = [T.Resize((self.image_size, self.image_size))]
        if self.in_chans == 1:
            tf.append(T.Grayscale(1))
        tf += [T.ToTensor(), T.Normalize([self.mean] * self.in_chans if np.isscalar(self.mean) else self.mean,
                                         [self.std] * self.in_chans if np.isscalar(self.std) else self.std)]  # fmt: skip
        return ImageFolder(str(self.root / split), transform=T.Compose(tf), loader=_named_loader)

    def check_files(self, splits: tuple[str, ...] = ("train", "test")) -> None:
        """Decode every image of ``splits`` now; raise one ``ValueError`` naming every file that fails (so a broken
        file stops the run before training, not in the middle of an epoch)."""
        from PIL import Image

        bad = []
        for split in splits:
            for path in _image_files(self.root / split) if (self.root / split).is_dir() else []:
                try:
                    with Image.open(path) as im:
                        im.load()
                except Exception as err:  # noqa: BLE001  (PIL's errors for broken files have many types)
                    bad.append(f"'{path}' ({type(err).__name__}: {err})")
        if bad:
            raise ValueError(
                f"{len(bad)} image file(s) under '{self.root}' cannot be decoded: {'; '.join(bad[:6])}"
                f"{' ...' if len(bad) > 6 else ''}. Replace or delete them; nothing was run."
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate", "predict"):
            self._holdout(self._folder("train"))
        if self.test_set is None and stage in (None, "test", "predict"):
            test = self.root / "test"
            if not test.is_dir():
                raise FileNotFoundError(f"ImageFolder root '{self.root}' has no 'test' folder; add test/<class>/<image>.")
            self.test_set = self._folder("test")


class SyntheticPatterns(Dataset):
    """K classes; class k is decided by its own pattern pasted at a random position on noise.

    Items are ``(image [C, S, S], label, region [1, S, S])``; ``region`` marks the pattern's pixels, the
    ground truth for explanation tests. Everything is generated up front from ``seed``.
    """

    def __init__(self, n: int, num_classes: int = 4, image_size: int = 16, in_chans: int = 1, pattern_size: int = 5,
                 noise: float = 0.3, seed: int = 0, pattern_seed: int = 1234):  # fmt: skip
        if pattern_size > image_size:
            raise ValueError(f"pattern_size ({pattern_size}) must not exceed image_size ({image_size}).")
        g = torch.Generator().manual_seed(pattern_seed)
        patterns = torch.rand(num_classes, in_chans, pattern_size, pattern_size, generator=g).round() * 2 - 1
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        self.images = noise * torch.randn(n, in_chans, image_size, image_size, generator=g)
        self.regions = torch.zeros(n, 1, image_size, image_size)
        pos = torch.randint(0, image_size - pattern_size + 1, (n, 2), generator=g)
        for i in range(n):
            r, c = pos[i].tolist()
            self.images[i, :, r : r + pattern_size, c : c + pattern_size] += patterns[self.labels[i]]
            self.regions[i, :, r : r + pattern_size, c : c + pattern_size] = 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], self.regions[i]


class SyntheticDataModule(ImageDataModule):
    """Synthetic patterns (no files): train/val/test generated from different seeds."""

    def __init__(self, num_classes: int = 4, image_size: int = 16, in_chans: int = 1, pattern_size: int = 5,
                 noise: float = 0.3, n_train: int = 2000, n_test: int = 500, batch_size: int = 64,
                 eval_batch_size: int | None = 256, num_workers: int = 0, val_size: int = 400, seed: int = 0,
                 predict_split: str = "test"):  # fmt: skip
        super().__init__(batch_size, eval_batch_size, num_workers, val_size, seed, predict_split)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self.num_classes = num_classes
        self.class_names = [f"pattern_{k}" for k in range(num_classes)]
        self.image_size = image_size
        self.in_chans = in_chans
        self._kw = dict(num_classes=num_classes, image_size=image_size, in_chans=in_chans,
                        pattern_size=pattern_size, noise=noise)  # fmt: skip
        self.n_train, self.n_test = n_train, n_test

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate", "predict"):
            self._holdout(SyntheticPatterns(self.n_train, seed=self.seed, **self._kw))
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = SyntheticPatterns(self.n_test, seed=self.seed + 10_000, **self._kw)
