"""``PreemptionCheckpoint``: a fit stopped by a signal saves its exact step and exits "interrupted, resumable".

What a scheduler, a terminal or a shell script sends before it takes the machine away:

- **SIGTERM** (SLURM, Kubernetes, ``kill``): Lightning's own signal connector notes it and raises
  ``SIGTERMException`` at the end of the step in progress (or at the next validation batch). This callback (what
  Lightning's ``OnExceptionCheckpoint`` does, for interruptions only) then writes ``last.ckpt`` of that step
  (weights, optimiser, schedulers, loop and data position, every buffer: class frequencies and prototypes
  included) through the Trainer's checkpoint IO (``AtomicCheckpointIO``: temporary file, fsync, rename), and
  ``gencnp.cli.main`` exits with ``EXIT_INTERRUPTED`` (75, ``EX_TEMPFAIL``: "try again later"). Lightning alone
  ends such a run with status 0.
- **SIGINT** (Ctrl+C) and **SIGUSR1**: handled the same way, at the end of the step (Lightning would raise
  ``KeyboardInterrupt`` anywhere, even inside an optimiser step, and SIGUSR1 kills a process by default). A second
  Ctrl+C stops at once without saving: ``last.ckpt`` keeps the last complete step saved before. Under SLURM with
  Lightning's auto-requeue, SIGUSR1 stays Lightning's (it saves an ``hpc_ckpt`` and requeues the job).

``python train.py fit ... --ckpt_path last`` then continues from the saved step and ends as the uninterrupted run
would (bitwise on CPU; ``tests/test_preemption.py``). CPU float results depend on torch's thread count (it decides how
sums are split), and a rerun may start where ``OMP_NUM_THREADS`` differs (a pipeline rerun from another shell, a
requeued job on another node): every checkpoint records the count (``torch_threads`` in this callback's state), and
a resumed fit continues with it, saying so when it differs from the process's own (restored when the fit ends). Any
other exception saves nothing: its state may be torn mid-step, and ``last.ckpt`` keeps the last complete one. Not an
``OnExceptionCheckpoint`` subclass: a Trainer with one resumes every ``fit`` without ``--ckpt_path`` from ``last`` on
its own, so a fresh run (``--force``) would silently continue an old one.

``every_minutes`` also writes ``last.ckpt`` every N minutes of training, at the end of a step, for epochs longer
than what a preemption may cost. ``gencnp.cli`` adds this callback (without ``every_minutes``) to every run whose
config does not name one; put it in the config's ``trainer.callbacks`` to set ``every_minutes``::

    - class_path: gencnp.callbacks.PreemptionCheckpoint
      init_args:
        every_minutes: 30
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["PreemptionCheckpoint", "EXIT_INTERRUPTED", "deferred_sigterm", "interrupted"]

EXIT_INTERRUPTED = 75  # sysexits.h EX_TEMPFAIL: the work is incomplete and resumable; schedulers may retry

# The signals recorded by the innermost active ``deferred_sigterm`` block (``None``: no block is active).
_received: list[list[int] | None] = [None]


def interrupted() -> int | None:
    """The first signal the active ``deferred_sigterm`` block recorded (``None``: none, or no block)."""
    record = _received[-1]
    return record[0] if record else None


@contextlib.contextmanager
def deferred_sigterm():
    """While the block runs, SIGTERM is recorded (in the list it yields, and ``interrupted()``) instead of ending the
    process at once.

    Lightning installs its own SIGTERM handler only while a Trainer runs and restores the previous one after: a
    SIGTERM before training starts would be forgotten (then the whole run trained), and one after Lightning's
    teardown (a second SIGTERM, sent to the whole process group) would kill the process while it exits. Lightning
    calls the handler found here too, so the record also holds SIGTERMs seen during training.
    """
    record: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield record
        return
    previous = signal.getsignal(signal.SIGTERM)
    _received.append(record)
    signal.signal(signal.SIGTERM, lambda signum, frame: record.append(signum))
    try:
        yield record
    finally:
        signal.signal(signal.SIGTERM, previous)
        _received.pop()


class PreemptionCheckpoint(Checkpoint):
    """Save ``last.ckpt`` of the exact step when a signal stops a fit, and every ``every_minutes`` of training.

    Args:
        dirpath: folder of the checkpoint; ``None``: the folder of the run's ``ModelCheckpoint`` (so that
            ``--ckpt_path last`` finds it), else the Trainer's ``default_root_dir``.
        filename: file name without ``.ckpt`` (``last``: what ``--ckpt_path last`` resumes from).
        every_minutes: also save every this many minutes of training, at the end of a step; ``None``: only on
            interruption.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last", every_minutes: float | None = None):
        if every_minutes is not None and not every_minutes > 0:
            raise ValueError(
                f"PreemptionCheckpoint every_minutes must be a positive number of minutes or null, got "
                f"{every_minutes!r}; e.g. every_minutes: 30."
            )
        super().__init__()
        if not filename:
            raise ValueError(
                "PreemptionCheckpoint filename cannot be empty; the default, last, is what --ckpt_path last finds."
            )
        self.dirpath, self.filename = dirpath, filename
        self.every_minutes = every_minutes
        self.saved_step: int | None = None  # step of the interruption checkpoint written by this run
        self._trainer: L.Trainer | None = None
        self._last_save = time.monotonic()
        self._start_step = 0
        self._validated_at: int | None = None
        self._interrupting = False
        self._threads: tuple[int, int] | None = None  # (this process's count, the resumed run's) while changed

    FILE_EXTENSION = ".ckpt"

    @property
    def ckpt_path(self) -> str:
        folder = self.dirpath or (self._folder(self._trainer) if self._trainer is not None else None)
        return os.path.join(folder, self.filename + self.FILE_EXTENSION) if folder else ""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @staticmethod
    def _folder(trainer: L.Trainer) -> str:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return str(cb.dirpath)
        return str(trainer.default_root_dir)

    # ----- signals -----
    def _graceful(self, trainer: L.Trainer, name: str, force_on_repeat: bool):
        def handler(signum: int, frame: Any) -> None:
            connector = trainer._signal_connector
            if connector.received_sigterm and force_on_repeat:
                raise KeyboardInterrupt
            connector.received_sigterm = True  # the loops raise SIGTERMException at the end of the step
            if trainer.is_global_zero:
                again = "; press Ctrl+C again to stop at once without saving" if force_on_repeat else ""
                print(f"\n{name} received: stopping at the end of this step{again}", file=sys.stderr, flush=True)

        return handler

    def _install_handlers(self, trainer: L.Trainer) -> None:
        """SIGINT and SIGUSR1 stop at a step boundary like SIGTERM. Lightning's teardown restores the handlers it
        found when the run started, so these live exactly as long as the run."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._graceful(trainer, "SIGINT", force_on_repeat=True))
        env = trainer._accelerator_connector.cluster_environment
        requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        if hasattr(signal, "SIGUSR1") and not requeue and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, self._graceful(trainer, "SIGUSR1", force_on_repeat=False))

    # ----- state: the thread count of the run -----
    def state_dict(self) -> dict[str, Any]:
        return {"torch_threads": torch.get_num_threads()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resuming: continue with the torch thread count of the run that saved the checkpoint (CPU float results
        depend on it); older checkpoints without the count, and validate/test/predict, leave it alone."""
        fitting = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
        saved, own = state_dict.get("torch_threads"), torch.get_num_threads()
        if fitting and isinstance(saved, int) and saved > 0 and saved != own:
            torch.set_num_threads(saved)
            self._threads = (own, saved)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_threads()

    def _restore_threads(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads[0])
            self._threads = None

    # ----- hooks -----
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer, self._last_save, self._start_step = trainer, time.monotonic(), trainer.global_step
        self._install_handlers(trainer)
        if trainer.ckpt_path and trainer.is_global_zero:
            print(
                f"resuming from step {trainer.global_step} (epoch {trainer.current_epoch}) of {trainer.ckpt_path}",
                file=sys.stderr,
                flush=True,
            )
        if self._threads is not None and trainer.is_global_zero:
            own, saved = self._threads
            print(
                f"resuming with {saved} torch thread(s) as the run that saved the checkpoint (this process had {own}): "
                f"CPU results depend on the count; set OMP_NUM_THREADS={saved} to start with it",
                file=sys.stderr,
                flush=True,
            )
        if interrupted() is not None:  # a SIGTERM before Lightning's handler existed: stop before the first step
            raise SIGTERMException

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install_handlers(trainer)
        if interrupted() is not None:
            raise SIGTERMException

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # Lightning's predict loop notes SIGTERM but never stops on it: an export would run to its end.
        if trainer.received_sigterm:
            raise SIGTERMException

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.every_minutes is None:
            return
        due = time.monotonic() - self._last_save >= 60 * self.every_minutes
        if trainer.strategy.broadcast(due):  # rank 0 decides: every rank must save together
            self._save(trainer)
            self._last_save = time.monotonic()

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.ckpt_path)
        for cb in trainer.checkpoint_callbacks:
            if not (isinstance(cb, ModelCheckpoint) and cb.dirpath and cb.save_last):
                continue
            if Path(cb.dirpath, f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}") == Path(self.ckpt_path):
                # The ModelCheckpoint's own last.ckpt, now holding this step: rewritten in place later (not beside it
                # as last-v1.ckpt), and not again for this step. Set after saving, so the saved state is the one an
                # uninterrupted run would hold.
                cb.last_model_path = self.ckpt_path
                cb._latest_step = trainer.global_step  # gencnp's ModelCheckpoint

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Stopped right after a mid-epoch validation: Lightning's restart takes such a checkpoint for one saved at
        # validation end (before the step's logger counter is incremented) and increments it again. Store it as
        # that checkpoint would, so the resumed run's counters equal the uninterrupted run's.
        if not self._interrupting or self._validated_at != trainer.global_step or trainer.fit_loop.epoch_loop.done:
            return
        state = ((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.state_dict") or {}
        if "_batches_that_stepped" in state:
            state["_batches_that_stepped"] -= 1

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            self._stopped(trainer, exception)
        finally:
            self._restore_threads()  # Lightning calls no teardown hook after an exception

    def _stopped(self, trainer: L.Trainer, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return  # a crash (or a second Ctrl+C) may leave a torn step: last.ckpt keeps the last complete one
        if trainer.state.fn != TrainerFn.FITTING:
            if trainer.is_global_zero:
                print(f"interrupted: {trainer.state.fn.value} stopped; no output was written.", file=sys.stderr)
            return
        if trainer.sanity_checking or trainer.global_step == self._start_step:
            where = f"nothing was trained since step {trainer.global_step}"
        else:
            self._interrupting = True
            try:
                self._save(trainer)
            finally:
                self._interrupting = False
            self.saved_step = trainer.global_step
            where = f"step {trainer.global_step} (epoch {trainer.current_epoch}) saved to {self.ckpt_path}"
        if trainer.is_global_zero:
            print(
                f"interrupted: {where}. Resume with the same command plus --ckpt_path last "
                f"(exit status {EXIT_INTERRUPTED}: interrupted, resumable).",
                file=sys.stderr,
                flush=True,
            )
