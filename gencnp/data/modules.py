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

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, FashionMNIST, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from gencnp.data.base import (  # noqa: F401  (re-exported: gencnp.data.modules is where callers find them)
    LUMA,
    EpochSampler,
    ImageDataModule,
    ResumableDataLoader,
    TensorImageDataset,
    check_image_size,
    check_in_chans,
    convert_images,
    converted_stats,
)

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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
    for candidate in (
        root / stem,
        root / f"{stem}.gz",
        root / "FashionMNIST" / "raw" / stem,
        root / "FashionMNIST" / "raw" / f"{stem}.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


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

    def __init__(
        self,
        data_dir: str | None = None,
        torchvision_root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = 512,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        predict_split: str = "test",
        image_size: int = 28,
        in_chans: int = 1,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, val_size, seed, predict_split)
        self._set_shape(in_chans, image_size, "FashionMNISTDataModule")
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

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = 512,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        predict_split: str = "test",
        image_size: int = 32,
        in_chans: int = 3,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, val_size, seed, predict_split)
        self._set_shape(in_chans, image_size, "CIFAR10DataModule")
        self.data_dir = data_dir
        self.download = download
        if not download and not (Path(data_dir) / "cifar-10-batches-py").is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 not found: '{Path(data_dir) / 'cifar-10-batches-py'}' does not exist. Extract "
                "cifar-10-python.tar.gz into data_dir, or set `download: true`."
            )

    def _load(self, train: bool) -> TensorImageDataset:
        ds = CIFAR10(self.data_dir, train=train, download=self.download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return TensorImageDataset(
            images, torch.as_tensor(ds.targets), self.mean, self.std, self.in_chans, self.image_size
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate", "predict"):
            self._holdout(self._load(True))
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = self._load(False)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _listing(paths: list, limit: int = 6) -> str:
    return ", ".join(f"'{p}'" for p in paths[:limit]) + (
        f" and {len(paths) - limit} more" if len(paths) > limit else ""
    )


def check_image_folders(root: Path, splits: tuple[str, ...] = ("train", "test")) -> list[str]:
    """The class list of ``root/train`` after checking every split's class folders against it; raises on the first
    problem, naming the folders or files.

    Raises:
        FileNotFoundError: a class folder of ``train/`` holds no images.
        ValueError: another split lacks a class folder of ``train/``, has one ``train/`` lacks, holds a class folder
            without images (indices would shift: class k of one split would be class k+1 of another), or holds
            zero-byte image files.
    """
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    for split in splits:
        folder = root / split
        if not folder.is_dir():
            continue
        here = sorted(p.name for p in folder.iterdir() if p.is_dir())
        missing, extra = sorted(set(classes) - set(here)), sorted(set(here) - set(classes))
        if split != "train" and (missing or extra):
            parts = (
                [f"lacks the class folders {_listing([folder / c for c in missing])} that train/ has"]
                if missing
                else []
            ) + ([f"has class folders {_listing([folder / c for c in extra])} that train/ lacks"] if extra else [])
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

    def __init__(
        self,
        root: str,
        image_size: int = 64,
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
        tf = [T.Resize((self.image_size, self.image_size))]
        if self.in_chans == 1:
            tf.append(T.Grayscale(1))
        tf += [
            T.ToTensor(),
            T.Normalize(
                [self.mean] * self.in_chans if np.isscalar(self.mean) else self.mean,
                [self.std] * self.in_chans if np.isscalar(self.std) else self.std,
            ),
        ]
        return ImageFolder(str(self.root / split), transform=T.Compose(tf), loader=_named_loader)

    def check_files(self, splits: tuple[str, ...] = ("train", "test")) -> None:
        """Decode every image of ``splits`` now; raise one ``ValueError`` naming every file that fails (so a broken
        file stops the run before training, not in the middle of an epoch)."""
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
                raise FileNotFoundError(
                    f"ImageFolder root '{self.root}' has no 'test' folder; add test/<class>/<image>."
                )
            self.test_set = self._folder("test")


class SyntheticPatterns(Dataset):
    """K classes; class k is decided by its own pattern pasted at a random position on noise.

    Items are ``(image [C, S, S], label, region [1, S, S])``; ``region`` marks the pattern's pixels, the
    ground truth for explanation tests. Everything is generated up front from ``seed``.
    """

    def __init__(
        self,
        n: int,
        num_classes: int = 4,
        image_size: int = 16,
        in_chans: int = 1,
        pattern_size: int = 5,
        noise: float = 0.3,
        seed: int = 0,
        pattern_seed: int = 1234,
    ):
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

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 16,
        in_chans: int = 1,
        pattern_size: int = 5,
        noise: float = 0.3,
        n_train: int = 2000,
        n_test: int = 500,
        batch_size: int = 64,
        eval_batch_size: int | None = 256,
        num_workers: int = 0,
        val_size: int = 400,
        seed: int = 0,
        predict_split: str = "test",
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, val_size, seed, predict_split)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self.num_classes = num_classes
        self.class_names = [f"pattern_{k}" for k in range(num_classes)]
        self.image_size = image_size
        self.in_chans = in_chans
        self._kw = dict(
            num_classes=num_classes, image_size=image_size, in_chans=in_chans, pattern_size=pattern_size, noise=noise
        )
        self.n_train, self.n_test = n_train, n_test

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate", "predict"):
            self._holdout(SyntheticPatterns(self.n_train, seed=self.seed, **self._kw))
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = SyntheticPatterns(self.n_test, seed=self.seed + 10_000, **self._kw)
