"""GEN-CNP's per-input pathways against the class lookup, on the validation split (model selection).

``python evaluate.py lookup --generator runs/fashion_mnist/gencnp/best.ckpt`` (validation by default).

The class lookup keeps, in every tap, a sample's own number of channels, ranked by how often its predicted class
selects each channel (``f_c``): it carries no per-input information. At shares of GEN-CNP's own per-sample,
per-tap counts, GEN-CNP keeps its highest generator scores and the lookup its class's highest ``f_c``; both go
through the frozen target. ``f_c`` is the generator's running class selection frequency (``GenCNP.class_freq``,
learnt during training on the train split), or a bank's when ``bank`` is given. The report
(``evaluate.py report``) makes the same comparison on the test split with the bank's ``f_c`` and intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from gencnp.banks.bank import PathwayBank
from gencnp.data.modules import FashionMNISTDataModule, ImageDataModule
from gencnp.evaluation.report.summaries import paired_bootstrap
from gencnp.io.files import write_json
from gencnp.pathways.baselines import split_pathway, tap_counts, topk_per_tap
from gencnp.systems.gencnp import GenCNP
from gencnp.systems.training import budget_pathways

__all__ = ["lookup_frontier"]


@torch.no_grad()
def lookup_frontier(
    generator: str = "runs/fashion_mnist/gencnp/best.ckpt",
    data: ImageDataModule | None = None,
    split: str = "val",
    fractions: list[float] | None = None,
    bank: str | None = None,
    batch_size: int = 500,
    limit: int | None = None,
    out: str | None = None,
    budgets: list[float] | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Agreement, swap and null forcing of GEN-CNP's score ranking and of the class lookup at equal per-tap counts.

    GEN-CNP keeps its highest generator scores at shares of its own per-sample, per-tap counts (``fractions``), or
    at fixed kept budgets (``budgets``: its top ``round(b D)`` scores over all taps, ``GenCNP.explain(x, kept=b)``);
    the lookup keeps the same per-sample, per-tap counts, ranked by its class's ``f_c``.

    Args:
        generator: GEN-CNP checkpoint.
        data: data module (Fashion-MNIST when unset).
        split: ``'val'`` (default: selection happens here) or ``'test'``.
        fractions: shares of GEN-CNP's per-sample, per-tap counts (default ``1.0, 0.8, 0.6, 0.4`` when no
            ``budgets`` are given).
        bank: a pathway bank whose ``f_c`` ranks the lookup (default: the generator's ``class_freq``).
        batch_size: images per batch.
        limit: only the first ``limit`` images of the split.
        out: also write the result as JSON to this file.
        budgets: kept budgets in ``(0, 1]`` (fractions of all tapped channels), e.g. ``0.1, 0.15, 0.25, 0.35``.
        bootstrap_samples, seed: paired bootstrap of GEN-CNP minus lookup agreement (95% interval).

    Returns:
        ``{"split", "n", "ranking", "rows": [{kind, fraction or budget, kept_mean, gencnp_agreement,
        lookup_agreement, gain, ci95, swap and null forcing of both}]}``.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got '{split}'.")
    bd = sorted({float(b) for b in (budgets or ())})
    fr = sorted({float(f) for f in (fractions or (() if bd else (1.0, 0.8, 0.6, 0.4)))}, reverse=True)
    if any(not 0 < f <= 1 for f in fr + bd):
        raise ValueError(
            f"fractions (shares of GEN-CNP's counts) and budgets (kept fractions) must lie in (0, 1], got "
            f"{fr} and {bd}."
        )
    if not Path(generator).is_file():
        raise FileNotFoundError(
            f"generator checkpoint '{generator}' does not exist; train one with python train.py fit "
            "--config configs/fashion_mnist/gencnp.yaml, or fix the path."
        )
    model = GenCNP.load_from_checkpoint(generator, map_location="cpu", weights_only=True).eval()
    if bank is not None:
        freq, ranking = PathwayBank.load(bank, target=model.target).frequencies(), f"bank {bank}"
    else:
        if not bool(model.freq_seen.all()):
            raise ValueError(f"{generator} has no running class frequencies (trained before they existed); pass bank.")
        freq, ranking = model.class_freq, "running class selection frequency of training (GenCNP.class_freq)"
    if data is None:
        data = FashionMNISTDataModule(eval_batch_size=batch_size)
    model.check_data(data)
    model.attach_probe_data(data.split("train"), getattr(data, "class_names", None))  # swap probes are indices
    ds = data.split(split)
    if limit is not None:
        ds = Subset(ds, list(range(min(limit, len(ds)))))
    points = [("fraction", f) for f in fr] + [("budget", b) for b in bd]
    per_sample = _per_sample(model, ds, freq, points, batch_size)
    rows = [
        _row(kind, v, h, list(model.null_eval), bootstrap_samples, seed) for (kind, v), h in zip(points, per_sample)
    ]
    result = {"generator": str(generator), "split": split, "n": len(ds), "ranking": ranking, "rows": rows}
    _print_rows(result, list(model.null_eval))
    if out is not None:
        write_json(out, result)
    return result


def _row(kind: str, value: float, h: torch.Tensor, fams: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    """One point's row from its per-sample table ``h`` (columns as in ``_per_sample``)."""
    mean, lo, hi = paired_bootstrap((h[:, 0] - h[:, 1])[:, None], n_boot, seed)
    m = h.mean(0)
    return {
        "kind": kind,
        kind: value,
        "kept_mean": float(m[2]),
        "gencnp_agreement": float(m[0]),
        "lookup_agreement": float(m[1]),
        "gain": float(mean[0]),
        "ci95": [float(lo[0]), float(hi[0])],
        "gencnp_swap_forcing": float(m[3]),
        "lookup_swap_forcing": float(m[4]),
        **{f"gencnp_null_forcing/{fam}": float(m[5 + 2 * j]) for j, fam in enumerate(fams)},
        **{f"lookup_null_forcing/{fam}": float(m[6 + 2 * j]) for j, fam in enumerate(fams)},
    }


