"""Pipeline stages: the pipeline file, each stage's key (resolved config and input hashes), its stamp, the
preflight of what it writes, and running its process. ``gencnp.pipeline.run`` runs them (and re-exports these names).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gencnp.callbacks.preemption import EXIT_INTERRUPTED
from gencnp.io.checkpoints import read_checkpoint
from gencnp.io.files import check_name_lengths, check_writable_dir

__all__ = [
    "Stage",
    "load_pipeline",
    "resolved_config",
    "file_hash",
    "preflight_stages",
    "PipelineError",
    "DataUnavailable",
    "StageFailed",
    "StageInterrupted",
    "resume_point",
    "STAMP_FORMAT",
    "REPO",
]

REPO = Path(__file__).resolve().parents[2]
STAMP_FORMAT = 1
TOP_KEYS = ("stages", "report", "logger")
STAGE_FIELDS = ("name", "entry", "command", "config", "args", "inputs", "outputs")


class PipelineError(RuntimeError):
    """A pipeline or stage config that cannot run (exit code 2)."""


class DataUnavailable(PipelineError):
    """The data of a stage could not be found or obtained; the message is the data module's own."""


class StageFailed(RuntimeError):
    """A stage's process exited non-zero (the pipeline exits with that code)."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


class StageInterrupted(StageFailed):
    """A stage (or the pipeline) stopped by a signal: not done, resumable (exit code 75, ``EX_TEMPFAIL``)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_INTERRUPTED)


@dataclass
class Stage:
    """One step of the pipeline: ``python <entry> <command> --config <config> <args...>``.

    Args:
        name: unique stage name (``--redo`` takes it).
        entry: entry-point script (``train.py`` or ``evaluate.py``).
        command: its sub-command (``fit``, ``predict``, ``report``, ...).
        config: the stage's YAML config.
        args: extra command-line arguments (part of the resolved config, hence of the key).
        inputs: files the stage reads, relative to the working folder (their bytes are part of the key).
        outputs: files the stage must write, relative to the working folder; the stamp lives next to the first.
    """

    name: str
    entry: str
    command: str
    config: str
    args: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def stamp_path(self, workdir: Path) -> Path:
        return (workdir / self.outputs[0]).parent / f"{self.name}.stamp.json"

    def attempt_path(self, workdir: Path) -> Path:
        """The record of a run of this stage that has not finished (written before it starts, removed once its stamp
        is written): a rerun of a ``fit`` stage with the same key resumes from its ``last.ckpt``."""
        return self.stamp_path(workdir).with_name(f"{self.name}.attempt.json")

    @property
    def resumable(self) -> bool:
        return Path(self.entry).name == "train.py" and self.command == "fit"


# ----- the pipeline file -----
def load_pipeline(path: str | Path) -> dict[str, Any]:
    """Read and check a pipeline YAML; returns ``{'stages': [Stage, ...], 'report': str | None, 'logger': ...}``."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline config '{path}' does not exist; try configs/fashion_mnist/pipeline.yaml.")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(spec, dict):
        raise PipelineError(f"pipeline config '{path}' must be a mapping with keys {', '.join(TOP_KEYS)}.")
    unknown = sorted(set(spec) - set(TOP_KEYS))
    if unknown:
        raise PipelineError(f"pipeline config '{path}' has unknown keys {unknown}; allowed: {', '.join(TOP_KEYS)}.")
    raw = spec.get("stages")
    if not isinstance(raw, list) or not raw:
        raise PipelineError(
            f"pipeline config '{path}' needs a non-empty list 'stages' (fields: {', '.join(STAGE_FIELDS)})."
        )
    stages, names = [], set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise PipelineError(f"stage {i} of '{path}' must be a mapping with fields {', '.join(STAGE_FIELDS)}.")
        bad = sorted(set(item) - set(STAGE_FIELDS))
        missing = [k for k in ("name", "entry", "command", "config", "outputs") if not item.get(k)]
        if bad or missing:
            raise PipelineError(
                f"stage {item.get('name', i)} of '{path}': unknown fields {bad}, missing fields {missing}; "
                f"fields are {', '.join(STAGE_FIELDS)} (outputs must list at least one file)."
            )
        for key in ("args", "inputs", "outputs"):
            value = item.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
                raise PipelineError(
                    f"stage '{item['name']}' of '{path}': '{key}' must be a list of strings, got {value!r}."
                )
            item[key] = [str(v) for v in value]
        if item["name"] in names:
            raise PipelineError(f"stage name '{item['name']}' appears twice in '{path}'; names must be unique.")
        names.add(item["name"])
        stages.append(Stage(**item))
    return {"stages": stages, "report": spec.get("report"), "logger": spec.get("logger")}


def _find(path: str, what: str) -> Path:
    """A script or config: absolute, else relative to the current folder, else to gencnp's repository."""
    p = Path(path)
    for candidate in [p] if p.is_absolute() else [Path.cwd() / p, REPO / p]:
        if candidate.is_file():
            return candidate.resolve()
    raise PipelineError(f"{what} '{path}' not found (looked in {Path.cwd()} and {REPO}); fix the path.")


