"""Evaluate pathways: ``python evaluate.py report|inspect|diffusion --config CONFIG``.

- ``report``: GEN-CNP, transferred class pathways and the baselines on the test split (``gencnp.evaluation.report``).
- ``inspect``: a bank's metadata, per-class summary and heatmap, without model or data (``gencnp.banks.bank``).
- ``diffusion``: pixel diffusion pathways (``gencnp.evaluation.diffusion``).
- ``lookup``: GEN-CNP's score ranking against the class lookup at shares of its counts, on validation
  (``gencnp.evaluation.lookup``).
- ``taps``: a model's candidate taps with channels, and what ``taps: auto`` picks (``gencnp.targets.taps.list_taps``).
- ``attribution``: input attributions against ground truth, sanity checks and deletion curves (``gencnp.evaluation.attributions``).
"""

from jsonargparse import CLI

from gencnp.banks.bank import inspect_bank
from gencnp.cli import importable_cwd
from gencnp.evaluation.attributions.evaluate import attribution
from gencnp.evaluation.diffusion import diffusion
from gencnp.evaluation.lookup import lookup_frontier
from gencnp.evaluation.report import report
from gencnp.pipeline.preflight import ConfigHintArgumentParser
from gencnp.targets.taps import list_taps

if __name__ == "__main__":
    importable_cwd()  # targets given by class path resolve from the working directory
    CLI(
        {
            "report": report,
            "inspect": inspect_bank,
            "diffusion": diffusion,
            "lookup": lookup_frontier,
            "taps": list_taps,
            "attribution": attribution,
        },
        as_positional=False,
        parser_class=ConfigHintArgumentParser,
    )  # "did you mean" for config keys that do not exist
