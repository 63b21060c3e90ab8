"""Which classes a figure shows when there are too many to draw (1,000-class data): a figure keeps at most
``MAX_ROWS`` rows, the highest and lowest classes by a stated value, and says so; full tables go to CSV/JSON.
No torch or Lightning import: every layer may use it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["MAX_ROWS", "shown_classes"]

MAX_ROWS = 40  # classes a figure shows at most


def shown_classes(value: Sequence[float] | np.ndarray, what: str, limit: int = MAX_ROWS) -> tuple[list[int], str]:
    """The classes a figure shows: all of them up to ``limit``; else, among the classes with a value (not NaN), the
    ``limit // 2`` with the highest and the ``limit // 2`` with the lowest ``value`` (ties by class index).

    Returns:
        ``(indices, note)``: class indices in display order, and a sentence naming the selection (``''`` when all).
    """
    v = np.asarray(value, dtype=np.float64)
    k = len(v)
    if k <= limit:
        return list(range(k)), ""
    have = [i for i in range(k) if not np.isnan(v[i])]
    order = sorted(have, key=lambda i: (-v[i], i))  # highest first
    if len(order) <= limit:
        return order, f"the {len(order)} classes with {what}, of {k}"
    half = max(1, limit // 2)
    return order[:half] + order[
        -half:
    ], f"the {half} classes with the highest and the {half} with the lowest {what}, of {k}"
