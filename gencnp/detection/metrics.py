"""Detection metrics as OpenOOD reports them (Zhang et al., "OpenOOD v1.5", 2023), computed with torchmetrics:
AUROC, AUPR with the out-of-distribution (or attacked) inputs as positives, and FPR at 95% TPR (the fraction of
clean in-distribution inputs flagged when 95% of the positives are caught), each with a bootstrap interval.

Point values come from torchmetrics. The bootstrap evaluates hundreds of resamples of every method on every set,
which torchmetrics does one call at a time (about 4 ms each here); ``weighted_metrics`` computes the same three
numbers for many resamples at once and is tested equal to torchmetrics at unit weights."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_specificity_at_sensitivity,
)

__all__ = ["METRICS", "auroc", "aupr", "bootstrap", "fpr_at_95_tpr", "point", "weighted_metrics"]

METRICS = ("auroc", "aupr", "fpr95")


def _stack(clean: torch.Tensor, flagged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.cat([clean, flagged]).double()
    target = torch.cat([torch.zeros(len(clean)), torch.ones(len(flagged))]).long()
    return scores, target


def auroc(clean: torch.Tensor, flagged: torch.Tensor) -> float:
    """Area under the ROC curve; ``flagged`` (OOD or attacked) inputs are positives, higher score = more anomalous."""
    return float(binary_auroc(*_stack(clean, flagged)))


def aupr(clean: torch.Tensor, flagged: torch.Tensor) -> float:
    """Average precision (area under precision-recall) with the flagged inputs as positives (OpenOOD's AUPR-Out)."""
    return float(binary_average_precision(*_stack(clean, flagged)))


def fpr_at_95_tpr(clean: torch.Tensor, flagged: torch.Tensor) -> float:
    """FPR at 95% TPR: ``1 - specificity`` at the threshold catching at least 95% of the flagged inputs."""
    spec, _ = binary_specificity_at_sensitivity(*_stack(clean, flagged), min_sensitivity=0.95)
    return float(1.0 - spec)


_FNS = {"auroc": auroc, "aupr": aupr, "fpr95": fpr_at_95_tpr}


def point(clean: torch.Tensor, flagged: torch.Tensor) -> dict[str, float]:
    """All three metrics of one score on one (clean, flagged) pair."""
    return {m: _FNS[m](clean, flagged) for m in METRICS}


def weighted_metrics(clean: torch.Tensor, flagged: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> dict:
    """AUROC, AUPR and FPR at 95% TPR of many weightings of the same inputs at once (the bootstrap: a resample with
    replacement is a weighting by multiplicities), ties handled as torchmetrics does.

    With ``u`` the distinct score values in decreasing order, ``a_u``/``b_u`` the clean/flagged weight at ``u``:
    ``AUROC = Σ_u b_u (A_{<u} + a_u / 2) / (N0 N1)``; ``AUPR = Σ_u (b_u / N1) TP_u / (TP_u + FP_u)`` with
    ``TP_u = Σ_{v>=u} b_v``, ``FP_u = Σ_{v>=u} a_v``; ``FPR95 = min {FP_u / N0 : TP_u / N1 >= 0.95}``.
    Unit weights give torchmetrics' values (a test checks it).

    Args:
        clean, flagged: scores ``[N0]``, ``[N1]``.
        w0, w1: weights ``[R, N0]``, ``[R, N1]`` (one row per resample).

    Returns:
        ``{metric: float64 [R]}``.
    """
    values, inverse = torch.unique(torch.cat([clean, flagged]).double(), sorted=True, return_inverse=True)
    inv0, inv1 = inverse[: len(clean)], inverse[len(clean) :]
    r, u = w0.shape[0], len(values)
    a = torch.zeros(r, u, dtype=torch.float64).index_add_(1, inv0, w0.double())
    b = torch.zeros(r, u, dtype=torch.float64).index_add_(1, inv1, w1.double())
    n0, n1 = a.sum(1), b.sum(1)
    below = torch.cumsum(a, 1) - a  # clean weight strictly below each value (ascending order)
    auc = (b * (below + 0.5 * a)).sum(1) / (n0 * n1)
    a_d, b_d = a.flip(1), b.flip(1)  # descending thresholds
    tp, fp = torch.cumsum(b_d, 1), torch.cumsum(a_d, 1)
    precision = tp / (tp + fp).clamp_min(1e-300)
    ap = (b_d / n1[:, None] * precision).sum(1)
    fpr = torch.where(tp / n1[:, None] >= 0.95 - 1e-12, fp / n0[:, None], torch.full_like(fp, 2.0)).amin(1)
    return {"auroc": auc, "aupr": ap, "fpr95": fpr}


def bootstrap(
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]],
    samples: int,
    seed: int,
    pairs: list[tuple[str, str]] = (),
    chunk: int = 100,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[float]]]:
    """Percentile 95% intervals of every metric of every method, resampling clean and flagged inputs separately
    (stratified) with the same resamples for every method, so differences are paired.

    Args:
        scores: method -> ``(clean [N0], flagged [N1])`` scores on the same inputs.
        samples: bootstrap resamples.
        seed: seed of the resampling.
        pairs: ``(a, b)`` method pairs whose AUROC difference ``a - b`` gets an interval too.
        chunk: resamples evaluated at once (memory ``chunk x (N0 + N1)``).

    Returns:
        ``({method: {metric: [lo, hi]}}, {"a - b": [lo, hi]})``.
    """
    g = torch.Generator().manual_seed(seed)
    n0, n1 = (len(t) for t in next(iter(scores.values())))
    draws: dict[str, dict[str, list[torch.Tensor]]] = {m: {k: [] for k in METRICS} for m in scores}
    done = 0
    while done < samples:
        r = min(chunk, samples - done)
        w0 = _multiplicities(r, n0, g)
        w1 = _multiplicities(r, n1, g)
        for m, (c, f) in scores.items():
            for k, v in weighted_metrics(c, f, w0, w1).items():
                draws[m][k].append(v)
        done += r
    cat = {m: {k: torch.cat(v) for k, v in d.items()} for m, d in draws.items()}
    cis = {m: {k: _interval(v) for k, v in d.items()} for m, d in cat.items()}
    diffs = {f"{a} - {b}": _interval(cat[a]["auroc"] - cat[b]["auroc"]) for a, b in pairs}
    return cis, diffs


def _multiplicities(r: int, n: int, g: torch.Generator) -> torch.Tensor:
    """``[r, n]``: how often each of ``n`` items is drawn in each of ``r`` resamples with replacement."""
    idx = torch.randint(0, n, (r, n), generator=g)
    return torch.zeros(r, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(r, n, dtype=torch.float64))


def _interval(values: torch.Tensor) -> list[float]:
    t = values.double()
    return [float(torch.quantile(t, 0.025)), float(torch.quantile(t, 0.975))]
