"""LightningDataModules: the shared base (``base``: splits, conversion, resumable loaders) and the data sets
(``modules``: Fashion-MNIST, CIFAR-10, ImageFolder, synthetic patterns).

May import the base modules (``settings``); nothing else of gencnp.
"""

from gencnp.data.base import ImageDataModule, ResumableDataLoader, TensorImageDataset
from gencnp.data.modules import (
    FASHION_MNIST_CLASSES,
    CIFAR10DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    SyntheticPatterns,
)

__all__ = [
    "ImageDataModule",
    "ResumableDataLoader",
    "TensorImageDataset",
    "FASHION_MNIST_CLASSES",
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "SyntheticPatterns",
]
