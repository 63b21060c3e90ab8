"""Preemption: a signal saves the exact step and exits 75 (interrupted, resumable); ``--ckpt_path last`` continues
to the weights of an uninterrupted run; the pipeline never stamps an interrupted stage and resumes it on a rerun.

Every signal here is a real one (``os.kill`` to this process, or to a subprocess from outside); the toy runs are
in-process Trainers, the synthetic runs ``train.py`` / ``python -m gencnp.pipeline`` subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUIET, ROOT, cli, snapshot
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gencnp.callbacks import EXIT_INTERRUPTED, PreemptionCheckpoint
from gencnp.io.checkpoint_io import AtomicCheckpointIO, ModelCheckpoint, read_checkpoint

pytestmark = pytest.mark.resume


class _Toy(L.LightningModule):
    """Adam and a step schedule on one linear layer; every batch is the same row, so data order cannot matter."""

    def __init__(self, crash_at: int | None = None):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.crash_at = crash_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_at:
            raise RuntimeError("a bug, not an interruption")
        return (self.lin(batch) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/m", -float(self.global_step))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)]


class SignalAt(L.Callback):
    """Sends ``signum`` to this process at the end of training step ``step`` (``where='train'``), at the start of a
    validation batch at that step (``'val'``), or after predict batch ``step`` (``'predict'``)."""

    def __init__(self, step: int, where: str = "train", signum: int = int(signal.SIGTERM)):
        self.step, self.where, self.signum = step, where, signum

    def on_train_batch_end(self, trainer, *args):
        if self.where == "train" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer, *args):
        if self.where == "val" and trainer.global_step == self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.where == "predict" and batch_idx == self.step:
            os.kill(os.getpid(), self.signum)


def toy_fit(folder: Path, ckpt_path=None, extra=(), crash_at=None, every_minutes=None) -> L.Trainer:
    """3 epochs of 10 steps, validation after every 4th batch of an epoch, gencnp's checkpoint callbacks."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.randn(1, 3).repeat(20, 1), batch_size=2)
    trainer = L.Trainer(
        max_epochs=3,
        val_check_interval=4,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[
            ModelCheckpoint(dirpath=folder, filename="best", monitor="val/m", mode="max", save_last=True),
            PreemptionCheckpoint(every_minutes=every_minutes),
            *extra,
        ],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(_Toy(crash_at), loader, loader, ckpt_path=ckpt_path)
    return trainer


def assert_same_run(a: dict, b: dict) -> None:
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])
    assert a["lr_schedulers"] == b["lr_schedulers"] and a["loops"] == b["loops"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("whole")
    toy_fit(folder)
    return read_checkpoint(folder / "last.ckpt")


@pytest.mark.parametrize(
    "step,where",
    [(3, "train"), (4, "train"), (14, "train"), (10, "train"), (29, "train"), (30, "train"), (4, "val")],
    ids=["mid-epoch", "after-validation", "after-validation-2", "epoch-end", "second-last", "last-step", "during-val"],
)
def test_sigterm_saves_the_exact_step_and_resuming_ends_as_the_uninterrupted_run(tmp_path, whole, step, where):
    with pytest.raises(SIGTERMException):
        toy_fit(tmp_path, extra=[SignalAt(step, where)])
    saved = read_checkpoint(tmp_path / "last.ckpt")
    assert saved["global_step"] == step
    assert toy_fit(tmp_path, ckpt_path="last").global_step == 30
    assert_same_run(read_checkpoint(tmp_path / "last.ckpt"), whole)


def test_the_first_ctrl_c_stops_at_the_end_of_the_step_like_sigterm(tmp_path, whole):
    """Lightning alone raises KeyboardInterrupt wherever SIGINT lands (inside an optimiser step too) and saves
    nothing; here the step finishes, is saved, and resuming gives the uninterrupted run."""
    with pytest.raises(SIGTERMException):
        toy_fit(tmp_path, extra=[SignalAt(7, signum=int(signal.SIGINT))])
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 7
    toy_fit(tmp_path, ckpt_path="last")
    assert_same_run(read_checkpoint(tmp_path / "last.ckpt"), whole)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the run


class _LastAt(L.Callback):
    """Copies ``last.ckpt`` as the next step starts (the timed save of the step before is complete then)."""

    def __init__(self, folder: Path, step: int):
        self.folder, self.step = folder, step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            shutil.copy(self.folder / "last.ckpt", self.folder / "timed.ckpt")


def test_every_minutes_writes_last_ckpt_during_an_epoch_and_it_resumes_bitwise(tmp_path, whole):
    # every_minutes below a step's duration: a save at the end of every step. Step 6 is no validation step.
    toy_fit(tmp_path, extra=[_LastAt(tmp_path, 7)], every_minutes=1e-9)
    timed = read_checkpoint(tmp_path / "timed.ckpt")
    assert timed["global_step"] == 7
    (tmp_path / "last.ckpt").unlink()
    shutil.move(tmp_path / "timed.ckpt", tmp_path / "last.ckpt")
    toy_fit(tmp_path, ckpt_path="last")
    assert_same_run(read_checkpoint(tmp_path / "last.ckpt"), whole)


def test_every_minutes_must_be_positive():
    with pytest.raises(ValueError, match="every_minutes must be a positive number"):
        PreemptionCheckpoint(every_minutes=0)


def test_a_crash_saves_nothing_and_a_fit_without_ckpt_path_starts_over(tmp_path):
    """Any other exception may leave a torn step: last.ckpt keeps the last complete one (validation at step 4).
    And unlike with Lightning's OnExceptionCheckpoint, a new fit in that folder does not resume on its own."""
    with pytest.raises(RuntimeError, match="a bug"):
        toy_fit(tmp_path, crash_at=6)
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 4
    started = []

    class _Start(L.Callback):
        def on_train_start(self, trainer, *args):
            started.append(trainer.global_step)

    toy_fit(tmp_path, extra=[_Start()])
    assert started == [0]


# ----- train.py: exit status 75, predict -----
def _fit_args(out: Path, target: Path) -> list[str]:
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(out), "filename": "best", "monitor": "val/score", "mode": "max"},
        }
    ]
    callbacks[0]["init_args"] |= {"save_last": True, "enable_version_counter": False, "auto_insert_metric_name": False}
    return [
        "fit",
        "--config",
        str(ROOT / "configs/synthetic/gencnp.yaml"),
        *QUIET,
        "--trainer.max_steps",
        "12",
        "--trainer.val_check_interval",
        "5",
        "--trainer.callbacks",
        json.dumps(callbacks),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--model.init_args.target_checkpoint",
        str(target),
    ]


