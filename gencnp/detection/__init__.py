"""Flagging adversarial and out-of-distribution inputs with pathways, against pytorch-ood's detectors
(docs/design.md section 12; ``python evaluate.py detect --config configs/<data>/detect.yaml``).

An evaluation-layer package: it imports targets, data, pathways, banks and systems; only ``evaluate.py`` imports it.
"""

from gencnp.detection.run import detect

__all__ = ["detect"]
