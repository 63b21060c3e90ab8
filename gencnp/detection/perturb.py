"""What the detector must flag: torchattacks attacks (FGSM, PGD, and an adaptive PGD against the pathway score) and
common corruptions at several severities, on images in the data's normalised units.

Attacks run in ``[0, 1]`` pixel space: torchattacks un-normalises its input and re-normalises its output when told
the data's mean and std (``set_normalization_used``), so budgets ``eps`` are fractions of the pixel range."""

from __future__ import annotations

import torch
import torchattacks
from torch import nn
from torchattacks.attack import Attack
from torchvision.transforms import functional as TF

__all__ = ["CORRUPTIONS", "PathwayAdaptivePGD", "corrupt", "make_attack", "pixel_stats"]

# severity 1 .. 5 -> parameter, in the spirit of Hendrycks & Dietterich (ICLR 2019) for 28-pixel grey images.
CORRUPTIONS = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # std of added noise, pixel units
    "gaussian_blur": (0.5, 0.8, 1.1, 1.5, 2.0),  # sigma in pixels
    "contrast": (0.75, 0.6, 0.45, 0.3, 0.15),  # factor towards the image mean
    "salt_pepper": (0.01, 0.03, 0.06, 0.1, 0.15),  # fraction of pixels set to 0 or 1
}


def pixel_stats(data, in_chans: int) -> tuple[list[float], list[float]]:
    """The data module's normalisation ``(mean, std)`` per channel (a scalar repeated), as torchattacks wants them."""
    mean, std = getattr(data, "mean", None), getattr(data, "std", None)
    if mean is None or std is None:
        raise ValueError(
            f"data module {type(data).__name__} has no `mean`/`std` attributes; the attacks and corruptions work in "
            "[0, 1] pixels and need the normalisation. Give the data module `mean` and `std` (per channel)."
        )

    def per_channel(v) -> list[float]:
        v = [float(v)] if isinstance(v, (int, float)) else [float(a) for a in v]
        return v * in_chans if len(v) == 1 else v

    return per_channel(mean), per_channel(std)


def _to_pixels(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def _to_normalised(p: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=p.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=p.dtype).view(1, -1, 1, 1)
    return (p - m) / s


def corrupt(
    x: torch.Tensor, kind: str, severity: int, mean: list[float], std: list[float], seed: int = 0
) -> torch.Tensor:
    """``x`` (normalised ``[B, C, H, W]``) with corruption ``kind`` at ``severity`` 1-5, returned normalised.

    The noise draws come from a generator seeded with ``seed`` (reproducible, the global RNG untouched).
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{kind}'; known: {sorted(CORRUPTIONS)}.")
    if not 1 <= severity <= 5:
        raise ValueError(f"corruption severity must be 1 to 5, got {severity}.")
    p = _to_pixels(x.float().cpu(), mean, std)
    v = CORRUPTIONS[kind][severity - 1]
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian_noise":
        p = p + v * torch.randn(p.shape, generator=g)
    elif kind == "gaussian_blur":
        k = 2 * int(3 * v + 0.5) + 1
        p = TF.gaussian_blur(p, [k, k], [v, v])
    elif kind == "contrast":
        mu = p.mean(dim=(1, 2, 3), keepdim=True)
        p = (p - mu) * v + mu
    else:
        u = torch.rand(p.shape[0], 1, *p.shape[2:], generator=g).expand_as(p)
        p = torch.where(u < v / 2, torch.zeros_like(p), torch.where(u > 1 - v / 2, torch.ones_like(p), p))
    return _to_normalised(p.clamp(0, 1), mean, std)


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
