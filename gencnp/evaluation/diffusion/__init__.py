"""Pixel diffusion pathways (docs/design.md section 9), after Lyu, Pang, Wang (Neural Networks 2024, arXiv
2402.18132). Plain PyTorch for the maths; the method is described in ``engine.py``.

- ``chain.py``: the target traced into a checked plain chain of modules (``trace_chain``, ``SUPPORTED_MODULES``).
- ``engine.py``: ``PixelDiffusion`` (frozen linearisation, impulses, transfers, beam search) and its kernels.
- ``stats.py``: pixels, crossing counts, the causal channel test, perturbations and the statistical tests.
- ``render.py``: ``diffusion.md`` and the ``diffusion_*.png`` figures.
- ``entry.py``: ``diffusion()``, the entry point of ``python evaluate.py diffusion``.
"""

from gencnp.evaluation.diffusion.chain import SUPPORTED_MODULES, UnsupportedModuleError
from gencnp.evaluation.diffusion.engine import FrozenPattern, PixelDiffusion, Window, exact_pathways
from gencnp.evaluation.diffusion.entry import _bank_overlap, diffusion  # noqa: F401 (tests import _bank_overlap from here)
from gencnp.evaluation.diffusion.stats import (  # noqa: F401 (tests import _class_sums and _within_between from here)
    _class_sums,
    _within_between,
    channel_importance,
    class_similarity,
    crossing_counts,
    hypergeom_sf,
    overlap_test,
    perturb,
    select_pixels,
)

__all__ = [
    "PixelDiffusion",
    "FrozenPattern",
    "Window",
    "UnsupportedModuleError",
    "SUPPORTED_MODULES",
    "select_pixels",
    "crossing_counts",
    "channel_importance",
    "overlap_test",
    "class_similarity",
    "perturb",
    "hypergeom_sf",
    "exact_pathways",
    "diffusion",
]
