"""Frontier sweep: train GEN-CNP at several settings and tabulate VALIDATION metrics.

``python -m gencnp.evaluation.sweep --config configs/fashion_mnist/gencnp.yaml --points configs/fashion_mnist/sweep.yaml``

Each point is a name plus ``model.init_args`` overrides (and optional trainer overrides). Every point trains in
its own folder under ``out_dir``; the row reported is the validation check with the best ``val/score`` (the
checkpoint the point would keep). Results go to ``out_dir/frontier.json`` and ``frontier.md``. The test split is
never read: choose the default from this table.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from jsonargparse import CLI
from tqdm import tqdm

from gencnp.systems.options import grouped_key

COLUMNS = [
    "agreement",
    "kept_mean",
    "swap_forcing",
    "zero_forcing",
    "acIOU",
    "between_class_iou",
    "kept_class_std",
    "score",
    "lookup_agreement",
    "lookup_gain",
]


def best_row(metrics_csv: Path) -> dict[str, float]:
    """The validation row with the highest ``val/score`` in a CSVLogger ``metrics.csv``."""
    rows = [r for r in csv.DictReader(open(metrics_csv)) if r.get("val/score")]
    if not rows:
        raise ValueError(f"{metrics_csv} has no validation rows; did the run reach a validation check?")
    best = max(rows, key=lambda r: float(r["val/score"]))
    out = {k: float(best[f"val/{k}"]) for k in COLUMNS if best.get(f"val/{k}")}
    # Null forcing and chance per family (whatever families the run measured).
    out.update({k[4:]: float(v) for k, v in best.items() if k.startswith("val/null_") and v})
    out["step"] = int(float(best["step"]))
    return out


def point_overrides(point: dict) -> dict:
    """A sweep point's ``model`` and ``trainer`` keys as a config to merge over the base config: flat setting names
    (``lambda_sp``) go to their group (``sparsity: {lambda_sp: ...}``), so 0.2 sweep files keep working. A config
    file rather than flags, because jsonargparse reads ``null`` for a grouped setting on the command line as 'None'."""
    init_args: dict = {}
    for k, v in (point.get("model") or {}).items():
        group, _, leaf = grouped_key(k).rpartition(".")
        (init_args.setdefault(group, {}) if group else init_args)[leaf] = v
    out: dict = {"model": {"init_args": init_args}} if init_args else {}
    if point.get("trainer"):
        out["trainer"] = dict(point["trainer"])
    return out


def run_point(config: str, point: dict, out_dir: Path, extra: list[str]) -> dict:
    name = point["name"]
    folder = out_dir / name
    args = [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        config,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(folder),
        "--trainer.logger.init_args.name",
        "logs",
        "--trainer.callbacks.init_args.dirpath",
        str(folder),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    overrides = folder / "point.yaml"
    overrides.write_text(yaml.safe_dump(point_overrides(point), sort_keys=False))
    args += ["--config", str(overrides), *extra]
    start = time.time()
    log = folder / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"sweep point '{name}' failed (exit {proc.returncode}); see {log}")
    versions = sorted((folder / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    row = best_row(versions[-1] / "metrics.csv")
    row.update(
        name=name,
        seconds=round(time.time() - start, 1),
        settings={**(point.get("model") or {}), **(point.get("trainer") or {})},
    )
    return row


def table(rows: list[dict]) -> str:
    nulls = sorted({k for r in rows for k in r if k.startswith("null_")}, key=lambda k: (k.split("/")[1], k))
    cols = COLUMNS + nulls
    head = "| point | settings | " + " | ".join(cols) + " | s |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for r in rows:
        vals = " | ".join(
            "" if r.get(c) is None or (isinstance(r.get(c), float) and math.isnan(r[c])) else f"{r[c]:.3f}"
            for c in cols
        )
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        lines.append(f"| {r['name']} | {settings} | {vals} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(
    config: str = "configs/fashion_mnist/gencnp.yaml",
    points: str = "configs/fashion_mnist/sweep.yaml",
    out_dir: str = "runs/fashion_mnist/sweep",
    only: list[str] | None = None,
    extra: list[str] | None = None,
) -> list[dict]:
    """Run every sweep point (or those named in ``only``) and write ``frontier.json`` / ``frontier.md``.

    Args:
        config: base LightningCLI config.
        points: YAML list of ``{name, model: {...}, trainer: {...}}``.
        out_dir: one folder per point plus the tables.
        only: names of the points to (re)run; others are kept from an existing ``frontier.json``.
        extra: extra CLI arguments passed to every run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load(open(points))
    results_path = out / "frontier.json"
    done = {r["name"]: r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    todo = [p for p in spec if only is None or p["name"] in only]
    bar = tqdm(todo, desc="sweep", unit="point")
    for point in bar:
        if only is None and point["name"] in done:
            continue
        # Each point trains for minutes in a subprocess (its own bar is off): say which one and where its log is.
        bar.set_postfix_str(f"{point['name']} (log: {out / point['name'] / 'train.log'})")
        done[point["name"]] = run_point(config, point, out, extra or [])
        rows = [done[p["name"]] for p in spec if p["name"] in done]
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        os.replace(tmp, results_path)
        (out / "frontier.md").write_text(table(rows) + "\n")
        tqdm.write(table([done[point["name"]]]).splitlines()[-1])
    return [done[p["name"]] for p in spec if p["name"] in done]


if __name__ == "__main__":
    CLI(main, as_positional=False)
