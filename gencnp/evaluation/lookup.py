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
from gencnp.io.files import write_json
from gencnp.pathways.baselines import split_pathway, tap_counts, topk_per_tap
from gencnp.systems.gencnp import GenCNP

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
) -> dict[str, Any]:
    """Agreement of GEN-CNP's score ranking and of the class lookup at shares of GEN-CNP's own counts.

    Args:
        generator: GEN-CNP checkpoint.
        data: data module (Fashion-MNIST when unset).
        split: ``'val'`` (default: selection happens here) or ``'test'``.
        fractions: shares of GEN-CNP's per-sample, per-tap counts (default ``1.0, 0.8, 0.6, 0.4``).
        bank: a pathway bank whose ``f_c`` ranks the lookup (default: the generator's ``class_freq``).
        batch_size: images per batch.
        limit: only the first ``limit`` images of the split.
        out: also write the result as JSON to this file.

    Returns:
        ``{"split", "n", "ranking", "rows": [{fraction, kept_mean, gencnp_agreement, lookup_agreement, gain}]}``.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got '{split}'.")
    fr = sorted({float(f) for f in (fractions or (1.0, 0.8, 0.6, 0.4))}, reverse=True)
    if any(not 0 < f <= 1 for f in fr):
        raise ValueError(f"fractions must lie in (0, 1] (shares of GEN-CNP's counts), got {fr}.")
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
    sums, nulls = _frontier_sums(model, ds, freq, fr, batch_size)
    rows = [
        {
            "fraction": f,
            "kept_mean": float(s[3] / s[0]),
            "gencnp_agreement": float(s[1] / s[0]),
            "lookup_agreement": float(s[2] / s[0]),
            "gain": float((s[1] - s[2]) / s[0]),
            "gencnp_swap_forcing": float(s[4] / s[0]),
            "lookup_swap_forcing": float(s[5] / s[0]),
            **{f"gencnp_null_forcing/{fam}": float(v[i, 0] / s[0]) for fam, v in nulls.items()},
            **{f"lookup_null_forcing/{fam}": float(v[i, 1] / s[0]) for fam, v in nulls.items()},
        }
        for i, (f, s) in enumerate(zip(fr, sums))
    ]
    result = {"generator": str(generator), "split": split, "n": len(ds), "ranking": ranking, "rows": rows}
    _print_rows(result, list(nulls))
    if out is not None:
        write_json(out, result)
    return result


def _frontier_sums(
    model: GenCNP, ds: Dataset, freq: torch.Tensor, fr: list[float], batch_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per share of GEN-CNP's counts: ``[n, own agree, lookup agree, kept, own swap, lookup swap]`` summed over
    ``ds``, and per null family ``[own, lookup]`` null-forced images."""
    chans = model.target.tap_channels
    sums = torch.zeros(len(fr), 6, dtype=torch.float64)
    nulls = {f: torch.zeros(len(fr), 2, dtype=torch.float64) for f in model.null_eval}
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        x = batch[0]
        ex = model.explain(x)
        counts = tap_counts(ex["pathway"], chans)
        inputs = model.control_inputs(x, ex["y_hat"])
        for i, f in enumerate(fr):
            c = torch.round(counts.double() * f).long()
            own = topk_per_tap(ex["scores"], c, chans)
            look = topk_per_tap(freq[ex["y_hat"]], c, chans)
            hits = [
                (model.target(x, masks=split_pathway(p.float(), chans), fill=model.fills()).argmax(1) == ex["y_hat"])
                .double()
                .sum()
                for p in (own, look)
            ]
            ctrl = [model.controls(x, {"pathway": p, "y_hat": ex["y_hat"]}, inputs=inputs) for p in (own, look)]
            swaps = [
                float(((c["swap_logits"].argmax(1) == ex["y_hat"]) & c["swap_valid"]).double().sum()) for c in ctrl
            ]
            sums[i] += torch.tensor([len(x), float(hits[0]), float(hits[1]), float(own.double().mean(1).sum()), *swaps])
            for fam in model.null_eval:
                nulls[fam][i] += torch.tensor(
                    [float((c["null_logits"][fam].argmax(1) == ex["y_hat"]).double().sum()) for c in ctrl]
                )
    return sums, nulls


def _print_rows(result: dict[str, Any], fams: list[str]) -> None:
    print(
        f"GEN-CNP score ranking vs class lookup ({result['split']}, {result['n']} images; lookup: {result['ranking']})"
    )
    print(
        f"{'share':>6} {'kept':>7} {'GEN-CNP':>8} {'lookup':>8} {'gain':>8}   swap forcing GEN-CNP/lookup   "
        + "   ".join(f"{f} GEN-CNP/lookup" for f in fams)
    )
    for r in result["rows"]:
        print(
            f"{r['fraction']:>6.2f} {r['kept_mean']:>7.3f} {r['gencnp_agreement']:>8.4f} {r['lookup_agreement']:>8.4f} "
            f"{r['gain']:>+8.4f}   {r['gencnp_swap_forcing']:.3f}/{r['lookup_swap_forcing']:.3f}   "
            + "   ".join(f"{r[f'gencnp_null_forcing/{f}']:.3f}/{r[f'lookup_null_forcing/{f}']:.3f}" for f in fams)
        )
