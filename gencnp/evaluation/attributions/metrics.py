"""Measures of input attributions: ground truth, sanity checks, deletion and insertion, bootstrap intervals.

Pure tensor functions (no Lightning). Maps are ``[B, H, W]``; regions are ``[B, H, W]`` (or ``[B, 1, H, W]``) in
``{0, 1}``.

| measure | source |
|---|---|
| ``relevance_mass`` | Arras et al., Information Fusion 2022 (relevance mass accuracy) |
| ``pointing_game`` | Zhang et al., ECCV 2016 (no tolerance margin) |
| ``ssim``, ``spearman`` | Adebayo et al., NeurIPS 2018 (similarity of maps before and after randomisation) |
| ``deletion_insertion`` | Petsiuk et al., BMVC 2018 (RISE) |
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["relevance_mass", "pointing_game", "normalise", "ssim", "spearman", "deletion_insertion", "auc", "bootstrap"]


def _region(region: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    if region.dim() == 4 and region.shape[1] == 1:
        region = region[:, 0]
    if region.shape != maps.shape:
        raise ValueError(
            f"region has shape {list(region.shape)}, maps {list(maps.shape)}; pass one [H, W] region per map."
        )
    return region > 0.5


def relevance_mass(maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Share of the positive attribution that falls inside the region: ``sum_{R} a+ / sum a+`` per map.

    Returns ``[B]`` float64 in ``[0, 1]``; a map without positive attribution scores 0.
    """
    r = _region(region, maps)
    pos = maps.double().clamp(min=0).flatten(1)
    total = pos.sum(1)
    inside = (pos * r.flatten(1)).sum(1)
    return torch.where(total > 0, inside / total.clamp(min=1e-300), torch.zeros_like(total))


def pointing_game(maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """1.0 where the map's maximum lies inside the region (the first maximum in raster order), else 0.0; ``[B]``."""
    r = _region(region, maps).flatten(1)
    idx = maps.flatten(1).argmax(1, keepdim=True)
    return r.gather(1, idx)[:, 0].double()


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """``|a| / max |a|`` per map (all-zero maps stay zero): the ``[0, 1]`` maps the sanity check compares."""
    a = maps.abs().flatten(1)
    m = a.amax(1, keepdim=True)
    return (a / torch.where(m > 0, m, torch.ones_like(m))).reshape(maps.shape)


def _gaussian(window: int, sigma: float, dtype) -> torch.Tensor:
    t = torch.arange(window, dtype=dtype) - (window - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(
    a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Structural similarity (Wang et al., IEEE TIP 2004) of two batches of maps, one value per pair.

    ``SSIM = mean over windows of (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))``
    with Gaussian windows (``window`` x ``window``, ``sigma``), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L =
    data_range``, over the positions where the window fits (no padding). Computed in float64.

    Args:
        a, b: ``[B, H, W]`` maps (e.g. ``normalise``d to ``[0, 1]``).

    Returns:
        ``[B]`` float64.
    """
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"ssim needs two [B, H, W] batches of one shape, got {list(a.shape)} and {list(b.shape)}.")
    if window % 2 == 0 or window < 1 or window > min(a.shape[-2:]):
        raise ValueError(f"window must be odd and at most the map size {list(a.shape[-2:])}, got {window}.")
    k = _gaussian(window, sigma, torch.float64).to(a.device)
    x, y = a.double()[:, None], b.double()[:, None]
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    sxx = (F.conv2d(x * x, k) - mu_x**2).clamp(min=0)  # non-negative despite rounding
    syy = (F.conv2d(y * y, k) - mu_y**2).clamp(min=0)
    sxy = F.conv2d(x * y, k) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions) along the last dimension, float64."""
    v = v.double()
    order = v.argsort(dim=-1, stable=True)
    sorted_v = v.gather(-1, order)
    n = v.shape[-1]
    pos = torch.arange(n, dtype=torch.float64, device=v.device).expand_as(v)
    # Runs of equal values: start index of each element's run, and run end, via cumulative maxima/minima.
    new = torch.ones_like(sorted_v, dtype=torch.bool)
    new[..., 1:] = sorted_v[..., 1:] != sorted_v[..., :-1]
    start = torch.where(new, pos, torch.zeros_like(pos)).cummax(-1).values
    end_flag = torch.ones_like(new)
    end_flag[..., :-1] = new[..., 1:]
    end = torch.where(end_flag, pos, torch.full_like(pos, n)).flip(-1).cummin(-1).values.flip(-1)
    avg = (start + end) / 2
    ranks = torch.empty_like(avg)
    ranks.scatter_(-1, order, avg)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per pair of maps (average ranks for ties); ``[B]`` float64, 0 for a constant map."""
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two batches of one shape, got {list(a.shape)} and {list(b.shape)}.")
    ra, rb = _ranks(a.flatten(1)), _ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = (ra.pow(2).sum(1) * rb.pow(2).sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp(min=1e-300), torch.zeros_like(den))


def deletion_insertion(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    maps: torch.Tensor,
    y: torch.Tensor,
    steps: int = 20,
    baseline: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Class probability as pixels are removed (deletion) or revealed (insertion) in decreasing attribution order.

    At step ``s`` of ``steps`` the top ``round(s / steps * H * W)`` pixels (all colour channels) are set to
    ``baseline`` (deletion) or taken from ``x`` on a ``baseline`` image (insertion). Ties are broken by raster order.

    Args:
        forward: ``x -> logits [B, K]``.
        x: ``[B, C, H, W]``; maps: ``[B, H, W]`` (higher = more important); y: ``[B]`` class whose softmax
            probability is tracked.

    Returns:
        ``fractions`` ``[steps + 1]``, ``deletion`` and ``insertion`` ``[B, steps + 1]`` probabilities.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    b, _, h, w = x.shape
    n = h * w
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
    counts = [round(s / steps * n) for s in range(steps + 1)]
    dels, ins = [], []
    base = torch.full_like(x, baseline)
    with torch.no_grad():
        for k in counts:
            top = (rank < k).reshape(b, 1, h, w)
            xd = torch.where(top, base, x)
            xi = torch.where(top, x, base)
            p = F.softmax(forward(torch.cat([xd, xi])).double(), dim=1)
            p = p.gather(1, torch.cat([y, y]).reshape(-1, 1))[:, 0]
            dels.append(p[:b])
            ins.append(p[b:])
    fr = torch.tensor(counts, dtype=torch.float64) / n
    return {"fractions": fr, "deletion": torch.stack(dels, 1).cpu(), "insertion": torch.stack(ins, 1).cpu()}


def auc(curves: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under each curve ``[B, S]`` over ``fractions`` ``[S]`` (from 0 to 1); ``[B]``."""
    return torch.trapezoid(curves.double(), fractions.double().to(curves.device), dim=1)


def bootstrap(values: torch.Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` ``[N]`` with a percentile bootstrap interval over the items (resampled with replacement).

    For a paired comparison pass the per-item differences. Returns ``mean``, ``lo``, ``hi``, ``n``.
    """
    v = values.double().flatten().cpu()
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=g)
    means = v[idx].mean(1)
    a = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return {"mean": float(v.mean()), "lo": lo, "hi": hi, "n": int(v.numel())}
