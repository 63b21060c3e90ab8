"""The main job in one command: target fit -> GEN-CNP fit -> bank export -> evaluation report.

``python -m gencnp.pipeline.run --config configs/fashion_mnist/pipeline.yaml``

Each stage runs as a subprocess of an existing entry point (``train.py``, ``evaluate.py``), so stages stay as
isolated as when typed by hand. The pipeline YAML lists them::

    report: runs/fashion_mnist/eval/report.json      # read for the final summary
    logger: null                                     # or configs/loggers/wandb.yaml: --trainer.logger of fit stages
    stages:
      - name: target
        entry: train.py                              # script, found in the current folder or gencnp's repository
        command: fit
        config: configs/fashion_mnist/target.yaml
        args: []                                     # extra command-line arguments
        inputs: []                                   # files the stage reads (hashed)
        outputs: [runs/fashion_mnist/target/best.ckpt]

**Reuse.** A stage is skipped when its key is unchanged: the hash of its **resolved** config (the entry point's
own ``--print_config`` output, every default included, with the extra arguments) and of its input files. The key
is stored in a JSON stamp next to the first output (``<folder>/<stage>.stamp.json``), written atomically after
the stage succeeds and removed before it reruns. A stage also reruns when an output is missing or differs from
the stamp's hash, when ``--force`` or ``--redo NAME`` asks, and whenever an earlier stage ran in this invocation
(every downstream stage is redone). Code changes do not invalidate stamps: use ``--redo``/``--force``.

**Data.** Before the first stage, every data module of the stages is built from its resolved config (their
constructors look for the files). When Fashion-MNIST is missing and ``data_dir`` is unset, the pipeline installs
the Debian package ``dataset-fashion-mnist`` when ``apt-get`` exists and it runs as root; otherwise, with
``--download``, torchvision downloads into the module's ``torchvision_root``. When nothing works it stops with the
data module's own error message (exit code 2) before any stage runs.

**Preflight.** Then every stage that will run is checked before the first starts (``preflight_stages``): its
inputs exist or an earlier stage writes them, and every folder it writes (outputs, stamp, ``--quiet`` log, and the
logger, checkpoint, bank and report folders of its resolved config) is writable with names the filesystem accepts.
A failure is one message and exit code 2; an ``OSError`` later (a full disk) is one line and exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from gencnp.callbacks.preemption import EXIT_INTERRUPTED
from gencnp.data.modules import FashionMNISTDataModule
from gencnp.io.checkpoints import read_checkpoint
from gencnp.io.files import check_writable_dir, path_exists, write_json
from gencnp.pipeline.stages import (  # noqa: F401  (re-exported: the pipeline's names stay importable from here)
    REPO,
    STAMP_FORMAT,
    DataUnavailable,
    PipelineError,
    Stage,
    StageFailed,
    StageInterrupted,
    _chdir,
    _checkpoint_folder,
    _find,
    _fmt_time,
    _log_path,
    _read_stamp,
    _run_stage,
    _show,
    _why_redo,
    file_hash,
    load_pipeline,
    preflight_stages,
    resolved_config,
    resume_point,
)
from gencnp.version import __version__

__all__ = [
    "Stage",
    "load_pipeline",
    "run_pipeline",
    "obtain_data",
    "resolved_config",
    "summary",
    "main",
    "PipelineError",
    "DataUnavailable",
    "StageFailed",
    "StageInterrupted",
]


# ----- data -----
def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def obtain_data(
    specs: Sequence[dict], download: bool = False, say: Callable[[str], None] = print, quiet: bool = False
) -> None:
    """Make sure every data module can find its files, before any stage runs.

    For each ``{'class_path', 'init_args'}``: build the module (its constructor looks for the files). When
    Fashion-MNIST is missing and ``data_dir`` is unset: ``apt-get install -y dataset-fashion-mnist`` when
    ``apt-get`` exists and we are root; then, when ``download``, the module's own download (torchvision).

    Raises:
        DataUnavailable: nothing worked; the message is the data module's own error.
    """
    seen = set()
    for spec in specs:
        key = json.dumps(spec, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        cls = _import(spec["class_path"])
        kwargs = dict(spec.get("init_args") or {})
        try:
            cls(**kwargs)
            continue
        except FileNotFoundError as exc:
            error = exc
        if issubclass(cls, FashionMNISTDataModule) and kwargs.get("data_dir") is None:
            root = getattr(os, "geteuid", lambda: -1)() == 0
            if shutil.which("apt-get") and root:
                say("data: Fashion-MNIST not found; installing the Debian package dataset-fashion-mnist (apt-get)")
                if _apt_install("dataset-fashion-mnist", quiet):
                    try:
                        cls(**kwargs)
                        continue
                    except FileNotFoundError as exc:
                        error = exc
            elif not download:
                say(
                    "data: Fashion-MNIST not found; apt-get needs root and an apt system"
                    f" (apt-get: {shutil.which('apt-get') or 'absent'}, root: {root}); --download lets torchvision fetch it"
                )
        if download and "download" in inspect.signature(cls).parameters and kwargs.get("data_dir") is None:
            say(f"data: downloading with torchvision ({cls.__name__}, download: true)")
            try:
                dm = cls(**{**kwargs, "download": True})
                dm.prepare_data()
                dm.setup()
                cls(**kwargs)
                continue
            except Exception as exc:  # noqa: BLE001  (network errors have many types; report and stop)
                raise DataUnavailable(f"{cls.__name__}: download failed: {exc}\n{error}") from exc
        raise DataUnavailable(str(error)) from error


def _apt_install(package: str, quiet: bool) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = subprocess.DEVNULL if quiet else None
    install = ["apt-get", "install", "-y", "-q", package]
    for cmds in ([install], [["apt-get", "update", "-q"], install]):
        try:
            if all(subprocess.run(c, env=env, stdout=out, stderr=out, timeout=900).returncode == 0 for c in cmds):
                return True
        except (OSError, subprocess.SubprocessError):
            return False
    return False


# ----- the run -----
def run_pipeline(
    config: str | Path,
    workdir: str | Path = ".",
    download: bool = False,
    force: bool = False,
    redo: Sequence[str] = (),
    logger: str | None = None,
    quiet: bool = False,
    dry_run: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every stage of a pipeline YAML, then summarise ``report.json``.

    Args:
        config: the pipeline YAML (see the module docstring).
        workdir: folder the stages run in; inputs, outputs and the configs' relative paths refer to it.
        download: allow torchvision to download data that is missing (after the Debian package).
        force: redo every stage.
        redo: names of stages to redo (with every stage after them).
        logger: a logger YAML (``configs/loggers/*.yaml``) passed as ``--trainer.logger`` to ``train.py fit``
            stages (overrides the pipeline file's ``logger``).
        quiet: send each stage's output to a new ``<output folder>/<stage>.<date-time>.<random>.log`` instead of the
            terminal (one file per run: concurrent runs never share a log).
        dry_run: only say what would run or be reused (no data step, no stage runs).
        say: progress printer (default ``print`` with flush).

    Returns:
        ``{'stages': [{'name', 'status' ('ran' | 'reused' | 'would run' | 'would reuse'), 'reason', 'seconds',
        'outputs'}], 'summary': dict | None, 'seconds': float}``.
    """
    say = say or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    spec = load_pipeline(config)
    stages: list[Stage] = spec["stages"]
    workdir = _working_folder(Path(workdir).resolve())
    unknown = sorted(set(redo) - {s.name for s in stages})
    if unknown:
        raise PipelineError(f"--redo names unknown stages {unknown}; stages: {', '.join(s.name for s in stages)}.")
    logger = logger or spec["logger"]
    argvs, printed = _stage_commands(stages, workdir, str(_find(logger, "logger config")) if logger else None)
    if not dry_run:
        specs = []
        for text in printed:
            data = (yaml.safe_load(text) or {}).get("data")
            if isinstance(data, dict) and data.get("class_path"):
                specs.append(data)
        with _chdir(workdir):
            obtain_data(specs, download, say, quiet)
    plan = _plan(stages, printed, workdir, force, redo)
    if not dry_run:
        # Every stage that will run: inputs present or produced upstream, every folder it writes writable, before
        # the first stage starts (a read-only report folder must not cost a rerun of training first).
        preflight_stages(
            [(st, text) for st, text, (_, r) in zip(stages, printed, plan) if r is not None], stages, workdir, quiet
        )
    results = []
    for i, (st, argv, text, (config_hash, reason)) in enumerate(zip(stages, argvs, printed, plan), 1):
        head = f"[{i}/{len(stages)}] {st.name}"
        results.append(_run_or_reuse(st, argv, text, config_hash, reason, head, workdir, quiet, dry_run, say))
    out: dict[str, Any] = {"stages": results, "summary": None, "seconds": time.perf_counter() - t0}
    if not dry_run:
        _finish(out, stages, spec["report"], workdir, say)
    return out


