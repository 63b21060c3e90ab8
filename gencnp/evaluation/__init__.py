"""Evaluation on trained systems and banks: the report (``report``), the class-lookup frontier (``lookup``), the
validation sweep (``sweep``), input attributions (``attributions``) and pixel diffusion pathways (``diffusion``).

May import every lower layer (io, targets, data, pathways, banks, systems, callbacks); never ``gencnp.pipeline`` or
``gencnp.cli``.
"""
