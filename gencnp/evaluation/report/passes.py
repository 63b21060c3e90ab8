"""The report's three passes over the split.

1. ``gencnp_pass``: GEN-CNP on the whole split; its pathways, scores and kept counts set the others' sparsity.
2. ``full_pass``: transfer and the class lookup on the whole split, and there too (``baselines_on: all``, the
   default) ``random``, ``neuron_mct`` and the lookup frontier.
3. ``subset_pass``: ``neuron_intgrad`` and ``dgr`` on the seeded subset (with ``baselines_on: subset`` also
   ``random``, ``neuron_mct`` and the lookup frontier), and the agreement-vs-kept curves there.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from gencnp.banks.bank import PathwayBank
from gencnp.data.modules import ImageDataModule
from gencnp.evaluation.report.evaluator import Batch, Evaluator
from gencnp.evaluation.report.results import Results, Timer
from gencnp.pathways.baselines import METHODS, global_percentile, tap_counts, topk_per_tap

__all__ = ["BASELINES", "Curves", "GenPass", "Split", "add_results", "full_pass", "gencnp_pass", "subset_pass"]

BASELINES = ("random", "neuron_mct", "neuron_intgrad", "dgr")
FULL_METHODS = [m for m in BASELINES if not METHODS[m].expensive]  # whole split
SUB_METHODS = [m for m in BASELINES if METHODS[m].expensive]  # seeded subset


@dataclass
class Split:
    """The evaluated images: ``dataset`` (``n_all`` images of ``data``), the positions of the seeded common subset,
    how the report names both, and the bank with its class pathways and frequencies on the device (or ``None``)."""

    data: ImageDataModule
    dataset: Dataset
    n_all: int
    class_names: list[str]
    subset_pos: torch.Tensor
    all_images: str
    sub_images: str
    bank: PathwayBank | None
    class_paths: torch.Tensor | None
    class_freq: torch.Tensor | None
    baselines_on: str = "all"

    def cheap_methods(self, where: str) -> list[str]:
        """The cheap baselines (and the lookup frontier) run ``where`` (``'all'`` or ``'subset'``)."""
        return FULL_METHODS if self.baselines_on == where else []


@dataclass
class GenPass:
    """GEN-CNP on the whole split, per image: the target's ``logits``, the class source ``y_hat``, ``labels``,
    ``pathways``, generator ``scores`` and per-tap kept ``counts``; ``keep_fraction`` is the mean kept fraction."""

    logits: torch.Tensor
    y_hat: torch.Tensor
    labels: torch.Tensor
    pathways: torch.Tensor
    scores: torch.Tensor
    counts: torch.Tensor
    keep_fraction: float


class Curves:
    """Agreement-vs-kept curves summed over batches: per ``(method, parameter)`` the images whose pathway keeps the
    class, the sum of kept fractions and the images. GEN-CNP's parameters are thresholds on its scores, the
    baselines' global kept fractions."""

    def __init__(self, thresholds: list[float], kept_grid: list[float]):
        self.thresholds, self.kept_grid = thresholds, kept_grid
        self.sums: dict[tuple[str, float], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # agree, kept, n

    def add(self, ev: Evaluator, b: Batch, gen_scores: torch.Tensor, ranked: dict[str, torch.Tensor]) -> None:
        """The points of one batch: GEN-CNP's ``gen_scores`` at each threshold, each ranking at each kept fraction."""
        for t in self.thresholds:
            self._point(ev, b, "gencnp", t, gen_scores > t)
        for m, s in ranked.items():
            for k in self.kept_grid:
                self._point(ev, b, m, k, global_percentile(s, k))

    def _point(self, ev: Evaluator, b: Batch, method: str, param: float, pathway: torch.Tensor) -> None:
        with ev.part(f"curves {method}"):
            agree = ev.keeps_class(b.x, pathway, b.y_hat, b.first(0)).double().sum()
        c = self.sums[method, param]
        c[0] += float(agree)
        c[1] += float(pathway.double().mean(1).sum())
        c[2] += len(b.x)

    def points(self) -> list[dict[str, Any]]:
        return [
            {
                "method": m,
                "param": p,
                "param_kind": "threshold" if m == "gencnp" else "global kept fraction",
                "agreement": c[0] / c[2],
                "kept_mean": c[1] / c[2],
            }
            for (m, p), c in sorted(self.sums.items())
        ]


def gencnp_pass(ev: Evaluator, sp: Split, res: dict[tuple[str, str], Results], batch_size: int) -> GenPass:
    """Pass 1: GEN-CNP's pathways of every image, measured into ``res['gencnp', 'matched']``."""
    gen = res["gencnp", "matched"] = Results("gencnp", "generator pathway (DAQ mask > 0.5)", sp.all_images)
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for pos, x, labels in ev.batches(sp.dataset, batch_size, "GEN-CNP"):
        with ev.part("gencnp explain"), Timer(ev.dev) as tm:
            ex = ev.model.explain(x, labels)
        b = ev.batch(pos, x, labels, ex["logits"], ex["y_hat"])
        ev.measure(gen, b, ex["pathway"], tm.seconds, masked=ex["masked_logits"])
        for key in ("logits", "y_hat", "pathway"):
            parts[key].append(ex[key].cpu())
        parts["labels"].append(labels.cpu())
        parts["scores"].append(ex["scores"].float().cpu())
    gen.finish()
    pathways = torch.cat(parts["pathway"])
    return GenPass(
        torch.cat(parts["logits"]),
        torch.cat(parts["y_hat"]),
        torch.cat(parts["labels"]),
        pathways,
        torch.cat(parts["scores"]),
        tap_counts(pathways, ev.chans),
        float(pathways.double().mean()),
    )


def add_results(res: dict[tuple[str, str], Results], sp: Split) -> None:
    """Empty results of every baseline (matched and native) and, with a bank, of transfer and the class lookup."""
    for m in BASELINES:
        images = sp.all_images if m in sp.cheap_methods("all") else sp.sub_images
        res[m, "matched"] = Results(m, "GEN-CNP's per-sample and per-tap kept counts", images)
        res[m, "native"] = Results(m, METHODS[m].native, images)
    if sp.bank is not None:
        ct = sp.bank.class_taus
        rule = f"tau = {sp.bank.tau:g}" if ct is None else f"per-class tau_c in [{min(ct):g}, {max(ct):g}], validation"
        res["transfer", "matched"] = Results(
            "transfer", f"class pathway M_c = f_c >= tau ({rule}) of the predicted class", sp.all_images
        )
        res["class_lookup", "matched"] = Results(
            "class_lookup",
            "the predicted class's channels ranked by the bank's f_c, GEN-CNP's per-sample and per-tap kept counts",
            sp.all_images,
        )


def full_pass(
    ev: Evaluator, sp: Split, gp: GenPass, res: dict[tuple[str, str], Results], fractions: list[float], batch_size: int
) -> tuple[torch.Tensor, dict[float, list[torch.Tensor]]]:
    """Pass 2: transfer and the class lookup on every image, and with ``baselines_on: all`` the cheap baselines and
    the lookup frontier.

    Returns NeuronMCT's scores ``[N, D]`` (zeros where it did not run) and the frontier's hits: per share of GEN-CNP's
    counts, per image (GEN-CNP's top-by-score pathway keeps the class, the lookup's does, GEN-CNP's kept fraction)."""
    hits: dict[float, list[torch.Tensor]] = {f: [] for f in fractions}
    mct_scores = torch.zeros(sp.n_all, sum(ev.chans))
    methods = sp.cheap_methods("all")
    if not methods and sp.bank is None:
        return mct_scores, hits
    desc = ", ".join(methods + (["transfer"] if sp.bank is not None else []))
    for pos, x, labels in ev.batches(sp.dataset, batch_size, desc):
        b = ev.batch(pos, x, labels, gp.logits[pos].to(ev.dev), gp.y_hat[pos].to(ev.dev))
        counts = gp.counts[pos].to(ev.dev)
        cheap_baselines(ev, res, b, counts, gp, methods, mct_scores, pos)
        if sp.bank is not None:
            _class_pathways(ev, sp, res, b, counts)
            if methods:
                frontier_hits(ev, sp, b, counts, gp.scores[pos].to(ev.dev), hits)
    return mct_scores, hits


def cheap_baselines(
    ev: Evaluator,
    res: dict[tuple[str, str], Results],
    b: Batch,
    counts: torch.Tensor,
    gp: GenPass,
    methods: list[str],
    mct_scores: torch.Tensor,
    pos: torch.Tensor,
) -> None:
    """``methods`` (cheap baselines) on ``b``; NeuronMCT's scores stored at the split positions ``pos``."""
    for m in methods:
        scores = ev.run_baseline(m, res, b, counts, gp.keep_fraction, {})
        if m == "neuron_mct":
            mct_scores[pos] = scores.float().cpu()


def frontier_hits(
    ev: Evaluator, sp: Split, b: Batch, counts: torch.Tensor, scores: torch.Tensor, hits: dict[float, list]
) -> None:
    """Both rankings at each share of GEN-CNP's own per-sample, per-tap counts: does the pathway keep the class."""
    for f in hits:
        c = torch.round(counts.double() * f).long()
        own = topk_per_tap(scores, c, ev.chans)
        look = topk_per_tap(sp.class_freq[b.y_hat], c, ev.chans)
        with ev.part("lookup frontier"):
            own_keeps = ev.keeps_class(b.x, own, b.y_hat, b.first(0)).double().cpu()
            look_keeps = ev.keeps_class(b.x, look, b.y_hat, b.first(0)).double().cpu()
        hits[f].append(torch.stack([own_keeps, look_keeps, own.double().mean(1).cpu()], dim=1))


def _class_pathways(
    ev: Evaluator, sp: Split, res: dict[tuple[str, str], Results], b: Batch, counts: torch.Tensor
) -> None:
    """Transfer (the predicted class's pathway ``M_c``) and the class lookup (its ``f_c`` at GEN-CNP's counts)."""
    with Timer(ev.dev) as tm:
        p = sp.class_paths[b.y_hat]
    ev.measure(res["transfer", "matched"], b, p, tm.seconds)
    with Timer(ev.dev) as tm:
        p = topk_per_tap(sp.class_freq[b.y_hat], counts, ev.chans)
    ev.measure(res["class_lookup", "matched"], b, p, tm.seconds)


def subset_pass(
    ev: Evaluator,
    sp: Split,
    gp: GenPass,
    res: dict[tuple[str, str], Results],
    mct_scores: torch.Tensor,
    opts: dict[str, dict],
    curves: Curves,
    batch_size: int,
    hits: dict[float, list[torch.Tensor]],
) -> torch.Tensor:
    """Pass 3: the expensive baselines (options ``opts[method]``) on the subset, with ``baselines_on: subset`` the
    cheap ones and the lookup frontier (into ``hits``) too, and the ``curves`` there.

    Returns the subset's images ``[n_sub, C, H, W]`` (on the CPU)."""
    cheap = sp.cheap_methods("subset")
    n_sub = len(sp.subset_pos)
    extra_scores = {m: torch.zeros(n_sub, sum(ev.chans)) for m in SUB_METHODS}
    x_sub: list[torch.Tensor] = []
    subset = Subset(sp.dataset, sp.subset_pos.tolist())
    for rows, x, labels in ev.batches(subset, batch_size, ", ".join(cheap + SUB_METHODS + ["curves"])):
        pos = sp.subset_pos[rows]
        x_sub.append(x.cpu())
        b = ev.batch(pos, x, labels, gp.logits[pos].to(ev.dev), gp.y_hat[pos].to(ev.dev))
        counts = gp.counts[pos].to(ev.dev)
        cheap_baselines(ev, res, b, counts, gp, cheap, mct_scores, pos)
        if cheap and sp.bank is not None:
            frontier_hits(ev, sp, b, counts, gp.scores[pos].to(ev.dev), hits)
        for m in SUB_METHODS:
            scores = ev.run_baseline(m, res, b, counts, gp.keep_fraction, opts[m])
            extra_scores[m][rows] = scores.float().cpu()
        ranked = {
            "random": torch.rand(len(x), sum(ev.chans), generator=ev.g_rand, device=ev.dev),
            "neuron_mct": mct_scores[pos].to(ev.dev),
            **{m: extra_scores[m][rows].to(ev.dev) for m in SUB_METHODS},
        }
        curves.add(ev, b, gp.scores[pos].to(ev.dev), ranked)
    return torch.cat(x_sub)
