"""Per-sample results of one method at one setting (``Results``) and the device-synchronised ``Timer``."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from gencnp.pathways.metrics import summarize

__all__ = ["Results", "Timer"]


class Results:
    """Per-sample values (``gencnp.pathways.metrics.per_sample``), pathways and classes at positions of the split."""

    def __init__(self, name: str, setting: str, images: str):
        self.name, self.setting, self.images = name, setting, images
        self._vals: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._paths: list[torch.Tensor] = []
        self._cls: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []
        self.seconds = 0.0
        self.vals: dict[str, torch.Tensor] = {}

    def add(
        self,
        pos: torch.Tensor,
        vals: dict[str, torch.Tensor],
        pathway: torch.Tensor,
        classes: torch.Tensor,
        seconds: float,
    ) -> None:
        for k, v in vals.items():
            self._vals[k].append(v.cpu())
        self._paths.append(pathway.bool().cpu())
        self._cls.append(classes.cpu())
        self._pos.append(pos.cpu())
        self.seconds += seconds

    def finish(self) -> Results:
        self.vals = {k: torch.cat(v) for k, v in self._vals.items()}
        self.pathways, self.classes, self.pos = torch.cat(self._paths), torch.cat(self._cls), torch.cat(self._pos)
        self.n = len(self.pos)
        return self

    def at(self, positions: torch.Tensor, images: str) -> Results:
        """The same results restricted to ``positions`` of the split (each must be covered)."""
        lookup = torch.full((int(max(self.pos.max(), positions.max())) + 1,), -1, dtype=torch.long)
        lookup[self.pos] = torch.arange(self.n)
        rows = lookup[positions]
        if bool((rows < 0).any()):
            raise ValueError(f"{self.name} ({self.setting}) does not cover every requested image.")
        out = Results(self.name, self.setting, images)
        out.vals = {k: v[rows] for k, v in self.vals.items()}
        out.pathways, out.classes, out.pos, out.n = (
            self.pathways[rows],
            self.classes[rows],
            positions.clone(),
            len(rows),
        )
        out.seconds = self.seconds * len(rows) / max(self.n, 1)
        return out

    def summary(self, tap_names: Sequence[str], tap_channels: Sequence[int]) -> dict[str, Any]:
        s = summarize(self.vals, self.pathways, self.classes, tap_names, tap_channels)
        return {
            "n": self.n,
            "images": self.images,
            "setting": self.setting,
            "seconds_per_image": self.seconds / max(self.n, 1),
            **s,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a block (``seconds``), the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Timer:
        _sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self.t0
