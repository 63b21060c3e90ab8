"""Pathway maths with no Lightning import: the generator (``generator``), losses (``losses``), null inputs
(``nulls``), baseline pathway methods on the shared masking backend (``baselines``), metrics (``metrics``), the
selection score and tau rule (``selection``) and gradients through a pathway (``gradients``).

May import ``gencnp.targets`` and the base modules.
"""
