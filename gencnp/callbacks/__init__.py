"""Lightning callbacks: they observe a run and feed the data structures that live elsewhere (``gencnp.banks.bank``)."""

from gencnp.callbacks.bank_writer import PathwayBankWriter
from gencnp.callbacks.pathway_images import PathwayImageLogger
from gencnp.callbacks.prediction_writer import PathwayPredictionWriter, load_predictions

__all__ = ["PathwayBankWriter", "PathwayImageLogger", "PathwayPredictionWriter", "load_predictions"]
