"""What the detector must flag, part one: common corruptions at several severities, on images in the data's
normalised units (the attacks are in ``gencnp.detection.attacks``, which needs torchattacks)."""

from __future__ import annotations

import torch
from torchvision.transforms import functional as TF

__all__ = ["CORRUPTIONS", "corrupt", "pixel_stats"]

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
