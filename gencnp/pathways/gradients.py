"""Input attributions through a fixed pathway (docs/design.md section 7): pathway gradient and Grad-CAM of ``H(.; m)``.

Both run on the shared masking backend (``FrozenTarget.forward(x, masks=..., fill=...)``), are batched, and
accept pathways as per-tap masks ``[B, C_l]``, a flat ``[B, D]`` pathway, or ``None`` (the unmasked target).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from gencnp.pathways.baselines import Fill, grad_enabled, plain, split_pathway
from gencnp.targets.loading import FrozenTarget

__all__ = ["pathway_gradient", "grad_cam", "as_tap_masks"]

Masks = torch.Tensor | Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor | None] | None


def as_tap_masks(target: FrozenTarget, masks: Masks, batch: int) -> list[torch.Tensor] | None:
    """Per-tap float masks ``[B, C_l]`` from per-tap masks (a list in tap order or ``{tap: mask}``, as
    ``GenCNP.explain`` returns), a flat ``[B, D]`` pathway, or ``None``."""
    if masks is None:
        return None
    if isinstance(masks, Mapping):
        masks = target.masks_by_name(masks)
    if isinstance(masks, torch.Tensor):
        masks = split_pathway(masks, target.tap_channels)
    masks = list(masks)
    if len(masks) != len(target.tap_names):
        raise ValueError(f"got {len(masks)} masks for {len(target.tap_names)} taps ({', '.join(target.tap_names)}).")
    out = []
    for name, c, m in zip(target.tap_names, target.tap_channels, masks):
        if m is not None and tuple(m.shape) not in ((batch, c), (c,)):
            raise ValueError(f"mask of tap '{name}' has shape {list(m.shape)}; expected [{batch}, {c}] (or [{c}]).")
        out.append(None if m is None else m.float())
    return out


def pathway_gradient(
    target: FrozenTarget, x: torch.Tensor, masks: Masks, y_hat: torch.Tensor, fill: Fill = None
) -> torch.Tensor:
    """Input gradient of the pre-softmax logit ``S_y`` under the fixed pathway: ``dS_y(x; m)/dx``.

    Colour channels are reduced to the signed value of largest magnitude (grey images pass through).

    Args:
        target: the frozen classifier.
        x: ``[B, C, H, W]`` inputs.
        masks: the pathway (per-tap ``[B, C_l]``, flat ``[B, D]``, or ``None`` for the unmasked target).
        y_hat: ``[B]`` class whose logit is differentiated.
        fill: per-tap fill values (mean ablation) or ``None``.

    Returns:
        ``[B, H, W]`` signed attribution map.
    """
    x = plain(x)
    masks = as_tap_masks(target, masks, x.shape[0])
    with grad_enabled():
        x = x.requires_grad_(True)
        logits = target(x, masks=masks, fill=fill)
        (g,) = torch.autograd.grad(logits.gather(1, y_hat.long().reshape(-1, 1)).sum(), x)
    idx = g.abs().argmax(dim=1, keepdim=True)
    return g.gather(1, idx)[:, 0]


def _as_grid(a: torch.Tensor, name: str) -> torch.Tensor:
    """A tap output as a spatial map ``[B, C, h, w]``; tokens ``[B, N, C]`` become a square grid (a leading
    class token is dropped when ``N - 1`` is square)."""
    if a.dim() == 4:
        return a
    if a.dim() == 3:
        n = a.shape[1]
        for drop in (0, 1):
            side = math.isqrt(n - drop)
            if side * side == n - drop:
                return a[:, drop:].transpose(1, 2).reshape(a.shape[0], a.shape[2], side, side)
    raise ValueError(
        f"Grad-CAM needs a spatial last tap; tap '{name}' gives {list(a.shape[1:])} per sample. "
        "Tap a convolutional block or a token sequence on a square grid."
    )


def grad_cam(
    target: FrozenTarget, x: torch.Tensor, masks: Masks, y_hat: torch.Tensor, fill: Fill = None
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017) of the masked target ``H(.; m)`` at its last tap.

    ``cam = ReLU(sum_c w_c A_c)`` with ``w_c`` the spatial mean of ``dS_y/dA_c``, where ``A`` is the last tap's
    output after masking (removed channels contribute nothing), bilinearly upsampled to the input size.

    Args:
        target: the frozen classifier.
        x: ``[B, C, H, W]``.
        masks: the pathway (per-tap ``[B, C_l]``, flat ``[B, D]``, or ``None``).
        y_hat: ``[B]`` class to explain.
        fill: per-tap fill values (mean ablation) or ``None``.

    Returns:
        ``[B, H, W]`` non-negative map (not normalised).
    """
    x = plain(x)
    b = x.shape[0]
    masks = as_tap_masks(target, masks, b)
    if masks is None:
        masks = [None] * len(target.tap_names)
    last = len(target.tap_names) - 1
    # An all-ones mask requiring grad on the last tap (when it has none) puts its output in the graph.
    if masks[last] is None:
        masks[last] = torch.ones(b, target.tap_channels[last], device=x.device, dtype=x.dtype)
    with grad_enabled():
        masks[last] = masks[last].detach().clone().requires_grad_(True)
        logits, feats = target(x, masks=masks, fill=fill, record=True)
        (g,) = torch.autograd.grad(logits.gather(1, y_hat.long().reshape(-1, 1)).sum(), feats[last])
    a = _as_grid(feats[last].detach(), target.tap_names[last])
    g = _as_grid(g, target.tap_names[last])
    cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
