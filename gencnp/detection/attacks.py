"""What the detector must flag, part two: torchattacks attacks (FGSM, PGD, and an adaptive PGD against the pathway
score), on images in the data's normalised units.

Attacks run in ``[0, 1]`` pixel space: torchattacks un-normalises its input and re-normalises its output when told
the data's mean and std (``set_normalization_used``), so budgets ``eps`` are fractions of the pixel range.

torchattacks is an optional dependency (``pip install -e ".[detect]"``); only ``detect`` imports this module, when it
runs."""

from __future__ import annotations

import torch
import torchattacks
from torch import nn
from torchattacks.attack import Attack

__all__ = ["PathwayAdaptivePGD", "make_attack"]


def make_attack(name: str, model: nn.Module, eps: float, steps: int, mean: list[float], std: list[float]):
    """A torchattacks ``FGSM`` or ``PGD`` (L-inf, ``alpha = 2.5 eps / steps``, random start) on ``model``, taking and
    returning normalised images."""
    if name == "fgsm":
        atk = torchattacks.FGSM(model, eps=eps)
    elif name == "pgd":
        atk = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    else:
        raise ValueError(f"unknown attack '{name}'; expected 'fgsm' or 'pgd'.")
    atk.set_normalization_used(mean=mean, std=std)
    return atk


class PathwayAdaptivePGD(Attack):
    """PGD that fools the target **and** keeps a pathway score looking clean (the adaptive test of a detector, Carlini &
    Wagner, "Adversarial Examples Are Not Easily Detected", AISec 2017; Tramèr et al., NeurIPS 2020).

    Each step ascends ``CE(H(x'), y) - weight * sign * s(x')``, ``s`` a differentiable version of the detector's score
    ``target`` (``Scorer.adaptive_score``: gradients through the generator and, for ``masked_logit_gap``, through the
    masked forward) and ``sign`` its orientation (+1 when higher means flagged), under the same L-inf budget, random
    start, sign step and projection as torchattacks' ``PGD``.

    Args:
        scorer: a ``gencnp.detection.features.Scorer``.
        eps, alpha, steps: PGD budget (pixel units), step size and steps.
        weight: weight of the pathway term.
        target: the score attacked, e.g. ``'masked_logit_gap@class'``.
        sign: the orientation of ``target`` set on validation.
    """

    def __init__(
        self, scorer, eps: float, alpha: float, steps: int, weight: float, target: str, sign: float, seed: int = 0
    ):
        super().__init__("PathwayAdaptivePGD", scorer.target)
        self.scorer, self.eps, self.alpha, self.steps, self.weight = scorer, eps, alpha, steps, weight
        self.score_name, self.sign, self.seed = target, sign, seed
        self.supported_mode = ["default"]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        g = torch.Generator().manual_seed(self.seed)
        start = (torch.rand(images.shape, generator=g) * 2 - 1).to(images) * self.eps
        adv = torch.clamp(images + start, 0, 1).detach()
        ce = nn.CrossEntropyLoss()
        for _ in range(self.steps):
            adv.requires_grad_(True)
            x = self.normalize(adv) if self._normalization_applied is False else adv
            logits, feats = self.scorer.target(x, record=True)
            score = self.scorer.adaptive_score(self.score_name, x, logits, feats)
            cost = ce(logits, labels) - self.weight * self.sign * score.float().mean()
            grad = torch.autograd.grad(cost, adv)[0]
            adv = adv.detach() + self.alpha * grad.sign()
            adv = torch.clamp(images + torch.clamp(adv - images, -self.eps, self.eps), 0, 1).detach()
        return adv
