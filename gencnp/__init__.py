"""gencnp: GEN-CNP neural-pathway explanations (Lin et al., arXiv 2309.09887) on PyTorch Lightning."""

from gencnp.banks.bank import PathwayBank
from gencnp.data.modules import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
)
from gencnp.data.shaped import ImageNetShapedDataModule
from gencnp.pathways.generator import PathwayGenerator, daq
from gencnp.registry import Registry
from gencnp.systems.gencnp import GenCNP, TargetClassifier
from gencnp.targets.loading import FrozenTarget, create_target, list_targets, load_target, register_target
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
