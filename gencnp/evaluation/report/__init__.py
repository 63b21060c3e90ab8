"""Evaluation report: GEN-CNP, transferred class pathways and the baselines on the test split.

``python evaluate.py report --config configs/fashion_mnist/evaluate.yaml`` writes to ``out_dir``:

- ``report.json``: ``provenance``, ``methods`` (every method at GEN-CNP's per-sample and per-tap kept counts),
  ``methods_native`` (each baseline at its own setting), ``transfer`` (class pathways ``M_c`` of the bank) and
  ``subset`` (every method again on one seeded common subset). Every entry holds ``n``, ``images``,
  ``seconds_per_image`` and all keys of docs/design.md section 8 (unprefixed, ``kept/<tap>`` included); comparisons
  carry paired bootstrap 95% intervals of the difference to GEN-CNP on the same images (``vs_gencnp``).
- ``report.md``: tables, provenance, intervals and one sentence per comparison saying who wins.
- figures: ``agreement_vs_kept.png``, ``kept_hist.png``, ``bank_heatmap.png``, ``attribution_grid.png``.

Costs: ``gencnp``, ``random``, ``neuron_mct`` and ``transfer`` cover the whole split; ``neuron_intgrad`` (44
forward-backward passes per image on 4 taps) and ``dgr`` (30 optimisation steps) cover the subset.

Modules: ``run`` (``report()``: options, loading, the passes in order, the written files), ``evaluator`` (the
frozen target on its device: masked predictions, measurements, baselines, phase times), ``passes`` (the three
passes), ``results`` (per-sample results of one method), ``summaries`` (bootstrap, comparisons, entries, lookup
frontier, same-class transfer), ``provenance``, ``markdown`` (``report.md`` and the screen summary) and ``figures``.
"""

from gencnp.evaluation.report.markdown import TABLE_KEYS
from gencnp.evaluation.report.passes import BASELINES
from gencnp.evaluation.report.run import report
from gencnp.evaluation.report.summaries import BETTER, CI_KEYS, ci_keys, paired_bootstrap, same_class_partners

__all__ = [
    "report",
    "paired_bootstrap",
    "CI_KEYS",
    "BASELINES",
    "BETTER",
    "TABLE_KEYS",
    "ci_keys",
    "same_class_partners",
]
