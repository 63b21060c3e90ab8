"""The selection score and the choice of a bank's threshold ``tau``.

``score = agreement - w_swap * swap_forcing - w_zero * zero_forcing - w_kept * kept``: GenCNP's ``val/score`` (the
checkpoint monitor) and ``PathwayBankWriter``'s rule for ``tau`` (``choose_tau``), with the default weights here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["W_SWAP", "W_ZERO", "W_KEPT", "selection_score", "check_tau", "choose_tau", "choose_class_taus"]

W_SWAP = 1.0  # weight of swap forcing
W_ZERO = 0.5  # weight of zero forcing
W_KEPT = 0.25  # weight of the kept fraction


def selection_score(
    agreement, swap_forcing, zero_forcing, kept, w_swap: float = W_SWAP, w_zero: float = W_ZERO, w_kept: float = W_KEPT
):
    """``agreement - w_swap * swap_forcing - w_zero * zero_forcing - w_kept * kept`` (numbers or tensors)."""
    return agreement - w_swap * swap_forcing - w_zero * zero_forcing - w_kept * kept


def check_tau(tau: float | None, what: str = "tau") -> float | None:
    """``tau`` as a float in ``(0, 1]`` (``None`` passes); raises with the valid range otherwise."""
    if tau is None:
        return None
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{what} must be a float in (0, 1], got {type(tau).__name__} {tau!r}.")
    tau = float(tau)
    if not (0.0 < tau <= 1.0):  # also refuses NaN
        raise ValueError(
            f"{what}={tau} is outside the valid range (0, 1]: M_c keeps channel j when f_c[j] >= tau, so tau <= 0 "
            "keeps every channel and tau > 1 keeps none. Pick a value such as 0.5, or let PathwayBankWriter choose "
            "it on the validation split."
        )
    return tau


def choose_tau(
    taus: Sequence[float],
    agreement: Sequence[float],
    swap_forcing: Sequence[float],
    zero_forcing: Sequence[float],
    kept: Sequence[float],
    min_agreement: float = 0.95,
    w_swap: float = W_SWAP,
    w_zero: float = W_ZERO,
    w_kept: float = W_KEPT,
    max_kept: float | None = None,
) -> tuple[float, str, list[float]]:
    """Pick ``tau`` from transfer results measured on the validation split (never test).

    Rule: ``score = agreement - w_swap * swap_forcing - w_zero * zero_forcing - w_kept * kept`` (GenCNP's
    ``val/score``; a control that was not run, NaN, counts 0). Among the taus whose transfer agreement is
    ``>= min_agreement`` and whose kept fraction is ``<= max_kept`` (the kept budget; ``None``: no budget), take
    the highest score; when none qualifies, the highest score among the taus within the kept budget, and when no
    tau is within it, the highest score overall. Ties go to the larger tau (the sparser class pathways).

    Args:
        taus: ``[T]`` candidate thresholds in ``(0, 1]``.
        agreement, swap_forcing, zero_forcing, kept: ``[T]`` transfer metrics of ``M_c = f_c >= tau`` per tau.

    Returns:
        ``(tau, rule, scores)``: the chosen threshold, a sentence stating why, and the ``[T]`` scores.
    """
    if not taus:
        raise ValueError("choose_tau needs at least one candidate tau.")
    lengths = {len(taus), len(agreement), len(swap_forcing), len(zero_forcing), len(kept)}
    if len(lengths) != 1:
        raise ValueError(f"choose_tau got sequences of different lengths {sorted(lengths)}; pass one value per tau.")
    for t in taus:
        check_tau(t, "candidate tau")

    def z(v: float) -> float:
        return 0.0 if v != v else float(v)

    scores = [
        selection_score(z(a), z(s), z(o), z(k), w_swap, w_zero, w_kept)
        for a, s, o, k in zip(agreement, swap_forcing, zero_forcing, kept)
    ]
    if max_kept is not None and not 0.0 < max_kept <= 1.0:
        raise ValueError(f"max_kept must lie in (0, 1] or be None (no kept budget), got {max_kept}.")
    in_budget = [i for i, k in enumerate(kept) if max_kept is None or (k == k and k <= max_kept)]
    feasible = [i for i in in_budget if agreement[i] == agreement[i] and agreement[i] >= min_agreement]
    pool = feasible or in_budget or list(range(len(taus)))
    best = max(pool, key=lambda i: (scores[i], taus[i]))
    weights = f"score = agreement - {w_swap:g} swap_forcing - {w_zero:g} zero_forcing - {w_kept:g} kept"
    budget = "" if max_kept is None else f" and kept <= {max_kept:g}"
    if feasible:
        rule = (
            f"highest {weights} among the {len(feasible)} of {len(taus)} taus with validation transfer "
            f"agreement >= {min_agreement:g}{budget}"
        )
    elif in_budget and max_kept is not None:
        rule = (
            f"no tau reached validation transfer agreement >= {min_agreement:g} with kept <= {max_kept:g}; "
            f"highest {weights} among the {len(in_budget)} taus with kept <= {max_kept:g}"
        )
    else:
        rule = f"no tau reached validation transfer agreement >= {min_agreement:g}{budget}; highest {weights} overall"
    return float(taus[best]), rule, scores


def choose_class_taus(
    taus: Sequence[float],
    sums: torch.Tensor,
    num_channels: int,
    min_agreement: float = 0.95,
    w_swap: float = W_SWAP,
    w_zero: float = W_ZERO,
    max_kept: float | None = None,
    max_swap: float | None = None,
) -> tuple[list[float], str, dict[str, float]]:
    """A threshold per class from transfer results measured per class on the validation split (never test).

    Greedy, from the sparsest class pathways (every class at the largest tau): while validation transfer agreement is
    below ``min_agreement``, lower the tau of the class whose step (to any lower tau) buys the most of ``agreement - w_swap
    swap_forcing - w_zero zero_forcing`` per channel it adds, among the steps that keep the kept fraction within
    ``max_kept`` and swap forcing within ``max_swap``; stop when the goal is met or no step helps. Classes are
    weighted by their validation images, so the totals are the whole split's.

    Args:
        taus: ``[T]`` ascending candidate thresholds.
        sums: ``[T, K, 8]`` float64 sums per tau and predicted class, columns ``n, agree, masked_correct,
            n_labelled, swap_forced, n_swap, zero_forced, kept channels`` (``PathwayBankWriter``'s tau search).
        num_channels: ``D``.

    Returns:
        ``(class_taus [K], rule, totals)``: the thresholds, a sentence stating the outcome, and the validation
        ``agreement``, ``kept``, ``swap_forcing`` and ``zero_forcing`` of the chosen class pathways.
    """
    t, k = sums.shape[0], sums.shape[1]
    if t != len(taus) or sums.shape[2] != 8:
        raise ValueError(f"sums must be [T={len(taus)}, K, 8], got {list(sums.shape)}.")
    idx = torch.full((k,), t - 1, dtype=torch.long)  # start sparsest
    cls = torch.arange(k)

    def totals(ix: torch.Tensor) -> dict[str, float]:
        s = sums[ix, cls].sum(0)  # [8]
        n = float(s[0])
        return {
            "agreement": float(s[1]) / n if n else math.nan,
            "kept": float(s[7]) / (n * num_channels) if n else math.nan,
            "swap_forcing": float(s[4]) / float(s[5]) if float(s[5]) else 0.0,
            "zero_forcing": float(s[6]) / n if n else 0.0,
        }

    def value(tt: dict[str, float]) -> float:
        return tt["agreement"] - w_swap * tt["swap_forcing"] - w_zero * tt["zero_forcing"]

    now = totals(idx)
    while now["agreement"] < min_agreement:
        best = _best_step(idx, now, totals, value, max_kept, max_swap)
        if best is None:
            break
        idx[best[0]] = best[1]
        now = totals(idx)
    limits = "".join(
        f" and {name} <= {v:g}" for name, v in (("kept", max_kept), ("swap_forcing", max_swap)) if v is not None
    )
    if now["agreement"] >= min_agreement:
        rule = (
            f"per-class tau: validation transfer agreement {now['agreement']:.4f} >= {min_agreement:g}{limits} "
            f"(kept {now['kept']:.4f}), greedy from the sparsest pathways"
        )
    else:
        rule = (
            f"per-class tau: validation transfer agreement {now['agreement']:.4f} stays below {min_agreement:g}"
            f"{limits} (kept {now['kept']:.4f}); the best the greedy search found"
        )
    return [float(taus[i]) for i in idx.tolist()], rule, now


def _best_step(idx, now, totals, value, max_kept, max_swap) -> tuple[int, int] | None:
    """``(class, tau index)``: the lower tau of one class that buys the most ``value`` per kept channel within the
    budgets (any lower tau, not only the next one, so a plateau of equal pathways does not stop the search)."""
    best, best_eff = None, 0.0
    for c in range(len(idx)):
        for j in range(int(idx[c])):
            trial = idx.clone()
            trial[c] = j
            tt = totals(trial)
            over = (max_kept is not None and tt["kept"] > max_kept) or (
                max_swap is not None and tt["swap_forcing"] > max_swap
            )
            gain, cost = value(tt) - value(now), tt["kept"] - now["kept"]
            if not over and gain > 0 and gain / max(cost, 1e-12) > best_eff:
                best, best_eff = (c, j), gain / max(cost, 1e-12)
    return best
