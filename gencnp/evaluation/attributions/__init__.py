"""Input attributions (pathway gradients beside Captum's methods) and their evaluation.

``attribute(method, model, x, target)`` is the one verb (``methods.py``); ``metrics.py`` holds the measures
(relevance mass, pointing game, SSIM, Spearman, deletion/insertion, bootstrap); ``evaluate.py`` is
``python evaluate.py attribution``. The older ``gencnp.pathways.gradients`` module (pathway gradient and Grad-CAM through a
pathway, used by the training-time pictures and the report) stays as it is.
"""

from gencnp.evaluation.attributions.methods import (
    ATTRIBUTION_METHODS,
    AttributionModel,
    attribute,
    cascade_layers,
    randomised,
)
from gencnp.evaluation.attributions.metrics import (
    auc,
    bootstrap,
    deletion_insertion,
    normalise,
    pointing_game,
    relevance_mass,
    spearman,
    ssim,
)

__all__ = [
    "ATTRIBUTION_METHODS",
    "AttributionModel",
    "attribute",
    "cascade_layers",
    "randomised",
    "auc",
    "bootstrap",
    "deletion_insertion",
    "normalise",
    "pointing_game",
    "relevance_mass",
    "spearman",
    "ssim",
]
