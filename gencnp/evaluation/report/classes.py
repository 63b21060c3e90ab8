"""Per-class views that stay readable and cheap at 1,000 classes.

Figures show at most ``MAX_ROWS`` classes (the highest and lowest by a stated value, named on the figure); the full
per-class table goes to CSV and JSON beside the report, with a few lines of summary on screen. Every per-class value
is one pass of ``index_add`` over the images: linear in images, ``O(K)`` memory.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gencnp.io.class_views import MAX_ROWS, shown_classes
from gencnp.io.files import write_atomic, write_json

__all__ = ["MAX_ROWS", "shown_classes", "class_table", "write_class_table", "table_summary", "summary_lines"]


def _class_means(values: torch.Tensor, classes: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class NaN-ignoring means of ``values [N]`` grouped by ``classes [N]``, and the counts of defined values."""
    v = values.double()
    ok = ~torch.isnan(v)
    c = classes.long()
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, c[ok], v[ok])
    counts = torch.zeros(k, dtype=torch.float64).index_add_(0, c[ok], torch.ones_like(v[ok]))
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
    return means.numpy(), counts.numpy()


# per-sample value -> column of the per-class table
COLUMNS = {"agree": "agreement", "kept": "kept", "swap_forced": "swap_forcing", "zero_forced": "zero_forcing"}


def class_table(results: dict[str, Any], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class (by class source ``y_hat``): images, and each method's mean of ``COLUMNS``.

    Args:
        results: ``{method: Results}`` (``vals``, ``classes``) measured on the same images or on subsets of them.
    """
    k = len(class_names)
    rows = [{"class": i, "name": str(n)} for i, n in enumerate(class_names)]
    for method, r in results.items():
        n = torch.bincount(r.classes.long(), minlength=k).numpy()
        for i in range(k):
            rows[i].setdefault("n", int(n[i]))
        for key, col in COLUMNS.items():
            if key not in r.vals:
                continue
            means, _ = _class_means(r.vals[key], r.classes, k)
            for i in range(k):
                rows[i][f"{method}/{col}"] = None if np.isnan(means[i]) else float(means[i])
    return rows


def write_class_table(stem: Path, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Write ``rows`` to ``<stem>.csv`` and ``<stem>.json`` (atomically); returns their file names."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    write_atomic(stem.with_suffix(".csv"), buf.getvalue())
    write_json(stem.with_suffix(".json"), rows)
    return {"csv": stem.with_suffix(".csv").name, "json": stem.with_suffix(".json").name}


def table_summary(rows: list[dict[str, Any]], key: str, n: int = 5) -> dict[str, Any]:
    """Spread of column ``key`` over the classes that have a value, and the ``n`` lowest and highest classes."""
    have = [(r[key], r["name"]) for r in rows if r.get(key) is not None]
    if not have:
        return {"key": key, "classes": 0}
    v = np.array([h[0] for h in have])
    order = sorted(range(len(have)), key=lambda i: (have[i][0], i))
    return {
        "key": key,
        "classes": len(have),
        "classes_without_images": len(rows) - len(have),
        "mean": float(v.mean()),
        "min": float(v.min()),
        "median": float(np.median(v)),
        "max": float(v.max()),
        "lowest": [{"name": have[i][1], key: have[i][0]} for i in order[:n]],
        "highest": [{"name": have[i][1], key: have[i][0]} for i in order[::-1][:n]],
    }


def summary_lines(summary: dict[str, Any], files: dict[str, str] | None = None) -> list[str]:
    """A few lines for the screen: the spread over classes and the lowest and highest classes."""
    key = summary["key"]
    if not summary.get("classes"):
        return [f"per-class {key}: no class has a value"]
    lines = [
        f"per-class {key} over {summary['classes']} classes: mean {summary['mean']:.3f}, min {summary['min']:.3f}, "
        f"median {summary['median']:.3f}, max {summary['max']:.3f}"
        + (
            f" ({summary['classes_without_images']} classes without images)"
            if summary["classes_without_images"]
            else ""
        )
    ]
    for side in ("lowest", "highest"):
        lines.append(f"  {side}: " + ", ".join(f"{e['name']} {e[key]:.3f}" for e in summary[side]))
    if files:
        lines.append(f"  full table: {files['csv']}, {files['json']}")
    return lines