def _per_sample(
    model: GenCNP, ds: Dataset, freq: torch.Tensor, points: list[tuple[str, float]], batch_size: int
) -> list[torch.Tensor]:
    """Per point a per-image table ``[n, 5 + 2F]``: GEN-CNP keeps the class, the lookup does, GEN-CNP's kept fraction,
    swap forced by GEN-CNP's and by the lookup's pathway, then per null family (GEN-CNP, lookup) null forced."""
    chans = model.target.tap_channels
    parts: list[list[torch.Tensor]] = [[] for _ in points]
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        x = batch[0]
        ex = model.explain(x)
        y = ex["y_hat"]
        counts = tap_counts(ex["pathway"], chans)
        inputs = model.control_inputs(x, y)
        for i, (kind, v) in enumerate(points):
            if kind == "fraction":
                own = topk_per_tap(ex["scores"], torch.round(counts.double() * v).long(), chans)
            else:
                own = budget_pathways(ex["scores"], v)  # explain(x, kept=v)
            look = topk_per_tap(freq[y], tap_counts(own, chans), chans)
            cols = [
                model.target(x, masks=split_pathway(p.float(), chans), fill=model.fills()).argmax(1) == y
                for p in (own, look)
            ]
            cols.append(own.double().mean(1))
            ctrl = [model.controls(x, {"pathway": p, "y_hat": y}, inputs=inputs) for p in (own, look)]
            cols += [(c_["swap_logits"].argmax(1) == y) & c_["swap_valid"] for c_ in ctrl]
            for fam in model.null_eval:
                cols += [c_["null_logits"][fam].argmax(1) == y for c_ in ctrl]
            parts[i].append(torch.stack([t.double() for t in cols], dim=1))
    return [torch.cat(p) for p in parts]


def _print_rows(result: dict[str, Any], fams: list[str]) -> None:
    print(
        f"GEN-CNP score ranking vs class lookup ({result['split']}, {result['n']} images; lookup: {result['ranking']})"
    )
    print(
        f"{'point':>14} {'kept':>7} {'GEN-CNP':>8} {'lookup':>8} {'gain [95% CI]':>26}   swap forcing GEN-CNP/lookup   "
        + "   ".join(f"{f} GEN-CNP/lookup" for f in fams)
    )
    for r in result["rows"]:
        point = f"{r['kind']} {r[r['kind']]:.2f}"
        ci = f"{r['gain']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
        print(
            f"{point:>14} {r['kept_mean']:>7.3f} {r['gencnp_agreement']:>8.4f} {r['lookup_agreement']:>8.4f} "
            f"{ci:>26}   {r['gencnp_swap_forcing']:.3f}/{r['lookup_swap_forcing']:.3f}   "
            + "   ".join(f"{r[f'gencnp_null_forcing/{f}']:.3f}/{r[f'lookup_null_forcing/{f}']:.3f}" for f in fams)
        )
