"""What a report ran on: the settings of every method (``method_settings``) and the provenance block (target,
generator, bank, data, code version, device)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
import torchmetrics

import gencnp

__all__ = ["method_settings", "provenance"]


def _git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict[str, str]:
    return {
        "gencnp": gencnp.__version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def method_settings(
    model, bank_obj, keep_fraction: float, intgrad_steps: int, dgr_opts: dict, mean_ablation: bool
) -> dict:
    """``settings`` of every report entry: per method (and per setting, ``matched`` / ``native``) how its pathway
    was formed and ablated."""
    ablation = "mean (dataset-mean activation)" if mean_ablation else "zero"
    matched = "top channels per tap, GEN-CNP's per-sample and per-tap kept counts"
    native_global = f"one global ranking over all taps, top {100 * keep_fraction:.1f}% (GEN-CNP's mean kept fraction)"
    return {
        "gencnp": {
            "pathway": "generator scores > 0.5 (DAQ)",
            "ablation": ablation,
            "class_source": model.hparams.class_source,
            "lambda_sp": model.settings.lambda_sp,
            "lambda_swap": model.settings.lambda_swap,
        },
        "random": {
            "matched": {"pathway": f"uniformly random channels, {matched}", "ablation": ablation},
            "native": {"pathway": f"uniformly random channels, {native_global}", "ablation": ablation},
        },
        "neuron_mct": {
            "matched": {"score": "sum_space |a dS_y/da|", "pathway": matched, "ablation": ablation},
            "native": {"score": "sum_space |a dS_y/da|", "pathway": native_global, "ablation": ablation},
        },
        "neuron_intgrad": {
            "matched": {
                "score": f"sum_space |IG| ({intgrad_steps} points, trapezoid)",
                "pathway": matched,
                "ablation": ablation,
            },
            "native": {
                "score": f"sum_space |IG| ({intgrad_steps} points, trapezoid)",
                "pathway": native_global,
                "ablation": ablation,
            },
        },
        "dgr": {
            "matched": {**dgr_opts, "clamp": [0.0, 5.0], "pathway": f"gates ranked, {matched}", "ablation": ablation},
            "native": {
                **dgr_opts,
                "clamp": [0.0, 5.0],
                "pathway": "gates > 0 of the lowest-loss faithful iterate",
                "ablation": ablation,
            },
        },
        "class_lookup": {
            "matched": {
                "pathway": f"channels of the predicted class ranked by the bank's f_c, {matched}",
                "ablation": ablation,
            }
        },
        "transfer": {
            "matched": {
                "pathway": "class pathway M_c = f_c >= tau of the predicted class",
                "tau": bank_obj.tau if bank_obj is not None else None,
                "ablation": ablation,
            }
        },
    }


def provenance(model, generator: str, bank: str | None, bank_obj, data, split: str, seed: int, n: int, limit) -> dict:
    """The ``provenance`` block: target, generator, bank, data, split, seed, code version, versions, device."""
    hp = model.hparams
    return {
        "target": {"arch": hp.target, "checkpoint": str(hp.target_checkpoint)},
        "target_hash": model.target.tensor_hash(),
        "generator": str(generator),
        "bank": str(bank) if bank is not None else None,
        "bank_samples": int(bank_obj.n.sum()) if bank_obj is not None else None,
        "bank_split": bank_obj.split if bank_obj is not None else None,
        "dataset": f"{type(data).__module__}.{type(data).__name__}",
        "split": split,
        "n": n,
        "limit": limit,
        "class_source": hp.class_source,
        "ablation": hp.ablation,
        "null_families": list(model.null_eval),
        "null_train": list(model.null_train) if model.settings.lambda_null > 0 else [],
        "taps": dict(zip(model.target.tap_names, model.target.tap_channels)),
        "tau": bank_obj.tau if bank_obj is not None else None,
        "seed": seed,
        "git_commit": _git_commit(),
        "versions": _versions(),
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
    }
