"""Files and checkpoints: atomic writes, JSON and figures (``files``), checkpoint hashes and safe readers with no
Lightning import (``checkpoints``), and Lightning's checkpoint plumbing (``checkpoint_io``: atomic ``CheckpointIO``,
``ModelCheckpoint``, verified loading; ``python -m gencnp.io.checkpoint_io seal FILE``).

Lowest layer: imports nothing from gencnp but ``settings``.
"""
