"""LightningDataModules: the shared base (``base``: splits, conversion, resumable loaders) and the data sets
(``modules``: Fashion-MNIST, CIFAR-10, ImageFolder, synthetic patterns; ``shaped``: ImageNet-shaped synthetic
data; ``shards``: litdata streaming shards, imported on demand).

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
from gencnp.data.shaped import ImageNetShapedDataModule, ShapedImages

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
    "ImageNetShapedDataModule",
    "ShapedImages",
]
