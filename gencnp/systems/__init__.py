"""LightningModules: ``GenCNP`` (``gencnp``: trains the pathway generator), its training step's parts
(``training``) and ``TargetClassifier`` (``classifier``: trains a target).

Systems orchestrate; the maths lives in ``gencnp.pathways``. May import every lower layer (io, targets, data,
pathways, banks).
"""

from gencnp.systems.classifier import TargetClassifier
from gencnp.systems.gencnp import DEFAULT_NULL_FAMILIES, FORMAT_VERSION, GenCNP

__all__ = ["DEFAULT_NULL_FAMILIES", "FORMAT_VERSION", "GenCNP", "TargetClassifier"]
