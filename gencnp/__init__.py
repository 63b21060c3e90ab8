"""gencnp: GEN-CNP neural-pathway explanations (Lin et al., arXiv 2309.09887) on PyTorch Lightning."""

from gencnp.banks import PathwayBank
from gencnp.data import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
)
from gencnp.generator import PathwayGenerator, daq
from gencnp.registry import Registry
from gencnp.shaped_data import ImageNetShapedDataModule
from gencnp.systems import GenCNP, TargetClassifier
from gencnp.targets import FrozenTarget, create_target, list_targets, load_target, register_target
from gencnp.version import __version__

__all__ = [
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "ImageNetShapedDataModule",
    "PathwayBank",
    "PathwayGenerator",
    "daq",
    "Registry",
    "GenCNP",
    "TargetClassifier",
    "FrozenTarget",
    "create_target",
    "list_targets",
    "load_target",
    "register_target",
    "__version__",
]
