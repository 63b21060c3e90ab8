"""Evaluate pathways: ``python evaluate.py report|inspect|diffusion --config CONFIG``.

- ``report``: GEN-CNP, transferred class pathways and the baselines on the test split (``gencnp.report``).
- ``inspect``: a bank's metadata, per-class summary and heatmap, without model or data (``gencnp.banks``).
- ``diffusion``: pixel diffusion pathways (``gencnp.diffusion``).
- ``attribution``: input attributions against ground truth, sanity checks and deletion curves (``gencnp.attributions``).
"""

from jsonargparse import CLI

from gencnp.attributions.evaluate import attribution
from gencnp.banks import inspect_bank
from gencnp.diffusion import diffusion
from gencnp.preflight import ConfigHintArgumentParser
from gencnp.report import report

if __name__ == "__main__":
    CLI({"report": report, "inspect": inspect_bank, "diffusion": diffusion, "attribution": attribution}, as_positional=False,
        parser_class=ConfigHintArgumentParser)  # "did you mean" for config keys that do not exist
