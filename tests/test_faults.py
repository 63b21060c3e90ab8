"""Real faults, not patched functions: a disk that refuses writes, made by the operating system.

``RLIMIT_FSIZE`` (``ulimit -f``) in a ``train.py`` / ``evaluate.py`` subprocess makes every write past the limit fail
with ``EFBIG`` (SIGXFSZ ignored, as Python does by default), during the checkpoint, bank and figure writes. The
report's ``report.json`` comes after its figures, which are larger, so a size limit cannot reach it: there a small
tmpfs mounted on the report folder runs out of space (``ENOSPC``) at ``report.json`` (skipped where mounting is not
allowed). Each time: exit status 1, one ``stopped:`` line naming the file, no traceback, no partial or temporary
file, and the files written before unchanged (same bytes, same inode: never replaced).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUIET, ROOT, snapshot

pytestmark = pytest.mark.slow  # every test runs train.py or evaluate.py as a subprocess

REPORT_FAST = ["--limit", "120", "--subset_n", "40", "--bootstrap_samples", "20"]


def _limit(size: int | None):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        if size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return preexec


def run(args: list[str], limit: int | None = None, check: bool | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` with a file-size limit (bytes) or none; without a limit (or with ``check``) it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, preexec_fn=_limit(limit), capture_output=True, text=True
    )
    if check if check is not None else limit is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_refused(proc: subprocess.CompletedProcess, prog: str, why: str, file: str) -> None:
    stopped = [line for line in proc.stderr.splitlines() if f"{prog}: stopped:" in line]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(stopped) == 1 and why in stopped[0] and file in stopped[0], proc.stderr[-3000:]
    assert "previous file is unchanged" in stopped[0] and "Traceback" not in proc.stderr


def inodes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_ino for p in sorted(folder.rglob("*")) if p.is_file()}


def bank_args(runs: dict, bank: Path) -> list[str]:
    return [
        str(ROOT / "train.py"),
        "predict",
        "--config",
        str(ROOT / "configs/synthetic/bank.yaml"),
        *QUIET,
        "--ckpt_path",
        str(runs["gencnp"]),
        "--model.init_args.target_checkpoint",
        str(runs["target"]),
        "--trainer.callbacks.init_args.path",
        str(bank),
        # per-class taus too: a bank file clearly bigger than the run's config.yaml, so a limit fits between them
        "--trainer.callbacks.init_args.per_class",
        "true",
        "--trainer.default_root_dir",
        str(bank.parent / "bank_logs"),
    ]


def report_args(runs: dict, bank: Path, out: Path) -> list[str]:
    return [
        str(ROOT / "evaluate.py"),
        "report",
        "--config",
        str(ROOT / "configs/synthetic/evaluate.yaml"),
        "--generator",
        str(runs["gencnp"]),
        "--bank",
        str(bank),
        "--out_dir",
        str(out),
        *REPORT_FAST,
    ]


@pytest.fixture(scope="module")
def outputs(synthetic_runs, tmp_path_factory) -> dict:
    """A bank and a report written without limits: the files a failed rerun must leave as they are."""
    work = tmp_path_factory.mktemp("faults")
    run(bank_args(synthetic_runs, work / "bank.safetensors"))
    run(report_args(synthetic_runs, work / "bank.safetensors", work / "eval"))
    return {"work": work, **synthetic_runs}


def test_checkpoint_write_past_a_file_size_limit(outputs, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("best.ckpt", "last.ckpt"):
        shutil.copy(outputs["dir"] / "gencnp" / name, folder / name)
    size = (folder / "last.ckpt").stat().st_size
    before, nodes = snapshot(folder), inodes(folder)
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(folder), "filename": "best", "monitor": "val/score", "mode": "max"},
        }
    ]
    callbacks[0]["init_args"].update(save_last=True, enable_version_counter=False, auto_insert_metric_name=False)
    args = [str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/synthetic/gencnp.yaml"), *QUIET]
    args += ["--trainer.max_steps", "3", "--trainer.callbacks", json.dumps(callbacks)]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    args += ["--model.init_args.target_checkpoint", str(outputs["target"])]
    proc = run(args, limit=size // 2)  # logs and config.yaml fit, a checkpoint does not
    assert_refused(proc, "train.py", "file size limit (ulimit -f)", ".ckpt")
    assert snapshot(folder) == before and inodes(folder) == nodes


def test_bank_write_past_a_file_size_limit(outputs, tmp_path):
    bank = tmp_path / "bank.safetensors"
    shutil.copy(outputs["work"] / "bank.safetensors", bank)
    config = (outputs["work"] / "bank_logs/config.yaml").stat().st_size
    assert bank.stat().st_size > config + 200  # a limit between them lets config.yaml through, not the bank
    before, nodes = snapshot(tmp_path), inodes(tmp_path)
    proc = run(bank_args(outputs, bank), limit=(bank.stat().st_size + config) // 2)
    assert_refused(proc, "train.py", "file size limit", "bank.safetensors")
    assert snapshot(tmp_path) == {**before, **snapshot(tmp_path / "bank_logs")}  # only the new config.yaml
    assert {k: v for k, v in inodes(tmp_path).items() if "bank_logs" not in k} == nodes


def test_figure_write_past_a_file_size_limit(outputs, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(outputs["work"] / "eval", out)
    smallest = min(p.stat().st_size for p in out.glob("*.png"))
    before, nodes = snapshot(out), inodes(out)
    proc = run(report_args(outputs, outputs["work"] / "bank.safetensors", out), limit=smallest // 2)
    assert_refused(proc, "evaluate.py", "file size limit", ".png")
    assert snapshot(out) == before and inodes(out) == nodes


@pytest.fixture
def small_tmpfs(tmp_path):
    """A folder on its own tmpfs of a size chosen by the test (``mount(size)``); skipped where mounting fails."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for f in mounted:
        subprocess.run(["umount", str(f)], check=False)


def test_report_json_write_on_a_full_tmpfs(outputs, small_tmpfs):
    src = outputs["work"] / "eval"
    kept = {name: (src / name).stat().st_size for name in ("report.json", "report.md")}
    figures = sum(p.stat().st_size for p in src.glob("*.png"))
    # Room for the previous report and every figure, and half of the new report.json: the figures are written, the
    # report fails. tmpfs counts whole 4 KiB pages: a page of slack per file.
    size = sum(kept.values()) + figures + 4096 * (len(kept) + 8) + kept["report.json"] // 2
    out = small_tmpfs(size)
    for name in kept:
        shutil.copy(src / name, out / name)
    before = {name: (out / name).read_bytes() for name in kept}
    nodes = {name: (out / name).stat().st_ino for name in kept}
    proc = run(report_args(outputs, outputs["work"] / "bank.safetensors", out), check=False)
    assert_refused(proc, "evaluate.py", "no space left on the device", "report.json")
    assert {name: (out / name).read_bytes() for name in kept} == before
    assert {name: (out / name).stat().st_ino for name in kept} == nodes
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
