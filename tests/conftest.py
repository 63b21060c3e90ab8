"""Shared fixtures: offline environment, tiny synthetic runs trained once per session."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def cli(*args: str):
    """Run the project's LightningCLI in-process (``python train.py ...``)."""
    from gencnp.cli import main

    return main(args=list(args))


def fit_synthetic(out: Path, epochs: int = 2, extra_target: tuple = (), extra_gencnp: tuple = ()) -> dict[str, Path]:
    """Train the synthetic target and generator into ``out``; returns checkpoint paths."""
    tdir, gdir = out / "target", out / "gencnp"
    cli(
        "fit",
        "--config",
        str(ROOT / "configs/synthetic/target.yaml"),
        *QUIET,
        "--trainer.logger.init_args.save_dir",
        str(tdir),
        "--trainer.callbacks.init_args.dirpath",
        str(tdir),
        *extra_target,
    )
    cli(
        "fit",
        "--config",
        str(ROOT / "configs/synthetic/gencnp.yaml"),
        *QUIET,
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.logger.init_args.save_dir",
        str(gdir),
        "--trainer.callbacks.init_args.dirpath",
        str(gdir),
        "--model.init_args.target_checkpoint",
        str(tdir / "best.ckpt"),
        *extra_gencnp,
    )
    return {"target": tdir / "best.ckpt", "gencnp": gdir / "best.ckpt", "gencnp_last": gdir / "last.ckpt", "dir": out}


@pytest.fixture(scope="session")
def synthetic_runs(tmp_path_factory) -> dict[str, Path]:
    """A trained synthetic target and generator, shared by the tests that only read them."""
    return fit_synthetic(tmp_path_factory.mktemp("synthetic"))


def says(*phrases: str) -> str:
    """A ``match=`` pattern for ``pytest.raises``: every phrase (literal text) appears in the message, in any order.
    Tests match the error type and a few distinctive words, so rewording the rest of a message breaks nothing."""
    return "(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in phrases)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to assert that nothing changed."""
    return {str(p): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: fastest, and spinning OpenMP workers stall on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
