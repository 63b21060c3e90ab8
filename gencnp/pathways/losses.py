"""GEN-CNP losses as pure functions (docs/design.md section 5). Shapes: ``B`` batch, ``K`` classes, ``D`` channels.

All terms are computed in float32 (float64 inputs stay float64), whatever the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "kd",
    "sparsity",
    "faithful_gate",
    "dependence_gate",
    "swap",
    "cls",
    "con",
    "update_prototypes",
    "total_loss",
    "partners",
    "lookup",
]


def _f(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def kd(
    logits: torch.Tensor, masked_logits: torch.Tensor, y_hat: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Faithfulness: ``T^2 KL(softmax(H(x)/T) || softmax(H(x;m)/T)) + CE(H(x;m), y_hat)``, batch mean.

    Args:
        logits: ``[B, K]`` unmasked logits (no gradient needed).
        masked_logits: ``[B, K]`` logits of the masked forward.
        y_hat: ``[B]`` class the pathway must keep.
    """
    t = temperature
    logp = F.log_softmax(_f(logits) / t, dim=1)
    logq = F.log_softmax(_f(masked_logits) / t, dim=1)
    kl = (logp.exp() * (logp - logq)).sum(dim=1).mean()
    return t * t * kl + F.cross_entropy(_f(masked_logits), y_hat)


def faithful_gate(
    logits: torch.Tensor,
    masked_logits: torch.Tensor,
    y_hat: torch.Tensor,
    kappa: float = 0.9,
    top_margin: float | None = None,
) -> torch.Tensor:
    """``[B]`` float: 1 where the pathway stays faithful with a margin, ``p^m_y >= kappa p_y`` (float64 logs).

    With ``top_margin`` (in nats) the masked output must also keep ``y`` on top: ``log p^m_y - max_{k != y}
    log p^m_k >= top_margin``. A sample whose target output is unsure (``p_y`` near 0.5) can lose its class while
    still meeting the ratio ``kappa``; this stops its sparsity pressure before it does.
    """
    lp = F.log_softmax(logits.detach().double(), dim=1).gather(1, y_hat[:, None])[:, 0]
    lqa = F.log_softmax(masked_logits.detach().double(), dim=1)
    lq = lqa.gather(1, y_hat[:, None])[:, 0]
    ok = lq >= lp + torch.log(torch.tensor(kappa, dtype=torch.float64))
    if top_margin is not None:
        runner_up = lqa.scatter(1, y_hat[:, None], float("-inf")).amax(1)
        ok = ok & (lq - runner_up >= top_margin)
    return ok.to(torch.float32)


def dependence_gate(
    swapped_logits: torch.Tensor, y_hat: torch.Tensor, max_prob: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B]`` float: 1 where a pathway does not force its class on another input, ``p^{m_i}(x_j)_{y_i} <= max_prob``.

    gencnp's extension of the faithfulness gate: a sample's sparsity pressure stops while its pathway
    already pushes another image (``x_j``: the swap partner or the all-zero image) towards ``y_i``, so the
    sparsity term cannot buy kept channels with forcing. Pairs that are not ``valid`` (same class) pass.

    Args:
        swapped_logits: ``[B, K]`` logits of the other input through image ``i``'s pathway.
        y_hat: ``[B]`` class of image ``i``.
        max_prob: largest tolerated probability of ``y_i`` (float64 comparison).
        valid: ``[B]`` bool, pairs the gate applies to (all when ``None``).
    """
    p = F.softmax(swapped_logits.detach().double(), dim=1).gather(1, y_hat[:, None])[:, 0]
    ok = p <= max_prob
    if valid is not None:
        ok = ok | ~valid
    return ok.to(torch.float32)


def sparsity(
    scores: Sequence[torch.Tensor],
    gate: torch.Tensor | None = None,
    tap_weights: Sequence[float] | None = None,
    per: str = "tap",
) -> torch.Tensor:
    """Instance-specific sparsity per sample, times ``gate``, batch mean.

    ``per='tap'``: ``mean_l w_l mean_c a_l,c`` (every tap counts the same); ``per='channel'``:
    ``sum_l w_l sum_c a_l,c / D`` (every channel counts the same, i.e. the expected ``kept_mean``).

    Args:
        scores: per-tap scores ``[B, C_l]`` in (0, 1).
        gate: ``[B]`` in {0, 1}; samples that are not faithful with a margin get no sparsity pressure.
        tap_weights: optional weight per tap (default 1 each).
        per: ``'tap'`` or ``'channel'``.
    """
    w = tap_weights or [1.0] * len(scores)
    if per == "channel":
        per_sample = sum(wi * _f(s).sum(dim=1) for wi, s in zip(w, scores)) / sum(s.shape[1] for s in scores)
    elif per == "tap":
        per_sample = sum(wi * _f(s).mean(dim=1) for wi, s in zip(w, scores)) / len(scores)
    else:
        raise ValueError(f"sparsity per must be 'tap' or 'channel', got '{per}'.")
    if gate is not None:
        per_sample = per_sample * gate
    return per_sample.mean()


def _log_not(logits: torch.Tensor, cls_idx: torch.Tensor) -> torch.Tensor:
    """``log(1 - softmax(logits)[cls])`` computed stably as ``logsumexp(others) - logsumexp(all)``."""
    z = _f(logits)
    others = z.scatter(1, cls_idx[:, None], float("-inf"))
    return torch.logsumexp(others, dim=1) - torch.logsumexp(z, dim=1)


def swap(swapped_logits: torch.Tensor, y_hat: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Input dependence: ``-log(1 - p^{m_i}(x_j)_{y_i})`` for pairs with ``y_i != y_j``, mean over valid pairs.

    Args:
        swapped_logits: ``[B, K]`` logits of image ``j`` through image ``i``'s pathway.
        y_hat: ``[B]`` class of image ``i`` (the class the pathway must not force).
        valid: ``[B]`` bool, pairs whose classes differ (all when ``None``).
    """
    nll = -_log_not(swapped_logits, y_hat)
    if valid is None:
        return nll.mean()
    v = valid.to(nll.dtype)
    return (nll * v).sum() / v.sum().clamp_min(1.0)


