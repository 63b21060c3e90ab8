"""``Evaluator``: one report's frozen target on its device. Masked predictions, the per-sample measurement of a
pathway (controls included), one baseline on one batch, the batches of a dataset and the time of each phase."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gencnp.evaluation.report.results import Results, Timer
from gencnp.pathways.baselines import METHODS, global_percentile, split_pathway, topk_per_tap
from gencnp.pathways.metrics import per_sample

__all__ = ["Batch", "Evaluator"]


@dataclass
class Batch:
    """One batch of the split: positions ``pos``, images ``x``, ``labels``, the unmasked target's ``logits``, the class
    source ``y_hat`` and ``inputs``, the batch's ``GenCNP.control_inputs`` shared by every pathway measured on it."""

    pos: torch.Tensor
    x: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    y_hat: torch.Tensor
    inputs: dict


class Evaluator:
    """A GEN-CNP model's frozen target on device ``dev``, its fills (mean ablation) and the random baseline's
    generator (``seed``); ``phases`` holds the seconds of each phase since ``t_start``."""

    def __init__(self, model, dev: torch.device, seed: int, progress: bool, t_start: float):
        self.model, self.target, self.dev, self.progress = model, model.target, dev, progress
        self.chans = self.target.tap_channels
        self.fills = model.fills()
        self.g_rand = torch.Generator(device=dev).manual_seed(seed)
        self.phases: dict[str, float] = {}
        self._t_phase = t_start

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap (or ``t_start``) as phase ``name``."""
        now = time.perf_counter()
        self.phases[name] = now - self._t_phase
        self._t_phase = now

    def batches(self, dataset: Dataset, batch_size: int, desc: str) -> Iterator[tuple[torch.Tensor, ...]]:
        """``(rows, x, labels)`` of ``dataset`` in order, images and labels on the device, ``rows`` counted from 0."""
        start = 0
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        for batch in tqdm(loader, desc=desc, disable=not self.progress):
            x, labels = batch[0].to(self.dev), batch[1].to(self.dev)
            rows = torch.arange(start, start + len(x))
            start += len(x)
            yield rows, x, labels

    def batch(
        self, pos: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, y_hat: torch.Tensor
    ) -> Batch:
        """A ``Batch`` with its control inputs."""
        return Batch(pos, x, labels, logits, y_hat, self.model.control_inputs(x, y_hat))

    def masked_forward(self, x: torch.Tensor, pathway: torch.Tensor) -> torch.Tensor:
        """The target's logits on ``x`` through ``pathway`` (``[B, D]``)."""
        with torch.no_grad():
            return self.target(x, masks=split_pathway(pathway.to(x.dtype), self.chans), fill=self.fills)

    def keeps_class(self, x: torch.Tensor, pathway: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Per image: does ``x`` through ``pathway`` give ``classes``?"""
        return self.masked_forward(x, pathway).argmax(1) == classes

    def measure(
        self, res: Results, b: Batch, pathway: torch.Tensor, seconds: float, masked: torch.Tensor | None = None
    ) -> None:
        """Masked prediction (timed into ``seconds`` unless given as ``masked``), controls and per-sample metrics of
        ``pathway`` on ``b``, added to ``res``."""
        if masked is None:
            with Timer(self.dev) as tm:
                masked = self.masked_forward(b.x, pathway)
            seconds += tm.seconds
        with torch.no_grad():
            ctrl = self.model.controls(b.x, {"pathway": pathway, "y_hat": b.y_hat}, necessity=True, inputs=b.inputs)
        vals = per_sample(b.logits, masked, b.y_hat, pathway, b.labels, **ctrl)
        res.add(b.pos, vals, pathway, b.y_hat, seconds)

    def run_baseline(
        self,
        m: str,
        res: dict[tuple[str, str], Results],
        b: Batch,
        counts: torch.Tensor,
        keep_fraction: float,
        opts: dict,
    ) -> torch.Tensor:
        """Baseline ``m`` on ``b``: scores (timed once), then its matched (per-tap ``counts``) and native pathways,
        each measured into ``res[m, setting]``. Returns the scores ``[B, D]`` (for the curves)."""
        with Timer(self.dev) as t_scores:
            out = METHODS[m].run(self.target, b.x, b.y_hat, fill=self.fills, generator=self.g_rand, **opts)
        with Timer(self.dev) as t_m:
            matched = topk_per_tap(out["scores"], counts, self.chans)
        self.measure(res[m, "matched"], b, matched, t_scores.seconds + t_m.seconds)
        with Timer(self.dev) as t_n:
            native = out["native"] if "native" in out else global_percentile(out["scores"], keep_fraction)
        self.measure(res[m, "native"], b, native, t_scores.seconds + t_n.seconds)
        return out["scores"].detach()
