"""Uninformative ("null") inputs: controls that a pathway must not turn into its class.

A sparse mask on a frozen network can force a class whatever the input. The all-zero (data-mean) image is one
such input; a pathway trained against it alone learns that one image and still forces its class on noise. This
module draws whole families of inputs that carry no class evidence, each paired with an image ``x_i``:

| family | input paired with ``x_i`` |
|---|---|
| ``gaussian`` | i.i.d. Gaussian pixels with the data's per-channel mean and std |
| ``uniform`` | i.i.d. uniform pixels with the data's per-channel mean and std |
| ``shuffle`` | ``x_i`` with its pixel positions permuted (same permutation for every colour channel) |
| ``smooth`` | low-frequency noise: Gaussian noise on a grid 4 times coarser, bilinearly upsampled, rescaled to the data's per-channel mean and std |
| ``constant`` | one grey level per channel, drawn from the data's per-channel mean +- 2 std |

Every draw is a pure function of ``x_i``'s pixels and a ``salt`` (counter-based hashing, no random-number
generator state): the same image gets the same null input whatever the batch, process count or resume point, and
training draws (salted with the step) never touch the global RNG. Plain tensor maths; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["FAMILIES", "pixel_hash", "hash_uniform", "null_inputs", "check_families"]

FAMILIES = ("gaussian", "uniform", "shuffle", "smooth", "constant")
_MASK = 0x7FFFFFFF
_SALTS = {name: 7919 * (i + 1) for i, name in enumerate(FAMILIES)}


def check_families(families: Sequence[str] | None, what: str) -> list[str]:
    """The family list as given, after checking every name (``None`` is the empty list)."""
    if families is None:
        return []
    if isinstance(families, str):
        raise TypeError(f"{what} must be a list of family names, got the string '{families}'; write [{families}].")
    out = list(families)
    unknown = [f for f in out if f not in FAMILIES]
    if unknown:
        raise ValueError(f"{what} has unknown null families {unknown}; known families: {list(FAMILIES)}.")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} lists a family twice: {out}; list each family once.")
    return out


def pixel_hash(x: torch.Tensor) -> torch.Tensor:
    """``[B]`` non-negative int64 hash of each image's pixels (quantised to 1/64), independent of the batch."""
    q = (x.detach().float().flatten(1) * 64).round().long()
    w = torch.arange(1, q.shape[1] + 1, device=x.device, dtype=torch.long) % 1009 + 1
    return (q * w).sum(1).abs()


def _mix(v: torch.Tensor) -> torch.Tensor:
    """A few rounds of 31-bit integer mixing (xorshift and odd multipliers kept below 2^62)."""
    for mult in (1103515245, 2654435761 & _MASK, 2246822519 & _MASK):
        v = v ^ (v >> 15)
        v = (v * mult + 12345) & _MASK
    return v


def hash_uniform(h: torch.Tensor, n: int, salt: int = 0) -> torch.Tensor:
    """``[B, n]`` floats in ``(0, 1)``, a deterministic function of the hashes ``h [B]``, the position and ``salt``."""
    pos = torch.arange(n, device=h.device, dtype=torch.long)
    v = _mix((h[:, None] & _MASK) * 31 + _mix(pos + int(salt) * 1000003 + 1)[None, :])
    v = _mix(v ^ (int(salt) & _MASK))
    return (v.double() + 0.5) / float(_MASK + 1)


def _normal(h: torch.Tensor, n: int, salt: int) -> torch.Tensor:
    """Box-Muller standard normals ``[B, n]`` from two hashed uniforms."""
    u1, u2 = hash_uniform(h, n, salt), hash_uniform(h, n, salt + 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def null_inputs(
    family: str, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, salt: int = 0, h: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``family``'s null input paired with each image of ``x [B, C, H, W]`` (same shape and dtype).

    Args:
        family: one of ``FAMILIES``.
        x: the (normalised) images the null inputs are paired with.
        mean, std: ``[C]`` per-channel mean and std of the data the target sees (in ``x``'s normalised units).
        salt: varies the draw (training uses the step); 0 for evaluation.
        h: ``[B]`` precomputed ``pixel_hash(x)``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown null family '{family}'; known families: {list(FAMILIES)}.")
    b, c, hh, ww = x.shape
    h = pixel_hash(x) if h is None else h
    s = _SALTS[family] + 104729 * int(salt)
    mu = mean.to(x.device, torch.float64).reshape(1, c, 1, 1)
    sd = std.to(x.device, torch.float64).reshape(1, c, 1, 1)
    if family == "gaussian":
        out = mu + sd * _normal(h, c * hh * ww, s).reshape(b, c, hh, ww)
    elif family == "uniform":
        u = hash_uniform(h, c * hh * ww, s).reshape(b, c, hh, ww)
        out = mu + sd * math.sqrt(3.0) * (2.0 * u - 1.0)
    elif family == "shuffle":
        perm = hash_uniform(h, hh * ww, s).argsort(dim=1)
        flat = x.flatten(2)
        return flat.gather(2, perm[:, None, :].expand(b, c, hh * ww)).reshape_as(x)
    elif family == "smooth":
        gh, gw = max(2, hh // 4), max(2, ww // 4)
        coarse = _normal(h, c * gh * gw, s).reshape(b, c, gh, gw)
        fine = F.interpolate(coarse, size=(hh, ww), mode="bilinear", align_corners=False)
        flat = fine.flatten(2)
        z = (flat - flat.mean(2, keepdim=True)) / flat.std(2, keepdim=True).clamp_min(1e-6)
        out = mu + sd * z.reshape(b, c, hh, ww)
    else:  # constant
        u = hash_uniform(h, c, s).reshape(b, c, 1, 1)
        out = (mu + sd * 2.0 * (2.0 * u - 1.0)).expand(b, c, hh, ww)
    return out.to(x.dtype).contiguous()
