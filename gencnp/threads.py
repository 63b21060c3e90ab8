"""``torch_threads(n)``: run a block with ``torch.set_num_threads(n)`` and restore the previous count afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Within the block torch uses ``n`` CPU threads (``None``: leave the count as it is); the previous count comes
    back on exit, exceptions included. Yields the count in effect."""
    if n is not None and int(n) < 1:
        raise ValueError(f"threads must be a positive integer or null (torch's default), got {n}.")
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
