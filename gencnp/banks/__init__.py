"""Pathway banks: per-class channel selection counts (``bank``: ``PathwayBank``, ``inspect_bank``) and their
file format (``file``: safetensors plus JSON metadata, checksums).

May import ``gencnp.pathways``, ``gencnp.targets``, ``gencnp.io`` and the base modules.
"""

from gencnp.banks.bank import DEFAULT_TAUS, FORMAT_VERSION, PathwayBank, choose_tau, inspect_bank
from gencnp.banks.file import DEFAULT_BANK

__all__ = ["DEFAULT_BANK", "DEFAULT_TAUS", "FORMAT_VERSION", "PathwayBank", "choose_tau", "inspect_bank"]
