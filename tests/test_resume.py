"""Crash and resume, and determinism: ``python train.py fit`` killed with SIGKILL mid-epoch and rerun with
``--ckpt_path last`` ends with exactly the weights, optimiser state and bank of an uninterrupted run; two seeded
runs of the same config are bitwise equal.

The runs are the synthetic GEN-CNP config with validation (and so ``last.ckpt``) every 4 of the 15 training batches
of an epoch, 2 epochs. The killed run is a ``python train.py fit`` subprocess, killed with SIGKILL as soon as its first
``last.ckpt`` (step 4, mid-epoch) exists; the rerun, the uninterrupted runs and the bank exports run in this process
(``gencnp.cli.main``, the entry point of ``train.py``). Every run uses one thread, so that float results do not depend
on how a process splits its work.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUIET, ROOT, cli

from gencnp.banks.bank import PathwayBank
from gencnp.io.checkpoint_io import read_checkpoint

pytestmark = pytest.mark.resume

GENCNP, BANK = str(ROOT / "configs/synthetic/gencnp.yaml"), str(ROOT / "configs/synthetic/bank.yaml")
# 1000 train images, batch 64, drop_last: 15 batches an epoch. Validating every 4 batches puts every checkpoint but the
# final one mid-epoch (after batches 4, 8 and 12 of each epoch), so the kill always leaves a mid-epoch last.ckpt.
BATCHES_PER_EPOCH, EPOCHS, VAL_EVERY = 15, 2, 4
TOTAL_STEPS = BATCHES_PER_EPOCH * EPOCHS


def fit_args(out: Path, target: Path) -> list[str]:
    """``train.py fit`` arguments of every run here: only the checkpoint callback (the picture logger is not under
    test), checkpoints and logs in ``out``, validation every ``VAL_EVERY`` batches, every step logged. Generator
    scores start at 0.5 (not 0.9), so that pathways differ between images and the banks are not all-ones."""
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(out),
                "filename": "best",
                "monitor": "val/score",
                "mode": "max",
                "save_last": True,
                "enable_version_counter": False,
                "auto_insert_metric_name": False,
            },
        }
    ]
    return [
        "fit",
        "--config",
        GENCNP,
        *QUIET,
        "--trainer.max_epochs",
        str(EPOCHS),
        "--trainer.val_check_interval",
        str(VAL_EVERY),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.callbacks",
        json.dumps(callbacks),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--model.init_args.target_checkpoint",
        str(target),
        "--model.init_args.generator.init_score",
        "0.5",
    ]


def one_thread():
    """Run in this process with one torch thread, as the subprocesses do (``OMP_NUM_THREADS=1``)."""

    class _Threads:
        def __enter__(self):
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)

        def __exit__(self, *exc):
            torch.set_num_threads(self.n)

    return _Threads()


def train_py(log: Path, *args: str) -> subprocess.Popen:
    """``python train.py ARGS`` with one thread, output to ``log`` (a pipe nobody reads while polling could fill up
    and stall the run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        )


def export_bank(ckpt: Path, target: Path, out: Path) -> PathwayBank:
    """``train.py predict --config configs/synthetic/bank.yaml --ckpt_path ckpt`` into ``out``."""
    with one_thread():
        cli(
            "predict",
            "--config",
            BANK,
            *QUIET,
            "--ckpt_path",
            str(ckpt),
            "--model.init_args.target_checkpoint",
            str(target),
            "--trainer.callbacks.init_args.path",
            str(out),
            "--trainer.default_root_dir",
            str(out.parent),
        )
    return PathwayBank.load(out)


