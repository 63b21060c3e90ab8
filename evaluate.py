"""Evaluate pathways: ``python evaluate.py report|inspect|diffusion --config CONFIG``.

- ``report``: GEN-CNP, transferred class pathways and the baselines on the test split (``gencnp.evaluation.report``).
- ``inspect``: a bank's metadata, per-class summary and heatmap, without model or data (``gencnp.banks.bank``).
- ``diffusion``: pixel diffusion pathways (``gencnp.evaluation.diffusion``).
- ``lookup``: GEN-CNP's score ranking against the class lookup at shares of its counts, on validation
  (``gencnp.evaluation.lookup``).
- ``taps``: a model's candidate taps with channels, and what ``taps: auto`` picks (``gencnp.targets.taps.list_taps``).
- ``attribution``: input attributions against ground truth, sanity checks and deletion curves (``gencnp.evaluation.attributions``).
- ``detect``: pathway scores that flag attacked and out-of-distribution inputs, against pytorch-ood's detectors
  (``gencnp.detection``).
"""

from gencnp.commands import evaluate

if __name__ == "__main__":
    evaluate()