@pytest.mark.slow  # three short synthetic fits in this process
def test_train_py_exits_75_and_resumes_from_the_signalled_step(synthetic_runs, tmp_path, one_thread, capsys):
    target = synthetic_runs["target"]
    cli(*_fit_args(tmp_path / "whole", target))
    signalled = [*_fit_args(tmp_path / "cut", target), "--trainer.callbacks+=test_preemption.SignalAt"]
    with pytest.raises(SystemExit) as stop:
        cli(*signalled, "--trainer.callbacks.init_args.step", "7")
    assert stop.value.code == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "step 7 (epoch 0) saved to" in err and "--ckpt_path last" in err and "exit status 75" in err
    position = read_checkpoint(tmp_path / "cut/last.ckpt")["SyntheticDataModule"]["train_position"]
    assert position == {"epoch": 0, "batches": 7}
    # Resumed where torch has another thread count (another shell, node or pipeline rerun): the fit continues with
    # the count recorded in last.ckpt (CPU float results depend on it) and gives this process its own back.
    torch.set_num_threads(2)
    try:
        cli(*_fit_args(tmp_path / "cut", target), "--ckpt_path", "last")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    err = capsys.readouterr().err
    assert "resuming from step 7 (epoch 0)" in err
    assert "resuming with 1 torch thread(s) as the run that saved the checkpoint (this process had 2)" in err
    for name in ("last", "best"):
        a, b = (read_checkpoint(tmp_path / run / f"{name}.ckpt") for run in ("cut", "whole"))
        assert_same_run(a, b)
        assert a["gencnp_state_hash"] == b["gencnp_state_hash"]


