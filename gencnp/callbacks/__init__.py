"""Lightning callbacks: they observe a run and feed the data structures that live elsewhere (``gencnp.banks.bank``)."""

from gencnp.callbacks.bank_writer import PathwayBankWriter
from gencnp.callbacks.pathway_images import PathwayImageLogger
from gencnp.callbacks.prediction_writer import PathwayPredictionWriter, load_predictions
from gencnp.callbacks.preemption import EXIT_INTERRUPTED, PreemptionCheckpoint

__all__ = [
    "EXIT_INTERRUPTED",
    "PathwayBankWriter",
    "PathwayImageLogger",
    "PathwayPredictionWriter",
    "PreemptionCheckpoint",
    "load_predictions",
]
