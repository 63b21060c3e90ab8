"""Checks that run before a Trainer touches anything, so that bad input fails in seconds and leaves nothing behind.

``gencnp.cli`` calls ``preflight`` after the classes are instantiated and before ``fit``/``validate``/``test``/
``predict`` (the Trainer creates log folders, writes ``config.yaml`` and loads ``--ckpt_path`` only later):

- ``check_checkpoint``: ``--ckpt_path`` (``last`` included) is read safely (``gencnp.io.checkpoint_io.read_checkpoint``)
  and must fit the model (``model.check_checkpoint`` when the system has one, then the state-dict keys and shapes).
- ``check_class_names``: the data's class names equal those recorded in ``--ckpt_path`` and in the target
  checkpoint (names and order).
- ``check_outputs``: every folder the run will write (checkpoint ``dirpath``, logger ``save_dir``, bank and
  prediction writers' paths) must be writable.
- ``check_inputs``: the first images of every split the command reads have the shape the model expects and
  finite values (a NaN file or a zero ``std`` fails here, not after the log folder exists; a NaN further in still
  stops the run at its batch, see ``gencnp.systems.gencnp``).
- ``check_wandb_online``: a ``WandbLogger`` in online mode needs an API key and a reachable host; without a key
  W&B fails after about 4 s, with a key but no network it hangs for about 105 s. This check takes at most
  ``timeout`` seconds (a TCP connect) and says how to log offline instead.

``ConfigHintParser`` adds "did you mean" hints to the parser's message when a config key does not exist.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import netrc
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import WandbLogger

from gencnp.banks.bank import _diff_names
from gencnp.io.checkpoint_io import read_checkpoint, read_state_dict
from gencnp.io.files import check_writable_dir
from gencnp.targets.loading import state_mismatch

__all__ = [
    "preflight",
    "check_checkpoint",
    "check_class_names",
    "check_outputs",
    "check_inputs",
    "check_wandb_online",
    "config_hint",
    "ConfigHintParser",
    "ConfigHintArgumentParser",
    "resolve_ckpt_path",
]

_OFFLINE_FIX = (
    "Log offline instead (nothing uploaded, no key or network needed): --trainer.logger.init_args.offline true, or "
    "WANDB_MODE=offline (upload later with `wandb sync <run folder>`), or --trainer.logger configs/loggers/csv.yaml."
)


# ----- checkpoints -----
def resolve_ckpt_path(trainer: Any, ckpt_path: str | None) -> Path | None:
    """The file ``--ckpt_path`` names: ``'last'`` is the newest ``last*.ckpt`` in a ``ModelCheckpoint`` dirpath
    (``None`` when there is none yet: Lightning then starts from scratch); ``'best'``/``'hpc'``/``'registry'`` and
    remote paths are left to Lightning."""
    if ckpt_path is None or "://" in str(ckpt_path):
        return None
    ckpt_path = str(ckpt_path)
    if ckpt_path in ("best", "hpc", "registry") or ckpt_path.startswith("registry:"):
        return None
    if ckpt_path == "last":
        found = []
        for cb in getattr(trainer, "callbacks", []) or []:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath and "://" not in str(cb.dirpath):
                found += Path(cb.dirpath).glob(f"{cb.CHECKPOINT_NAME_LAST}*{cb.FILE_EXTENSION}")
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    return Path(ckpt_path)


def check_checkpoint(trainer: Any, model: Any, ckpt_path: str | None) -> None:
    """Read ``--ckpt_path`` safely and check that it fits ``model``, before the Trainer writes anything.

    Raises:
        FileNotFoundError: the named file does not exist.
        ValueError: it is truncated, altered, holds code, or was written for another model, target or taps.
    """
    path = resolve_ckpt_path(trainer, ckpt_path)
    if path is None:
        return
    if not path.is_file():
        raise FileNotFoundError(
            f"--ckpt_path '{path}' does not exist; nothing was run. Fix the path, use --ckpt_path last to resume from "
            "the checkpoint folder of the config, or drop --ckpt_path to start from scratch."
        )
    checkpoint = read_checkpoint(path)
    if model is None:
        return
    source = f"checkpoint '{path}'"
    check = getattr(model, "check_checkpoint", None)
    if callable(check):
        check(checkpoint, source=source)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{source} has no 'state_dict': it is not a Lightning checkpoint; pass a .ckpt from `fit`.")
    upgrade = getattr(model, "upgrade_state", None)
    if callable(upgrade):  # older layouts the model migrates on load (GenCNP: probe images -> indices)
        state = upgrade(state)
    own = model.state_dict()
    if not any(k.startswith("target.") for k in state):  # a GEN-CNP checkpoint without embedded target weights
        own = {k: v for k, v in own.items() if not k.startswith("target.")}
    parts = state_mismatch(own, state, limit=6)
    if parts:
        raise ValueError(
            f"{source} does not fit {type(model).__name__} as configured: " + "; ".join(parts) + ". It was written by "
            "another system or with other settings (arch, num_classes, d, taps); use the config it was trained with."
        )


# ----- class lists -----
def _recorded_classes(path: Path) -> list[str] | None:
    try:
        meta = read_state_dict(path)[1]
    except (OSError, ValueError):  # unreadable files are refused with their own message elsewhere
        return None
    names = meta.get("class_names")
    return [str(c) for c in names] if isinstance(names, (list, tuple)) else None


def check_class_names(trainer: Any, model: Any, datamodule: Any, ckpt_path: str | None = None) -> None:
    """The data's class list must equal the one recorded in ``--ckpt_path`` and in the model's target checkpoint
    (``target_checkpoint``, or ``checkpoint`` of a ``TargetClassifier``), names and order, when they record one.

    Raises:
        ValueError: naming both lists and the first differences.
    """
    names = getattr(datamodule, "class_names", None)
    if not names:
        return
    names = [str(c) for c in names]
    hp = getattr(model, "hparams", None) or {}
    paths = [(resolve_ckpt_path(trainer, ckpt_path), "--ckpt_path")]
    paths += [(Path(hp[k]), k) for k in ("target_checkpoint", "checkpoint") if isinstance(hp.get(k), (str, Path))]
    for path, what in paths:
        if path is None or not path.is_file() or path.suffix == ".safetensors":
            continue
        recorded = _recorded_classes(path)
        if recorded is not None and recorded != names:
            raise ValueError(
                f"{what} '{path}' was trained on the classes {recorded}, but the data ({type(datamodule).__name__}) "
                f"has {names} (differences: {_diff_names(recorded, names)}); class indices would mean other classes. "
                "Use the data it was trained on (same class folders, same order), or train on this data; nothing "
                "was run."
            )


# ----- output folders -----
def _outputs(trainer: Any) -> list[tuple[Path, str, str]]:
    """``(folder, what, how to change it)`` for every place the run writes."""
    out = []
    loggers = list(getattr(trainer, "loggers", []) or [])
    for lg in loggers:
        save_dir = getattr(lg, "save_dir", None)
        if save_dir:
            out.append((Path(save_dir), f"log folder of {type(lg).__name__}", "set trainer.logger.init_args.save_dir."))
    if not loggers and getattr(trainer, "default_root_dir", None):
        out.append((Path(trainer.default_root_dir), "run folder (default_root_dir)", "set trainer.default_root_dir."))
    for cb in getattr(trainer, "callbacks", []) or []:
        name = type(cb).__name__
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            out.append((Path(cb.dirpath), "checkpoint folder", f"set the dirpath of {name} in trainer.callbacks."))
        for attr in ("output_dir",):
            if getattr(cb, attr, None):
                out.append((Path(getattr(cb, attr)), f"output folder of {name}", f"set {attr} of {name}."))
        path = getattr(cb, "path", None)
        if isinstance(path, (str, Path)) and str(path).endswith(".safetensors"):
            out.append((Path(path).parent, f"folder of {name}'s file '{Path(path).name}'", f"set path of {name}."))
    return [(d, w, f) for d, w, f in out if "://" not in str(d)]


def check_outputs(trainer: Any) -> None:
    """Every folder the run will write must be writable (see ``check_writable_dir``)."""
    for directory, what, fix in _outputs(trainer):
        check_writable_dir(directory, what, fix)


# ----- inputs -----
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


def _expected_shape(model: Any) -> tuple[int, ...] | None:
    shape = getattr(model, "input_shape", None) or getattr(getattr(model, "target", None), "input_shape", None)
    return tuple(shape) if shape is not None else None


def check_inputs(model: Any, datamodule: Any, stage: str | None, n: int = 64) -> None:
    """The first ``n`` images of every split ``stage`` reads must have the model's input shape and finite values.

    Data modules without ``split(name)`` (gencnp's ``ImageDataModule`` has it) are not checked.

    Raises:
        ValueError: an image of the wrong shape (C, H, W), or one holding NaN or Inf.
    """
    split = getattr(datamodule, "split", None)
    if not callable(split) or stage is None:
        return
    names = _STAGE_SPLITS.get(stage) or (getattr(datamodule, "predict_split", None),)
    check_files = getattr(datamodule, "check_files", None)
    if callable(check_files):  # every image file decodes (ImageFolder), not only the first n
        check_files(tuple(dict.fromkeys("test" if nm == "test" else "train" for nm in names if nm)))
    expected = _expected_shape(model)
    what = f"the model ({type(model).__name__})"
    for name in (nm for nm in names if nm):
        dataset = split(name)
        for i in range(min(n, len(dataset))):
            item = dataset[i]
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, torch.Tensor):
                return
            if expected is not None and tuple(x.shape) != expected:
                raise ValueError(
                    f"the {name} split gives images of shape {tuple(x.shape)} (C, H, W; image {i}), but {what} "
                    f"expects {expected}; nothing was run. Make the data match (its image_size/in_chans, or resize "
                    "the images), or set the model's in_chans/image_size to the data and use a target trained on it."
                )
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise ValueError(
                    f"the {name} split holds NaN or Inf inputs (image {i}: {bad} of {x.numel()} values are not "
                    "finite); nothing was run. Check the data files and the normalisation (a std of 0 gives Inf), "
                    "or remove the broken images."
                )


# ----- Weights & Biases -----
def _wandb_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def wandb_api_key(host: str) -> str | None:
    """The API key W&B would use for ``host``: ``WANDB_API_KEY``, else the netrc entry ``wandb login`` writes."""
    key = os.environ.get("WANDB_API_KEY")
    if key:
        return key
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    return entry[2] if entry and entry[2] else None


def reachable(host: str, port: int, timeout: float) -> str | None:
    """``None`` when a TCP connection to ``host:port`` opens within ``timeout`` seconds, else the reason.

    Name resolution runs in a daemon thread: ``getaddrinfo`` ignores socket timeouts and can block far longer.
    """
    start, found = time.monotonic(), {}

    def resolve() -> None:
        try:
            found["addr"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][:2]
        except OSError as err:
            found["error"] = err

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout)
    if "error" in found:
        return f"name resolution failed: {found['error']}"
    if "addr" not in found:
        return f"name resolution of {host} took longer than {timeout:g} s"
    try:
        with socket.create_connection(found["addr"], timeout=max(0.1, timeout - (time.monotonic() - start))):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def _wandb_online(logger: Any) -> bool:
    if getattr(logger, "_experiment", None) is not None or getattr(logger, "_offline", False):
        return False
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return False
    init = getattr(logger, "_wandb_init", {}) or {}
    mode = str(init.get("mode") or os.environ.get("WANDB_MODE") or "online").lower()
    return mode not in ("offline", "dryrun", "disabled")


def check_wandb_online(loggers: Iterable[Any], timeout: float = 2.0) -> None:
    """Refuse an online ``WandbLogger`` without an API key or without a reachable W&B host, in ``<= timeout`` s.

    Raises:
        ValueError: what is missing, and how to log offline instead.
    """
    if not any(isinstance(lg, WandbLogger) and _wandb_online(lg) for lg in loggers or []):
        return
    host, port = _wandb_host()
    if wandb_api_key(host) is None:
        raise ValueError(
            f"the W&B logger is in online mode but no API key is configured for {host} (WANDB_API_KEY is unset and "
            f"no netrc entry exists); nothing was run. Run `wandb login` (or export WANDB_API_KEY) to log online. "
            + _OFFLINE_FIX
        )
    problem = reachable(host, port, timeout)
    if problem is not None:
        raise ValueError(
            f"the W&B logger is in online mode but {host}:{port} cannot be reached within {timeout:g} s ({problem}); "
            "nothing was run (W&B itself would hang for minutes). Check the network or WANDB_BASE_URL. " + _OFFLINE_FIX
        )


# ----- all of it -----
def preflight(
    trainer: Any,
    model: Any,
    ckpt_path: str | None = None,
    wandb_timeout: float = 2.0,
    datamodule: Any = None,
    stage: str | None = None,
) -> None:
    """The checks of this module in order: checkpoint, output folders, inputs (when ``datamodule`` is given), W&B."""
    check_checkpoint(trainer, model, ckpt_path)
    check_outputs(trainer)
    if datamodule is not None:
        check_class_names(trainer, model, datamodule, ckpt_path)
        check_inputs(model, datamodule, stage)
    check_wandb_online(getattr(trainer, "loggers", []) or [], timeout=wandb_timeout)


# ----- config keys that do not exist -----
def _init_parameters(class_path: str) -> list[str]:
    try:
        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except (ValueError, ImportError, AttributeError, TypeError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _grouped_settings(class_path: str) -> dict[str, str]:
    """Flat setting name -> ``group.name`` for a class with grouped settings (``GenCNP.setting_groups``), else {}."""
    try:
        module, name = class_path.rsplit(".", 1)
        groups = getattr(getattr(importlib.import_module(module), name), "setting_groups", None)
        return groups() if callable(groups) else {}
    except (ValueError, ImportError, AttributeError):
        return {}


def _suggest(key: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def config_hint(message: str, options: Sequence[str] = ()) -> str | None:
    """A hint for a parser error about a key that does not exist (``None`` for other errors).

    Args:
        message: jsonargparse's error message.
        options: the parser's own option names (``--trainer.max_epochs``, ...), for top-level keys.
    """
    m = re.search(r"class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if m:
        cls, key = m.groups()
        params = _init_parameters(cls)
        grouped = _grouped_settings(cls)
        if key in grouped:  # a 0.2 flat setting: say where it lives now
            group, _, leaf = grouped[key].partition(".")
            return (
                f"'{key}' is a setting of {cls} in the flat form of gencnp 0.2; it now lives in the group '{group}': "
                f"write it as `{group}: {{{leaf}: ...}}` under init_args (on the command line "
                f"--model.init_args.{grouped[key]}). Fix the key in the YAML or on the command line."
            )
        candidates = params + sorted(set(grouped.values()))
        listing = f" Its arguments: {', '.join(params)}." if params else ""
        return (
            f"'{key}' is not an argument of {cls} (config keys are constructor argument names)."
            f"{_suggest(key, candidates)}{listing} Fix the key in the YAML or on the command line."
        )
    m = re.search(r"does not accept option '([\w.]+)'", message) or re.search(
        r"unrecognized arguments: --([\w.]+)", message
    )
    if m:
        key = m.group(1)
        group, _, leaf = key.rpartition(".")
        if group == "trainer":
            candidates = _init_parameters(f"{L.Trainer.__module__}.Trainer")
        else:
            names = [o.lstrip("-") for o in options if o.startswith("--")]
            candidates = [n.rpartition(".")[2] for n in names if n.rpartition(".")[0] == group]
        return (
            f"'{key}' is not a config key here.{_suggest(leaf, candidates)} Fix the key in the YAML or on the command "
            "line; `--help` lists every key, `--print_config` shows the resolved config."
        )
    return None


class _HintOnError:
    def error(self, message: str, ex: Exception | None = None):
        hint = config_hint(message, list(getattr(self, "_option_string_actions", {})))
        return super().error(f"{message}\n{hint}" if hint else message, ex)


class ConfigHintParser(_HintOnError, LightningArgumentParser):
    """``LightningArgumentParser`` (``train.py``) whose error for a key that does not exist adds a "did you mean"."""


class ConfigHintArgumentParser(_HintOnError, ArgumentParser):
    """jsonargparse's ``ArgumentParser`` (``evaluate.py``) with the same hints."""
