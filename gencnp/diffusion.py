"""Pixel diffusion pathways (Lyu, Pang, Wang, "Understanding the Role of Pathways in a Deep Neural Network",
Neural Networks 2024, arXiv 2402.18132; docs/design.md section 9). Plain PyTorch: no Lightning at import time.

Method (every step is a [decision] of gencnp; the paper's own algorithm uses rotated diffusion kernels on VGG-16):

1. **Frozen linearisation.** At a clean input ``x`` the ReLU on/off pattern and the max-pool switches are
   recorded. With them frozen the network is affine in its input; its *linear part* ``L_x`` is the network with
   every bias removed, BatchNorm reduced to its per-channel scale ``gamma / sqrt(var + eps)``, ReLU replaced by
   multiplication with the recorded on/off mask, max-pooling by a gather at the recorded switches, average
   pooling and linear layers kept without bias. ``L_x(e)`` is the Jacobian of the network at ``x`` applied to
   ``e`` (exactly, wherever no pre-activation sits at 0 and no max-pool ties).
2. **Impulses.** The impulse of pixel ``(h, w)`` is 1 (in normalised input units) at that position in every input
   channel and 0 elsewhere; for grey images it is the unit impulse. Its response at tap ``l`` is
   ``R_l = L_x^{(l)}(e) [C_l, H_l, W_l]`` and its **mass** per channel is ``M_l[c] = sum_{h,w} |R_l[c, h, w]|``.
3. **Transfer between taps.** ``T_l[i, j] = sum_{h,w} |S_l(R_l * 1_i)[j, h, w]|``: the mass that channel ``j`` of
   tap ``l+1`` receives from channel ``i`` of tap ``l`` alone, where ``S_l`` is the linear segment between the
   taps and ``1_i`` keeps channel ``i`` only. Exact and batched: the restriction is fused into the segment's
   first convolution (one ``[C_out, k*k] x [k*k, positions]`` product per kept channel). By linearity the signed
   parts add up exactly, ``sum_i S_l(R_l * 1_i) = R_{l+1}``; the masses obey ``sum_i T_l[i, j] >= M_{l+1}[j]``.
4. **Chain score (Markov routing).** A pathway is a chain ``(c_1, ..., c_L)`` of one channel per tap. Its score
   is the fraction of the pixel's impulse mass routed along it when every channel passes its mass on in
   proportion to what it transfers to each next channel::

       score = M_1[c_1] / sum_c M_1[c]  *  prod_l T_l[c_l, c_{l+1}] / sum_j T_l[c_l, j]

   Scores of all chains of a pixel sum to 1, so they compare across pixels, images and inputs.
5. **Beam search over taps.** The beam keeps the ``beam_width`` best prefixes; transfers are computed only out of
   the beam's channels (this is what makes 1,000 images x 32 pixels cheap). The ``top_k`` best complete chains are
   a pixel's *large pathways*. Beam search is exact when ``beam_width`` is at least the number of prefixes
   (``prod`` of the channel counts up to the second-to-last tap); ``exact_pathways`` enumerates every chain for
   checks.
6. **Windows.** A pixel's response is spatially local (a few positions per map). Every step works on a window
   holding the response's support (zero outside by construction), placed per impulse; windows grow with each
   convolution or pool and never leave the map. Results equal full-map propagation (``window=False``) exactly.

Supported targets are plain chains of ``Conv2d`` (zero padding), ``BatchNorm2d`` (eval), ``ReLU``, ``MaxPool2d``,
``AdaptiveAvgPool2d``, ``Flatten``, ``Linear``, ``Dropout`` (eval) and ``Identity`` modules, each run once, with
nothing but flattening between them (``ConvBlockNet``, i.e. ``fmnist_cnn``, ``small_cnn`` and ``tiny_cnn``).
Anything else is refused with the module's name and type.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gencnp.fileio import save_figure, write_atomic

__all__ = [
    "PixelDiffusion", "FrozenPattern", "Window", "UnsupportedModuleError", "SUPPORTED_MODULES", "select_pixels",
    "crossing_counts", "channel_importance", "overlap_test", "class_similarity", "perturb", "hypergeom_sf",
    "exact_pathways", "diffusion",
]  # fmt: skip

SUPPORTED_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear,
                     nn.Dropout, nn.Identity)  # fmt: skip
_SPATIAL = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Identity)


class UnsupportedModuleError(TypeError):
    """The target holds a module the frozen linearisation does not know."""


# ----------------------------------------------------------------------------------------------------------------
# Tracing the target into a chain of steps
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One module of the chain, with the spatial sizes it saw on the probe input."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]  # per-sample input shape
    out_shape: tuple[int, ...]  # per-sample output shape
    tap: int | None = None  # index of the tap whose output this step produces


@dataclass
class FrozenPattern:
    """The frozen ReLU on/off masks and max-pool switches of a batch of clean inputs.

    Attributes:
        x: the clean inputs ``[B, C, H, W]``.
        masks: per step index, ``bool [B, C, H, W]`` (ReLU steps) or ``long [B, C, Ho, Wo]`` switches into the
            flattened ``H * W`` input (max-pool steps).
        logits: ``[B, K]`` logits of the clean inputs.
        taps: tap outputs ``[B, C_l, H_l, W_l]`` of the clean inputs.
    """

    x: torch.Tensor
    masks: dict[int, torch.Tensor]
    logits: torch.Tensor
    taps: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Window:
    """Impulse responses on per-row windows of a ``[H, W]`` map (zero outside the window).

    Attributes:
        data: ``[N, G, C, h, w]``: N rows (impulses), G copies per row (channel-restricted copies, 1 if none).
        top, left: ``long [N]`` position of each row's window in the map.
        size: ``(H, W)`` of the full map.
    """

    data: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    size: tuple[int, int]

    def full(self) -> torch.Tensor:
        """The responses on the full map, ``[N, G, C, H, W]``."""
        n, g, c, h, w = self.data.shape
        big_h, big_w = self.size
        out = self.data.new_zeros(n, g, c, big_h, big_w)
        rows = self.top[:, None] + torch.arange(h, device=self.data.device)
        cols = self.left[:, None] + torch.arange(w, device=self.data.device)
        idx = (rows[:, :, None] * big_w + cols[:, None, :]).reshape(n, 1, 1, h * w).expand(n, g, c, h * w)
        out.view(n, g, c, big_h * big_w).scatter_(3, idx, self.data.reshape(n, g, c, h * w))
        return out

    def mass(self) -> torch.Tensor:
        """``sum |.|`` over space: ``[N, G, C]``."""
        return self.data.abs().sum(dim=(3, 4))


def _spatial_range(
    lo: torch.Tensor, hi: torch.Tensor, k: int, s: int, p: int, d: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output positions ``[o_lo, o_hi]`` whose ``k``-tap window (stride s, padding p, dilation d) meets input ``[lo, hi]``."""
    o_lo = -((-(lo + p - d * (k - 1))) // s)  # ceil division
    o_hi = (hi + p) // s
    return o_lo, o_hi


def _gather_region(
    data: torch.Tensor, start_h: torch.Tensor, start_w: torch.Tensor, len_h: int, len_w: int
) -> torch.Tensor:
    """Per-row crop ``data[n, ..., start_h[n] : +len_h, start_w[n] : +len_w]``, zero where it leaves ``data``.

    Args:
        data: ``[N, G, C, h, w]``.
        start_h, start_w: ``long [N]`` crop origins relative to the window (may be negative).

    Returns:
        ``[N, G, C, len_h, len_w]``.
    """
    n, g, c, h, w = data.shape
    if len_h == h and len_w == w and not bool(start_h.any() or start_w.any()):
        return data
    # Zero-pad so that every crop lies inside, then index a strided view of all crops (no index arithmetic).
    pt, pl = max(0, -int(start_h.min())), max(0, -int(start_w.min()))
    pb, pr = max(0, int(start_h.max()) + len_h - h), max(0, int(start_w.max()) + len_w - w)
    padded = F.pad(data, (pl, pr, pt, pb)) if pt or pl or pb or pr else data
    view = padded.unfold(3, len_h, 1).unfold(4, len_w, 1)  # [N, G, C, nh, nw, len_h, len_w]
    return view[torch.arange(n, device=data.device), :, :, start_h + pt, start_w + pl]


def _gather_state(
    state: torch.Tensor, img: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """Per-row window of a per-image map: ``state[img[n], :, top[n] : +h, left[n] : +w]`` -> ``[N, C, h, w]``."""
    big_h, big_w = state.shape[-2:]
    if h == big_h and w == big_w:
        return state[img]
    return state.unfold(2, h, 1).unfold(3, w, 1)[img, :, top, left]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PixelDiffusion:
    """A chain-structured CNN traced once, linearised per input, and run on pixel impulses.

    Args:
        model: the classifier (eval mode), a plain chain of ``SUPPORTED_MODULES``.
        tap_names: dotted module paths whose outputs are the taps, in depth order (block outputs).
        input_shape: ``(C, H, W)``.
        window: propagate on support windows (fast) instead of full maps; both give identical numbers.

    Raises:
        UnsupportedModuleError: a module of another type runs in the forward.
        ValueError: the forward is not a plain chain, a module runs twice, BatchNorm is in training mode, or a tap
            is not the output of one of the chain's modules.
    """

    def __init__(self, model: nn.Module, tap_names: Sequence[str], input_shape: Sequence[int], window: bool = True):
        self.model = model
        self.tap_names = list(tap_names)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.window = window
        self.steps = self._trace()
        self.tap_steps = [i for i, s in enumerate(self.steps) if s.tap is not None]
        self.tap_channels = [self.steps[i].out_shape[0] for i in self.tap_steps]
        self.offsets = [0, *np.cumsum(self.tap_channels).tolist()]
        # Fusions (same numbers, fewer passes over the big channel-restricted copies): a BatchNorm right after a
        # convolution is folded into its weight; a ReLU right before a max-pool is applied at the pool's switches.
        self._weights: dict[int, torch.Tensor] = {}
        self._skip: set[int] = set()
        self._relu_pool: set[int] = set()
        for i, st in enumerate(self.steps[: self.tap_steps[-1] + 1]):
            nxt = self.steps[i + 1] if i + 1 <= self.tap_steps[-1] else None
            if isinstance(st.module, nn.Conv2d):
                w = st.module.weight.detach()
                if st.tap is None and nxt is not None and isinstance(nxt.module, nn.BatchNorm2d):
                    w = w * _bn_scale(nxt.module).to(w.dtype)[:, None, None, None]
                    self._skip.add(i + 1)
                self._weights[i] = w
            if (
                isinstance(st.module, nn.ReLU)
                and st.tap is None
                and nxt is not None
                and isinstance(nxt.module, nn.MaxPool2d)
            ):
                self._skip.add(i)
                self._relu_pool.add(i + 1)

    # ----- tracing -----
    def _trace(self) -> list[Step]:
        model = self.model
        modules = dict(model.named_modules())
        missing = [t for t in self.tap_names if t not in modules]
        if missing:
            raise KeyError(f"taps {missing} not found in {type(model).__name__}; name block outputs, e.g. 'blocks.0'.")
        leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
        if isinstance(model, SUPPORTED_MODULES) and not list(model.children()):
            leaves = [("", model)]
        for n, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d) and m.training:
                raise ValueError(
                    f"BatchNorm '{n}' is in training mode; call model.eval() (or wrap it in FrozenTarget) first."
                )
        records: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
        tap_out: dict[str, torch.Tensor] = {}
        handles = []
        for name, mod in leaves:
            handles.append(mod.register_forward_hook(lambda m, a, o, name=name: records.append((name, m, a[0], o))))
        for t in self.tap_names:
            handles.append(modules[t].register_forward_hook(lambda m, a, o, t=t: tap_out.__setitem__(t, o)))
        p = next(iter(model.parameters()), None)
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(2, *self.input_shape, generator=g).to(
            device=p.device if p is not None else "cpu", dtype=p.dtype if p is not None else torch.float32
        )
        try:
            with torch.no_grad():
                y0 = model(x0)
        finally:
            for h in handles:
                h.remove()
        seen: dict[str, int] = {}
        for name, mod, _, _ in records:
            if not isinstance(mod, SUPPORTED_MODULES):
                raise UnsupportedModuleError(
                    f"pixel diffusion cannot linearise module '{name}' of type {type(mod).__name__}; supported: "
                    f"{', '.join(t.__name__ for t in SUPPORTED_MODULES)} in a plain chain. Use a ConvBlockNet-style "
                    "target (fmnist_cnn, small_cnn, tiny_cnn) or register a target built from these modules."
                )
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                raise ValueError(
                    f"module '{name}' runs {seen[name]} times in one forward; pixel diffusion needs each module once."
                )
        if not records:
            raise ValueError(f"{type(model).__name__} ran no leaf module; nothing to linearise.")
        steps: list[Step] = []
        prev: torch.Tensor = x0
        prev_name = "<input>"
        for name, mod, inp, out in records:
            same = inp is prev or (inp.shape == prev.shape and inp.data_ptr() == prev.data_ptr())
            flat = (isinstance(mod, (nn.Linear, nn.Flatten)) and inp.dim() == 2 and inp.shape[1] == prev[0].numel()
                    and torch.equal(inp, prev.flatten(1)))  # fmt: skip
            if not (same or flat):
                raise ValueError(
                    f"module '{name}' does not receive the output of '{prev_name}' (the forward has a skip connection "
                    "or a functional op between them); pixel diffusion supports plain chains of modules only."
                )
            steps.append(Step(name, mod, tuple(inp.shape[1:]), tuple(out.shape[1:])))
            prev, prev_name = out, name
        if not (y0 is prev or (y0.shape == prev.shape and torch.equal(y0, prev))):
            raise ValueError(f"the model's output is not the output of its last module '{prev_name}' (a functional op "
                             "follows it); pixel diffusion supports plain chains of modules only.")  # fmt: skip
        for ti, t in enumerate(self.tap_names):
            hit = [i for i, (_, _, _, o) in enumerate(records) if o is tap_out.get(t)]
            if not hit:
                raise ValueError(f"tap '{t}' is not the output of a module of the chain; tap block outputs.")
            steps[hit[-1]].tap = ti
        order = [s.tap for s in steps if s.tap is not None]
        if order != sorted(order) or len(order) != len(self.tap_names):
            raise ValueError(
                f"taps {self.tap_names} are not in depth order (or two taps share an output); list them shallow to deep."
            )
        last_tap = max(i for i, s in enumerate(steps) if s.tap is not None)
        for s in steps[: last_tap + 1]:
            if not isinstance(s.module, _SPATIAL):
                raise ValueError(f"module '{s.name}' ({type(s.module).__name__}) comes before the last tap; taps must be "
                                 "feature maps ahead of pooling and the head.")  # fmt: skip
            if isinstance(s.module, nn.Conv2d) and s.module.padding_mode != "zeros":
                raise UnsupportedModuleError(
                    f"Conv2d '{s.name}' uses padding_mode='{s.module.padding_mode}'; only zero padding is supported."
                )
            if isinstance(s.module, nn.BatchNorm2d) and s.module.running_var is None:
                raise ValueError(
                    f"BatchNorm '{s.name}' has no running statistics (track_running_stats=False); it is not affine per input."
                )
        return steps

    # ----- the clean (nonlinear) forward that records the pattern -----
    @torch.no_grad()
    def freeze(self, x: torch.Tensor) -> FrozenPattern:
        """Run the chain on clean inputs ``x [B, C, H, W]`` and record ReLU masks and max-pool switches."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected inputs [B, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}.")
        masks: dict[int, torch.Tensor] = {}
        taps = []
        h = x
        with torch.no_grad():
            for i, s in enumerate(self.steps):
                m = s.module
                if isinstance(m, nn.ReLU):
                    h = F.relu(h)
                    if i not in self._skip:
                        masks[i] = h > 0
                elif isinstance(m, nn.MaxPool2d):
                    h, idx = F.max_pool2d(
                        h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
                    )
                    # After a fused ReLU, a window whose maximum is 0 had its ReLU off at the switch: mark it -1.
                    masks[i] = idx.masked_fill(h <= 0, -1) if i in self._relu_pool else idx
                elif isinstance(m, nn.Linear):
                    h = m(h.flatten(1))
                else:
                    h = m(h)
                if s.tap is not None:
                    taps.append(h)
        return FrozenPattern(x=x, masks=masks, logits=h, taps=taps)

    @torch.no_grad()
    def forward_from_tap(self, tap: int, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` from tap ``tap``'s output ``[B, C_l, H_l, W_l]`` (the nonlinear suffix of the chain)."""
        h = features
        for s in self.steps[self.tap_steps[tap] + 1 :]:
            h = s.module(h.flatten(1)) if isinstance(s.module, nn.Linear) else s.module(h)
        return h

    # ----- the frozen linear part, on windows -----
    def impulses(self, pos: torch.Tensor) -> Window:
        """Unit impulses at pixels ``pos [N, 2]`` (row, col) in every input channel, as 1x1 windows."""
        c, big_h, big_w = self.input_shape
        p = next(iter(self.model.parameters()))
        pos = pos.to(device=p.device, dtype=torch.long)
        if pos.numel() and (
            pos[:, 0].min() < 0 or pos[:, 0].max() >= big_h or pos[:, 1].min() < 0 or pos[:, 1].max() >= big_w
        ):
            raise ValueError(f"pixel positions must lie in [0, {big_h}) x [0, {big_w}).")
        n = pos.shape[0]
        if self.window:
            return Window(
                torch.ones(n, 1, c, 1, 1, dtype=p.dtype, device=p.device),
                pos[:, 0].clone(),
                pos[:, 1].clone(),
                (big_h, big_w),
            )
        data = torch.zeros(n, 1, c, big_h, big_w, dtype=p.dtype, device=p.device)
        data[torch.arange(n), 0, :, pos[:, 0], pos[:, 1]] = 1.0
        zero = torch.zeros(n, dtype=torch.long, device=p.device)
        return Window(data, zero, zero.clone(), (big_h, big_w))

    def _apply(self, i: int, win: Window, pattern: FrozenPattern, img: torch.Tensor, channels: torch.Tensor | None = None,
               owned: bool = False) -> Window:  # fmt: skip
        """Linear part of step ``i`` on a window. ``channels [N, G]`` restricts a G=1 input to one channel per copy.

        ``owned``: ``win.data`` was made inside the current segment, so elementwise steps may overwrite it (the big
        channel-restricted copies are then never reallocated).
        """
        s = self.steps[i]
        m = s.module
        if i in self._skip:
            return win
        data = win.data
        n, g, c, h, w = data.shape
        if channels is not None and not (isinstance(m, nn.Conv2d) and m.groups == 1):
            # Generic restriction: copy G of row n keeps input channel channels[n, G] only.
            onehot = F.one_hot(channels, c).to(data.dtype)  # [N, G, C]
            data = data[:, :1] * onehot[:, :, :, None, None]
            win = Window(data, win.top, win.left, win.size)
            n, g = data.shape[:2]
            channels = None
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k_h, k_w = _pair(m.kernel_size)
            s_h, s_w = _pair(m.stride)
            p_h, p_w = _pair(m.padding)
            d_h, d_w = _pair(m.dilation)
            out_h, out_w = s.out_shape[-2:]
            lo_h, hi_h = _spatial_range(win.top, win.top + h - 1, k_h, s_h, p_h, d_h)
            lo_w, hi_w = _spatial_range(win.left, win.left + w - 1, k_w, s_w, p_w, d_w)
            sz_h = min(int((hi_h - lo_h).max()) + 1, out_h)
            sz_w = min(int((hi_w - lo_w).max()) + 1, out_w)
            top = lo_h.clamp(min=0).clamp(max=out_h - sz_h)
            left = lo_w.clamp(min=0).clamp(max=out_w - sz_w)
            if isinstance(m, nn.Conv2d):
                len_h, len_w = (sz_h - 1) * s_h + d_h * (k_h - 1) + 1, (sz_w - 1) * s_w + d_w * (k_w - 1) + 1
                if channels is not None:
                    # Fused restriction + convolution: one [C_out, k*k] x [k*k, positions] product per copy.
                    gg = channels.shape[1]
                    sel = data[:, 0].gather(1, channels[:, :, None, None].expand(n, gg, h, w))[:, :, None]
                    region = _gather_region(sel, top * s_h - p_h - win.top, left * s_w - p_w - win.left, len_h, len_w)
                    # Patches by strided slices (F.unfold loops over the batch on CPU and is far slower here).
                    r2 = region.reshape(n * gg, len_h, len_w)
                    cols = torch.stack([r2[:, a * d_h : a * d_h + (sz_h - 1) * s_h + 1 : s_h, b * d_w : b * d_w + (sz_w - 1) * s_w + 1 : s_w]
                                        for a in range(k_h) for b in range(k_w)], 1).reshape(n * gg, k_h * k_w, sz_h * sz_w)  # fmt: skip
                    wt = self._weights[i].permute(1, 0, 2, 3).reshape(m.in_channels, m.out_channels, k_h * k_w)
                    out = torch.bmm(wt[channels.reshape(-1)], cols).reshape(n, gg, m.out_channels, sz_h, sz_w)
                else:
                    region = _gather_region(data, top * s_h - p_h - win.top, left * s_w - p_w - win.left, len_h, len_w)
                    out = F.conv2d(
                        region.reshape(n * g, c, len_h, len_w),
                        self._weights[i],
                        None,
                        (s_h, s_w),
                        0,
                        (d_h, d_w),
                        m.groups,
                    )
                    out = out.reshape(n, g, -1, sz_h, sz_w)
                return Window(out, top, left, (out_h, out_w))
            sw = _gather_state(pattern.masks[i], img, top, left, sz_h, sz_w)  # [N, C, sz_h, sz_w] switches
            big_w = win.size[1]
            rh = sw.clamp(min=0) // big_w - win.top[:, None, None, None]
            rw = sw.clamp(min=0) % big_w - win.left[:, None, None, None]
            valid = (rh >= 0) & (rh < h) & (rw >= 0) & (rw < w) & (sw >= 0)
            rel = (
                (rh.clamp(0, h - 1) * w + rw.clamp(0, w - 1)).reshape(n, 1, c, sz_h * sz_w).expand(n, g, c, sz_h * sz_w)
            )
            out = data.reshape(n, g, c, h * w).gather(3, rel).reshape(n, g, c, sz_h, sz_w)
            return Window(out.mul_(valid[:, None]), top, left, (out_h, out_w))
        if isinstance(m, nn.BatchNorm2d):
            scale = _bn_scale(m).to(data.dtype)[None, None, :, None, None]
            return Window(data.mul_(scale) if owned else data * scale, win.top, win.left, win.size)
        if isinstance(m, nn.ReLU):
            mask = _gather_state(pattern.masks[i], img, win.top, win.left, h, w)[:, None]
            return Window(data.mul_(mask) if owned else data * mask, win.top, win.left, win.size)
        if isinstance(m, (nn.Dropout, nn.Identity)):
            return win
        raise ValueError(f"step '{s.name}' ({type(m).__name__}) cannot run on a window.")  # pragma: no cover

    def _head(self, full: torch.Tensor) -> torch.Tensor:
        """Linear part of the steps after the last tap on full maps ``[N, G, C, H, W]`` -> ``[N, G, K]``."""
        n, g = full.shape[:2]
        h = full.reshape(n * g, *full.shape[2:])
        for s in self.steps[self.tap_steps[-1] + 1 :]:
            m = s.module
            if isinstance(m, nn.Linear):
                h = F.linear(h.flatten(1), m.weight)
            elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)):
                h = m(h)
            elif isinstance(m, nn.Conv2d):
                h = F.conv2d(h, m.weight, None, m.stride, m.padding, m.dilation, m.groups)
            else:
                raise UnsupportedModuleError(f"module '{s.name}' ({type(m).__name__}) after the last tap needs a frozen "
                                             "pattern; only pooling, Flatten, Linear and Conv2d may follow the last tap.")  # fmt: skip
        return h.reshape(n, g, -1)

    def segment(self, tap: int | None, win: Window, pattern: FrozenPattern, img: torch.Tensor,
                channels: torch.Tensor | None = None) -> Window:  # fmt: skip
        """Run the linear part from tap ``tap``'s output (``None``: the input) to tap ``tap + 1``'s output.

        Args:
            win: responses at tap ``tap`` (``[N, 1, C_l, h, w]`` when ``channels`` is given).
            img: ``long [N]`` row -> image index into ``pattern``.
            channels: ``long [N, G]``: copy g of row n keeps only channel ``channels[n, g]`` of tap ``tap``.
        """
        start = 0 if tap is None else self.tap_steps[tap] + 1
        stop = self.tap_steps[0 if tap is None else tap + 1]
        owned = False
        for i in range(start, stop + 1):
            before = win.data
            win = self._apply(i, win, pattern, img, channels if i == start else None, owned)
            owned = owned or win.data is not before
        if channels is not None and start > stop:  # pragma: no cover - taps share a module
            raise ValueError("consecutive taps need at least one module between them.")
        return win

    @torch.no_grad()
    def responses(
        self, pattern: FrozenPattern, img: torch.Tensor, pos: torch.Tensor, logits: bool = False
    ) -> list[Window]:
        """Impulse responses at every tap for impulses at ``pos [N, 2]`` of images ``img [N]``.

        Returns:
            one ``Window`` per tap (``data [N, 1, C_l, h, w]``), plus the logit responses ``[N, K]`` (as a tensor,
            appended) when ``logits`` is set: the Jacobian column of the logits.
        """
        img = img.to(pattern.x.device)
        out = []
        win = self.impulses(pos)
        for t in range(len(self.tap_steps)):
            win = self.segment(None if t == 0 else t - 1, win, pattern, img)
            out.append(win)
        if logits:
            out.append(self._head(win.full())[:, 0])
        return out

    @torch.no_grad()
    def transfer(
        self, tap: int, win: Window, pattern: FrozenPattern, img: torch.Tensor, channels: torch.Tensor
    ) -> torch.Tensor:
        """Transferred masses ``T [N, G, C_{tap+1}]`` from channels ``channels [N, G]`` of tap ``tap``.

        ``T[n, g, j] = sum_space |S(R_n * 1_{channels[n, g]})[j]|`` (module docstring, step 3).
        """
        out = self.segment(tap, win, pattern, img, channels).data
        return out.abs_().sum(dim=(3, 4))  # the copies are fresh: overwrite them

    @torch.no_grad()
    def pathways(self, pattern: FrozenPattern, img: torch.Tensor, pos: torch.Tensor, top_k: int = 5,
                 beam_width: int = 16) -> dict[str, Any]:  # fmt: skip
        """Each impulse's ``top_k`` channel chains across taps by beam search (module docstring, steps 4-5).

        Args:
            pattern: frozen pattern of the images.
            img: ``long [N]`` image index (into ``pattern``) of each impulse.
            pos: ``long [N, 2]`` pixel (row, col) of each impulse.

        Returns:
            ``chains long [N, top_k, L]`` (channel per tap), ``log_scores [N, top_k]`` (natural log, ``-inf`` where a
            pixel has fewer than ``top_k`` chains with mass), ``valid bool [N, top_k]``, ``masses`` (list of
            ``[N, C_l]``) and ``links [N, top_k, L]`` (``M_1[c_1]`` then the transferred masses along each chain).
        """
        if top_k < 1 or beam_width < top_k:
            raise ValueError(f"need 1 <= top_k <= beam_width, got top_k={top_k}, beam_width={beam_width}.")
        img = img.to(pattern.x.device)
        n = img.shape[0]
        win = self.segment(None, self.impulses(pos), pattern, img)
        m0 = win.mass()[:, 0]
        masses = [m0]
        logp = _log_ratio(m0, m0.sum(1, keepdim=True))
        w0 = min(beam_width, m0.shape[1])
        score, ch = logp.topk(w0, dim=1)
        hist = ch[:, :, None]
        links = m0.gather(1, ch)[:, :, None]
        for t in range(len(self.tap_steps) - 1):
            tr = self.transfer(t, win, pattern, img, ch)  # [N, W, C_next]
            win = self.segment(t, win, pattern, img)
            masses.append(win.mass()[:, 0])
            c_next = tr.shape[2]
            cand = score[:, :, None] + _log_ratio(tr, tr.sum(2, keepdim=True))
            k = min(beam_width, cand.shape[1] * c_next)
            score, flat = cand.reshape(n, -1).topk(k, dim=1)
            parent, nxt = flat // c_next, flat % c_next
            hist = torch.cat([hist.gather(1, parent[:, :, None].expand(-1, -1, hist.shape[2])), nxt[:, :, None]], 2)
            links = torch.cat([links.gather(1, parent[:, :, None].expand(-1, -1, links.shape[2])),
                               tr.reshape(n, -1).gather(1, flat)[:, :, None]], 2)  # fmt: skip
            ch = nxt
        k = min(top_k, score.shape[1])
        valid = torch.isfinite(score[:, :k])
        return {
            "chains": hist[:, :k],
            "log_scores": score[:, :k],
            "valid": valid,
            "masses": masses,
            "links": links[:, :k],
        }


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """BatchNorm's linear part in eval mode: ``gamma / sqrt(running_var + eps)`` per channel ``[C]``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale * bn.weight.detach() if bn.weight is not None else scale


def _log_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(a / b)`` with ``-inf`` where ``a`` or ``b`` is 0 (no mass, no route)."""
    ok = (a > 0) & (b > 0)
    return torch.where(
        ok, torch.log(a.clamp_min(1e-300)) - torch.log(b.clamp_min(1e-300)), torch.full_like(a, -math.inf)
    )


