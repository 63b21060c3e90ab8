"""Taps: named modules of a target whose outputs are read (features) and masked (pathways).

A mask ``m_l: [B, C_l]`` multiplies the tap output channel-wise, broadcast over space (``[B, C, H, W]``) or
tokens (``[B, N, C]``). Masked channels are zeroed (the critical-pathway convention) or, with mean
ablation, set to a per-channel fill value (the dataset-mean activation): ``out * m + fill * (1 - m)``.

Hooks live in context managers (``FeatureTaps``, ``MaskedForward``) that remove them in ``finally``, and in
``TapHooks``, registered once per run and driven through a state holder (what ``torch.compile`` and hot
loops want).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["TapHooks", "FeatureTaps", "MaskedForward", "resolve_taps", "split_shallow_deep", "apply_mask"]


def apply_mask(out: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``out * mask`` broadcast over space/tokens; with ``fill [C]``, masked channels take ``fill``.

    Args:
        out: ``[B, C, H, W]`` or ``[B, N, C]`` tap output.
        mask: ``[B, C]`` in ``[0, 1]`` (or ``[C]`` shared by the batch).
        fill: optional ``[C]`` value of a removed channel (mean ablation).
    """
    if out.dim() == 4:
        shape = (mask.shape[0], -1, 1, 1) if mask.dim() == 2 else (1, -1, 1, 1)
    elif out.dim() == 3:
        shape = (mask.shape[0], 1, -1) if mask.dim() == 2 else (1, 1, -1)
    elif out.dim() == 2:
        shape = (mask.shape[0], -1) if mask.dim() == 2 else (1, -1)
    else:
        raise ValueError(f"cannot mask a tap output of shape {tuple(out.shape)}; expected [B,C,H,W], [B,N,C] or [B,C].")
    m = mask.to(out.dtype).reshape(shape)
    if fill is None:
        return out * m
    f = fill.to(out.dtype).reshape((1, -1, 1, 1) if out.dim() == 4 else (1, 1, -1) if out.dim() == 3 else (1, -1))
    # One pass and one allocation over the feature map instead of two (fill * (1 - m) is only [B, C, 1, 1]). For
    # binary masks the result equals out * m + fill * (1 - m) bit for bit (each element is out + 0 or 0 + fill).
    return torch.addcmul(f * (1 - m), out, m)


def channel_dim(out: torch.Tensor) -> int:
    """Channel axis of a tap output: 1 for ``[B, C, H, W]`` and ``[B, C]``, -1 for tokens ``[B, N, C]``."""
    return -1 if out.dim() == 3 else 1


def channel_means(out: torch.Tensor) -> torch.Tensor:
    """Per-sample channel means ``[B, C]`` of a tap output (space/token average)."""
    if out.dim() == 4:
        return out.mean(dim=(2, 3))
    if out.dim() == 3:
        return out.mean(dim=1)
    return out


class TapHooks:
    """One forward hook per tap, registered once; behaviour comes from ``record``, ``masks`` and ``fill``.

    Set the state, run the model, read ``features``, then ``clear()``; use it inside ``try/finally`` (see
    ``FrozenTarget.forward``). A tap firing twice in one forward is refused: a module reused inside its
    parent (torchvision's ResNet ReLU) cannot be masked per position.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.names = list(names)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(unknown_tap_message(model, missing))
        self.record = False
        self.masks: Sequence[torch.Tensor] | None = None
        self.fill: Sequence[torch.Tensor | None] | None = None
        self.features: list[torch.Tensor | None] = [None] * len(self.names)
        self._calls = [0] * len(self.names)
        self._first = modules[self.names[0]]
        # The first tap's module can be skipped (its output given) only when no other tap lives inside it.
        self.can_skip_first = bool(self.names[0]) and not any(n.startswith(self.names[0] + ".") for n in self.names[1:])
        self._skipping, self._saved_forward = False, None
        self._handles = [modules[n].register_forward_hook(self._hook(i)) for i, n in enumerate(self.names)]

    def _hook(self, i: int):
        def hook(module, args, out):
            self._calls[i] += 1
            if self._calls[i] > 1:
                parent = self.names[i].rpartition(".")[0] or "<the block containing it>"
                raise ValueError(
                    f"tap '{self.names[i]}' ran {self._calls[i]} times in one forward (the module is reused); "
                    f"tap a block output instead, e.g. '{parent}'."
                )
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"tap '{self.names[i]}' returns {type(out).__name__}, not a tensor; tap a module returning one.")
            if self.masks is not None and self.masks[i] is not None:
                fill = self.fill[i] if self.fill is not None else None
                out = apply_mask(out, self.masks[i], fill)
            if self.record:
                self.features[i] = out
            return out if self.masks is not None else None

        return hook

    def start(self, record: bool = False, masks=None, fill=None, first: torch.Tensor | None = None) -> None:
        """Set the state of the next forward.

        Args:
            record: keep every tap output (after masking) in ``features``.
            masks: per-tap masks (``None`` entries leave a tap alone), or ``None``.
            fill: per-tap fill values of removed channels (mean ablation), or ``None``.
            first: the first tap's unmasked output for this input (e.g. ``features[0]`` of an earlier pass on the
                same input): the first tap's module is not run, its output is ``first`` (then masked). Ignored when
                ``can_skip_first`` is False. Call ``clear()`` in ``finally``: it restores the module.
        """
        self.record, self.masks, self.fill = record, masks, fill
        self._calls = [0] * len(self.names)
        self.features = [None] * len(self.names)
        if first is not None and self.can_skip_first:
            self._saved_forward = self._first.__dict__.get("forward")
            self._first.forward = lambda *args, **kwargs: first  # an instance attribute shadows the class's forward
            self._skipping = True

    def clear(self) -> None:
        if self._skipping:
            if self._saved_forward is None:
                del self._first.forward
            else:
                self._first.forward = self._saved_forward
            self._skipping, self._saved_forward = False, None
        self.record, self.masks, self.fill = False, None, None
        self.features = [None] * len(self.names)
        self._calls = [0] * len(self.names)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class FeatureTaps:
    """Context manager recording tap outputs: ``with FeatureTaps(model, names) as ft: model(x); ft.features``."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model, self.names = model, list(names)
        self.hooks: TapHooks | None = None

    def __enter__(self) -> FeatureTaps:
        self.hooks = TapHooks(self.model, self.names)
        self.hooks.start(record=True)
        return self

    @property
    def features(self) -> list[torch.Tensor]:
        return self.hooks.features

    def __exit__(self, *exc) -> None:
        self.hooks.remove()


