"""What the detector learns, on validation only (a holdout of train; never test): the sign of each pathway score and
one logistic-regression combination of them (``pathway_combined``)."""

from __future__ import annotations

import torch

from gencnp.detection.metrics import auroc

__all__ = ["LogisticCombination", "orient"]


def orient(clean: dict[str, torch.Tensor], flagged: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per score, ``+1`` when it is higher on ``flagged`` validation inputs than on ``clean`` ones (AUROC >= 0.5),
    else ``-1``: the sign the detector multiplies it by. Fitted on validation; test never sets a sign."""
    return {k: 1.0 if auroc(clean[k], flagged[k]) >= 0.5 else -1.0 for k in clean}


class LogisticCombination:
    """``p(flagged | x) = sigmoid(w · (s(x) - mu) / sigma + b)`` over the pathway scores ``s`` (standardised with the
    validation mean ``mu`` and std ``sigma``), fitted by L-BFGS on the L2-regularised, class-balanced logistic loss
    ``mean_0 softplus(u) + mean_1 softplus(-u) + l2 |w|^2``. The score is the logit ``u``.

    Args:
        names: the scores it combines (in this order).
        l2: weight of the L2 penalty on ``w``.
    """

    def __init__(self, names: list[str], l2: float = 1e-3):
        self.names, self.l2 = list(names), l2
        self.mu = self.sigma = self.w = self.b = None

    def _matrix(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([scores[k].double() for k in self.names], dim=1)

    def fit(self, clean: dict[str, torch.Tensor], flagged: dict[str, torch.Tensor]) -> LogisticCombination:
        """Fit on validation scores of clean inputs (label 0) and attacked or corrupted ones (label 1)."""
        x0, x1 = self._matrix(clean), self._matrix(flagged)
        both = torch.cat([x0, x1])
        self.mu, self.sigma = both.mean(0), both.std(0).clamp_min(1e-12)
        z0, z1 = (x0 - self.mu) / self.sigma, (x1 - self.mu) / self.sigma
        w = torch.zeros(len(self.names), dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (
                torch.nn.functional.softplus(z0 @ w + b).mean()
                + torch.nn.functional.softplus(-(z1 @ w + b)).mean()
                + self.l2 * (w * w).sum()
            )
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = w.detach(), b.detach()
        return self

    def score(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fitted logit ``u`` for each input: float64 ``[N]``, higher = more anomalous."""
        if self.w is None:
            raise RuntimeError("LogisticCombination.score called before fit.")
        return ((self._matrix(scores) - self.mu) / self.sigma) @ self.w + self.b

    def weights(self) -> dict[str, float]:
        """Standardised weight per score (the JSON record of what was learnt)."""
        return {k: float(v) for k, v in zip(self.names, self.w)} if self.w is not None else {}
