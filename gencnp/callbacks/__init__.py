"""Lightning callbacks: they observe a run and feed the data structures that live elsewhere (``gencnp.banks``)."""

from gencnp.callbacks.bank_writer import PathwayBankWriter
from gencnp.callbacks.prediction_writer import PathwayPredictionWriter, load_predictions

__all__ = ["PathwayBankWriter", "PathwayPredictionWriter", "load_predictions"]