@torch.no_grad()
def exact_pathways(engine: PixelDiffusion, pattern: FrozenPattern, img: torch.Tensor, pos: torch.Tensor,
                   top_k: int = 5) -> dict[str, torch.Tensor]:  # fmt: skip
    """Exhaustive reference for ``PixelDiffusion.pathways``: every chain scored, top ``top_k`` kept.

    Costs ``prod(C_l)`` scores per impulse: for tests and small targets only.
    """
    img = img.to(pattern.x.device)
    n = img.shape[0]
    win = engine.segment(None, engine.impulses(pos), pattern, img)
    m0 = win.mass()[:, 0]
    total = _log_ratio(m0, m0.sum(1, keepdim=True))  # [N, C_1]
    for t in range(len(engine.tap_steps) - 1):
        c = win.data.shape[2]
        tr = engine.transfer(t, win, pattern, img, torch.arange(c, device=m0.device).expand(n, c))
        step = _log_ratio(tr, tr.sum(2, keepdim=True))  # [N, C_t, C_t+1]
        total = total.reshape(n, -1, c, 1) + step.reshape(n, 1, c, -1)
        win = engine.segment(t, win, pattern, img)
    flat = total.reshape(n, -1)
    score, idx = flat.topk(min(top_k, flat.shape[1]), dim=1)
    chains = torch.stack(torch.unravel_index(idx, tuple(engine.tap_channels)), dim=-1)
    return {"chains": chains, "log_scores": score, "valid": torch.isfinite(score)}


