"""Preemption trials: SIGTERM at seeded random steps of a fit, resume with ``--ckpt_path last``, compare bitwise.

    python benchmarks/preempt.py --config configs/fashion_mnist/gencnp.yaml --trials 10 --seed 0 \\
        --out runs/preempt [--max_steps 80] [-- extra train.py arguments]

One uninterrupted ``python train.py fit`` (the reference), then per trial: a fit that gets SIGTERM from this process
as soon as it reports finishing the drawn step (a probe callback prints every finished step), and its rerun with
``--ckpt_path last``. Each trial checks: the interrupted fit exits with status 75; the saved ``last.ckpt`` holds
the last step the fit reported finishing (the step it had reached when it stopped); the resumed fit exits 0 and
its ``last.ckpt`` and ``best.ckpt`` equal the reference's bitwise (weights and buffers, optimiser state, scheduler
state, loop counters, data position). Without ``--max_steps`` the fit runs as configured (the whole default GEN-CNP
fit: 2 epochs). Every fit runs with ``OMP_NUM_THREADS=1``: CPU float results depend on the thread count (how sums
are split), so the reference and every trial use the same one. Prints one line per trial and a JSON summary (also
written to ``<out>/preempt.json``); exit status 1 when a trial fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
PROBE = "preempt-probe step"
sys.path.insert(0, str(ROOT))


class StepProbe(L.Callback):
    """Prints ``preempt-probe step N`` after every finished training step (read by the parent to time its signal)."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        print(f"{PROBE} {trainer.global_step}", flush=True)


def fit_command(config: str, out: Path, max_steps: int | None, extra: list[str], probe: bool) -> list[str]:
    """``train.py fit`` into ``out`` (logs and checkpoints); the probe callback appended last."""
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", config]
    cmd += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cmd += ["--trainer.logger.init_args.save_dir", str(out), "--trainer.callbacks.init_args.dirpath", str(out)]
    if max_steps is not None:
        cmd += ["--trainer.max_steps", str(max_steps)]
    cmd += extra
    if probe:
        cmd += ["--trainer.callbacks+=preempt.StepProbe"]
    return cmd


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def run(cmd: list[str], log: Path) -> int:
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT).returncode


def interrupted_run(cmd: list[str], log: Path, at: int, sig: int = signal.SIGTERM) -> tuple[int, int | None, int]:
    """Run ``cmd``, send ``sig`` once it reports finishing step ``at``; returns ``(exit status, last step it
    reported finishing, step it was signalled after)``."""
    reached, signalled = None, -1
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if line.startswith(PROBE):
                reached = int(line.split()[-1])
                if reached >= at and signalled < 0:
                    proc.send_signal(sig)
                    signalled = reached
        return proc.wait(), reached, signalled


def read(path: Path) -> dict:
    from gencnp.io.checkpoint_io import read_checkpoint

    return read_checkpoint(path)


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths at which two checkpoint structures differ (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        return [] if same and a.shape == b.shape and torch.equal(a, b) else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(set(a) ^ set(b), key=str)[:5]}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}/{i}")]
    return [] if a == b else [where]


def _relative(obj: Any, folder: str) -> Any:
    """``obj`` with ``folder`` in every string replaced by ``<run>`` (callback states hold checkpoint paths)."""
    if isinstance(obj, str):
        return obj.replace(folder, "<run>")
    if isinstance(obj, dict):
        return {_relative(k, folder): _relative(v, folder) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_relative(v, folder) for v in obj)
    return obj


def compare(a: dict, b: dict, folder_a: Path, folder_b: Path) -> list[str]:
    """Where two checkpoints differ: everything (state, optimiser, schedulers, loops, callbacks, data position,
    hyper-parameters, hashes) once each run's own folder is named alike."""
    return differences(_relative(a, str(folder_a)), _relative(b, str(folder_b)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/fashion_mnist/gencnp.yaml")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the draw of the signalled steps")
    p.add_argument("--max_steps", type=int, default=None, help="shorten the fit (default: as configured)")
    p.add_argument("--steps", type=int, default=None, help="steps of the full fit (drawn from 1..steps-1)")
    p.add_argument("--out", default="runs/preempt")
    p.add_argument("extra", nargs="*", help="extra train.py arguments (after --)")
    a = p.parse_args(argv)
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    ref = out / "reference"
    rc = run(fit_command(a.config, ref, a.max_steps, a.extra, probe=False), out / "reference.log")
    if rc != 0:
        print(f"reference fit failed (exit {rc}); see {out / 'reference.log'}")
        return 1
    reference = {n: read(ref / f"{n}.ckpt") for n in ("last", "best")}
    total = a.steps or a.max_steps or int(reference["last"]["global_step"])
    draw = random.Random(a.seed)
    rows, ok = [], True
    print(f"reference: {total} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    for i in range(a.trials):
        at = draw.randint(1, total - 1)
        folder = out / f"trial{i}"
        cmd = fit_command(a.config, folder, a.max_steps, a.extra, probe=True)
        code, reached, signalled = interrupted_run(cmd, out / f"trial{i}.log", at)
        saved = int(read(folder / "last.ckpt")["global_step"]) if (folder / "last.ckpt").is_file() else None
        resumed = run(cmd + ["--ckpt_path", "last"], out / f"trial{i}.resume.log")
        diff = {}
        if resumed == 0:
            diff = {n: compare(read(folder / f"{n}.ckpt"), reference[n], folder, ref) for n in ("last", "best")}
        row = {
            "trial": i,
            "drawn_step": at,
            "signalled_after_step": signalled,
            "exit": code,
            "reached": reached,
            "saved_step": saved,
            "resume_exit": resumed,
            "differences": diff,
        }
        row["pass"] = bool(code == 75 and saved == reached and resumed == 0 and diff and not any(diff.values()))
        ok &= row["pass"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "config": a.config,
        "max_steps": a.max_steps,
        "extra": a.extra,
        "total_steps": total,
        "seed": a.seed,
        "trials": rows,
        "passed": sum(r["pass"] for r in rows),
        "seconds": round(time.perf_counter() - t0),
    }
    (out / "preempt.json").write_text(json.dumps(summary, indent=2))
    print(f"{summary['passed']}/{len(rows)} trials passed in {summary['seconds']} s ({out / 'preempt.json'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
