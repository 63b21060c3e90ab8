"""The LightningCLI behind ``train.py``: the LightningModule and DataModule classes come from the config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import gencnp  # noqa: F401  (registers targets and makes class paths importable)
from gencnp.io.checkpoint_io import AtomicCheckpointIO, ModelCheckpoint, read_checkpoint
from gencnp.pipeline.preflight import ConfigHintParser, preflight
from gencnp.tracking import ConfigSaver, check_loggers  # a missing tracker package fails in check_loggers


class GenCNPCLI(LightningCLI):
    """``fit | validate | test | predict`` for any gencnp system. Model and data are checked against each
    other before the Trainer runs (and before loggers or checkpoints create any directory)."""

    def __init__(self, *args, **kwargs):
        # config.yaml in the log dir, and the resolved config into W&B/TensorBoard
        kwargs.setdefault("save_config_callback", ConfigSaver)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", ConfigHintParser)  # "did you mean" for config keys that do not exist
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads --ckpt_path here (for the hyper-parameters it stores, which then take precedence over the
        # config) with a bare torch.load, before any gencnp check: a truncated, altered or code-carrying file must
        # fail with gencnp's message instead (gencnp.io.checkpoint_io.read_checkpoint).
        subcommand = self.config.get("subcommand")
        cfg = (self.config.get(subcommand) or {}) if subcommand else {}
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            written_by = (read_checkpoint(ckpt_path).get("hyper_parameters") or {}).get("_class_path")
            configured = (cfg.get("model") or {}).get("class_path")
            # Lightning would silently swap the configured model class for the checkpoint's (a target checkpoint
            # given to a GEN-CNP config would train or evaluate a TargetClassifier).
            if written_by and configured and written_by != configured:
                hint = (
                    " A target classifier's checkpoint goes to model.init_args.target_checkpoint, not --ckpt_path."
                    if written_by.endswith("TargetClassifier")
                    else ""
                )
                raise ValueError(
                    f"--ckpt_path '{ckpt_path}' was written by {written_by}, but the config's model is {configured}; "
                    f"nothing was run.{hint} Pass a checkpoint of {configured} (or the config that trained this "
                    "checkpoint)."
                )
        super()._parse_ckpt_path()

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
        # Crash-safe checkpoints for every config (gencnp.io.checkpoint_io), unless one names its own CheckpointIO.
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        trainer = super()._instantiate_trainer(config, callbacks)
        # last.ckpt always holds the newest state (Lightning 2.6 leaves it at the last improvement of the monitored
        # metric, so --ckpt_path last would resume from an older state): see gencnp.io.checkpoint_io.ModelCheckpoint.
        for cb in trainer.callbacks:
            if type(cb) is LightningModelCheckpoint:
                cb.__class__ = ModelCheckpoint  # same state_key: checkpoints stay interchangeable
        return trainer

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        check_loggers((cfg.get("trainer") or {}).get("logger"))

    def _check(self) -> None:
        check = getattr(self.model, "check_data", None)
        if check is not None:
            check(self.datamodule)
        # --ckpt_path read safely and fitting the model, output folders writable, the first images of the splits
        # read of the right shape and finite, online W&B reachable.
        preflight(
            self.trainer,
            self.model,
            (self.config.get(self.subcommand) or {}).get("ckpt_path"),
            datamodule=self.datamodule,
            stage=self.subcommand,
        )

    def before_fit(self) -> None:
        self._check()

    def before_validate(self) -> None:
        self._check()

    def before_test(self) -> None:
        self._check()

    def before_predict(self) -> None:
        self._check()


def importable_cwd() -> None:
    """Put the working directory first on ``sys.path``: a target given by class path (``mynet.MyNet``) or a module
    with ``@register_target`` can live next to the configs. ``python train.py`` alone puts only the script's own
    folder there."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path[:1]:
        sys.path.insert(0, cwd)


def main(args=None) -> GenCNPCLI:
    importable_cwd()

    return GenCNPCLI(args=args)
