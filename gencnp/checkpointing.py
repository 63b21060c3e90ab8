"""Checkpoints that survive crashes and refuse damage: atomic writes, an integrity hash, safe reads.

- ``AtomicCheckpointIO``: a Lightning ``CheckpointIO`` plugin. Saving serialises the checkpoint in memory, writes it
  to a temporary file **in the checkpoint's own directory**, fsyncs and ``os.replace``-s it into place
  (``gencnp.fileio.write_atomic``), so a process killed mid-save (SIGKILL, power loss) leaves the previous
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
import hashlib
import io
import json
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from safetensors import safe_open

from gencnp.fileio import write_atomic

__all__ = [
    "AtomicCheckpointIO", "ModelCheckpoint", "read_checkpoint", "read_state_dict", "state_hash", "verify_state_hash", "seal",
    "VerifiedLoading", "STATE_HASH_KEY", "SETTINGS_HASH_KEY", "ALLOW_UNHASHED_ENV",
]  # fmt: skip

STATE_HASH_KEY = "gencnp_state_hash"
SETTINGS_HASH_KEY = "gencnp_settings_hash"
SETTINGS_SECTIONS = ("hyper_parameters", "datamodule_hyper_parameters", "gencnp", "class_names")
ALLOW_UNHASHED_ENV = "GENCNP_ALLOW_UNHASHED"


def state_hash(state: Mapping[str, torch.Tensor], settings: Mapping[str, Any] | None = None) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted by name), and, when given,
    over ``settings`` (canonical JSON: sorted keys, ``repr`` for anything JSON cannot hold).

    Non-tensor entries (Lightning may store extra state objects) contribute their ``repr``.
    """
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(str(name).encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(t).encode())
    if settings is not None:
        try:
            text = json.dumps(settings, sort_keys=True, default=repr)
        except TypeError:  # keys of mixed types cannot be sorted
            text = repr(sorted(settings.items(), key=lambda kv: str(kv[0])))
        h.update(b"\0settings\0" + text.encode())
    return h.hexdigest()


def _settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    return {k: checkpoint[k] for k in SETTINGS_SECTIONS if k in checkpoint}


