"""The pathway generator of GEN-CNP (Lin et al., arXiv 2309.09887): RFE, PDN, RPD and DAQ.

Module roles follow the paper; their internals are gencnp's reconstruction (docs/design.md section 5). No Lightning
import here: the generator is a plain ``nn.Module`` that maps tap features to per-tap channel masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["RFE", "PDN", "RPD", "daq", "straight_through", "PathwayGenerator"]


class _ReluMeanMax(torch.autograd.Function):
    """``cat([relu(n).mean((2, 3)), relu(n).amax((2, 3))], 1)`` with a one-pass backward.

    Autograd's own backward of this pooling allocates and walks a full ``[B, C, H, W]`` map about five times
    (mean, amax's equality mask and tie count, their sum, ReLU); here it is one map: ``g_mean / (H W)`` broadcast,
    ``g_max`` added at the arg-max, zero where the ReLU output is zero. The values equal autograd's except when two
    *positive* entries of a map tie for its maximum (autograd splits ``g_max`` among ties, here one entry gets it);
    an all-zero map's ``g_max`` is removed by the ReLU either way.
    """

    @staticmethod
    def forward(ctx, n: torch.Tensor) -> torch.Tensor:
        h = torch.relu(n)
        mx, idx = h.flatten(2).max(dim=2)
        ctx.save_for_backward((h > 0).contiguous(), idx, mx > 0)  # contiguous: the backward views it [B, C, H W]
        return torch.cat([h.mean(dim=(2, 3)), mx], dim=1)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        positive, idx, max_positive = ctx.saved_tensors
        b, c, hh, ww = positive.shape
        grad = (g[:, :c] / (hh * ww))[:, :, None, None] * positive
        grad.view(b, c, -1).scatter_add_(2, idx.unsqueeze(-1), (g[:, c:] * max_positive).unsqueeze(-1))
        return grad


class TapEmbedding(nn.Module):
    """One tap's feature map ``[B, C_l, H, W]`` (or tokens ``[B, N, C_l]``) -> embedding ``[B, d]``.

    1x1 conv, GroupNorm (never BatchNorm: an explanation must not depend on the batch), ReLU, global
    average and max pooling concatenated, linear.
    """

    def __init__(self, channels: int, d: int, groups: int = 8):
        super().__init__()
        self.proj = nn.Conv2d(channels, d, 1)
        self.norm = nn.GroupNorm(math.gcd(groups, d), d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.dim() == 3:  # tokens [B, N, C] -> [B, C, N, 1]
            f = f.transpose(1, 2).unsqueeze(-1)
        elif f.dim() == 2:
            f = f[:, :, None, None]
        n = self.norm(self.proj(f))
        if torch.is_grad_enabled() and n.requires_grad:
            return self.out(_ReluMeanMax.apply(n))
        h = torch.relu(n)
        return self.out(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


class RFE(nn.Module):
    """Recursive Feature Embedder: tap embeddings, then a GRU cell over the branch's taps in depth order.

    Returns the states ``h_l: [B, d]`` for every tap of the branch (the last one summarises the branch).
    """

    def __init__(self, channels: Sequence[int], d: int, groups: int = 8):
        super().__init__()
        self.embed = nn.ModuleList(TapEmbedding(c, d, groups) for c in channels)
        self.gru = nn.GRUCell(d, d)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        h = None
        states = []
        for emb, f in zip(self.embed, feats):
            h = self.gru(emb(f), h)
            states.append(h)
        return states


class PDN(nn.Module):
    """Pathway Distillation Network: fuses the last shallow and deep states into ``z [B, d]``; head ``g(z)``."""

    def __init__(self, d: int, num_classes: int):
        super().__init__()
        self.fuse = nn.Sequential(nn.Linear(2 * d, d), nn.LayerNorm(d), nn.ReLU(), nn.Linear(d, d))
        self.head = nn.Linear(d, num_classes)

    def forward(self, h_shallow: torch.Tensor, h_deep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.fuse(torch.cat([h_shallow, h_deep], dim=1))
        return z, self.head(z)


class RPD(nn.Module):
    """Recursive Pathway Decoder: a GRU cell from deep to shallow, ``s_l = GRU([z, h_l], s_{l+1})``.

    One linear head per tap gives scores ``a_l = sigmoid(W_l s_l + b_l)``; ``b_l`` starts at
    ``logit(init_score)`` so every channel starts kept (scores near 0.9).
    """

    def __init__(self, channels: Sequence[int], d: int, init_score: float = 0.9):
        super().__init__()
        self.gru = nn.GRUCell(2 * d, d)
        self.heads = nn.ModuleList(nn.Linear(d, c) for c in channels)
        bias = math.log(init_score / (1 - init_score))
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.constant_(head.bias, bias)

    def forward(self, z: torch.Tensor, states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        s = z
        logits: list[torch.Tensor | None] = [None] * len(states)
        for i in reversed(range(len(states))):
            s = self.gru(torch.cat([z, states[i]], dim=1), s)
            logits[i] = self.heads[i](s)
        return logits


def daq(a: torch.Tensor, sigma: float = 2.0, t0: float = 2.0) -> torch.Tensor:
    """Distance-Aware Quantization to {0, 1} (Kim, Lee, Ham, ICCV 2021), exactly binary forward.

    For ``q in {0, 1}``: ``d_q = exp(-|a-q|)``, ``k_q = exp(-(q-q*)^2/sigma^2)`` with ``q*`` the nearest level,
    ``s_q = d_q k_q``, ``beta = t0/|s_0-s_1|`` (detached), ``pi = softmax(beta s)``, ``soft = sum_q q~_q pi_q`` with
    ``q~_0 = -1/(e^t0-1)`` and ``q~_1 = 1+1/(e^t0-1)``. ``soft`` equals hard rounding in exact arithmetic but
    not in float32, so the output is ``hard + (soft - soft.detach())``: the forward is ``(a > 0.5)`` exactly
    and the gradient is the soft-argmax one. Computed in float32 whatever the autocast dtype.

    Args:
        a: scores in ``(0, 1)``, any shape.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        a32 = a.float()
        hard = (a32 > 0.5).to(a32.dtype)
        d0, d1 = torch.exp(-a32.abs()), torch.exp(-(a32 - 1).abs())
        far = math.exp(-1.0 / sigma**2)
        s0 = d0 * torch.where(hard > 0, far, 1.0)
        s1 = d1 * torch.where(hard > 0, 1.0, far)
        beta = (t0 / (s0 - s1).abs().clamp_min(1e-12)).detach()
        pi1 = torch.sigmoid(beta * (s1 - s0))  # softmax over two levels
        off = 1.0 / math.expm1(t0)
        soft = (1 + off) * pi1 - off * (1 - pi1)
        return hard + (soft - soft.detach())


def straight_through(a: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: forward ``(a > 0.5)``, identity gradient (the DAQ ablation)."""
    a32 = a.float()
    return (a32 > 0.5).to(a32.dtype) + (a32 - a32.detach())


BINARIZERS = {"daq": daq, "ste": straight_through}


class PathwayGenerator(nn.Module):
    """Features of the frozen target's taps -> per-tap channel scores, binary masks and a class code.

    Args:
        channels: ``C_l`` per tap, in depth order.
        n_shallow: how many of the first taps form the shallow branch (the rest are deep).
        num_classes: ``K`` of the target (for the PDN class head).
        d: embedding width.
        binarizer: ``'daq'`` (default) or ``'ste'``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        n_shallow: int,
        num_classes: int,
        d: int = 64,
        groups: int = 8,
        init_score: float = 0.9,
        binarizer: str = "daq",
        daq_sigma: float = 2.0,
        daq_t0: float = 2.0,
    ):
        super().__init__()
        if binarizer not in BINARIZERS:
            raise ValueError(f"binarizer must be one of {sorted(BINARIZERS)}, got '{binarizer}'.")
        if not 1 <= n_shallow < len(channels):
            raise ValueError(f"n_shallow must be between 1 and {len(channels) - 1}, got {n_shallow}.")
        self.channels = list(channels)
        self.n_shallow = n_shallow
        self.binarizer = binarizer
        self.daq_sigma, self.daq_t0 = daq_sigma, daq_t0
        self.rfe_shallow = RFE(self.channels[:n_shallow], d, groups)
        self.rfe_deep = RFE(self.channels[n_shallow:], d, groups)
        self.pdn = PDN(d, num_classes)
        self.rpd = RPD(self.channels, d, init_score)

    def binarize(self, scores: torch.Tensor) -> torch.Tensor:
        if self.binarizer == "daq":
            return daq(scores, self.daq_sigma, self.daq_t0)
        return straight_through(scores)

    def forward(self, feats: Sequence[torch.Tensor], prior: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Returns ``scores [B, D]`` in (0, 1), ``masks [B, D]`` in {0, 1} (float, with gradient),
        ``class_logits [B, K]`` and ``z [B, d]``; per-tap views via ``split``.

        Args:
            feats: per-tap features of the frozen target.
            prior: optional ``[B, D]`` added to the score logits before the sigmoid (no gradient), e.g. a class prior.
        """
        feats = [f.detach() for f in feats]
        hs = self.rfe_shallow(feats[: self.n_shallow])
        hd = self.rfe_deep(feats[self.n_shallow :])
        z, class_logits = self.pdn(hs[-1], hd[-1])
        logits = torch.cat(self.rpd(z, hs + hd), dim=1)
        if prior is not None:
            logits = logits + prior.detach().to(logits.dtype)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            scores = torch.sigmoid(logits.float())
        return {"scores": scores, "masks": self.binarize(scores), "class_logits": class_logits, "z": z}

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``[B, D]`` -> per-tap ``[B, C_l]`` views."""
        return list(torch.split(flat, self.channels, dim=-1))