@contextlib.contextmanager
def _chdir(folder: Path):
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


# ----- keys -----
def resolved_config(argv: Sequence[str]) -> str:
    """The entry point's ``--print_config`` output for ``argv = [script, command, args...]``, run in-process.

    Raises:
        PipelineError: the arguments do not parse (the parser's message is included).
    """
    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = [str(a) for a in argv] + ["--print_config"]
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(argv[0]), run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old_argv
    if code not in (0, None) or not out.getvalue().strip():
        tail = "\n".join(err.getvalue().strip().splitlines()[-12:])
        raise PipelineError(f"`{' '.join(map(str, argv))} --print_config` failed (exit {code}):\n{tail}")
    return out.getvalue()


def file_hash(path: Path) -> str | None:
    """sha256 of a file's bytes (``None`` when missing)."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_stamp(path: Path) -> dict | None:
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("format") == STAMP_FORMAT else None


def _why_redo(stage: Stage, workdir: Path, config_hash: str, inputs: dict[str, str | None]) -> str | None:
    """Why ``stage`` must run (``None``: its stamp still holds)."""
    path = stage.stamp_path(workdir)
    if not path.exists():
        return "no stamp yet"
    stamp = _read_stamp(path)
    if stamp is None:
        return f"stamp {path} unreadable"
    if stamp.get("config_hash") != config_hash:
        return "resolved config changed"
    for name, h in inputs.items():
        if (stamp.get("inputs") or {}).get(name) != h:
            return f"input {name} changed"
    for name in stage.outputs:
        h = file_hash(workdir / name)
        if h is None:
            return f"output {name} missing"
        if (stamp.get("outputs") or {}).get(name) != h:
            return f"output {name} differs from the stamp"
    return None


def _checkpoint_folder(text: str) -> str | None:
    """The folder of the first ``ModelCheckpoint`` with ``save_last`` in a resolved config (where ``--ckpt_path last``
    looks)."""
    trainer = (yaml.safe_load(text) or {}).get("trainer")
    for cb in (trainer.get("callbacks") if isinstance(trainer, dict) else None) or []:
        args = (cb.get("init_args") or {}) if isinstance(cb, dict) else {}
        if args.get("save_last") and args.get("dirpath") and "://" not in str(args["dirpath"]):
            return str(args["dirpath"])
    return None


def resume_point(
    stage: Stage, workdir: Path, text: str, config_hash: str, inputs: dict[str, str | None]
) -> tuple[Path, int] | None:
    """``(last.ckpt, its step)`` when an unfinished earlier run of a ``fit`` stage (its attempt record) had the same
    key (resolved config and inputs) and left a readable ``last.ckpt``; ``None``: start over."""
    record = _read_stamp(stage.attempt_path(workdir))
    if not stage.resumable or record is None:
        return None
    if record.get("config_hash") != config_hash or record.get("inputs") != inputs:
        return None
    folder = _checkpoint_folder(text)
    found = sorted((workdir / folder).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder else []
    if not found:
        return None
    try:
        return found[-1], int(read_checkpoint(found[-1]).get("global_step") or 0)
    except (OSError, ValueError):  # damaged: the stage's own preflight would refuse it; start over instead
        return None


# ----- preflight of the stages -----
def _config_folders(text: str) -> list[tuple[str, str]]:
    """``(folder, what)`` for every place a stage's resolved config writes (logger, checkpoints, bank, report)."""
    cfg = yaml.safe_load(text) or {}
    out: list[tuple[str, str]] = []
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    loggers = trainer.get("logger")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(lg, dict) and (lg.get("init_args") or {}).get("save_dir"):
            out.append((str(lg["init_args"]["save_dir"]), "log folder (trainer.logger save_dir)"))
    if trainer.get("default_root_dir"):
        out.append((str(trainer["default_root_dir"]), "run folder (trainer.default_root_dir)"))
    for cb in trainer.get("callbacks") or []:
        args = (cb.get("init_args") or {}) if isinstance(cb, dict) else {}
        name = str(cb.get("class_path", "callback")).rpartition(".")[2] if isinstance(cb, dict) else "callback"
        if args.get("dirpath"):
            out.append((str(args["dirpath"]), f"checkpoint folder of {name}"))
        if args.get("output_dir"):
            out.append((str(args["output_dir"]), f"output folder of {name}"))
        if isinstance(args.get("path"), str) and args["path"].endswith(".safetensors"):
            out.append((str(Path(args["path"]).parent), f"folder of {name}'s file"))
    if cfg.get("out_dir"):
        out.append((str(cfg["out_dir"]), "report folder (out_dir)"))
    return [(d, w) for d, w in out if "://" not in d]