class MaskedForward:
    """Context manager masking tap outputs: ``with MaskedForward(model, names, masks): logits = model(x)``.

    Args:
        masks: one ``[B, C_l]`` (or ``[C_l]``) mask per tap, ``None`` to leave a tap alone.
        fill: optional per-tap ``[C_l]`` values for masked channels (mean ablation); zero when ``None``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], masks, fill=None, record: bool = False):
        self.model, self.names, self.masks, self.fill, self.record = model, list(names), masks, fill, record
        self.hooks: TapHooks | None = None
        if len(masks) != len(self.names):
            raise ValueError(f"got {len(masks)} masks for {len(self.names)} taps ({', '.join(self.names)}).")

    def __enter__(self) -> MaskedForward:
        self.hooks = TapHooks(self.model, self.names)
        self.hooks.start(record=self.record, masks=self.masks, fill=self.fill)
        return self

    @property
    def features(self) -> list[torch.Tensor]:
        return self.hooks.features

    def __exit__(self, *exc) -> None:
        self.hooks.remove()


def unknown_tap_message(model: nn.Module, missing: Sequence[str]) -> str:
    import difflib

    names = [n for n, _ in model.named_modules() if n]
    shown = getattr(model, "default_taps", None) or [n for n in names if "." not in n]
    close = sorted({c for m in missing for c in difflib.get_close_matches(m, names, n=3, cutoff=0.5)})
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return (
        f"tap {', '.join(repr(m) for m in missing)} not found in {type(model).__name__}; available taps: "
        f"{', '.join(shown)}.{hint} Use dotted module paths (model.named_modules()), or taps: auto."
    )


def resolve_taps(model: nn.Module, taps: str | Sequence[str] = "auto") -> list[str]:
    """Tap names: explicit dotted paths, or ``'auto'`` (``default_taps``, then timm's ``feature_info``)."""
    if isinstance(taps, str) and taps != "auto":
        taps = [t.strip() for t in taps.split(",") if t.strip()]
    if isinstance(taps, str):
        names = list(getattr(model, "default_taps", None) or [])
        if not names:
            info = getattr(model, "feature_info", None)
            if info is not None:
                entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
                names = [e["module"] for e in entries if e.get("module")]
        if not names:
            raise ValueError(
                f"taps: auto found no feature_info on {type(model).__name__}; name the taps explicitly, e.g. "
                f"taps: [{', '.join(n for n, _ in list(model.named_children())[:3])}]."
            )
        # timm lists the stem activation first; it is too shallow to carry a pathway, but keep what users name.
        return names
    names = list(taps)
    if not names:
        raise ValueError("taps is empty; name at least one module, or use taps: auto.")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(unknown_tap_message(model, missing))
    return names


def split_shallow_deep(names: Sequence[str], shallow: Sequence[str] | int | None = None) -> tuple[list[str], list[str]]:
    """Shallow taps are the first ``ceil(L/2)`` unless named (or counted) explicitly; the rest are deep."""
    names = list(names)
    if len(names) < 2:
        raise ValueError(f"GEN-CNP needs at least 2 taps (one shallow, one deep), got {names}.")
    if shallow is None:
        k = math.ceil(len(names) / 2)
    elif isinstance(shallow, int):
        k = shallow
    else:
        shallow = list(shallow)
        if shallow != names[: len(shallow)]:
            raise ValueError(f"shallow taps {shallow} must be the first taps in depth order {names}.")
        k = len(shallow)
    if not 1 <= k < len(names):
        raise ValueError(f"need 1 to {len(names) - 1} shallow taps out of {len(names)}, got {k}.")
    return names[:k], names[k:]
