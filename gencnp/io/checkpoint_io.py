"""Checkpoints that survive crashes and refuse damage: atomic writes, an integrity hash, safe reads.

- ``AtomicCheckpointIO``: a Lightning ``CheckpointIO`` plugin. Saving serialises the checkpoint in memory, writes it
  to a temporary file **in the checkpoint's own directory**, fsyncs and ``os.replace``-s it into place
  (``gencnp.io.files.write_atomic``), so a process killed mid-save (SIGKILL, power loss) leaves the previous
  ``last.ckpt`` intact and never a truncated one. It also records ``gencnp_state_hash``, a sha256 over the
  checkpoint's ``state_dict`` (names, dtypes, shapes, bytes), and ``gencnp_settings_hash``, the same hash over the
  ``state_dict`` together with the settings that rebuild the model (``hyper_parameters``,
  ``datamodule_hyper_parameters``, GenCNP's ``gencnp`` section and the data's ``class_names``; ``seal``). Loading always uses
  ``torch.load(weights_only=True)``.
- ``verify_state_hash``: a Lightning checkpoint (a dict with a ``state_dict``) must carry both hashes and match
  them. One without them (written by another tool, by an older gencnp, or with the hash removed) is refused unless
  the user opts in with ``GENCNP_ALLOW_UNHASHED=1``, which loads it with a warning.
  ``gencnp.cli`` adds the plugin to every Trainer it builds unless the config names another ``CheckpointIO``.
- ``read_checkpoint``: the one safe reader of checkpoints (``weights_only=True``, clear errors for missing, truncated,
  altered or code-carrying files); ``read_state_dict``, the reader of target weights, takes safetensors files and
  plain state dicts too, checking Lightning checkpoints' hashes the same way.
- ``ModelCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state, so that
  ``--ckpt_path last`` resumes where a crashed run stopped. ``gencnp.cli`` upgrades every plain Lightning
  ``ModelCheckpoint`` of a config to it.

Why not Lightning's default: ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file is
created by ``tempfile.mkstemp()`` in the **system** temporary directory and moved with ``shutil.move``. That is an
atomic rename only when the system temporary directory and the checkpoint directory share a filesystem; otherwise
it is a copy into place (a kill mid-copy leaves a truncated checkpoint), and nothing is fsynced. Torch's zip format
does not notice altered tensor bytes on load either, hence the hash.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from gencnp.io import checkpoints as checkpoint_files
from gencnp.io.checkpoints import *  # noqa: F403  (checkpointing re-exports the hashes and readers)
from gencnp.io.checkpoints import SETTINGS_HASH_KEY, read_checkpoint, seal
from gencnp.io.files import write_atomic

__all__ = ["AtomicCheckpointIO", "ModelCheckpoint", "VerifiedLoading", "main", *checkpoint_files.__all__]


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with crash-safe saving, an integrity hash and ``weights_only=True`` loading.

    Use it in YAML as ``trainer.plugins: [gencnp.io.checkpoint_io.AtomicCheckpointIO]`` (``gencnp.cli`` adds it on
    its own when no other ``CheckpointIO`` is configured), or ``Trainer(plugins=[AtomicCheckpointIO()])``.
    Remote paths (``s3://``, ...) fall back to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO takes no storage_options (got {storage_options!r}); drop them, or configure "
                "another CheckpointIO plugin that supports them."
            )
        seal(checkpoint)
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path)

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(str(path).removeprefix("file://"), buffer.getvalue())

    def load_checkpoint(
        self, path: Any, map_location: Callable | Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        # weights_only is always True here: a checkpoint is data, never code.
        return read_checkpoint(str(path).removeprefix("file://"), map_location=map_location)


class VerifiedLoading:
    """Mixin for a ``LightningModule``: ``load_from_checkpoint(path, **overrides)`` first reads the file with
    ``read_checkpoint`` (weights and hyper-parameters checked against their hashes, unhashed files refused), before
    Lightning applies the keyword overrides to the stored hyper-parameters."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(checkpoint_path, (str, os.PathLike)) and _is_local(checkpoint_path):
            read_checkpoint(str(checkpoint_path).removeprefix("file://"))
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``save_last: true`` meaning "``last.ckpt`` is the newest state".

    Lightning 2.6 writes ``last.ckpt`` only in a step where a top-k checkpoint is written too. With a ``monitor``
    that is a step where the metric *improved*: once it stops improving, ``last.ckpt`` stays behind, a crashed run
    resumed with ``--ckpt_path last`` silently goes back to the best checkpoint (epochs of work lost), and a finished
    run's final weights are in no file at all. Here ``last.ckpt`` is also written after every validation (or every
    training epoch when it saves at epoch ends) and when training ends, whenever it does not hold that step yet.
    A run whose ``max_steps`` ends before its first validation validates at its last step, so it writes its
    monitored checkpoint too. Everything else (top-k files, ``save_last: link``, the callback's state in checkpoints)
    is Lightning's.
    """

    _latest_step: int | None = None  # the global step last.ckpt holds (class default: instances upgraded in place)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        # A run shorter than its first validation (max_steps below an epoch) would end without validating, so
        # best.ckpt would never be written: validate at its last step instead.
        steps = trainer.max_steps
        if (
            steps is None
            or steps < 0
            or not trainer.limit_val_batches
            or trainer.check_val_every_n_epoch not in (1, None)
        ):
            return
        batches = (steps - trainer.global_step) * trainer.accumulate_grad_batches
        check = trainer.val_check_batch
        if trainer.current_epoch == 0 and isinstance(check, (int, float)) and 0 < batches < check:
            trainer.val_check_batch = batches

    def _save_last_checkpoint(self, trainer: Any, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._latest_step = trainer.global_step

    def _keep_latest(self, trainer: Any) -> None:
        if self.save_last is not True or trainer.fast_dev_run or trainer.sanity_checking:
            return
        if trainer.state.fn != TrainerFn.FITTING or self._latest_step == trainer.global_step:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._keep_latest(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._keep_latest(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        self._keep_latest(trainer)


def main(argv: list[str] | None = None) -> int:
    """``python -m gencnp.io.checkpoint_io seal FILE...``: record the integrity hashes in checkpoints you trust.

    For checkpoints written by an older gencnp (weights hash only) or by another Lightning tool. A file whose
    recorded weights hash does not match is refused (it was damaged); the file is rewritten atomically.
    """
    p = argparse.ArgumentParser(prog="python -m gencnp.io.checkpoint_io", description=main.__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["seal"])
    p.add_argument("files", nargs="+", help="checkpoint files (.ckpt) to seal in place")
    a = p.parse_args(argv)

    for path in a.files:
        try:
            # This command is the explicit opt-in; a weights hash that does not match is still refused.
            checkpoint = read_checkpoint(path, allow_unhashed=True)
            if not isinstance(checkpoint.get("state_dict"), Mapping):
                raise ValueError(f"'{path}' has no 'state_dict': it is a plain state dict, which needs no seal")
            buffer = io.BytesIO()
            torch.save(seal(checkpoint), buffer)
            write_atomic(path, buffer.getvalue())
        except (OSError, ValueError) as err:
            print(f"seal: {err}", flush=True)
            return 2
        print(f"sealed {path}: {checkpoint[SETTINGS_HASH_KEY][:12]} (weights and hyper-parameters)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