def preflight_stages(
    to_run: Sequence[tuple[Stage, str]], stages: Sequence[Stage], workdir: Path, quiet: bool = False
) -> None:
    """Check every stage that will run before the first one starts: each input exists or is an output of an earlier
    stage, and every folder it writes (its outputs', its stamp's and log's, and the logger, checkpoint, bank and
    report folders of its resolved config) can be written. Nothing is created.

    Raises:
        PipelineError: one message naming the stage, the path and the fix (exit code 2).
    """
    produced: set[str] = set()
    order = {st.name: i for i, st in enumerate(stages)}
    for st in stages:
        if st.name not in {s.name for s, _ in to_run}:
            produced |= set(st.outputs)
    for st, text in sorted(to_run, key=lambda item: order[item[0].name]):
        missing = [name for name in st.inputs if name not in produced and not (workdir / name).is_file()]
        if missing:
            raise PipelineError(
                f"stage '{st.name}' needs {', '.join(missing)}, which does not exist and no earlier "
                "stage produces; add the stage that writes it, or fix 'inputs'."
            )
        fix = f"change the path in {st.config}, or use another --workdir."
        folders = [(str(Path(o).parent), f"folder of the output '{o}'") for o in st.outputs]
        folders += _config_folders(text)
        for out in st.outputs:
            if (workdir / out).is_dir():
                raise PipelineError(
                    f"stage '{st.name}': its output '{out}' is a folder, not a file; move it away or "
                    f"fix 'outputs'. Nothing was run."
                )
        for folder, what in folders:
            try:
                check_name_lengths(workdir / folder, f"{what} of stage '{st.name}'", fix)
                for out in st.outputs:
                    check_name_lengths(workdir / out, f"output of stage '{st.name}'", fix)
                check_writable_dir(workdir / folder, f"{what} of stage '{st.name}'", fix)
            except (OSError, ValueError) as err:
                raise PipelineError(f"{err} No stage was run.") from err
        produced |= set(st.outputs)


def _log_path(st: Stage, workdir: Path) -> Path:
    """A new ``<output folder>/<stage>.<date-time>.<random>.log`` (created, mode 0644): two runs, concurrent or not,
    never write the same log."""
    folder = st.stamp_path(workdir).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{st.name}.{time.strftime('%Y%m%d-%H%M%S')}.", suffix=".log", dir=folder)
    os.close(fd)
    os.chmod(name, 0o644)
    return Path(name)


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{seconds:.1f}s")


def _show(path: Path) -> str:
    """A path relative to the current folder when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _run_stage(argv: list[str], workdir: Path, log: Path | None) -> tuple[int, int | None]:
    """Run a stage's process; returns ``(exit code, signal the pipeline received meanwhile or None)``.

    SIGTERM, SIGINT or SIGUSR1 to the pipeline is passed on to the stage as SIGTERM (a fit then saves its exact step
    and exits 75), and the pipeline waits for it to finish instead of dying first: a scheduler's or a ``kill``'s
    signal reaches the stage even when sent to the pipeline alone. A stage that received the signal itself too (the
    whole process group: Ctrl+C, a scheduler) handles repeated SIGTERMs as one.
    """
    received: list[int] = []
    out = open(log, "w", encoding="utf-8") if log is not None else None  # noqa: SIM115  (closed below)
    try:
        # A log gets one line per finished part, not progress bars redrawn in place (tqdm reads TQDM_DISABLE).
        env = {**os.environ, "TQDM_DISABLE": "1"} if out else None
        proc = subprocess.Popen(
            [sys.executable, *argv], cwd=workdir, stdout=out, stderr=subprocess.STDOUT if out else None, env=env
        )

        def forward(signum: int, frame: Any) -> None:
            received.append(signum)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

        names = ("SIGTERM", "SIGINT", "SIGUSR1")
        sigs = [getattr(signal, n) for n in names if hasattr(signal, n)]
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, forward) for s in sigs} if main else {}
        try:
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        if out is not None:
            out.close()
    return code, (received[0] if received else None)
