"""Experiment tracking: checks and config logging for the Lightning loggers a config chooses.

Loggers are plain Lightning loggers picked in YAML (``trainer.logger``); ready-made ones live in
``configs/loggers/{csv,tensorboard,wandb}.yaml`` and are used as ``--trainer.logger configs/loggers/wandb.yaml``.

- ``check_loggers``: fails before anything is instantiated when a chosen logger's package is missing, with the
  ``pip install`` line that fixes it (Lightning's own TensorBoard message does not name gencnp's extra).
- ``ConfigSaver``: LightningCLI's ``SaveConfigCallback`` (``config.yaml`` in the logger's directory) that also
  hands the resolved config to the trackers: the W&B run config (and ``resolved_config.yaml`` in the run's files),
  a ``config`` text entry in TensorBoard.

W&B stays offline unless the user chooses online: ``configs/loggers/wandb.yaml`` sets ``offline: true``, which
needs no API key and no network. (The network pre-check for online W&B lives in ``gencnp.cli``.)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from typing import Any

import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

__all__ = ["check_loggers", "logger_class_paths", "ConfigSaver", "TENSORBOARD_INSTALL"]

TENSORBOARD_INSTALL = 'pip install -e ".[tb]"'


def _tensorboard_available() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def logger_class_paths(logger: Any) -> list[str]:
    """The class paths named by a ``trainer.logger`` config value (a bool, one class spec, or a list of them)."""
    if logger is None or isinstance(logger, bool):
        return []
    items: Iterable[Any] = logger if isinstance(logger, (list, tuple)) else [logger]
    paths = []
    for item in items:
        if isinstance(item, str):
            paths.append(item)
            continue
        get = item.get if hasattr(item, "get") else lambda k, d=None, _i=item: getattr(_i, k, d)
        path = get("class_path", None)
        if path is not None:
            paths.append(str(path))
        else:  # an instantiated logger
            paths.append(f"{type(item).__module__}.{type(item).__name__}")
    return paths


def check_loggers(logger: Any) -> None:
    """Raise before instantiation when a chosen logger cannot work in this environment.

    Args:
        logger: the resolved ``trainer.logger`` value (``True``/``False``, a ``class_path`` spec or a list).

    Raises:
        ModuleNotFoundError: TensorBoard chosen but neither ``tensorboard`` nor ``tensorboardX`` installed.
    """
    for path in logger_class_paths(logger):
        if path.rsplit(".", 1)[-1] == "TensorBoardLogger" and not _tensorboard_available():
            raise ModuleNotFoundError(
                f"trainer.logger selects {path}, but the `tensorboard` package is not installed. Install it with "
                f"{TENSORBOARD_INSTALL} (or pip install tensorboard), or choose another logger, e.g. "
                "--trainer.logger configs/loggers/csv.yaml."
            )


class ConfigSaver(SaveConfigCallback):
    """Save the resolved config to the log directory (``config.yaml``) and into every tracker.

    - W&B: ``run.config['config']`` holds the resolved config (nested), and ``resolved_config.yaml`` is written
      into the run's files (``wandb/<run>/files``), so ``python train.py fit --config resolved_config.yaml``
      reproduces the run.
    - TensorBoard: a ``config`` text entry with the YAML.
    - CSV: ``config.yaml`` in the version folder (the base class), next to ``hparams.yaml`` and ``metrics.csv``.

    Model hyper-parameters (``save_hyperparameters``) reach every logger through Lightning itself.
    """

    def save_config(self, trainer, pl_module, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]
        if not loggers:
            return
        text = self.parser.dump(self.config, skip_none=False)
        for lg in loggers:
            if isinstance(lg, WandbLogger):
                run = lg.experiment
                run.config.update({"config": yaml.safe_load(text)}, allow_val_change=True)
                folder = getattr(run, "dir", None)
                if folder:
                    with open(os.path.join(folder, "resolved_config.yaml"), "w", encoding="utf-8") as f:
                        f.write(text)
            else:
                lg.experiment.add_text("config", f"```yaml\n{text}\n```", global_step=trainer.global_step)
