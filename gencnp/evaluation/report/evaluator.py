"""``Evaluator``: one report's frozen target on its device. Masked predictions, the per-sample measurement of a
pathway (controls included), one baseline on one batch, the batches of a dataset, the time of each phase and the
target passes each phase made (the report's ``cost`` section).

Every control input of a batch (swap partners, null inputs, the zero image) is made once per batch and shared by
every pathway measured on it; their first tap's output, and the chance logits of the null inputs, come from one
unmasked pass per batch, so every masked pass afterwards starts at the first tap (``FrozenTarget``'s
``first_tap``). Masked passes run in chunks of ``chunk`` images (small batches keep a CPU's caches warm)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
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
    source ``y_hat`` and ``inputs``, the batch's ``GenCNP.control_inputs`` shared by every pathway measured on it;
    ``firsts``: the first tap's unmasked output for ``x``, the partners, the zero image and the null inputs, in that
    order (``None`` where the target cannot start at its first tap or they would not fit in memory)."""

    pos: torch.Tensor
    x: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    y_hat: torch.Tensor
    inputs: dict
    firsts: torch.Tensor | None = None

    def first(self, i: int) -> torch.Tensor | None:
        """The first tap's output for part ``i`` of ``firsts`` (0: ``x``, 1: partners, 2: zero, 3...: nulls)."""
        b = len(self.x)
        return None if self.firsts is None else self.firsts[i * b : (i + 1) * b]