def _working_folder(workdir: Path) -> Path:
    """``workdir``, created when missing (after checking it can be)."""
    if not (path_exists(workdir) and workdir.is_dir()):  # _exists: a name too long to stat is reported below
        try:
            check_writable_dir(workdir, "working folder (--workdir)", "choose another --workdir.")
            workdir.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as err:
            raise PipelineError(f"{err} No stage was run.") from err
    return workdir


def _stage_commands(stages: Sequence[Stage], workdir: Path, logger_path: str | None) -> tuple[list, list[str]]:
    """Each stage's command line ``[entry, command, --config, config, args...]`` and its resolved config."""
    argvs, printed = [], []
    for st in stages:
        argv = [
            str(_find(st.entry, f"stage '{st.name}': entry")),
            st.command,
            "--config",
            str(_find(st.config, f"stage '{st.name}': config")),
        ]
        if logger_path and Path(st.entry).name == "train.py" and st.command == "fit":
            argv += ["--trainer.logger", logger_path]
        argv += st.args
        argvs.append(argv)
        with _chdir(workdir):
            try:
                printed.append(resolved_config(argv))
            except PipelineError as exc:
                raise PipelineError(f"stage '{st.name}': its config does not parse. {exc}") from exc
    return argvs, printed


def _plan(
    stages: Sequence[Stage], printed: Sequence[str], workdir: Path, force: bool, redo: Sequence[str]
) -> list[tuple[str, str | None]]:
    """``(config hash, why it runs or None)`` per stage; a stage that runs redoes every stage after it."""
    plan, ran_before = [], None
    for st, text in zip(stages, printed):
        config_hash = hashlib.sha256(f"{Path(st.entry).name}\n{st.command}\n{text}".encode()).hexdigest()
        if force:
            reason = "--force"
        elif st.name in redo:
            reason = "--redo"
        elif ran_before is not None:
            reason = f"upstream stage '{ran_before}' ran"
        else:
            reason = _why_redo(st, workdir, config_hash, {name: file_hash(workdir / name) for name in st.inputs})
        ran_before = st.name if reason is not None else ran_before
        plan.append((config_hash, reason))
    return plan


