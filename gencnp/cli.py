"""The LightningCLI behind ``train.py``: the LightningModule and DataModule classes come from the config."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


class GenCNPCLI(LightningCLI):
    """``fit | validate | test | predict`` for any gencnp system. Model and data are checked against each
    other before the Trainer runs (and before loggers or checkpoints create any directory)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def _check(self) -> None:
        check = getattr(self.model, "check_data", None)
        if check is not None:
            check(self.datamodule)

    def before_fit(self) -> None:
        self._check()

    def before_validate(self) -> None:
        self._check()

    def before_test(self) -> None:
        self._check()

    def before_predict(self) -> None:
        self._check()


def main(args=None) -> GenCNPCLI:
    import gencnp  # noqa: F401  (registers targets and makes class paths importable)

    return GenCNPCLI(args=args)