def seal(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Record both integrity hashes in a checkpoint dict (``AtomicCheckpointIO`` does it on every save); returns it.

    Use it after editing a checkpoint on purpose; any other change after saving is refused on loading.
    """
    if isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint[STATE_HASH_KEY] = state_hash(checkpoint["state_dict"])
        checkpoint[SETTINGS_HASH_KEY] = state_hash(checkpoint["state_dict"], _settings(checkpoint))
    return checkpoint


def _unhashed(source: str, what: str, allow: bool = False) -> None:
    """Refuse a checkpoint whose integrity cannot be checked, unless the user opted in (then warn)."""
    if allow:
        return
    if os.environ.get(ALLOW_UNHASHED_ENV, "").strip().lower() in ("1", "true", "yes"):
        warnings.warn(
            f"{source} {what}; loading it anyway because {ALLOW_UNHASHED_ENV} is set: alterations of its weights or "
            "hyper-parameters cannot be detected.",
            UserWarning,
            stacklevel=3,
        )
        return
    raise ValueError(
        f"{source} {what}, so damage or edits after saving cannot be detected; nothing was run. Use a checkpoint "
        f"written by gencnp (python train.py fit --config ...), or, if you trust this file, opt in explicitly with "
        f"{ALLOW_UNHASHED_ENV}=1 (it is then loaded with a warning) or record its hashes once with "
        "`python -m gencnp.checkpointing seal FILE`."
    )


def verify_state_hash(checkpoint: Mapping[str, Any], source: str = "this checkpoint", allow_unhashed: bool = False,
                      settings: bool = True) -> None:  # fmt: skip
    """Raise ``ValueError`` when a checkpoint's ``state_dict`` or settings no longer match the hashes recorded at
    saving, or when it carries no hashes (unless ``GENCNP_ALLOW_UNHASHED=1``: then a warning).

    A plain state dict (no ``state_dict`` key: ``torch.save(model.state_dict())``) is not a checkpoint and is not
    checked here. ``allow_unhashed`` accepts missing hashes silently (``seal``'s command line only); with
    ``settings=False`` only the weights are checked (for hooks that see the hyper-parameters after Lightning applied
    ``load_from_checkpoint``'s keyword overrides; the file itself was checked when it was read).
    """
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        return
    recorded = checkpoint.get(STATE_HASH_KEY)
    if recorded is None:
        return _unhashed(source, f"carries no integrity hash ('{STATE_HASH_KEY}': written by another tool, or the "
                                 "hash was removed)", allow_unhashed)  # fmt: skip
    computed = state_hash(checkpoint["state_dict"])
    if computed != recorded:
        raise ValueError(
            f"{source} is damaged: its weights do not match the integrity hash recorded when it was saved "
            f"(sha256 {str(recorded)[:12]} recorded, {computed[:12]} computed), so the file was altered or corrupted "
            "after saving. Restore the original file (or an earlier copy), or retrain: python train.py fit --config ..."
        )
    if not settings:
        return
    recorded = checkpoint.get(SETTINGS_HASH_KEY)
    if recorded is None:
        return _unhashed(source, f"carries no hash of its hyper-parameters ('{SETTINGS_HASH_KEY}': written by an "
                                 "older gencnp, or the hash was removed)", allow_unhashed)  # fmt: skip
    computed = state_hash(checkpoint["state_dict"], _settings(checkpoint))
    if computed != recorded:
        raise ValueError(
            f"{source} is damaged: its hyper-parameters (the settings that rebuild the model: "
            f"{', '.join(k for k in SETTINGS_SECTIONS if k in checkpoint)}) do not match the integrity hash recorded "
            f"when it was saved (sha256 {str(recorded)[:12]} recorded, {computed[:12]} computed): they were edited "
            "after saving. Restore the original file, or change settings through the config of a new run "
            "(python train.py fit --config ...), not inside a checkpoint."
        )


def read_checkpoint(path: str | Path, map_location: Any = "cpu", allow_unhashed: bool = False) -> dict[str, Any]:
    """Load a checkpoint safely: ``torch.load(weights_only=True)``, integrity hash checked when present.

    A crafted pickle (one whose ``__reduce__`` would run code) is refused before anything in it runs.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, not a torch checkpoint, holds arbitrary Python objects, or was altered.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint '{path}' does not exist; fix the path, or train one (python train.py fit --config ...)."
        )
    try:
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint '{path}' was refused: it holds Python objects other than tensors and plain containers, and "
            f"gencnp loads checkpoints with weights_only=True so that no code in a file ever runs ({first}). Use a "
            "checkpoint written by gencnp/Lightning, or, if you trust its origin, re-save its tensors with "
            "torch.save(state_dict, path)."
        ) from err
    except Exception as err:  # truncated zip, bad magic number, EOF, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint '{path}' is damaged or not a torch checkpoint ({type(err).__name__}: {first}). It was "
            "truncated (an interrupted copy?) or altered; copy it again, or retrain (python train.py fit --config ...)."
        ) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a checkpoint dict; pass a Lightning .ckpt "
            "or a torch.save'd state dict."
        )
    verify_state_hash(checkpoint, f"checkpoint '{path}'", allow_unhashed)
    return checkpoint


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint: safetensors, Lightning ``.ckpt`` or a plain ``torch.save`` dict.

    The reader of target weights (``read_checkpoint`` reads whole Lightning checkpoints): it also takes safetensors
    files and plain state dicts, and its messages speak of re-saving weights. Every ``torch.load`` uses ``weights_only=True``: a crafted pickle is refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; train one (python train.py fit --config ...) or fix the path.")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:
            raise ValueError(f"checkpoint '{path}' is not a readable safetensors file ({err}); re-export it.") from err
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"checkpoint '{path}' could not be loaded safely (weights_only=True): {str(err).splitlines()[0]}. "
            "It is truncated, altered, or holds arbitrary Python objects; gencnp never unpickles code. "
            "Re-save it with torch.save(model.state_dict(), path) or as safetensors."
        ) from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        verify_state_hash(obj, f"checkpoint '{path}'")  # altered tensor bytes load silently otherwise
        meta = {k: v for k, v in obj.items() if k != "state_dict" and k not in ("optimizer_states", "lr_schedulers")}
        return obj["state_dict"], meta
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ValueError(f"checkpoint '{path}' holds {type(obj).__name__}, not a state dict of tensors.")


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with crash-safe saving, an integrity hash and ``weights_only=True`` loading.

    Use it in YAML as ``trainer.plugins: [gencnp.checkpointing.AtomicCheckpointIO]`` (``gencnp.cli`` adds it on
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
        if steps is None or steps < 0 or not trainer.limit_val_batches or trainer.check_val_every_n_epoch not in (1, None):
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
    """``python -m gencnp.checkpointing seal FILE...``: record the integrity hashes in checkpoints you trust.

    For checkpoints written by an older gencnp (weights hash only) or by another Lightning tool. A file whose
    recorded weights hash does not match is refused (it was damaged); the file is rewritten atomically.
    """
    p = argparse.ArgumentParser(prog="python -m gencnp.checkpointing", description=main.__doc__.split("\n\n")[0])
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