# ----------------------------------------------------------------------------------------------------------------
# Pixels, crossings, causal importance, statistics
# ----------------------------------------------------------------------------------------------------------------


def select_pixels(forward, x: torch.Tensor, y_hat: torch.Tensor, n_pixels: int, rule: str = "saliency",
                  seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Pixels to analyse per image: ``long [B, n_pixels, 2]`` (row, col).

    Args:
        forward: ``x -> logits`` (the target).
        x: ``[B, C, H, W]`` images; y_hat: ``[B]`` classes whose logit is explained.
        rule: ``'saliency'``: the ``n_pixels`` largest ``sum_c |d S_y / d x[c, h, w]|`` (input-gradient magnitude of
            the pre-softmax logit, i.e. the magnitude of each pixel's impulse response at the logit); ``'random'``:
            one seeded uniform sample of positions shared by every image.
    """
    b, _, big_h, big_w = x.shape
    if not 1 <= n_pixels <= big_h * big_w:
        raise ValueError(f"pixels must be between 1 and {big_h * big_w} (H * W), got {n_pixels}.")
    if rule == "random":
        g = torch.Generator().manual_seed(seed)
        flat = torch.randperm(big_h * big_w, generator=g)[:n_pixels].sort().values.to(x.device).expand(b, n_pixels)
    elif rule == "saliency":
        with torch.enable_grad():
            xx = x.detach().clone().requires_grad_(True)
            forward(xx).gather(1, y_hat[:, None]).sum().backward()
        sal = xx.grad.abs().sum(1).reshape(b, -1)
        flat = sal.topk(n_pixels, dim=1).indices
    else:
        raise ValueError(f"pixel_rule must be 'saliency' or 'random', got '{rule}'.")
    return torch.stack([flat // big_w, flat % big_w], dim=-1)


def crossing_counts(chains: torch.Tensor, valid: torch.Tensor, img: torch.Tensor, n_images: int,
                    tap_channels: Sequence[int]) -> torch.Tensor:  # fmt: skip
    """How many large pathways cross each channel of each tap, per image.

    Args:
        chains: ``long [N, K, L]`` channel per tap of each impulse's top-K chains; valid: ``bool [N, K]``.
        img: ``long [N]`` image of each impulse (``0 .. n_images-1``).

    Returns:
        ``long [n_images, D]`` counts in tap order (``D = sum C_l``); each tap's block sums to the number of valid
        chains of the image.
    """
    offsets = torch.tensor([0, *np.cumsum(tap_channels)[:-1].tolist()], device=chains.device)
    n, k, taps = chains.shape
    cols = (chains + offsets).reshape(n * k, taps)
    rows = img.to(chains.device)[:, None].expand(n, k).reshape(-1)
    keep = valid.reshape(-1)
    out = torch.zeros(n_images, int(sum(tap_channels)), dtype=torch.long, device=chains.device)
    flat = (rows[keep, None] * out.shape[1] + cols[keep]).reshape(-1)
    out.view(-1).index_add_(0, flat, torch.ones_like(flat))
    return out


def channel_importance(target, x: torch.Tensor, y_hat: torch.Tensor, engine: PixelDiffusion | None = None,
                       batch_size: int = 32, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Causal test: zero one channel of one tap and see what the target does.

    Args:
        target: a ``FrozenTarget`` (masked forward ``target(x, masks=...)``).
        x: ``[B, C, H, W]`` images; y_hat: ``[B]`` the target's predictions on them.
        engine: when given, the target is re-run only from the masked tap on (same numbers, less work; see
            ``PixelDiffusion.forward_from_tap``); otherwise every masked forward is a full ``target(x, masks=...)``.
        batch_size: images per chunk; the chunk is repeated once per channel of the tap (batched over channels).

    Returns:
        ``flip bool [B, D]``: the prediction leaves ``y_hat`` when that channel is zeroed (agreement drop = its
        mean over images), and ``logp_drop float64 [B, D]``: ``log p_y(x) - log p_y(x; channel zeroed)``.
    """
    from tqdm.auto import tqdm

    chans = list(target.tap_channels)
    flips, drops = [], []
    for s in tqdm(range(0, x.shape[0], batch_size), desc="causal test", disable=not progress, leave=False):
        xb, yb = x[s : s + batch_size], y_hat[s : s + batch_size]
        b = xb.shape[0]
        with torch.no_grad():
            if engine is not None:
                pat = engine.freeze(xb)
                clean = pat.logits
            else:
                clean = target(xb)
            ref = clean.double().log_softmax(1).gather(1, yb[:, None])
            f_row, d_row = [], []
            for t, c in enumerate(chans):
                keep = 1 - torch.eye(c, dtype=xb.dtype, device=xb.device)  # row j zeroes channel j
                keep = keep[None].expand(b, c, c).reshape(b * c, c)
                if engine is not None:
                    feats = pat.taps[t].repeat_interleave(c, 0) * keep[:, :, None, None]
                    logits = engine.forward_from_tap(t, feats)
                else:
                    masks = [keep if i == t else None for i in range(len(chans))]
                    logits = target(xb.repeat_interleave(c, 0), masks=masks)
                yy = yb.repeat_interleave(c)
                lp = logits.double().log_softmax(1).gather(1, yy[:, None]).reshape(b, c)
                f_row.append((logits.argmax(1) != yy).reshape(b, c))
                d_row.append(ref - lp)
            flips.append(torch.cat(f_row, 1))
            drops.append(torch.cat(d_row, 1))
    return torch.cat(flips), torch.cat(drops)


def hypergeom_sf(x: int, total: int, good: int, draws: int) -> float:
    """``P(X >= x)`` for ``X ~ Hypergeometric(total, good, draws)`` (exact; the chance of an overlap >= x)."""
    lo, hi = max(0, draws - (total - good)), min(good, draws)
    denom = math.comb(total, draws)
    return float(
        sum(math.comb(good, k) * math.comb(total - good, draws - k) for k in range(max(x, lo), hi + 1)) / denom
    )


def _top_m(primary: np.ndarray, secondary: np.ndarray, m: int) -> np.ndarray:
    """Boolean mask of the ``m`` largest entries ordered by ``primary`` then ``secondary`` (ties broken by index)."""
    order = np.lexsort((-np.arange(len(primary)), secondary, primary))[::-1][:m]
    out = np.zeros(len(primary), dtype=bool)
    out[order] = True
    return out


def _rank(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(len(a), dtype=np.float64)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _rank(a) - (len(a) - 1) / 2, _rank(b) - (len(b) - 1) / 2
    den = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def overlap_test(crossed: np.ndarray, important: np.ndarray, m: int, permutations: int = 1000, seed: int = 0,
                 crossed_tiebreak: np.ndarray | None = None, important_tiebreak: np.ndarray | None = None) -> dict:  # fmt: skip
    """Do the ``m`` most-crossed channels of a tap overlap the ``m`` most important ones more than chance?

    Args:
        crossed: ``[C]`` crossing counts; important: ``[C]`` importance (agreement drop); ``*_tiebreak``: secondary
            keys (pathway mass, log-probability drop).
        m: set size; chance overlap is ``m * m / C`` (hypergeometric mean).
        permutations: random channel relabelings for the permutation p-values.

    Returns:
        ``overlap``, ``chance``, ``p_hypergeom`` (exact), ``p_permutation``, ``spearman`` (crossing counts vs
        ``important_tiebreak`` or ``important``) and its permutation p-value.
    """
    c = len(crossed)
    if not 1 <= m < c:
        raise ValueError(f"overlap set size m must be in [1, {c - 1}] for a tap of {c} channels, got {m}.")
    zeros = np.zeros(c)
    a = _top_m(crossed, crossed_tiebreak if crossed_tiebreak is not None else zeros, m)
    b = _top_m(important, important_tiebreak if important_tiebreak is not None else zeros, m)
    obs = int((a & b).sum())
    rng = np.random.default_rng(seed)
    null = np.array([int(b[rng.permutation(c)[:m]].sum()) for _ in range(permutations)])
    cont = important_tiebreak if important_tiebreak is not None else important
    rho = _spearman(crossed.astype(np.float64), cont.astype(np.float64))
    rho_null = np.array(
        [_spearman(rng.permutation(crossed).astype(np.float64), cont.astype(np.float64)) for _ in range(permutations)]
    )
    return {
        "m": m, "channels": c, "overlap": obs, "chance": m * m / c, "overlap_fraction": obs / m, "chance_fraction": m / c,
        "p_hypergeom": hypergeom_sf(obs, c, m, m), "p_permutation": float((1 + (null >= obs).sum()) / (1 + permutations)),
        "spearman": rho, "spearman_p_permutation": float((1 + (rho_null >= rho).sum()) / (1 + permutations)),
        "crossed_channels": np.flatnonzero(a).tolist(), "important_channels": np.flatnonzero(b).tolist(),
    }  # fmt: skip


def _class_sums(gram: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-pair mean similarities for several labelings at once.

    Args:
        gram: ``[B, B]`` pairwise similarities; labels: ``long [B, P]``, P labelings.

    Returns:
        ``[P, K, K]`` mean similarity per class pair (diagonal: over pairs ``i != j`` of one class), ``[P, K]`` sizes.
    """
    b, p = labels.shape
    y = F.one_hot(labels, k).to(gram.dtype)  # [B, P, K]
    r = (gram @ y.reshape(b, p * k)).reshape(b, p, k)  # one GEMM for all labelings
    sums = torch.einsum("ipa,ipb->pab", y, r)
    diag = torch.einsum("i,ipa->pa", torch.diagonal(gram), y)
    n = y.sum(0)  # [P, K]
    mat = sums / (n[:, :, None] * n[:, None, :]).clamp_min(1)
    within = (torch.diagonal(sums, dim1=1, dim2=2) - diag) / (n * (n - 1)).clamp_min(1)
    torch.diagonal(mat, dim1=1, dim2=2).copy_(within)
    return mat, n


def _within_between(mat: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Within (mean over classes with >= 2 members) and between (mean over class pairs) for ``[P, K, K]``."""
    k = mat.shape[-1]
    w_ok = (n >= 2).to(mat.dtype)
    off = ~torch.eye(k, dtype=torch.bool, device=mat.device)
    b_ok = ((n[:, :, None] >= 1) & (n[:, None, :] >= 1) & off).to(mat.dtype)
    within = (torch.diagonal(mat, dim1=1, dim2=2) * w_ok).sum(1) / w_ok.sum(1)
    between = (mat * b_ok).sum((1, 2)) / b_ok.sum((1, 2))
    return within, between


def class_similarity(profiles: torch.Tensor | list[torch.Tensor], classes: torch.Tensor, num_classes: int,
                     permutations: int = 1000, seed: int = 0) -> dict:  # fmt: skip
    """Cosine similarity of crossing profiles within vs between classes, with a label-permutation null.

    Args:
        profiles: ``[B, C]`` per-image crossing counts of one tap, or a list of them (one per tap: the per-tap
            cosine similarities are averaged). An all-zero profile has similarity 0 with everything.
        classes: ``long [B]``.

    Returns:
        ``within`` (mean over classes of the mean over pairs i != j), ``between`` (mean over class pairs, each pair
        weighted equally), ``difference``, the null mean/std of the difference under shuffled classes,
        ``p_permutation`` (one-sided: within - between at least as large by chance) and ``matrix`` ``[K, K]``.
    """
    plist = profiles if isinstance(profiles, (list, tuple)) else [profiles]
    gram = sum(F.normalize(p.double(), dim=1) @ F.normalize(p.double(), dim=1).T for p in plist) / len(plist)
    mat, n = _class_sums(gram, classes[:, None], num_classes)
    w, b = _within_between(mat, n)
    within, between = float(w[0]), float(b[0])
    g = torch.Generator().manual_seed(seed)
    null = []
    for s in range(0, permutations, 100):
        perms = torch.stack([torch.randperm(len(classes), generator=g) for _ in range(min(100, permutations - s))], 1)
        w, b = _within_between(*_class_sums(gram, classes[perms.to(classes.device)], num_classes))
        null.append(w - b)
    null_t = torch.cat(null).double().cpu()
    diff = within - between
    return {
        "within": within, "between": between, "difference": diff, "null_mean": float(null_t.mean()),
        "null_std": float(null_t.std()), "p_permutation": float((1 + (null_t >= diff).sum()) / (1 + permutations)),
        "matrix": mat[0].tolist(),
    }  # fmt: skip


def perturb(kind: str, x: torch.Tensor, y_hat: torch.Tensor, forward=None, noise_std: float = 0.2,
            occlusion_size: int = 8, fgsm_eps: float = 0.05, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Perturbed copies of ``x [B, C, H, W]`` (normalised input units).

    Args:
        kind: ``'noise'`` (add ``noise_std`` * N(0, 1), seeded), ``'occlusion'`` (a centred ``occlusion_size`` square
            set to each image's minimum, i.e. the background of dark-background data), or ``'fgsm'``
            (``x + fgsm_eps * sign(grad_x CE(H(x), y_hat))`` against the target, Goodfellow et al. 2015).
        forward: ``x -> logits``, needed for FGSM.
    """
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return x + noise_std * torch.randn(x.shape, generator=g).to(x)
    if kind == "occlusion":
        _, _, big_h, big_w = x.shape
        s = min(occlusion_size, big_h, big_w)
        r, c = (big_h - s) // 2, (big_w - s) // 2
        out = x.clone()
        low = x.amin(dim=(1, 2, 3), keepdim=True).expand(-1, x.shape[1], s, s)
        out[:, :, r : r + s, c : c + s] = low
        return out
    if kind == "fgsm":
        if forward is None:
            raise ValueError("FGSM needs the target's forward.")
        with torch.enable_grad():
            xx = x.detach().clone().requires_grad_(True)
            F.cross_entropy(forward(xx), y_hat, reduction="sum").backward()
        return (x + fgsm_eps * xx.grad.sign()).detach()
    raise ValueError(f"unknown perturbation '{kind}'; expected 'noise', 'occlusion' or 'fgsm'.")


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(pos = neg) (Mann-Whitney)."""
    if not len(neg) or not len(pos):
        return float("nan")
    r = _rank(np.concatenate([neg, pos]).astype(np.float64))
    n0, n1 = len(neg), len(pos)
    return float((r[n0:].sum() - n1 * (n1 - 1) / 2) / (n0 * n1))


# ----------------------------------------------------------------------------------------------------------------
# The evaluation entry point: python evaluate.py diffusion --config configs/fashion_mnist/diffusion.yaml
# ----------------------------------------------------------------------------------------------------------------

PERTURBATIONS = ("noise", "occlusion", "fgsm")


def _make_data(data: dict | None, data_dir: str | None):
    """A data module from a ``{class_path, init_args}`` dict, or Fashion-MNIST (``data_dir`` or the defaults)."""
    import importlib

    if data is None:
        from gencnp.data import FashionMNISTDataModule

        return FashionMNISTDataModule(data_dir=data_dir)
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(
            f"data must be a {{class_path, init_args}} mapping (e.g. class_path: gencnp.FashionMNISTDataModule), got {data!r}."
        )
    module, _, name = str(data["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "gencnp"), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"data class_path '{data['class_path']}' cannot be imported ({err}); use e.g. gencnp.FashionMNISTDataModule."
        ) from err
    return cls(**dict(data.get("init_args") or {}))


def _chunks(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _masses(
    engine: PixelDiffusion, x: torch.Tensor, pix: torch.Tensor, batch: int, progress: bool, desc: str
) -> list[torch.Tensor]:
    """Per-tap impulse masses ``[n, P, C_l]`` of pixels ``pix [n, P, 2]`` (plain propagation, no transfers)."""
    from tqdm.auto import tqdm

    n, p = pix.shape[:2]
    out = [torch.zeros(n, p, c) for c in engine.tap_channels]
    for s, e in tqdm(_chunks(n, batch), desc=desc, disable=not progress, leave=False):
        pat = engine.freeze(x[s:e])
        img = torch.arange(e - s).repeat_interleave(p)
        for t, win in enumerate(engine.responses(pat, img, pix[s:e].reshape(-1, 2))):
            out[t][s:e] = win.mass()[:, 0].reshape(e - s, p, -1).float().cpu()
    return out


def _pathway_run(engine: PixelDiffusion, x: torch.Tensor, pix: torch.Tensor, top_k: int, beam_width: int, batch: int,
                 progress: bool, desc: str) -> dict[str, Any]:  # fmt: skip
    """Beam-search pathways of every pixel of every image, plus masses and crossing counts."""
    from tqdm.auto import tqdm

    n, p = pix.shape[:2]
    masses = [torch.zeros(n, p, c) for c in engine.tap_channels]
    chains, scores, valid, links = [], [], [], []
    for s, e in tqdm(_chunks(n, batch), desc=desc, disable=not progress, leave=False):
        pat = engine.freeze(x[s:e])
        img = torch.arange(e - s).repeat_interleave(p)
        res = engine.pathways(pat, img, pix[s:e].reshape(-1, 2), top_k, beam_width)
        for t, m in enumerate(res["masses"]):
            masses[t][s:e] = m.reshape(e - s, p, -1).float().cpu()
        chains.append(res["chains"].reshape(e - s, p, *res["chains"].shape[1:]).cpu())
        scores.append(res["log_scores"].reshape(e - s, p, -1).float().cpu())
        valid.append(res["valid"].reshape(e - s, p, -1).cpu())
        links.append(res["links"].reshape(e - s, p, *res["links"].shape[1:]).float().cpu())
    chains_t, valid_t = torch.cat(chains), torch.cat(valid)
    img_all = torch.arange(n).repeat_interleave(p)
    cross = crossing_counts(chains_t.reshape(n * p, *chains_t.shape[2:]), valid_t.reshape(n * p, -1), img_all, n,
                            engine.tap_channels)  # fmt: skip
    return {"masses": masses, "chains": chains_t, "log_scores": torch.cat(scores), "valid": valid_t,
            "links": torch.cat(links), "crossings": cross}  # fmt: skip


def _mass_stats(masses: list[torch.Tensor], thresholds: list[float]) -> dict[str, np.ndarray]:
    """Per image: large crossings (pixel, tap, channel with mass >= the tap's clean threshold), the number of
    chains through large feature maps only (``sum_pixels prod_taps n_l``), and the total impulse mass."""
    counts = [(m >= th).sum(-1).double() for m, th in zip(masses, thresholds)]  # [n, P] per tap
    crossings = sum(c.sum(1) for c in counts)
    prod = torch.ones_like(counts[0])
    for c in counts:
        prod = prod * c
    total = sum(m.double().sum(dim=(1, 2)) for m in masses)
    return {"large_crossings": crossings.numpy(), "large_pathways": prod.sum(1).numpy(), "total_mass": total.numpy()}


def _split_taps(t: torch.Tensor, channels: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(t, list(channels), dim=-1))


def _per_image_overlap(cross: torch.Tensor, mass: torch.Tensor, drop: torch.Tensor, m: int, permutations: int,
                       seed: int) -> dict:  # fmt: skip
    """Per image: overlap of its ``m`` most-crossed channels with its ``m`` most important ones (log p drop).

    Baselines: random channel sets (hypergeometric, ``m / C``) and another image's important channels.
    """
    n, c = cross.shape
    key = cross.double() + 0.5 * mass.double() / mass.double().amax(1, keepdim=True).clamp_min(1e-30)
    a = torch.zeros(n, c, dtype=torch.bool).scatter_(1, key.topk(m, 1).indices, True)
    b = torch.zeros(n, c, dtype=torch.bool).scatter_(1, drop.double().topk(m, 1).indices, True)
    obs = (a & b).sum(1).double() / m
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    other = perm.roll(1)
    mismatch = torch.empty(n, dtype=torch.long)
    mismatch[perm] = other  # image perm[i] is paired with image perm[i-1]: never itself when n > 1
    mism = (a & b[mismatch]).sum(1).double() / m
    rng = np.random.default_rng(seed)
    null = rng.hypergeometric(m, c - m, m, size=(max(permutations, 1), n)).mean(1) / m
    mean = float(obs.mean())
    # Instance specificity: re-pair every image with another image's important channels (random derangements).
    others = []
    for _ in range(max(permutations, 1)):
        p = torch.randperm(n, generator=g)
        pair = torch.empty(n, dtype=torch.long)
        pair[p] = p.roll(1)
        others.append(float((a & b[pair]).sum()) / (n * m))
    others_t = np.array(others)
    return {"m": m, "channels": c, "overlap_fraction": mean, "chance_fraction": m / c,
            "other_image_fraction": float(mism.mean()),
            "p_permutation": float((1 + (null >= mean).sum()) / (1 + len(null))),
            "p_vs_other_images": float((1 + (others_t >= mean).sum()) / (1 + len(others_t)))}  # fmt: skip


def _bank_overlap(bank_path: str | None, cross_class: torch.Tensor, mass_class: torch.Tensor, channels: Sequence[int],
                  tap_names: Sequence[str], class_names: Sequence[str], target=None) -> dict:  # fmt: skip
    """Overlap of each class's most-crossed channels with GEN-CNP's class pathway ``M_c`` (same size per tap).

    Args:
        bank_path: a ``gencnp.banks.PathwayBank`` file, or ``None``. Missing file, missing module, a bank that does
            not fit ``target`` or has no threshold: the comparison is skipped and the reason recorded.
        cross_class, mass_class: ``[K, D]`` crossing counts and impulse masses summed over each class's images.
    """
    if not bank_path:
        return {"skipped": "no bank path given"}
    if not Path(bank_path).is_file():
        return {"skipped": f"bank file '{bank_path}' does not exist (export one with GEN-CNP first)"}
    try:
        from gencnp.banks import PathwayBank
    except ImportError as err:
        return {"skipped": f"gencnp.banks is not importable ({err})"}
    try:
        pathways = PathwayBank.load(bank_path, target).class_pathways()
    except ValueError as err:
        return {"skipped": f"bank '{bank_path}' cannot be used: {err}"}
    pathways = torch.as_tensor(pathways).bool().cpu()
    d = int(sum(channels))
    if pathways.dim() != 2 or pathways.shape[1] != d or pathways.shape[0] != cross_class.shape[0]:
        return {"skipped": f"bank class pathways have shape {tuple(pathways.shape)}, expected [{cross_class.shape[0]}, {d}] "
                           "for this target; export the bank from the same target"}  # fmt: skip
    rows = []
    per_tap: dict[str, dict[str, float]] = {}
    offs = [0, *np.cumsum(channels).tolist()]
    for k in range(pathways.shape[0]):
        for t, name in enumerate(tap_names):
            sl = slice(offs[t], offs[t + 1])
            mk = pathways[k, sl]
            size, c = int(mk.sum()), channels[t]
            if not 0 < size < c or cross_class[k, sl].sum() == 0:
                continue
            key = cross_class[k, sl].double() + 0.5 * mass_class[k, sl].double() / mass_class[
                k, sl
            ].double().max().clamp_min(1e-30)
            top = torch.zeros(c, dtype=torch.bool)
            top[key.topk(size).indices] = True
            ov = int((top & mk).sum())
            rows.append({"class": class_names[k], "tap": name, "size": size, "overlap": ov, "chance": size * size / c,
                         "p_hypergeom": hypergeom_sf(ov, c, size, size)})  # fmt: skip
            acc = per_tap.setdefault(name, {"overlap": 0.0, "chance": 0.0, "size": 0.0})
            acc["overlap"] += ov
            acc["chance"] += size * size / c
            acc["size"] += size
    if not rows:
        return {"skipped": "every class pathway keeps all or none of a tap's channels; nothing to compare"}
    tot_ov = sum(r["overlap"] for r in rows)
    tot_ch = sum(r["chance"] for r in rows)
    return {"path": str(bank_path), "rows": rows, "per_tap": per_tap, "overlap": tot_ov, "chance": tot_ch,
            "ratio_to_chance": tot_ov / tot_ch if tot_ch else float("nan")}  # fmt: skip


def diffusion(
    arch: str = "fmnist_cnn",
    checkpoint: str | None = "runs/fashion_mnist/target/best.ckpt",
    taps: str | list[str] = "auto",
    target_kwargs: dict | None = None,
    data: dict | None = None,
    data_dir: str | None = None,
    split: str = "test",
    n_images: int = 1000,
    pixels: int = 32,
    pixel_rule: str = "saliency",
    top_k: int = 5,
    beam_width: int = 16,
    overlap_fraction: float = 0.125,
    class_source: str = "pred",
    large_quantile: float = 0.9,
    noise_std: float = 0.2,
    occlusion_size: int = 8,
    fgsm_eps: float = 0.05,
    perturbed_pathways: int = 1000,
    permutations: int = 1000,
    bank: str | None = "runs/fashion_mnist/bank.safetensors",
    batch_images: int = 32,
    seed: int = 0,
    threads: int | None = None,
    out_dir: str = "runs/fashion_mnist/eval",
    progress: bool = True,
) -> dict:
    """Pixel diffusion pathways of a frozen CNN (docs/design.md section 9; method in this module's docstring).

    Writes ``diffusion.json``, ``diffusion.md`` and ``diffusion_*.png`` into ``out_dir``.

    Args:
        arch: target architecture (a plain chain CNN, e.g. ``fmnist_cnn``).
        checkpoint: target weights; ``None`` keeps the random initialisation (smoke tests only).
        taps: tap module paths or ``'auto'`` (block outputs).
        target_kwargs: extra arguments of the target factory.
        data: data module as ``{class_path, init_args}``; default Fashion-MNIST from ``data_dir``.
        data_dir: Fashion-MNIST IDX folder when ``data`` is unset (``None``: the Debian package, then ``data/``).
        split: ``'test'`` (default), ``'val'`` or ``'train'``.
        n_images: images analysed, a seeded random subset of the split (all when larger).
        pixels: pixels per image.
        pixel_rule: ``'saliency'`` (the ``pixels`` largest input-gradient magnitudes of the explained logit) or
            ``'random'`` (one seeded set of positions for every image).
        top_k: large pathways kept per pixel.
        beam_width: prefixes kept by the beam search (``>= top_k``). Measured on ``fmnist_cnn`` against exhaustive
            search (24 pixels): 16 recovers 96% of the top-5 chains and every top-1 chain; 8 recovers 82%.
        overlap_fraction: size of the compared channel sets per tap, as a fraction of the tap's channels.
        class_source: ``'pred'`` (the target's prediction) or ``'label'`` groups images into classes.
        large_quantile: a feature map is crossed by large diffusion when its impulse mass reaches this quantile of
            the clean masses at its tap (the clean-vs-perturbed counts).
        noise_std, occlusion_size, fgsm_eps: perturbations, in normalised input units (see ``perturb``). The
            defaults change the default target's prediction on about 39%, 29% and 38% of test images.
        perturbed_pathways: images (the first ones) whose perturbed versions also get beam-search pathways, to
            compare crossing profiles with the clean ones; 0 skips it (the counts use every image regardless).
        permutations: draws for every permutation baseline.
        bank: GEN-CNP pathway bank to compare with; skipped with a note when absent.
        batch_images: images per chunk (peak memory grows with it: about 20 MB per image at the defaults).
        seed: subset, random pixels, noise and permutation seed.
        threads: ``torch.set_num_threads`` (``None`` leaves it).
        out_dir: output folder.
        progress: tqdm progress bars.

    Returns:
        The summary written to ``diffusion.json``.
    """
    checks = [
        (class_source in ("pred", "label"), f"class_source must be 'pred' or 'label', got '{class_source}'."),
        (pixel_rule in ("saliency", "random"), f"pixel_rule must be 'saliency' or 'random', got '{pixel_rule}'."),
        (split in ("train", "val", "test"), f"split must be 'train', 'val' or 'test', got '{split}'."),
        (n_images >= 2, f"n_images must be >= 2, got {n_images}."),
        (1 <= top_k <= beam_width, f"need 1 <= top_k <= beam_width, got top_k={top_k}, beam_width={beam_width}."),
        (0 < overlap_fraction < 1, f"overlap_fraction must be in (0, 1), got {overlap_fraction}."),
        (0 < large_quantile < 1, f"large_quantile must be in (0, 1), got {large_quantile}."),
        (permutations >= 1, f"permutations must be >= 1, got {permutations}."),
        (batch_images >= 1, f"batch_images must be >= 1, got {batch_images}."),
        (perturbed_pathways >= 0, f"perturbed_pathways must be >= 0, got {perturbed_pathways}."),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    from gencnp.targets import FrozenTarget, load_target

    if threads:
        torch.set_num_threads(int(threads))
    times: dict[str, float] = {}
    t_start = time.time()
    torch.manual_seed(seed)
    dm = _make_data(data, data_dir)
    ds = dm.split(split)
    num_classes = int(dm.num_classes)
    input_shape = tuple(dm.input_shape)
    class_names = list(getattr(dm, "class_names", [str(k) for k in range(num_classes)]))
    model = load_target(arch, checkpoint, num_classes, input_shape[0], **(target_kwargs or {}))
    target = FrozenTarget(model, taps, input_shape, arch=arch)
    engine = PixelDiffusion(target.model, target.tap_names, input_shape)
    out = Path(out_dir)

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[: min(n_images, len(ds))].sort().values.tolist()
    items = [ds[i] for i in idx]
    x = torch.stack([torch.as_tensor(it[0]) for it in items]).float()
    labels = torch.as_tensor([int(it[1]) for it in items])
    n = x.shape[0]
    with torch.no_grad():
        logits = torch.cat([target(x[s:e]) for s, e in _chunks(n, 256)])
    y_hat = logits.argmax(1)
    classes = y_hat if class_source == "pred" else labels
    times["load"] = time.time() - t_start

    t0 = time.time()
    pix = torch.cat([select_pixels(target, x[s:e], y_hat[s:e], pixels, pixel_rule, seed) for s, e in _chunks(n, 256)])
    clean = _pathway_run(engine, x, pix, top_k, beam_width, batch_images, progress, "pathways (clean)")
    times["pathways"] = time.time() - t0

    t0 = time.time()
    flip, drop = channel_importance(target, x, y_hat, engine, batch_size=max(1, batch_images), progress=progress)
    times["causal_test"] = time.time() - t0

    t0 = time.time()
    chans, names = engine.tap_channels, target.tap_names
    cross = clean["crossings"]  # [n, D]
    mass_img = torch.cat([m.sum(1) for m in clean["masses"]], 1)  # [n, D] impulse mass summed over pixels
    agreement_drop = flip.double().mean(0)
    logp_drop = drop.mean(0)
    global_overlap, image_overlap = {}, {}
    for t, name in enumerate(names):
        sl = slice(engine.offsets[t], engine.offsets[t + 1])
        m = max(1, min(chans[t] - 1, round(overlap_fraction * chans[t])))
        global_overlap[name] = overlap_test(cross[:, sl].sum(0).numpy(), agreement_drop[sl].numpy(), m, permutations, seed,
                                            mass_img[:, sl].sum(0).double().numpy(), logp_drop[sl].numpy())  # fmt: skip
        image_overlap[name] = _per_image_overlap(cross[:, sl], mass_img[:, sl], drop[:, sl], m, permutations, seed)
    profiles = _split_taps(cross.double(), chans)
    consistency = {
        name: class_similarity(p, classes, num_classes, permutations, seed) for name, p in zip(names, profiles)
    }
    consistency["all"] = class_similarity(profiles, classes, num_classes, permutations, seed)
    y1 = F.one_hot(classes, num_classes).double()
    bank_result = _bank_overlap(
        bank, y1.T @ cross.double(), y1.T @ mass_img.double(), chans, names, class_names, target
    )
    times["analysis"] = time.time() - t0

    t0 = time.time()
    flat = [m.reshape(-1) for m in clean["masses"]]
    thresholds = [float(f.kthvalue(max(1, math.ceil(large_quantile * f.numel()))).values) for f in flat]
    stats = {"clean": _mass_stats(clean["masses"], thresholds)}
    pert: dict[str, dict] = {}
    n_pp = min(perturbed_pathways, n)
    for kind in PERTURBATIONS:
        xp = torch.cat([perturb(kind, x[s:e], y_hat[s:e], target, noise_std, occlusion_size, fgsm_eps, seed + s)
                        for s, e in _chunks(n, 256)])  # fmt: skip
        with torch.no_grad():
            yp = torch.cat([target(xp[s:e]).argmax(1) for s, e in _chunks(n, 256)])
        stats[kind] = _mass_stats(_masses(engine, xp, pix, batch_images, progress, f"masses ({kind})"), thresholds)
        entry = {"prediction_changed": float((yp != y_hat).double().mean())}
        if n_pp:
            run = _pathway_run(
                engine, xp[:n_pp], pix[:n_pp], top_k, beam_width, batch_images, progress, f"pathways ({kind})"
            )
            sims = [F.cosine_similarity(a.double(), b.double(), dim=1)
                    for a, b in zip(_split_taps(run["crossings"], chans), _split_taps(cross[:n_pp], chans))]  # fmt: skip
            entry["profile_cosine_to_clean"] = float(torch.stack(sims).mean())
            entry["profile_cosine_to_clean_per_tap"] = {nm: float(s.mean()) for nm, s in zip(names, sims)}
        pert[kind] = entry
    for kind, st in stats.items():
        entry = pert.setdefault(kind, {})
        for key, v in st.items():
            entry[key] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "median": float(np.median(v))}
        entry["large_pathways"]["mean_log10"] = float(np.mean(np.log10(1 + st["large_pathways"])))
        if kind != "clean":
            entry["auroc_vs_clean"] = {key: _auroc(stats["clean"][key], st[key]) for key in st}
            entry["fraction_above_clean"] = {key: float(np.mean(st[key] > stats["clean"][key])) for key in st}
    times["perturbations"] = time.time() - t0
    times["total"] = time.time() - t_start

    summary = {
        "settings": {
            "target": arch, "checkpoint": checkpoint, "tensor_hash": target.tensor_hash(), "taps": names,
            "tap_channels": chans, "data": (data or {}).get("class_path", "gencnp.FashionMNISTDataModule"), "split": split,
            "n": n, "subset_seed": seed, "pixels": pixels, "pixel_rule": pixel_rule, "top_k": top_k,
            "beam_width": beam_width, "overlap_fraction": overlap_fraction, "class_source": class_source,
            "large_quantile": large_quantile, "large_thresholds": dict(zip(names, thresholds)),
            "noise_std": noise_std, "occlusion_size": occlusion_size, "fgsm_eps": fgsm_eps,
            "perturbed_pathways": n_pp, "permutations": permutations, "torch_threads": torch.get_num_threads(),
            "score_rule": "Markov routing: M_1[c_1]/sum M_1 * prod_l T_l[c_l,c_l+1]/sum_j T_l[c_l,j]",
        },
        "target_accuracy": float((y_hat == labels).double().mean()),
        "pathways": {
            "valid_fraction": float(clean["valid"].double().mean()),
            "top1_score_mean": float(clean["log_scores"][..., 0].exp().mean()),
            "topk_score_sum_mean": float(clean["log_scores"].exp().sum(-1).mean()),
            "distinct_top1_chains": int(torch.unique(clean["chains"][:, :, 0].reshape(-1, len(names)), dim=0).shape[0]),
        },
        "importance": {name: {"agreement_drop_max": float(agreement_drop[engine.offsets[t]:engine.offsets[t + 1]].max()),
                              "agreement_drop_mean": float(agreement_drop[engine.offsets[t]:engine.offsets[t + 1]].mean())}
                       for t, name in enumerate(names)},  # fmt: skip
        "per_channel": {name: {  # tap order; mass = mean impulse mass per analysed pixel
            "crossings": cross[:, engine.offsets[t]:engine.offsets[t + 1]].sum(0).tolist(),
            "mass": (mass_img[:, engine.offsets[t]:engine.offsets[t + 1]].double().mean(0) / pixels).tolist(),
            "agreement_drop": agreement_drop[engine.offsets[t]:engine.offsets[t + 1]].tolist(),
            "logp_drop": logp_drop[engine.offsets[t]:engine.offsets[t + 1]].tolist()}
            for t, name in enumerate(names)},
        "crossing_vs_importance": {"global": global_overlap, "per_image": image_overlap},
        "consistency": {k: {kk: vv for kk, vv in v.items() if kk != "matrix"} for k, v in consistency.items()},
        "class_similarity_matrix": consistency["all"]["matrix"],
        "bank": bank_result,
        "perturbations": pert,
        "seconds": times,
    }  # fmt: skip
    write_atomic(out / "diffusion.json", json.dumps(summary, indent=2))
    write_atomic(out / "diffusion.md", _markdown(summary, class_names))
    _figures(out, summary, consistency, clean, x, pix, labels, y_hat, agreement_drop, cross, class_names, stats, engine)
    return summary


def _fmt_p(p: float, floor: float | None = None) -> str:
    """A p-value; at the smallest value a permutation test can give (``floor``), ``<= floor``."""
    if floor is not None and p <= floor * (1 + 1e-9):
        return f"≤ {floor:.1e}"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def _p_phrase(p: float, floor: float | None = None) -> str:
    """``p = 0.03`` or ``p ≤ 1.0e-03``."""
    txt = _fmt_p(p, floor)
    return f"p {txt}" if txt.startswith("≤") else f"p = {txt}"


def _markdown(s: dict, class_names: Sequence[str]) -> str:
    st = s["settings"]
    names = st["taps"]
    floor = 1 / (1 + st["permutations"])
    glob, img = s["crossing_vs_importance"]["global"], s["crossing_vs_importance"]["per_image"]
    sig = [t for t in names if glob[t]["p_permutation"] < 0.05 and glob[t]["overlap"] > glob[t]["chance"]]
    sig_img = [
        t for t in names if img[t]["p_permutation"] < 0.05 and img[t]["overlap_fraction"] > img[t]["chance_fraction"]
    ]
    sig_own = [
        t
        for t in names
        if img[t]["p_vs_other_images"] < 0.05 and img[t]["overlap_fraction"] > img[t]["other_image_fraction"]
    ]
    verdict = "Yes" if len(sig) == len(names) else "Partly" if sig else "No"
    lines = [
        "# Pixel diffusion pathways",
        "",
        f"Target `{st['target']}` (`{st['checkpoint']}`), {st['split']} split, n = {st['n']} images (subset seed "
        f"{st['subset_seed']}), target accuracy on them {100 * s['target_accuracy']:.1f}%. Taps "
        f"{', '.join(f'`{t}` ({c})' for t, c in zip(names, st['tap_channels']))}. {st['pixels']} pixels per image "
        f"({st['pixel_rule']}), top {st['top_k']} pathways per pixel from a beam of {st['beam_width']}; class source "
        f"`{st['class_source']}`; {st['permutations']} permutations per baseline.",
        "",
        "## Do large pathways cross the causally important feature maps more often than chance?",
        "",
        f"**{verdict}.** Over all images, the channels most crossed by large pathways overlap the channels whose removal "
        f"drops agreement most more often than random channel sets at {len(sig)} of {len(names)} taps"
        + (f" ({', '.join(f'`{t}`' for t in sig)})" if sig else "")
        + f". Per image (its own crossings vs its own causal test), the overlap beats chance at {len(sig_img)} of "
        f"{len(names)} taps, and beats the overlap with another image's important channels (instance-specific) at "
        f"{len(sig_own)} of {len(names)}" + (f" ({', '.join(f'`{t}`' for t in sig_own)})" if sig_own else "") + ".",
        "",
        "| tap | set size m | overlap (all images) | chance | p (permutation) | p (hypergeom.) | Spearman ρ (p) | "
        "per-image overlap | chance | another image's | p (vs chance) | p (vs another image) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in names:
        a, b = glob[t], img[t]
        lines.append(
            f"| `{t}` | {a['m']} of {a['channels']} | {a['overlap']} | {a['chance']:.2f} | {_fmt_p(a['p_permutation'], floor)} | "
            f"{_fmt_p(a['p_hypergeom'])} | {a['spearman']:.2f} ({_fmt_p(a['spearman_p_permutation'], floor)}) | "
            f"{b['overlap_fraction']:.3f} | {b['chance_fraction']:.3f} | {b['other_image_fraction']:.3f} | {_fmt_p(b['p_permutation'], floor)} | "
            f"{_fmt_p(b['p_vs_other_images'], floor)} |"
        )
    c = s["consistency"]
    allc = c["all"]
    yes = allc["difference"] > 0 and allc["p_permutation"] < 0.05
    lines += [
        "",
        "Importance = agreement drop when one channel of a tap is zeroed (ties broken by the mean drop of log p_ŷ); "
        "per image, the drop of log p_ŷ. Crossings = how many of the image's top pathways pass through a channel "
        "(ties broken by impulse mass). Chance = the expected overlap of random channel sets of the same size.",
        "",
        "## Are within-class crossing profiles more similar than between-class ones?",
        "",
        f"**{'Yes' if yes else 'No'}.** Mean cosine similarity of per-tap crossing profiles: within classes "
        f"{allc['within']:.3f}, between classes {allc['between']:.3f} (difference {allc['difference']:.3f}; with shuffled "
        f"classes {allc['null_mean']:.3f} ± {allc['null_std']:.3f}, {_p_phrase(allc['p_permutation'], floor)}).",
        "",
        "| tap | within | between | difference | shuffled-class difference | p |",
        "|---|---|---|---|---|---|",
    ]
    for t in [*names, "all"]:
        v = c[t]
        lines.append(f"| {'`' + t + '`' if t != 'all' else 'all taps'} | {v['within']:.3f} | {v['between']:.3f} | "
                     f"{v['difference']:.3f} | {v['null_mean']:.3f} ± {v['null_std']:.3f} | {_fmt_p(v['p_permutation'], floor)} |")  # fmt: skip
    p = s["perturbations"]
    lines += [
        "",
        "## Clean vs perturbed inputs",
        "",
        f"Same pixels, pattern re-frozen at the perturbed input. A feature map is crossed by large diffusion when its "
        f"impulse mass reaches the clean {st['large_quantile']:.2f}-quantile of its tap; *large pathways* counts the "
        "chains (one channel per tap) through such maps only, summed over the image's pixels. Perturbations: Gaussian "
        f"noise σ = {st['noise_std']}, a centred {st['occlusion_size']}x{st['occlusion_size']} occlusion, FGSM ε = "
        f"{st['fgsm_eps']} (normalised units). AUROC: how well the count separates perturbed from clean images "
        "(0.5 = not at all; > 0.5 = larger when perturbed).",
        "",
        "| input | prediction changed | large crossings / image | log10(1 + large pathways) | total mass / image | "
        "AUROC (crossings) | AUROC (mass) | profile cosine to clean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ["clean", *PERTURBATIONS]:
        v = p[kind]
        au = v.get("auroc_vs_clean", {})
        lines.append(
            f"| {kind} | {100 * v.get('prediction_changed', 0.0):.1f}% | {v['large_crossings']['mean']:.1f} ± "
            f"{v['large_crossings']['std']:.1f} | {v['large_pathways']['mean_log10']:.2f} | {v['total_mass']['mean']:.1f} | "
            f"{au.get('large_crossings', float('nan')):.3f} | {au.get('total_mass', float('nan')):.3f} | "
            f"{v.get('profile_cosine_to_clean', 1.0 if kind == 'clean' else float('nan')):.3f} |"
        )
    lines.append("")
    for kind in PERTURBATIONS:
        v, c0 = p[kind], p["clean"]
        au = v["auroc_vs_clean"]["large_crossings"]
        direction = "fewer" if v["large_crossings"]["mean"] < c0["large_crossings"]["mean"] else "more"
        lines.append(
            f"- **{kind}**: {direction} large crossings than clean ({v['large_crossings']['mean']:.0f} vs "
            f"{c0['large_crossings']['mean']:.0f} per image; {100 * v['fraction_above_clean']['large_crossings']:.0f}% of "
            f"images above their own clean count); the count separates perturbed from clean images with AUROC "
            f"{max(au, 1 - au):.2f} (0.5 = not at all)."
        )
    b = s["bank"]
    lines += ["", "## GEN-CNP class pathways", ""]
    if "skipped" in b:
        lines.append(f"Skipped: {b['skipped']}.")
    else:
        lines.append(f"Bank `{b['path']}`: per class and tap, the most-crossed channels (as many as the class pathway keeps "
                     f"there) share {b['overlap']} channels with the class pathway; random sets of the same sizes share "
                     f"{b['chance']:.1f} on average ({b['ratio_to_chance']:.2f}x chance).")  # fmt: skip
        lines += ["", "| tap | kept channels (sum over classes) | overlap | chance |", "|---|---|---|---|"]
        for t, v in b["per_tap"].items():
            lines.append(f"| `{t}` | {v['size']:.0f} | {v['overlap']:.0f} | {v['chance']:.1f} |")
    pw = s["pathways"]
    lines += [
        "",
        "## Method",
        "",
        "- ReLU on/off pattern and max-pool switches frozen at each (clean or perturbed) input; a one-pixel unit impulse "
        "runs through the network's linear part (no biases, BatchNorm as its scale), i.e. the Jacobian column.",
        "- Transfer `T_l[i, j]`: Σ|·| over space of tap l+1's channel j when only channel i of tap l carries the response.",
        f"- Chain score: {st['score_rule']} (the scores of all chains of a pixel sum to 1). Top-1 score mean "
        f"{pw['top1_score_mean']:.2e}, top-{st['top_k']} sum {pw['topk_score_sum_mean']:.2e}; "
        f"{pw['distinct_top1_chains']} distinct top-1 chains over all pixels; {100 * pw['valid_fraction']:.1f}% of the "
        "kept chains carry mass.",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()) + ".",
        "",
        "Figures: `diffusion_crossings.png`, `diffusion_pixel_pathways.png`, `diffusion_similarity.png`, "
        "`diffusion_perturbations.png`.",
        "",
    ]
    return "\n".join(lines)


def _figures(out: Path, s: dict, consistency: dict, clean: dict, x: torch.Tensor, pix: torch.Tensor,
             labels: torch.Tensor, y_hat: torch.Tensor, agreement_drop: torch.Tensor, cross: torch.Tensor,
             class_names: Sequence[str], stats: dict, engine: PixelDiffusion) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    names, chans = s["settings"]["taps"], s["settings"]["tap_channels"]
    glob = s["crossing_vs_importance"]["global"]

    # 1. Crossings per channel, coloured by causal importance.
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.6 * rows), squeeze=False, layout="constrained")
    drop = agreement_drop.numpy()
    norm = colors.Normalize(vmin=0.0, vmax=max(float(drop.max()), 1e-6))
    for t, name in enumerate(names):
        ax = axes[t // cols][t % cols]
        sl = slice(engine.offsets[t], engine.offsets[t + 1])
        counts = cross[:, sl].sum(0).numpy()
        ax.bar(np.arange(chans[t]), counts, color=cm.viridis(norm(drop[sl])), width=0.9)
        imp = glob[name]["important_channels"]
        ax.scatter(
            imp,
            counts[imp] + 0.02 * max(counts.max(), 1),
            marker="v",
            color="crimson",
            s=18,
            label="most important (causal)",
        )
        g = glob[name]
        ax.set_title(f"{name}: {g['m']} most crossed vs {g['m']} most important share {g['overlap']} "
                     f"(chance {g['chance']:.1f}, {_p_phrase(g['p_permutation'], 1 / (1 + s['settings']['permutations']))})",
                     fontsize=9)  # fmt: skip
        ax.set_xlabel("channel")
        ax.set_ylabel("large pathways crossing")
        ax.legend(fontsize=7, loc="upper right")
    for t in range(len(names), rows * cols):
        axes[t // cols][t % cols].axis("off")
    fig.colorbar(
        cm.ScalarMappable(norm=norm, cmap="viridis"),
        ax=axes,
        label="agreement drop when the channel is zeroed",
        shrink=0.8,
    )
    # (bar colour = causal importance; red triangles = the compared most-important set)
    fig.suptitle(
        f"Large pathways (top {s['settings']['top_k']} per pixel) crossing each feature map, {s['settings']['n']} images"
    )
    save_figure(fig, out / "diffusion_crossings.png", dpi=120, pad_inches=0.1)

    # 2. One pixel's top pathways across the layers.
    i_img, i_pix = 0, 0
    fig, (ax0, ax1) = plt.subplots(
        1, 2, figsize=(13, 6.5), gridspec_kw={"width_ratios": [1, 2.2]}, layout="constrained"
    )
    img = x[i_img].float()
    ax0.imshow(
        img[0] if img.shape[0] == 1 else ((img - img.min()) / (img.max() - img.min() + 1e-12)).permute(1, 2, 0),
        cmap="gray",
    )
    r, c = pix[i_img, i_pix].tolist()
    ax0.scatter([c], [r], s=120, facecolors="none", edgecolors="red", linewidths=2)
    ax0.set_title(f"image 0: label {class_names[int(labels[i_img])]}, predicted {class_names[int(y_hat[i_img])]}\n"
                  f"pixel ({r}, {c}) (most salient)", fontsize=9)  # fmt: skip
    ax0.set_xlabel("column")
    ax0.set_ylabel("row")
    masses = [clean["masses"][t][i_img, i_pix].numpy() for t in range(len(names))]
    logm = [np.log10(m + 1e-12) for m in masses]
    lo = min(float(v[np.isfinite(v)].min()) for v in logm)
    hi = max(float(v.max()) for v in logm)
    mnorm = colors.Normalize(vmin=max(lo, hi - 6), vmax=hi)
    for t in range(len(names)):
        ax1.scatter(
            np.full(chans[t], t),
            np.arange(chans[t]) / max(chans[t] - 1, 1),
            c=logm[t],
            cmap="magma",
            norm=mnorm,
            s=14,
            zorder=2,
        )
    chains = clean["chains"][i_img, i_pix].numpy()
    sc = clean["log_scores"][i_img, i_pix].numpy()
    valid = clean["valid"][i_img, i_pix].numpy()
    palette = cm.tab10(np.arange(len(chains)) % 10)
    for k in range(len(chains)):
        if not valid[k]:
            continue
        ys = [chains[k][t] / max(chans[t] - 1, 1) for t in range(len(names))]
        ax1.plot(np.arange(len(names)), ys, "-o", color=palette[k], lw=3.0 - 0.4 * k, alpha=0.9, zorder=3,
                 label=f"#{k + 1} score {np.exp(sc[k]):.2e}: " + " → ".join(str(int(v)) for v in chains[k]))  # fmt: skip
    ax1.set_xticks(range(len(names)), [f"{n}\n({cc} ch)" for n, cc in zip(names, chans)])
    ax1.set_xlabel("tap (layer)")
    ax1.set_ylabel("channel index / (channels − 1)")
    ax1.set_title("top pathways of this pixel (dots: every channel, coloured by impulse mass)", fontsize=9)
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, title="pathway: channel per tap")
    fig.colorbar(cm.ScalarMappable(norm=mnorm, cmap="magma"), ax=ax1, label="log10 impulse mass Σ|response|")
    save_figure(fig, out / "diffusion_pixel_pathways.png", dpi=120, pad_inches=0.1)

    # 3. Within- vs between-class similarity.
    fig, (ax0, ax1) = plt.subplots(
        1, 2, figsize=(14, 5.8), gridspec_kw={"width_ratios": [1, 1.3]}, layout="constrained"
    )
    mat = np.array(consistency["all"]["matrix"])
    im = ax0.imshow(mat, cmap="viridis")
    k = mat.shape[0]
    ax0.set_xticks(range(k), [class_names[i] for i in range(k)], rotation=60, ha="right", fontsize=7)
    ax0.set_yticks(range(k), [class_names[i] for i in range(k)], fontsize=7)
    ax0.set_xlabel(f"class ({s['settings']['class_source']})")
    ax0.set_ylabel(f"class ({s['settings']['class_source']})")
    ax0.set_title("crossing-profile cosine similarity, all taps\n(diagonal: pairs within a class)", fontsize=9)
    fig.colorbar(im, ax=ax0, label="cosine similarity")
    keys = [*names, "all"]
    within = [consistency[t]["within"] for t in keys]
    between = [consistency[t]["between"] for t in keys]
    xs = np.arange(len(keys))
    ax1.bar(xs - 0.2, within, 0.4, label="within class")
    ax1.bar(xs + 0.2, between, 0.4, label="between classes")
    null_w = [consistency[t]["between"] + consistency[t]["null_mean"] for t in keys]
    err = [2 * consistency[t]["null_std"] for t in keys]
    ax1.errorbar(xs - 0.2, null_w, yerr=err, fmt="k_", capsize=4, label="within, shuffled classes (±2 sd)")
    for xi, t in zip(xs, keys):
        p_txt = _p_phrase(consistency[t]["p_permutation"], 1 / (1 + s["settings"]["permutations"]))
        ax1.text(xi, max(within[xi], between[xi]) + 0.02, p_txt, ha="center", fontsize=7)
    ax1.set_xticks(xs, keys)
    ax1.set_xlabel("tap")
    ax1.set_ylabel("mean cosine similarity")
    ax1.set_ylim(0, 1.1)
    ax1.set_title("per-tap crossing profiles: within vs between classes", fontsize=9)
    ax1.legend(fontsize=7, loc="lower right")
    save_figure(fig, out / "diffusion_similarity.png", dpi=120, pad_inches=0.1)

    # 4. Clean vs perturbed.
    kinds = ["clean", *PERTURBATIONS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    for ax, key, label in (
        (axes[0], "large_crossings", "large crossings per image"),
        (axes[1], "total_mass", "total impulse mass per image"),
    ):
        ax.boxplot([stats[kd][key] for kd in kinds], showfliers=False)
        ax.set_xticks(
            range(1, len(kinds) + 1),
            [
                kd if kd == "clean" else f"{kd}\nAUROC {s['perturbations'][kd]['auroc_vs_clean'][key]:.2f}"
                for kd in kinds
            ],
        )
        ax.set_xlabel("input")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: clean vs perturbed", fontsize=9)
    save_figure(fig, out / "diffusion_perturbations.png", dpi=120, pad_inches=0.1)
