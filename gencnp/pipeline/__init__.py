"""The main job: stages, stamps and reuse (``stages``), checks of every stage's inputs and outputs before anything
runs (``preflight``) and the runner (``run``; ``python -m gencnp.pipeline --config FILE``).

Top layer: may import anything in gencnp.
"""
