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
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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


def _run_stage(argv: list[str], workdir: Path, log: Path | None) -> int:
    cmd = [sys.executable, *argv]
    if log is None:
        return subprocess.run(cmd, cwd=workdir).returncode
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        return subprocess.run(cmd, cwd=workdir, stdout=f, stderr=subprocess.STDOUT).returncode
