"""The LightningCLI behind ``train.py``: the LightningModule and DataModule classes come from the config."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from gencnp.preflight import ConfigHintParser, preflight


class GenCNPCLI(LightningCLI):
    """``fit | validate | test | predict`` for any gencnp system. Model and data are checked against each
    other before the Trainer runs (and before loggers or checkpoints create any directory)."""

    def __init__(self, *args, **kwargs):
        # config.yaml in the log dir, and the resolved config into W&B/TensorBoard
        from gencnp.tracking import ConfigSaver

        kwargs.setdefault("save_config_callback", ConfigSaver)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", ConfigHintParser)  # "did you mean" for config keys that do not exist
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse wraps a constructor's own error (unknown tap, missing data folder, ...) in a long "Does
            # not validate against any of the Union subtypes" report; the constructor's message is the clear one.
            if err.__cause__ is not None and "Does not validate against any of the Union subtypes" in str(err):
                raise err.__cause__ from None
            raise

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        # Crash-safe checkpoints for every config (gencnp.checkpointing), unless one names its own CheckpointIO.
        from lightning.fabric.plugins import CheckpointIO

        from gencnp.checkpointing import AtomicCheckpointIO

        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        from gencnp.tracking import check_loggers  # a missing tracker package fails here, naming its pip extra

        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        check_loggers((cfg.get("trainer") or {}).get("logger"))

    def _check(self) -> None:
        check = getattr(self.model, "check_data", None)
        if check is not None:
            check(self.datamodule)
        # --ckpt_path read safely and fitting the model, output folders writable, online W&B reachable.
        preflight(self.trainer, self.model, (self.config.get(self.subcommand) or {}).get("ckpt_path"))

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