def cls(logits: torch.Tensor, class_logits: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """PDN distillation: ``KL(p || softmax(g(z))) + CE(g(z), y_hat)``, batch mean."""
    logp = F.log_softmax(_f(logits), dim=1)
    logg = F.log_softmax(_f(class_logits), dim=1)
    return (logp.exp() * (logp - logg)).sum(dim=1).mean() + F.cross_entropy(_f(class_logits), y_hat)


def con(scores: torch.Tensor, prototypes: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """Class relevance: ``mean_c |a_i,c - proto_{y_i},c|``, batch mean. ``scores [B, D]``, ``prototypes [K, D]``."""
    return (_f(scores) - prototypes[y_hat].to(_f(scores).dtype)).abs().mean()


@torch.no_grad()
def update_prototypes(
    prototypes: torch.Tensor,
    seen: torch.Tensor,
    scores: torch.Tensor,
    y_hat: torch.Tensor,
    momentum: float = 0.9,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """EMA of per-class mean scores, in place. Sums and counts are all-reduced before the update so every
    process holds the same prototypes. A class seen for the first time takes its batch mean.

    Args:
        prototypes: ``[K, D]`` buffer; ``seen``: ``[K]`` bool buffer.
        scores: ``[B, D]``; ``y_hat``: ``[B]``.
        all_reduce: sums a tensor across processes (identity when ``None``).
    """
    k = prototypes.shape[0]
    onehot = F.one_hot(y_hat, k).to(torch.float32)
    packed = torch.cat([onehot.T @ scores.detach().float(), onehot.sum(0)[:, None]], dim=1)
    if all_reduce is not None:
        packed = all_reduce(packed)
    sums, counts = packed[:, :-1], packed[:, -1]
    present = counts > 0
    means = sums[present] / counts[present, None]
    old = prototypes[present]
    fresh = seen[present]
    new = torch.where(fresh[:, None], momentum * old + (1 - momentum) * means, means)
    prototypes[present] = new.to(prototypes.dtype)
    seen[present] = True


def partners(y_hat: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch swap pairs for training; returns ``(index [B], valid [B])``, ``valid`` where the classes differ.

    Without ``logits``: ``j = i + 1`` (cyclic). With ``logits [B, K]`` (the target's, unmasked): **hard partners**,
    gencnp's choice: ``j`` is the next sample (cyclically after ``i``) whose class ``y_hat_j`` is the runner-up class
    of ``x_i`` (second-largest logit), i.e. the class that ``x_i``'s pathway is most likely to force on other inputs;
    ``i + 1`` when the batch holds no such sample.
    """
    b = len(y_hat)
    ar = torch.arange(b, device=y_hat.device)
    idx = torch.roll(ar, -1)
    if logits is not None and b > 1:
        runner_up = logits.detach().topk(2, dim=1).indices[:, 1]
        match = y_hat[None, :] == runner_up[:, None]  # [B, B]: j has i's runner-up class
        dist = (ar[None, :] - ar[:, None] - 1) % b  # 0 for j = i + 1, cyclic order after i
        score = torch.where(match, dist, torch.full_like(dist, b))
        first = score.argmin(dim=1)
        idx = torch.where(match.any(dim=1), first, idx)
    return idx, y_hat[idx] != y_hat


def lookup(
    logits: torch.Tensor, masked_logits: torch.Tensor, lookup_logits: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """Beat the class lookup: ``relu(KL(p || p^m) - KL(p || p^lookup) + margin)`` per sample, batch mean.

    gencnp's term for input-specific pathways: a per-input pathway earns its keep only when it preserves the
    target's output better than the class's most frequent channels at the same per-tap counts. Without it a
    generator can settle on a noisy copy of its class pathway.

    Args:
        logits: ``[B, K]`` unmasked logits; masked_logits: ``[B, K]`` through each sample's pathway (with gradient).
        lookup_logits: ``[B, K]`` through the class lookup at the same counts (no gradient needed).
        margin: in nats; the pathway must beat the lookup by at least this much before the term is zero.
    """
    logp = F.log_softmax(_f(logits).detach(), dim=1)
    p = logp.exp()
    kl_m = (p * (logp - F.log_softmax(_f(masked_logits), dim=1))).sum(1)
    kl_l = (p * (logp - F.log_softmax(_f(lookup_logits).detach(), dim=1))).sum(1)
    return F.relu(kl_m - kl_l + margin).mean()


def total_loss(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """``L = sum_name weights[name] * terms[name]`` (missing weight = 1). Returns the terms plus ``'loss'``."""
    out = dict(terms)
    out["loss"] = sum(weights.get(name, 1.0) * value for name, value in terms.items())
    return out