def train_steps(folder: Path) -> list[int]:
    """Global steps of the training rows of a CSVLogger ``metrics.csv`` (one row per step here)."""
    with open(folder / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def assert_same_weights(a: dict, b: dict) -> None:
    """Model tensors (weights and buffers) and optimiser state bitwise equal, and at the same step."""
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"tensors differ: {differ[:5]}"
    (sa,), (sb,) = a["optimizer_states"], b["optimizer_states"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for name, value in sa["state"][i].items():
            assert torch.equal(value, sb["state"][i][name]), (i, name)


def assert_same_bank(a: PathwayBank, b: PathwayBank) -> None:
    assert torch.equal(a.counts, b.counts) and torch.equal(a.n, b.n) and a.tau == b.tau
    assert 0 < int(a.counts.sum()) < int(a.n.sum()) * a.num_channels  # neither empty nor all-ones
    drop = ("created_utc", "info")
    assert {k: v for k, v in a.metadata.items() if k not in drop} == {
        k: v for k, v in b.metadata.items() if k not in drop
    }
    info = [{k: v for k, v in bank.info.items() if k != "generator_checkpoint"} for bank in (a, b)]
    assert info[0] == info[1]  # the tau search table included


@pytest.fixture(scope="module")
def runs(synthetic_runs, tmp_path_factory) -> dict:
    """Two uninterrupted runs, one killed and resumed, and the bank of each."""
    target, work = synthetic_runs["target"], tmp_path_factory.mktemp("resume")
    out = {"work": work}
    for name in ("first", "second"):
        with one_thread():
            result = cli(*fit_args(work / name, target))
    out["checkpoint_callback"] = result.trainer.checkpoint_callback

    # Killed as soon as its first last.ckpt exists (written atomically: the file appears complete or not at all).
    killed = work / "killed"
    proc = train_py(work / "killed.log", *fit_args(killed, target))
    deadline = time.monotonic() + 240
    while not (killed / "last.ckpt").exists():
        if proc.poll() is not None:
            tail = (work / "killed.log").read_text()[-3000:]
            pytest.fail(f"the run ended (exit code {proc.returncode}) before it was killed:\n{tail}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no last.ckpt within 240 s")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    out["killed_returncode"] = proc.wait(timeout=60)
    out["at_kill"] = read_checkpoint(killed / "last.ckpt")

    # The rerun, as `python train.py fit ... --ckpt_path last` (in this process: the entry point is the same).
    with one_thread():
        out["resumed_step"] = cli(*fit_args(killed, target), "--ckpt_path", "last").trainer.global_step
    for name in ("first", "second", "killed"):
        out[name] = read_checkpoint(work / name / "last.ckpt")
        out[f"{name}_bank"] = export_bank(work / name / "last.ckpt", target, work / f"bank_{name}.safetensors")
    return out


@pytest.mark.slow  # the module's runs fixture: four short trainings, a killed subprocess, three banks
@pytest.mark.timeout(420)
def test_sigkilled_run_resumed_with_ckpt_path_last_ends_with_the_uninterrupted_weights_and_bank(runs):
    assert runs["killed_returncode"] == -signal.SIGKILL
    # The kill came mid-epoch, after a validation checkpoint: training had really started and not finished.
    at_kill = runs["at_kill"]
    step = at_kill["global_step"]
    assert 0 < step < TOTAL_STEPS and (step % BATCHES_PER_EPOCH) % VAL_EVERY == 0
    position = at_kill["SyntheticDataModule"]["train_position"]
    assert position == {"epoch": step // BATCHES_PER_EPOCH, "batches": step % BATCHES_PER_EPOCH}
    assert 0 < position["batches"] < BATCHES_PER_EPOCH
    # The rerun resumed from it: its first training step is the checkpoint's step, not 0, and it ran to the end.
    assert runs["resumed_step"] == TOTAL_STEPS
    logs = sorted((runs["work"] / "killed" / "logs").glob("version_*"))
    assert [p.name for p in logs] == ["version_0", "version_1"]
    # (version_0, the killed run's log, is not read: the kill may have cut its last row.)
    assert train_steps(logs[1]) == list(range(step, TOTAL_STEPS))
    # Exactly the uninterrupted run: weights, buffers (EMA prototypes), optimiser moments, and the exported bank.
    assert runs["first"]["global_step"] == TOTAL_STEPS  # last.ckpt holds the final state (gencnp ModelCheckpoint)
    assert_same_weights(runs["killed"], runs["first"])
    assert_same_bank(runs["killed_bank"], runs["first_bank"])
    # The logged training losses after the resume point are those of the uninterrupted run.
    with open(logs[1] / "metrics.csv") as f:
        resumed = {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}
    with open(runs["work"] / "first" / "logs" / "version_0" / "metrics.csv") as f:
        first = {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}
    assert resumed == {s: first[s] for s in resumed}


@pytest.mark.slow  # the module's runs fixture: four short trainings, a killed subprocess, three banks
def test_two_seeded_runs_give_identical_weights_and_banks(runs):
    assert_same_weights(runs["first"], runs["second"])
    assert_same_bank(runs["first_bank"], runs["second_bank"])
    assert runs["first"]["gencnp_state_hash"] == runs["second"]["gencnp_state_hash"]


class _FallingMetric(L.LightningModule):
    """One weight; ``val/m`` gets worse at every validation, so only the first validation improves it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum() + 0 * batch.sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/m", -float(self.global_step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("cls", ["lightning", "gencnp"])
def test_last_ckpt_is_the_newest_state_even_when_the_monitored_metric_stops_improving(tmp_path, cls):
    """Lightning 2.6 alone rewrites last.ckpt only when best.ckpt improves, so --ckpt_path last would go back to
    the best state; gencnp's ModelCheckpoint rewrites it after every validation and when training ends."""
    from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

    from gencnp.io.checkpoint_io import AtomicCheckpointIO, ModelCheckpoint

    callback = (LightningModelCheckpoint if cls == "lightning" else ModelCheckpoint)(
        dirpath=tmp_path, filename="best", monitor="val/m", mode="max", save_last=True
    )
    loader = torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)
    trainer = L.Trainer(
        max_steps=7,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[callback],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_FallingMetric(), loader, loader)
    best, last = (read_checkpoint(tmp_path / f"{n}.ckpt") for n in ("best", "last"))
    assert best["global_step"] == 2
    assert last["global_step"] == (2 if cls == "lightning" else 7)  # 7: after the validation at 6, at the end


def test_resuming_from_last_ckpt_continues_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """The fast counterpart of the SIGKILL test: a toy run stopped after 3 of 7 steps and resumed from its
    ``last.ckpt`` (gencnp's ModelCheckpoint and AtomicCheckpointIO) ends where an uninterrupted run ends."""
    from gencnp.io.checkpoint_io import AtomicCheckpointIO, ModelCheckpoint

    def fit(folder: Path, max_steps: int, ckpt_path: str | None = None) -> L.Trainer:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(torch.randn(8, 1), batch_size=1)
        trainer = L.Trainer(
            max_steps=max_steps,
            val_check_interval=2,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            callbacks=[ModelCheckpoint(dirpath=folder, filename="best", monitor="val/m", mode="max", save_last=True)],
            plugins=[AtomicCheckpointIO()],
        )
        trainer.fit(_FallingMetric(), loader, loader, ckpt_path=ckpt_path)
        return trainer

    fit(tmp_path / "whole", 7)
    fit(tmp_path / "cut", 3)
    assert read_checkpoint(tmp_path / "cut/last.ckpt")["global_step"] == 3
    assert fit(tmp_path / "cut", 7, ckpt_path=str(tmp_path / "cut/last.ckpt")).global_step == 7
    whole, resumed = (read_checkpoint(tmp_path / f"{n}/last.ckpt") for n in ("whole", "cut"))
    assert whole["global_step"] == resumed["global_step"] == 7
    assert torch.equal(whole["state_dict"]["w"], resumed["state_dict"]["w"]) and float(whole["state_dict"]["w"]) > 0


@pytest.mark.slow  # the module's runs fixture: four short trainings, a killed subprocess, three banks
def test_the_cli_puts_gencnp_model_checkpoint_in_place_of_lightnings(runs):
    from gencnp.io.checkpoint_io import ModelCheckpoint

    assert type(runs["checkpoint_callback"]) is ModelCheckpoint
    assert runs["first"]["global_step"] == TOTAL_STEPS


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_checkpoint_save_interrupted_mid_write_leaves_the_previous_last_ckpt_intact(
    synthetic_runs, tmp_path, monkeypatch, where
):
    """What a kill during ``trainer.save_checkpoint`` leaves: the previous ``last.ckpt``, whole, and no temp file."""
    import shutil

    from gencnp.io.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    shutil.copy(synthetic_runs["gencnp_last"], path)
    before = path.read_bytes()
    newer = read_checkpoint(path)
    newer["global_step"] += 1

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(os, where, crash)  # whichever module writes the file
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint(newer, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    AtomicCheckpointIO().save_checkpoint(newer, path)
    assert read_checkpoint(path)["global_step"] == newer["global_step"]