class Evaluator:
    """A GEN-CNP model's frozen target on device ``dev``, its fills (mean ablation) and the random baseline's
    generator (``seed``); ``phases`` holds the seconds of each phase since ``t_start``, ``passes`` the images the
    target ran on per phase and part (one image through the target once = one pass; backward passes not counted).

    Args:
        chunk: images per masked target pass.
        first_cache_mb: memory allowed for a batch's first-tap outputs (above it, passes start at the input).
    """

    def __init__(
        self,
        model,
        dev: torch.device,
        seed: int,
        progress: bool,
        t_start: float,
        chunk: int = 256,
        first_cache_mb: float = 1024.0,
    ):
        self.model, self.target, self.dev, self.progress = model, model.target, dev, progress
        self.chans = self.target.tap_channels
        self.fills = model.fills()
        self.g_rand = torch.Generator(device=dev).manual_seed(seed)
        self.chunk, self.first_cache_mb = chunk, first_cache_mb
        self.phases: dict[str, float] = {}
        self.passes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._t_phase = t_start
        self._phase, self._part = "setup", "other"
        self._chance_cache: dict[int, torch.Tensor] = {}
        self._hook = self.target.model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if args and torch.is_tensor(args[0]):
            self.passes[self._phase][self._part] += int(args[0].shape[0])

    @contextlib.contextmanager
    def part(self, name: str):
        """Count the target passes inside the block as part ``name`` of the current phase."""
        before, self._part = self._part, name
        try:
            yield
        finally:
            self._part = before

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap (or ``t_start``) as phase ``name``; the passes counted since then
        become that phase's. Prints one line per finished phase (in logs, where progress bars are off, the only sign of
        progress)."""
        now = time.perf_counter()
        self.phases[name] = now - self._t_phase
        self._t_phase = now
        if self._phase in self.passes:
            self.passes[name] = self.passes.pop(self._phase)
        self._phase = f"after {name}"
        print(f"report: {name} done in {self.phases[name]:.1f} s", flush=True)

    def close(self) -> None:
        self._hook.remove()

    def batches(self, dataset: Dataset, batch_size: int, desc: str) -> Iterator[tuple[torch.Tensor, ...]]:
        """``(rows, x, labels)`` of ``dataset`` in order, images and labels on the device, ``rows`` counted from 0."""
        start = 0
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        for batch in tqdm(loader, desc=desc, disable=not self.progress, unit="batch"):
            x, labels = batch[0].to(self.dev), batch[1].to(self.dev)
            rows = torch.arange(start, start + len(x))
            start += len(x)
            yield rows, x, labels

    def batch(
        self, pos: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, y_hat: torch.Tensor
    ) -> Batch:
        """A ``Batch`` with its control inputs, their first-tap outputs (the model run only that far) and the chance
        logits of its null inputs (computed once per image of the split, then reused by every later pass)."""
        inputs = self.model.control_inputs(x, y_hat, chance=False)
        with self.part("control inputs to the first tap"):
            firsts = self._first_taps(x, inputs)
        with self.part("null chance (once per image)"):
            inputs["chance"] = self._chance(pos, inputs["nulls"], firsts, len(x))
        return Batch(pos, x, labels, logits, y_hat, inputs, firsts)

    def _first_taps(self, x: torch.Tensor, inputs: dict) -> torch.Tensor | None:
        """``GenCNP.control_firsts`` (in chunks), or ``None`` where the stack would not fit in ``first_cache_mb``."""
        parts = 3 + len(inputs["nulls"])
        per_image = 4 * int(torch.Size(self.target.tap_shapes[0]).numel())
        if per_image * parts * len(x) > self.first_cache_mb * 2**20:
            return None
        chunks = []
        for i in range(0, len(x), self.chunk):
            sl = slice(i, i + self.chunk)
            part = {"partners": inputs["partners"][sl], "nulls": [n[sl] for n in inputs["nulls"]]}
            chunks.append(self.model.control_firsts(x[sl], part))
        if chunks[0] is None:
            return None
        # chunk-major -> part-major ([x, partners, zero, nulls...], each over the whole batch)
        sizes = [min(self.chunk, len(x) - i) for i in range(0, len(x), self.chunk)]
        per_part = [torch.split(c, n) for c, n in zip(chunks, sizes)]
        return torch.cat([torch.cat([p[j] for p in per_part]) for j in range(parts)])

    def _chance(self, pos: torch.Tensor, nulls: list, firsts: torch.Tensor | None, b: int) -> list[torch.Tensor]:
        """The unmasked target's logits on the null inputs (the chance level), cached by position in the split."""
        if not nulls:
            return []
        key = pos.tolist()
        if all(k in self._chance_cache for k in key):
            cached = torch.stack([self._chance_cache[k] for k in key]).to(self.dev)  # [B, F, K]
            return list(cached.unbind(1))
        out = []
        for i, n in enumerate(nulls):
            first = None if firsts is None else firsts[(3 + i) * b : (4 + i) * b]
            out.append(self._chunks(lambda v, f: self.target(v, first_tap=f), n, first))
        for j, k in enumerate(key):
            self._chance_cache[k] = torch.stack([o[j] for o in out]).cpu()
        return out

    def _chunks(self, fn, *tensors: torch.Tensor | None) -> torch.Tensor:
        """``fn`` over ``tensors`` (rows aligned; ``None`` passed through) in chunks of ``chunk`` rows, concatenated."""
        out = []
        with torch.no_grad():
            for i in range(0, len(tensors[0]), self.chunk):
                out.append(fn(*(None if t is None else t[i : i + self.chunk] for t in tensors)))
        return torch.cat(out)

    def masked_forward(self, x: torch.Tensor, pathway: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """The target's logits on ``x`` through ``pathway`` (``[B, D]``), in chunks; ``first``: the first tap's unmasked
        output for ``x`` (the passes then start there)."""

        def run(xc, pc, fc):
            return self.target(xc, masks=split_pathway(pc.to(xc.dtype), self.chans), fill=self.fills, first_tap=fc)

        return self._chunks(run, x, pathway, first)

    def keeps_class(
        self, x: torch.Tensor, pathway: torch.Tensor, classes: torch.Tensor, first: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per image: does ``x`` through ``pathway`` give ``classes``?"""
        return self.masked_forward(x, pathway, first).argmax(1) == classes

    def controls(self, b: Batch, pathway: torch.Tensor) -> dict:
        """``GenCNP.controls`` of ``pathway`` on ``b`` (necessity included), its masked passes started at the first tap
        where ``b.firsts`` is set."""
        xs, ms = self.model.control_stack(b.x, pathway, b.inputs, necessity=True)
        first = None
        if b.firsts is not None:  # the stack's order: partners, zero, nulls..., then x through the complement
            first = torch.cat([b.firsts[len(b.x) :], b.first(0)])
        logits = self.masked_forward(torch.cat(xs), torch.cat(ms), first)
        return self.model.control_outputs(logits, len(b.x), b.inputs, necessity=True)

    def measure(
        self, res: Results, b: Batch, pathway: torch.Tensor, seconds: float, masked: torch.Tensor | None = None
    ) -> None:
        """Masked prediction (timed into ``seconds`` unless given as ``masked``), controls and per-sample metrics of
        ``pathway`` on ``b``, added to ``res``."""
        with self.part(f"{res.name} masked"):
            if masked is None:
                with Timer(self.dev) as tm:
                    masked = self.masked_forward(b.x, pathway, b.first(0))
                seconds += tm.seconds
        with self.part(f"{res.name} controls"):
            ctrl = self.controls(b, pathway)
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
        with self.part(f"{m} scores"), Timer(self.dev) as t_scores:
            out = METHODS[m].run(self.target, b.x, b.y_hat, fill=self.fills, generator=self.g_rand, **opts)
        with Timer(self.dev) as t_m:
            matched = topk_per_tap(out["scores"], counts, self.chans)
        self.measure(res[m, "matched"], b, matched, t_scores.seconds + t_m.seconds)
        with Timer(self.dev) as t_n:
            native = out["native"] if "native" in out else global_percentile(out["scores"], keep_fraction)
        self.measure(res[m, "native"], b, native, t_scores.seconds + t_n.seconds)
        return out["scores"].detach()