def _run_or_reuse(
    st: Stage,
    argv: list[str],
    text: str,
    config_hash: str,
    reason: str | None,
    head: str,
    workdir: Path,
    quiet: bool,
    dry_run: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Run one stage (or reuse it, or say what would happen) and write its stamp; returns its result row.

    A ``fit`` stage whose earlier run did not finish (attempt record, same key) resumes from its ``last.ckpt``
    (``--ckpt_path last``), unless ``--force`` or ``--redo`` asks for a fresh run."""
    inputs = {name: file_hash(workdir / name) for name in st.inputs}  # now: upstream stages may have rewritten them
    shown = f"python {Path(st.entry).name} {st.command} --config {st.config}" + "".join(f" {a}" for a in argv[4:])
    row = {"name": st.name, "reason": reason, "seconds": 0.0, "outputs": list(st.outputs)}
    if reason is None:
        stamp = _read_stamp(st.stamp_path(workdir)) or {}
        row["status"] = "would reuse" if dry_run else "reused"
        say(
            f"{head}: reused (config and inputs unchanged since {stamp.get('finished', '?')}; "
            f"stamp {st.stamp_path(workdir)})"
        )
        return row
    resume = None if reason in ("--force", "--redo") else resume_point(st, workdir, text, config_hash, inputs)
    if resume is not None:
        argv, shown = [*argv, "--ckpt_path", "last"], f"{shown} --ckpt_path last"
        reason = f"{reason}; resuming the unfinished run from step {resume[1]} of {_show(resume[0])}"
        row["reason"], row["resumed_from_step"] = reason, resume[1]
    if dry_run:
        row["status"] = "would run"
        say(f"{head}: would run ({reason}): {shown}")
        return row
    missing = [name for name, h in inputs.items() if h is None]
    if missing:
        raise PipelineError(
            f"stage '{st.name}' needs {', '.join(missing)}, which no earlier stage produced; "
            "add the stage that writes it, or fix 'inputs'."
        )
    stamp_path = st.stamp_path(workdir)
    stamp_path.unlink(missing_ok=True)  # a failed or interrupted rerun must not leave a valid stamp behind
    record = {"format": STAMP_FORMAT, "stage": st.name, "config_hash": config_hash, "inputs": inputs}
    write_json(st.attempt_path(workdir), {**record, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    log = _log_path(st, workdir) if quiet else None
    # --quiet: the stage's own progress bars go to its log; say where, so a long stage can be followed (tail -f).
    say(f"{head}: running ({reason}): {shown}" + (f"; output in {_show(log)}" if log else ""))
    t_stage = time.perf_counter()
    proc, received = _run_stage(argv, workdir, log)
    seconds = time.perf_counter() - t_stage
    if proc != 0:
        _stage_failed(st, workdir, text, proc, received, seconds, shown, log)
    _write_stamp(st, workdir, record, seconds)
    say(f"{head}: done in {_fmt_time(seconds)}")
    row.update(status="ran", seconds=seconds)
    if received is not None:  # the stage finished anyway: it is done, but no further stage starts
        raise StageInterrupted(
            f"{signal.Signals(received).name} received; stage '{st.name}' finished first and is done (stamped). "
            "Rerun the same pipeline command to run the stages after it."
        )
    return row


def _stage_failed(
    st: Stage, workdir: Path, text: str, code: int, received: int | None, seconds: float, shown: str, log: Path | None
) -> None:
    """Raise ``StageInterrupted`` (a signal stopped it: 75, or killed by one) or ``StageFailed``; no stamp."""
    where = f"; see {log}" if log else ""
    if received is None and code != EXIT_INTERRUPTED and code >= 0:
        raise StageFailed(
            f"stage '{st.name}' failed with exit code {code} after {_fmt_time(seconds)}: {shown}{where}", code
        )
    why = signal.Signals(received or -code).name if (received or code < 0) else f"exit code {code}"
    folder = _checkpoint_folder(text) if st.resumable else None
    found = sorted((workdir / folder).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder else []
    step = None
    if found:
        with contextlib.suppress(OSError, ValueError):
            step = int(read_checkpoint(found[-1]).get("global_step") or 0)
    resumes = f"resumes from step {step} ({_show(found[-1])})" if step is not None else "runs it again"
    raise StageInterrupted(
        f"stage '{st.name}' was interrupted ({why}) after {_fmt_time(seconds)}{where}; it is not done (no stamp). "
        f"Rerun the same pipeline command: it {resumes}."
    )


def _write_stamp(st: Stage, workdir: Path, record: dict[str, Any], seconds: float) -> None:
    """The stage's stamp (its outputs must exist), then its attempt record removed."""
    outputs = {name: file_hash(workdir / name) for name in st.outputs}
    absent = [name for name, h in outputs.items() if h is None]
    if absent:
        raise PipelineError(
            f"stage '{st.name}' finished but did not write {', '.join(absent)}; make the pipeline's "
            f"'outputs' match the paths in {st.config}."
        )
    write_json(
        st.stamp_path(workdir),
        {
            "format": STAMP_FORMAT,
            "stage": st.name,
            "entry": Path(st.entry).name,
            "command": st.command,
            "config": st.config,
            "args": st.args,
            "config_hash": record["config_hash"],
            "inputs": record["inputs"],
            "outputs": outputs,
            "seconds": round(seconds, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "gencnp": __version__,
        },
    )
    st.attempt_path(workdir).unlink(missing_ok=True)


def _finish(
    out: dict[str, Any], stages: Sequence[Stage], report: str | None, workdir: Path, say: Callable[[str], None]
) -> None:
    """Say where every output is, and summarise the report into ``out['summary']``."""
    say(f"pipeline finished in {_fmt_time(out['seconds'])}")
    for st, row in zip(stages, out["stages"]):
        say(f"  {st.name:<8} {', '.join(_show(workdir / o) for o in st.outputs)} ({row['status']})")
    if report and (workdir / report).is_file():
        out["summary"] = summary(json.loads((workdir / report).read_text(encoding="utf-8")))
        say(summary_text(out["summary"], _show(workdir / report)))
    elif report:
        say(f"  (no summary: {_show(workdir / report)} does not exist)")


# ----- the summary -----
def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The key numbers of a ``report.json``: target accuracy, GEN-CNP, transfer, DGR's speed ratio."""
    keys = ("agreement", "kept_mean", "swap_forcing", "zero_forcing", "acIOU")
    gen = (report.get("methods") or {}).get("gencnp") or {}
    transfer = report.get("transfer") or None
    dgr = (report.get("methods_native") or {}).get("dgr") or {}
    prov = report.get("provenance") or {}
    g_s, d_s = gen.get("seconds_per_image"), dgr.get("seconds_per_image")
    return {
        "split": prov.get("split"),
        "n": prov.get("n"),
        "target_accuracy": gen.get("target_accuracy"),
        "gencnp": {k: gen.get(k) for k in keys},
        "transfer": {**{k: transfer.get(k) for k in keys}, "tau": transfer.get("tau")} if transfer else None,
        "seconds_per_image": {"gencnp": g_s, "dgr": d_s},
        "dgr_speed_ratio": (d_s / g_s) if g_s and d_s else None,
        # The baselines at GEN-CNP's own per-sample and per-tap kept counts (equal sparsity).
        "matched": {
            m: {k: e.get(k) for k in ("agreement", "swap_forcing", "n")}
            for m, e in (report.get("methods") or {}).items()
            if m != "gencnp" and e
        },
        "figures": sorted((report.get("figures") or {}).values()),
        # Null-input forcing of GEN-CNP per family beside its chance level, and the families trained on.
        "null": {
            k.split("/", 1)[1]: {"forcing": v, "chance": gen.get(f"null_chance/{k.split('/', 1)[1]}")}
            for k, v in gen.items()
            if k.startswith("null_forcing/")
        },
        "null_train": prov.get("null_train") or [],
        "class_lookup": _lookup_summary((report.get("methods") or {}).get("class_lookup")),
    }


def _lookup_summary(e: dict | None) -> dict[str, Any] | None:
    """Agreement of the class lookup at GEN-CNP's counts and the paired 95% CI of GEN-CNP minus lookup."""
    if not e or "agreement" not in (e.get("vs_gencnp") or {}):
        return None
    c = e["vs_gencnp"]["agreement"]
    return {"agreement": e.get("agreement"), "gencnp_minus_lookup": -c["diff"], "ci95": [-c["ci95"][1], -c["ci95"][0]]}


def summary_text(s: dict[str, Any], path: str | Path | None = None) -> str:
    """One screen: the summary of ``summary`` as aligned lines."""

    def f(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    def row(name: str, e: dict | None) -> str:
        if not e:
            return f"  {name:<20} -"
        return (
            f"  {name:<20} agreement {f(e['agreement'])}  kept {f(e['kept_mean'])}  swap forcing "
            f"{f(e['swap_forcing'])}  zero forcing {f(e['zero_forcing'])}  acIOU {f(e['acIOU'])}"
        )

    lines = [
        f"key numbers ({s['n']} {s['split']} images{f', from {path}' if path else ''}):",
        f"  target accuracy      {f(s['target_accuracy'])}",
        row("GEN-CNP", s["gencnp"]),
        row(_transfer_label(s["transfer"], f), s["transfer"]),
    ]
    if s.get("matched"):
        lines.append("  baselines at GEN-CNP's kept counts (agreement / swap forcing):")
        lines.append(
            "    " + "  ".join(f"{m} {f(e['agreement'], 2)}/{f(e['swap_forcing'], 2)}" for m, e in s["matched"].items())
        )
    if s.get("null"):
        trained = set(s.get("null_train") or [])
        lines.append("  GEN-CNP null forcing (chance), * = family used in training:")
        lines.append(
            "    "
            + "  ".join(
                f"{fam}{'*' if fam in trained else ''} {f(e['forcing'])} ({f(e['chance'])})"
                for fam, e in s["null"].items()
            )
        )
    lk = s.get("class_lookup")
    if lk:
        lines.append(
            f"  class lookup         agreement {f(lk['agreement'])} at GEN-CNP's counts; GEN-CNP minus lookup "
            f"{lk['gencnp_minus_lookup']:+.4f} [{lk['ci95'][0]:+.4f}, {lk['ci95'][1]:+.4f}]"
        )
    sp = s["seconds_per_image"]
    if s["dgr_speed_ratio"] is not None:
        lines.append(
            f"  speed                GEN-CNP {sp['gencnp'] * 1e3:.3f} ms/image, DGR {sp['dgr'] * 1e3:.3f} ms/image: "
            f"GEN-CNP {s['dgr_speed_ratio']:.0f}x faster"
        )
    if s.get("figures"):
        lines.append(f"  figures (.png)       {', '.join(Path(x).stem for x in s['figures'])}")
    lines.append("  read agreement only beside kept and forcing: high forcing means the pathway encodes the class.")
    return "\n".join(lines)


# ----- command line -----
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gencnp.pipeline.run --config PIPELINE.yaml [--download] [--force] [--redo STAGE] ...``."""
    p = argparse.ArgumentParser(
        prog="python -m gencnp.pipeline.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/fashion_mnist/pipeline.yaml")
    p.add_argument("--workdir", default=".", help="folder the stages run in (default: the current folder)")
    p.add_argument("--download", action="store_true", help="let torchvision download missing data")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE", help="redo STAGE and every stage after it")
    p.add_argument("--logger", default=None, help="logger YAML for the fit stages, e.g. configs/loggers/wandb.yaml")
    p.add_argument(
        "--quiet", action="store_true", help="stage output to a new <output folder>/<stage>.<date-time>.<random>.log"
    )
    p.add_argument("--dry_run", action="store_true", help="say what would run or be reused, run nothing")
    a = p.parse_args(argv)
    try:
        run_pipeline(a.config, a.workdir, a.download, a.force, a.redo, a.logger, a.quiet, a.dry_run)
    except StageFailed as exc:
        print(f"pipeline: {exc}", file=sys.stderr, flush=True)
        return exc.returncode
    except PipelineError as exc:
        print(f"pipeline: stopped: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # disk full, a folder made read-only mid-run, ...: one line, not a traceback
        where = f" ('{exc.filename}')" if exc.filename else ""
        print(
            f"pipeline: stopped: {exc.strerror or exc}{where}; finished stages keep their outputs and stamps. Free "
            "space or fix the folder, then rerun the same command (finished stages are reused).",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _transfer_label(t: dict | None, f) -> str:
    """``transfer (tau 0.60)``, or ``transfer (per-class tau)`` for a bank with a threshold per class."""
    if not t:
        return "transfer"
    return "transfer (per-class tau)" if t.get("class_taus") else f"transfer (tau {f(t['tau'], 2)})"