@pytest.mark.slow  # a synthetic bank export in this process
def test_sigterm_during_a_bank_export_exits_75_and_keeps_the_previous_bank(synthetic_runs, tmp_path, one_thread):
    bank = tmp_path / "bank.safetensors"
    bank.write_bytes(b"the previous bank")
    args = ["predict", "--config", str(ROOT / "configs/synthetic/bank.yaml"), *QUIET]
    args += ["--ckpt_path", str(synthetic_runs["gencnp"]), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--model.init_args.target_checkpoint", str(synthetic_runs["target"])]
    args += ["--trainer.callbacks.init_args.path", str(bank)]
    args += ["--trainer.callbacks+=test_preemption.SignalAt", "--trainer.callbacks.init_args.step", "1"]
    with pytest.raises(SystemExit) as stop:
        cli(*args, "--trainer.callbacks.init_args.where", "predict")
    assert stop.value.code == EXIT_INTERRUPTED
    assert bank.read_bytes() == b"the previous bank" and not list(tmp_path.glob(".bank*"))


# ----- seeded trials as subprocesses (benchmarks/preempt.py) -----
@pytest.mark.slow  # a reference fit and two interrupted-and-resumed fits, as subprocesses
@pytest.mark.timeout(400)
def test_sigterm_from_outside_at_drawn_steps_saves_the_step_reached_and_resumes_bitwise(synthetic_runs, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import preempt
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    extra = ["--trainer.max_epochs", "2", "--trainer.val_check_interval", "4"]
    extra += ["--model.init_args.target_checkpoint", str(synthetic_runs["target"])]
    code = preempt.main(
        [
            "--config",
            "configs/synthetic/gencnp.yaml",
            "--trials",
            "2",
            "--seed",
            "1",
            "--out",
            str(tmp_path),
            "--",
            *extra,
        ]
    )
    summary = json.loads((tmp_path / "preempt.json").read_text())
    for row in summary["trials"]:
        assert row["exit"] == EXIT_INTERRUPTED and row["saved_step"] == row["reached"] >= row["drawn_step"]
        assert row["resume_exit"] == 0 and row["differences"] == {"last": [], "best": []}
    assert code == 0 and summary["passed"] == 2


# ----- the pipeline -----
def _pipeline_spec(tmp_path: Path) -> Path:
    from test_pipeline import _pipeline

    # A GEN-CNP stage of 30 steps with last.ckpt from step 4 on (validation every 4 batches).
    gencnp = {"args": ["--trainer.max_epochs", "2", "--trainer.val_check_interval", "4"]}
    return _pipeline(tmp_path, gencnp=gencnp)


def _numbers(report: dict) -> dict:
    """report.json without timings."""
    if isinstance(report, dict):
        return {k: _numbers(v) for k, v in report.items() if "second" not in k and "speed" not in k}
    return [_numbers(v) for v in report] if isinstance(report, list) else report


@pytest.mark.slow  # two synthetic pipelines (one interrupted and rerun), as a subprocess and in this process
@pytest.mark.timeout(1200)
def test_sigterm_to_the_pipeline_during_gencnp_leaves_no_stamp_and_a_rerun_resumes_the_stage(tmp_path, monkeypatch):
    from gencnp.pipeline import run as P

    # Every stage process of the three pipelines (interrupted, rerun, uninterrupted) with the same thread count:
    # float sums depend on it, and a shell without OMP_NUM_THREADS would give the reference another one
    # (the resumed stage takes the count recorded in last.ckpt: test_train_py_exits_75_...).
    for key, value in (
        ("OMP_NUM_THREADS", "1"),
        ("MKL_NUM_THREADS", "1"),
        ("HF_HUB_OFFLINE", "1"),
        ("WANDB_MODE", "offline"),
    ):
        monkeypatch.setenv(key, value)
    pipe, work = _pipeline_spec(tmp_path), tmp_path / "work"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "gencnp.pipeline", "--config", str(pipe), "--workdir", str(work), "--quiet"]
    with open(tmp_path / "pipeline.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        last, deadline = work / "runs/synthetic/gencnp/last.ckpt", time.monotonic() + 300
        while not last.exists():
            assert proc.poll() is None, (tmp_path / "pipeline.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no GEN-CNP last.ckpt within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # to the pipeline alone: it passes the signal on to the stage
        assert proc.wait(timeout=240) == EXIT_INTERRUPTED
    text = (tmp_path / "pipeline.log").read_text()
    step = read_checkpoint(last)["global_step"]
    assert 4 <= step < 30 and "stage 'gencnp' was interrupted (SIGTERM)" in text
    assert f"resumes from step {step}" in text and "Traceback" not in text
    runs = work / "runs/synthetic"
    assert not (runs / "gencnp/gencnp.stamp.json").exists() and (runs / "gencnp/gencnp.attempt.json").exists()
    assert (runs / "target/target.stamp.json").exists() and not (runs / "bank.safetensors").exists()

    lines: list[str] = []
    result = P.run_pipeline(pipe, work, quiet=True, say=lines.append)
    assert [s["status"] for s in result["stages"]] == ["reused", "ran", "ran", "ran"]
    assert result["stages"][1]["resumed_from_step"] == step
    assert any(f"resuming the unfinished run from step {step}" in line for line in lines)
    stage_log = sorted((runs / "gencnp").glob("gencnp.*.log"))[-1].read_text()
    assert f"resuming from step {step} (epoch 0)" in stage_log
    assert (runs / "gencnp/gencnp.stamp.json").exists() and not (runs / "gencnp/gencnp.attempt.json").exists()

    whole = tmp_path / "whole"  # the uninterrupted pipeline, on the same target (its stage reused)
    shutil.copytree(runs / "target", whole / "runs/synthetic/target")
    P.run_pipeline(pipe, whole, quiet=True, say=lambda _: None)
    for name in ("gencnp/last.ckpt", "gencnp/best.ckpt"):
        assert_same_run(read_checkpoint(runs / name), read_checkpoint(whole / "runs/synthetic" / name))
    report, reference = (json.loads((w / "runs/synthetic/eval/report.json").read_text()) for w in (work, whole))
    assert _numbers(report) == _numbers(reference)
    before = snapshot(work / "runs/synthetic/eval")
    assert [s["status"] for s in P.run_pipeline(pipe, work, quiet=True, say=lambda _: None)["stages"]] == ["reused"] * 4
    assert snapshot(work / "runs/synthetic/eval") == before
