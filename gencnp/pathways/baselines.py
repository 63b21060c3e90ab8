"""Baseline pathway methods on the shared masking backend ``FrozenTarget.forward(x, masks=..., fill=...)``.

docs/design.md section 7. Every function is batched (no per-sample Python loop); loops run over taps or optimisation
steps only. Pathways are boolean ``[B, D]`` in tap order (``D = sum(tap_channels)``).

| name | source | pathway |
|---|---|---|
| ``random`` | control | uniformly random channels with given per-sample and per-tap counts |
| ``neuron_mct`` | Khakzar et al., CVPR 2021 | ``sum_space |a * dS_y/da|``, one global ranking over all taps |
| ``neuron_intgrad`` | Khakzar et al., CVPR 2021 | integrated gradients of each tap's activation (11 points), then as above |
| ``dgr`` | Wang et al., CVPR 2018 (CDRP) | per-input channel gates optimised for 30 SGD steps; pathway = gates > 0 |

Each method is reported at its own (native) setting and at GEN-CNP's per-sample and per-tap kept counts
(``topk_per_tap``): with one global ranking, early taps' scores can dominate and leave a late tap empty.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gencnp.targets.hooks import space_reduce
from gencnp.targets.loading import FrozenTarget

__all__ = [
    "split_pathway",
    "tap_counts",
    "random_pathways",
    "topk_per_tap",
    "global_percentile",
    "neuron_mct_scores",
    "neuron_intgrad_scores",
    "dgr",
    "PathwayMethod",
    "METHODS",
    "run_method",
    "grad_enabled",
    "plain",
    "Fill",
]

Fill = Sequence[torch.Tensor | None] | None


# ----- pathway bookkeeping -----
def split_pathway(pathway: torch.Tensor, tap_channels: Sequence[int]) -> list[torch.Tensor]:
    """``[B, D]`` -> per-tap ``[B, C_l]`` views (tap order).

    Raises:
        ValueError: when ``D`` differs from ``sum(tap_channels)``.
    """
    if pathway.shape[-1] != sum(tap_channels):
        raise ValueError(
            f"pathway has {pathway.shape[-1]} channels but the taps have {sum(tap_channels)} ({list(tap_channels)}); "
            "pass pathways of the same target and taps."
        )
    return list(torch.split(pathway, list(tap_channels), dim=-1))


def tap_counts(pathway: torch.Tensor, tap_channels: Sequence[int]) -> torch.Tensor:
    """Kept channels per sample and tap: ``[B, D]`` binary -> ``[B, L]`` long."""
    return torch.stack([p.long().sum(-1) for p in split_pathway(pathway, tap_channels)], dim=-1)


def _check_counts(counts: torch.Tensor, tap_channels: Sequence[int]) -> torch.Tensor:
    if counts.dim() != 2 or counts.shape[1] != len(tap_channels):
        raise ValueError(
            f"counts must be [B, L] with L = {len(tap_channels)} taps, got {list(counts.shape)}; use "
            "tap_counts(pathway, tap_channels) to get them from a pathway."
        )
    caps = torch.as_tensor(list(tap_channels), device=counts.device)
    if bool((counts < 0).any()) or bool((counts > caps).any()):
        raise ValueError(
            f"counts must lie in [0, C_l] per tap (C = {list(tap_channels)}), got min {int(counts.min())} "
            f"and per-tap max {counts.max(0).values.tolist()}."
        )
    return counts.long()


def _rank_keep(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, C]``: the ``k[b]`` highest scores of each row (ties broken by channel index, stable)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < k.reshape(-1, 1)


def topk_per_tap(scores: torch.Tensor, counts: torch.Tensor, tap_channels: Sequence[int]) -> torch.Tensor:
    """Matched sparsity: in every tap keep each sample's ``counts[b, l]`` highest-scoring channels.

    Args:
        scores: ``[B, D]`` channel scores (higher = more important).
        counts: ``[B, L]`` channels to keep per sample and tap (e.g. ``tap_counts`` of GEN-CNP's pathways).
        tap_channels: ``C_l`` per tap.

    Returns:
        bool ``[B, D]`` with exactly ``counts[b, l]`` channels in tap ``l`` of sample ``b``.
    """
    counts = _check_counts(counts, tap_channels)
    parts = split_pathway(scores, tap_channels)
    return torch.cat([_rank_keep(s, counts[:, i]) for i, s in enumerate(parts)], dim=-1)


def global_percentile(scores: torch.Tensor, keep_fraction: float | torch.Tensor) -> torch.Tensor:
    """Khakzar's native setting: one ranking over all taps, keep the top ``round(keep_fraction * D)`` per sample.

    Args:
        scores: ``[B, D]``.
        keep_fraction: in ``[0, 1]``, a float or a per-sample ``[B]`` tensor.

    Returns:
        bool ``[B, D]``.
    """
    kf = torch.as_tensor(keep_fraction, dtype=torch.float64, device=scores.device)
    if bool(((kf < 0) | (kf > 1)).any()) or bool(torch.isnan(kf).any()):
        raise ValueError(f"keep_fraction must lie in [0, 1], got {kf.tolist()}.")
    k = torch.round(kf * scores.shape[-1]).long().expand(scores.shape[0])
    return _rank_keep(scores, k)


def random_pathways(
    counts: torch.Tensor, tap_channels: Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random control: uniformly random channels with the same per-sample **and** per-tap counts.

    Args:
        counts: ``[B, L]`` channels to keep per sample and tap.
        tap_channels: ``C_l`` per tap.
        generator: optional seeded ``torch.Generator`` (on the device of ``counts``).

    Returns:
        bool ``[B, D]``; tap ``l`` of sample ``b`` holds exactly ``counts[b, l]`` channels.
    """
    counts = _check_counts(counts, tap_channels)
    u = torch.rand(counts.shape[0], sum(tap_channels), generator=generator, device=counts.device)
    return topk_per_tap(u, counts, tap_channels)


# ----- gradients w.r.t. tap activations -----
@contextlib.contextmanager
def grad_enabled():
    """Gradients on even inside ``torch.no_grad()`` or ``torch.inference_mode()`` callers."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def plain(x: torch.Tensor) -> torch.Tensor:
    """A detached tensor usable by autograd (inference tensors are cloned outside inference mode)."""
    x = x.detach()
    return x.clone() if x.is_inference() else x


def _space_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over space/tokens: ``[B, C, H, W]`` -> ``[B, C]``, tokens ``[B, N, C]`` -> ``[B, C]``."""
    return space_reduce(t, "sum")


def _class_score(logits: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """``sum_b S_{y_b}(x_b)``: samples are independent in eval mode, so one backward gives per-sample gradients."""
    return logits.gather(1, y_hat.reshape(-1, 1)).sum()


def _default_y(target: FrozenTarget, x: torch.Tensor, y_hat: torch.Tensor | None, fill: Fill) -> torch.Tensor:
    if y_hat is not None:
        if y_hat.shape != (x.shape[0],):
            raise ValueError(f"y_hat must be [B] = [{x.shape[0]}], got {list(y_hat.shape)}.")
        return y_hat.long()
    with torch.no_grad():
        return target(x).argmax(1)


def neuron_mct_scores(
    target: FrozenTarget, x: torch.Tensor, y_hat: torch.Tensor | None = None, fill: Fill = None
) -> torch.Tensor:
    """NeuronMCT channel scores (Khakzar et al., CVPR 2021): ``sum_space |a * dS_y/da|`` per tap channel.

    One forward and one backward for all taps: an all-ones mask that requires grad puts every tap output
    ``a`` in the graph; ``dS/da`` is read at the recorded tap outputs. ``S`` is the pre-softmax logit. Without
    ``y_hat`` the class is that forward's argmax (an all-ones mask reproduces the logits exactly), not a second pass.

    Args:
        target: the frozen classifier.
        x: ``[B, C, H, W]`` inputs.
        y_hat: ``[B]`` class to explain (default: the prediction).
        fill: per-tap fill values (mean ablation); at an all-ones mask they do not change the forward.

    Returns:
        ``[B, D]`` non-negative scores, tap order.
    """
    x = plain(x)
    if y_hat is not None:
        y_hat = _default_y(target, x, y_hat, fill)
    with grad_enabled():
        ones = [
            torch.ones(x.shape[0], c, device=x.device, dtype=x.dtype, requires_grad=True) for c in target.tap_channels
        ]
        logits, feats = target(x, masks=ones, fill=fill, record=True)
        if y_hat is None:
            y_hat = logits.detach().argmax(1)
        grads = torch.autograd.grad(_class_score(logits, y_hat), feats)
    return torch.cat([_space_sum((f.detach() * g).abs()) for f, g in zip(feats, grads)], dim=1)


def _trapezoid(steps: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    alphas = torch.linspace(0.0, 1.0, steps, device=device, dtype=dtype)
    w = torch.full((steps,), 1.0 / (steps - 1), device=device, dtype=dtype)
    w[0] = w[-1] = 0.5 / (steps - 1)
    return alphas, w


def neuron_intgrad_scores(
    target: FrozenTarget, x: torch.Tensor, y_hat: torch.Tensor | None = None, steps: int = 11, fill: Fill = None
) -> torch.Tensor:
    """Neuron integrated gradients (Khakzar et al., CVPR 2021): per tap, ``IG = (a - a0) * int_0^1 dS/da(a0 + t(a - a0)) dt``
    along the straight path from the removed value ``a0`` (0, or the fill under mean ablation) to ``a``, with
    ``steps`` points (trapezoid rule); the channel score is ``sum_space |IG|``.

    The path of tap ``l`` is the mask ``t`` on that tap alone (``a * t + a0 * (1 - t)``), so the scaled activation
    flows through the rest of the network; all ``steps`` points of a tap run as one batch of ``steps * B``. The
    first tap's output is computed once and reused by every pass (``FrozenTarget(first_tap=...)``).

    Args:
        target: the frozen classifier.
        x: ``[B, C, H, W]``.
        y_hat: ``[B]`` class to explain (default: the prediction).
        steps: points on the path, both ends included (>= 2).
        fill: per-tap fill values (mean ablation) or ``None`` (zero ablation).

    Returns:
        ``[B, D]`` non-negative scores, tap order.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (both ends of the path), got {steps}.")
    x = plain(x)
    b = x.shape[0]
    with grad_enabled(), torch.no_grad():  # ordinary tensors even under inference_mode: the passes below save them
        logits, first = target(x, record=True)
        y_hat = logits.argmax(1) if y_hat is None else _default_y(target, x, y_hat, fill)
        alphas, w = _trapezoid(steps, x.device, x.dtype)
        xr = x.repeat(steps, *([1] * (x.dim() - 1)))  # [steps * B, ...], path point major
        first_r = first[0].repeat(steps, *([1] * (first[0].dim() - 1)))
        yr = y_hat.repeat(steps)
    scores = []
    with grad_enabled():
        for i, c in enumerate(target.tap_channels):
            masks: list[torch.Tensor | None] = [None] * len(target.tap_channels)
            masks[i] = alphas.repeat_interleave(b)[:, None].expand(steps * b, c).clone().requires_grad_(True)
            logits, feats = target(xr, masks=masks, fill=fill, record=True, first_tap=first_r)
            (g,) = torch.autograd.grad(_class_score(logits, yr), feats[i])
            g = g.reshape(steps, b, *g.shape[1:])
            avg = (w.reshape(-1, *([1] * (g.dim() - 1))) * g).sum(0)
            path = feats[i].detach().reshape(steps, b, *g.shape[2:])
            delta = path[-1] - path[0]  # a - a0
            scores.append(_space_sum((delta * avg).abs()))
    return torch.cat(scores, dim=1)


def dgr(
    target: FrozenTarget,
    x: torch.Tensor,
    y_hat: torch.Tensor | None = None,
    steps: int = 30,
    lr: float = 0.1,
    momentum: float = 0.9,
    l1: float = 0.05,
    clamp: tuple[float, float] = (0.0, 5.0),
    fill: Fill = None,
) -> dict[str, torch.Tensor]:
    """Distillation-guided routing (Wang et al., CVPR 2018, CDRP): per-input channel gates on every tap.

    Gates start at 1; the loss ``-sum_k p_k log p^gates_k + l1 * sum |gates|`` is **summed** over the batch
    (so each sample's gradient, hence the result, does not depend on the batch), ``steps`` SGD steps with
    momentum, gates clamped to ``clamp`` after each step. Each sample keeps its lowest-loss faithful iterate
    (masked argmax equals ``y_hat``) among the ``steps + 1`` iterates, the initial all-ones one included;
    all-ones when none is faithful. The first tap's output is computed once and reused by every step.

    Args:
        target: the frozen classifier.
        x: ``[B, C, H, W]``.
        y_hat: ``[B]`` class the pathway must keep (default: the prediction).
        fill: per-tap fill values (mean ablation) or ``None``.

    Returns:
        ``gates`` ``[B, D]`` (the kept iterate), ``pathway`` bool ``[B, D]`` (``gates > 0``), ``loss`` ``[B]`` of the
        kept iterate, ``faithful`` bool ``[B]`` (a faithful iterate was found), ``step`` ``[B]`` (its index).
    """
    if steps < 0 or lr <= 0 or not 0 <= momentum < 1 or l1 < 0 or clamp[0] > clamp[1]:
        raise ValueError(
            f"dgr needs steps >= 0, lr > 0, 0 <= momentum < 1, l1 >= 0 and clamp lo <= hi; got steps={steps}, "
            f"lr={lr}, momentum={momentum}, l1={l1}, clamp={clamp}."
        )
    x = plain(x)
    chans = target.tap_channels
    with grad_enabled(), torch.no_grad():  # ordinary tensors even under inference_mode: the steps below save them
        logits, first = target(x, record=True)
        p = F.softmax(logits.float(), dim=1)
        y_hat = logits.argmax(1) if y_hat is None else _default_y(target, x, y_hat, fill)
    b, d = x.shape[0], sum(chans)
    best = torch.ones(b, d, device=x.device, dtype=x.dtype)
    best_loss = torch.full((b,), float("inf"), device=x.device, dtype=torch.float64)
    best_step = torch.full((b,), -1, device=x.device, dtype=torch.long)
    with grad_enabled():
        gates = torch.ones(b, d, device=x.device, dtype=x.dtype, requires_grad=True)
        velocity = torch.zeros_like(gates)
        for t in range(steps + 1):
            masked = target(x, masks=list(torch.split(gates, chans, dim=1)), fill=fill, first_tap=first[0])
            per = -(p * F.log_softmax(masked.float(), dim=1)).sum(1) + l1 * gates.abs().sum(1)  # [B]
            with torch.no_grad():
                better = (masked.argmax(1) == y_hat) & (per.double() < best_loss)
                best = torch.where(better[:, None], gates.detach(), best)
                best_loss = torch.where(better, per.detach().double(), best_loss)
                best_step = torch.where(better, torch.full_like(best_step, t), best_step)
            if t == steps:
                break
            (grad,) = torch.autograd.grad(per.sum(), gates)
            with torch.no_grad():  # SGD with momentum (torch.optim.SGD, dampening 0), then clamp
                velocity.mul_(momentum).add_(grad)
                gates.sub_(lr * velocity).clamp_(clamp[0], clamp[1])
    faithful = best_step >= 0
    return {"gates": best, "pathway": best > 0, "loss": best_loss, "faithful": faithful, "step": best_step}


# ----- registry -----
@dataclass(frozen=True)
class PathwayMethod:
    """A baseline the report iterates by name.

    ``run(target, x, y_hat, fill=None, generator=None, **options)`` returns ``scores`` ``[B, D]`` (higher = keep
    first; the matched setting is ``topk_per_tap(scores, counts)``) and, where the method has its own selection,
    ``native`` bool ``[B, D]`` (otherwise the native setting is ``global_percentile(scores, keep_fraction)``).
    """

    name: str
    source: str
    native: str
    expensive: bool
    run: Callable[..., dict[str, torch.Tensor]]


def _run_random(target, x, y_hat, fill=None, generator=None, **_):
    # Ranks of i.i.d. uniform scores: top-k per tap is a uniformly random subset of exactly k channels.
    return {"scores": torch.rand(x.shape[0], target.num_channels, generator=generator, device=x.device)}


def _run_mct(target, x, y_hat, fill=None, generator=None, **_):
    return {"scores": neuron_mct_scores(target, x, y_hat, fill=fill)}


def _run_intgrad(target, x, y_hat, fill=None, generator=None, steps: int = 11, **_):
    return {"scores": neuron_intgrad_scores(target, x, y_hat, steps=steps, fill=fill)}


def _run_dgr(target, x, y_hat, fill=None, generator=None, **options):
    out = dgr(target, x, y_hat, fill=fill, **options)
    return {"scores": out["gates"], "native": out["pathway"], "faithful": out["faithful"]}


METHODS: dict[str, PathwayMethod] = {
    "random": PathwayMethod(
        "random",
        "control",
        "uniformly random channels, one global draw at GEN-CNP's mean kept fraction",
        False,
        _run_random,
    ),
    "neuron_mct": PathwayMethod(
        "neuron_mct",
        "Khakzar et al., CVPR 2021",
        "single global percentile over all taps at GEN-CNP's mean kept fraction",
        False,
        _run_mct,
    ),
    "neuron_intgrad": PathwayMethod(
        "neuron_intgrad",
        "Khakzar et al., CVPR 2021",
        "single global percentile over all taps at GEN-CNP's mean kept fraction",
        True,
        _run_intgrad,
    ),
    "dgr": PathwayMethod(
        "dgr", "Wang et al., CVPR 2018 (CDRP)", "gates > 0 of the lowest-loss faithful iterate", True, _run_dgr
    ),
}


def run_method(
    name: str,
    target: FrozenTarget,
    x: torch.Tensor,
    y_hat: torch.Tensor,
    counts: torch.Tensor | None = None,
    keep_fraction: float | None = None,
    fill: Fill = None,
    generator: torch.Generator | None = None,
    **options,
) -> dict[str, torch.Tensor]:
    """Scores plus the ``matched`` (per-sample and per-tap ``counts``) and ``native`` pathways of a method.

    Args:
        name: a key of ``METHODS``.
        counts: ``[B, L]`` kept channels per sample and tap to match (omit to skip the matched pathway).
        keep_fraction: global kept fraction of the native setting (for methods without their own selection).
        options: method options (``steps`` for ``neuron_intgrad``; ``steps``, ``lr``, ... for ``dgr``).

    Returns:
        ``scores`` ``[B, D]``, and ``matched`` / ``native`` bool ``[B, D]`` where they could be formed.
    """
    if name not in METHODS:
        raise KeyError(f"unknown pathway method '{name}'; known methods: {', '.join(METHODS)}.")
    out = dict(METHODS[name].run(target, x, y_hat, fill=fill, generator=generator, **options))
    if counts is not None:
        out["matched"] = topk_per_tap(out["scores"], counts, target.tap_channels)
    if "native" not in out and keep_fraction is not None:
        out["native"] = global_percentile(out["scores"], keep_fraction)
    return out
