"""Checkpoint files without Lightning: the integrity hashes (``state_hash``, ``seal``, ``verify_state_hash``) and the
safe readers (``read_checkpoint`` for checkpoints, ``read_state_dict`` for target weights). ``gencnp.io.checkpoint_io``
(the Lightning plugins) re-exports every name; modules that must not import Lightning (``targets``) use this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

__all__ = [
    "read_checkpoint",
    "read_state_dict",
    "state_hash",
    "verify_state_hash",
    "seal",
    "STATE_HASH_KEY",
    "SETTINGS_HASH_KEY",
    "SETTINGS_SECTIONS",
    "ALLOW_UNHASHED_ENV",
]

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
        "`python -m gencnp.io.checkpoint_io seal FILE`."
    )


def verify_state_hash(
    checkpoint: Mapping[str, Any], source: str = "this checkpoint", allow_unhashed: bool = False, settings: bool = True
) -> None:
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
        return _unhashed(
            source,
            f"carries no integrity hash ('{STATE_HASH_KEY}': written by another tool, or the hash was removed)",
            allow_unhashed,
        )
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
        return _unhashed(
            source,
            f"carries no hash of its hyper-parameters ('{SETTINGS_HASH_KEY}': written by an "
            "older gencnp, or the hash was removed)",
            allow_unhashed,
        )
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
        raise FileNotFoundError(
            f"checkpoint '{path}' does not exist; train one (python train.py fit --config ...) or fix the path."
        )
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
