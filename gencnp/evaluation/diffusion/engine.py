"""The pixel diffusion engine (Lyu, Pang, Wang, "Understanding the Role of Pathways in a Deep Neural Network",
Neural Networks 2024, arXiv 2402.18132; docs/design.md section 9): ``PixelDiffusion`` and its kernels. Plain
PyTorch: no Lightning, data or bank imports here.

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
Anything else is refused with the module's name and type (``chain.trace_chain``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gencnp.evaluation.diffusion.chain import UnsupportedModuleError, trace_chain

__all__ = ["PixelDiffusion", "FrozenPattern", "Window", "exact_pathways"]


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
        self.steps = trace_chain(model, self.tap_names, self.input_shape)
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

    def _apply(
        self,
        i: int,
        win: Window,
        pattern: FrozenPattern,
        img: torch.Tensor,
        channels: torch.Tensor | None = None,
        owned: bool = False,
    ) -> Window:
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
            return self._spatial(i, win, data, pattern, img, channels)
        if isinstance(m, nn.BatchNorm2d):
            scale = _bn_scale(m).to(data.dtype)[None, None, :, None, None]
            return Window(data.mul_(scale) if owned else data * scale, win.top, win.left, win.size)
        if isinstance(m, nn.ReLU):
            mask = _gather_state(pattern.masks[i], img, win.top, win.left, h, w)[:, None]
            return Window(data.mul_(mask) if owned else data * mask, win.top, win.left, win.size)
        if isinstance(m, (nn.Dropout, nn.Identity)):
            return win
        raise ValueError(f"step '{s.name}' ({type(m).__name__}) cannot run on a window.")  # pragma: no cover

    def _spatial(
        self, i: int, win: Window, data: torch.Tensor, pattern: FrozenPattern, img: torch.Tensor, channels
    ) -> Window:
        """Step ``i`` when it is a ``Conv2d`` or ``MaxPool2d``: the output window the input window reaches, then the
        convolution (fused with a one-channel restriction when ``channels`` is set) or the recorded max switches."""
        s = self.steps[i]
        m = s.module
        n, g, c, h, w = data.shape
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
                cols = torch.stack(
                    [
                        r2[
                            :,
                            a * d_h : a * d_h + (sz_h - 1) * s_h + 1 : s_h,
                            b * d_w : b * d_w + (sz_w - 1) * s_w + 1 : s_w,
                        ]
                        for a in range(k_h)
                        for b in range(k_w)
                    ],
                    1,
                ).reshape(n * gg, k_h * k_w, sz_h * sz_w)
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
        rel = (rh.clamp(0, h - 1) * w + rw.clamp(0, w - 1)).reshape(n, 1, c, sz_h * sz_w).expand(n, g, c, sz_h * sz_w)
        out = data.reshape(n, g, c, h * w).gather(3, rel).reshape(n, g, c, sz_h, sz_w)
        return Window(out.mul_(valid[:, None]), top, left, (out_h, out_w))

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
                raise UnsupportedModuleError(
                    f"module '{s.name}' ({type(m).__name__}) after the last tap needs a frozen "
                    "pattern; only pooling, Flatten, Linear and Conv2d may follow the last tap."
                )
        return h.reshape(n, g, -1)

    def segment(
        self,
        tap: int | None,
        win: Window,
        pattern: FrozenPattern,
        img: torch.Tensor,
        channels: torch.Tensor | None = None,
    ) -> Window:
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
    def pathways(
        self, pattern: FrozenPattern, img: torch.Tensor, pos: torch.Tensor, top_k: int = 5, beam_width: int = 16
    ) -> dict[str, Any]:
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
            links = torch.cat(
                [
                    links.gather(1, parent[:, :, None].expand(-1, -1, links.shape[2])),
                    tr.reshape(n, -1).gather(1, flat)[:, :, None],
                ],
                2,
            )
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
def exact_pathways(
    engine: PixelDiffusion, pattern: FrozenPattern, img: torch.Tensor, pos: torch.Tensor, top_k: int = 5
) -> dict[str, torch.Tensor]:
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
