"""Tap hooks: named modules of a target whose outputs are read (features) and masked (pathways).

A mask ``m_l: [B, C_l]`` multiplies the tap output channel-wise, broadcast over space (``[B, C, H, W]``) or
tokens (``[B, N, C]``). Masked channels are zeroed (the critical-pathway convention) or, with mean
ablation, set to a per-channel fill value (the dataset-mean activation): ``out * m + fill * (1 - m)``.

Hooks live in context managers (``FeatureTaps``, ``MaskedForward``) that remove them in ``finally``, and in
``TapHooks``, registered once per run and driven through a state holder (what ``torch.compile`` and hot
loops want).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "TapHooks",
    "FeatureTaps",
    "MaskedForward",
    "resolve_taps",
    "split_shallow_deep",
    "apply_mask",
    "trace_modules",
    "discover_taps",
    "feature_info_taps",
    "channel_dim",
    "channel_means",
    "space_reduce",
    "forward_hooked",
    "unknown_tap_message",
]


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


def space_reduce(out: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """``out.mean`` (or ``.sum``) over space or tokens: ``[B, C, H, W]`` and tokens ``[B, N, C]`` give ``[B, C]``;
    a ``[B, C]`` output is returned as it is."""
    if out.dim() == 4:
        return getattr(out, how)(dim=(2, 3))
    if out.dim() == 3:
        return getattr(out, how)(dim=1)
    return out


def channel_means(out: torch.Tensor) -> torch.Tensor:
    """Per-sample channel means ``[B, C]`` of a tap output (space/token average)."""
    return space_reduce(out, "mean")


def forward_hooked(model: nn.Module, hooks: Sequence[tuple[nn.Module, Callable]], input_shape: Sequence[int]) -> None:
    """Run ``model`` once on zeros ``[1, *input_shape]`` (no grad) with forward hooks ``(module, fn)`` registered;
    the hooks are removed afterwards, errors included."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()


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
                raise TypeError(
                    f"tap '{self.names[i]}' returns {type(out).__name__}, not a tensor; tap a module returning one."
                )
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


class _TapContext:
    """Hooks registered on entering the block and removed on leaving it; ``features`` holds the recorded outputs."""

    model: nn.Module
    names: list[str]
    hooks: TapHooks | None

    def _start(self, hooks: TapHooks) -> None:
        hooks.start(record=True)

    def __enter__(self):
        self.hooks = TapHooks(self.model, self.names)
        self._start(self.hooks)
        return self

    @property
    def features(self) -> list[torch.Tensor]:
        return self.hooks.features

    def __exit__(self, *exc) -> None:
        self.hooks.remove()


class FeatureTaps(_TapContext):
    """Context manager recording tap outputs: ``with FeatureTaps(model, names) as ft: model(x); ft.features``."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model, self.names = model, list(names)
        self.hooks: TapHooks | None = None


class MaskedForward(_TapContext):
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

    def _start(self, hooks: TapHooks) -> None:
        hooks.start(record=self.record, masks=self.masks, fill=self.fill)


def unknown_tap_message(model: nn.Module, missing: Sequence[str]) -> str:
    names = [n for n, _ in model.named_modules() if n]
    shown = getattr(model, "default_taps", None) or [n for n in names if "." not in n]
    close = sorted({c for m in missing for c in difflib.get_close_matches(m, names, n=3, cutoff=0.5)})
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return (
        f"tap {', '.join(repr(m) for m in missing)} not found in {type(model).__name__}; available taps: "
        f"{', '.join(shown)}.{hint} Use dotted module paths (model.named_modules()), or taps: auto."
    )


# Modules whose outputs are not feature maps worth a pathway: global pooling, heads, no-ops.
_NOT_TAPS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Linear,
    nn.Dropout,
    nn.Identity,
)


def trace_modules(model: nn.Module, input_shape: Sequence[int]) -> list[dict]:
    """Run ``model`` once on zeros ``[1, *input_shape]`` and describe every submodule's output, in completion order.

    Returns:
        One dict per module that returned a tensor: ``name``, ``type``, ``shape`` (without batch), ``channels``
        (``C`` of ``[C, H, W]`` or of tokens ``[N, C]``; ``None`` otherwise), ``reduction`` (input side over output
        side for feature maps), ``calls`` (a module run more than once cannot be a tap), ``leaf``, ``same_as``
        (the module completing just before with the very same output tensor, e.g. a Sequential's last child).
    """
    shape = tuple(int(v) for v in input_shape)
    records: dict[str, dict] = {}
    calls: dict[str, int] = {}
    outs: list[torch.Tensor] = []  # kept alive so tensor ids stay unique during the trace
    last_by_id: dict[int, str] = {}

    def make_hook(name: str, module: nn.Module):
        def hook(m, args, out):
            calls[name] = calls.get(name, 0) + 1
            if not isinstance(out, torch.Tensor) or name in records:
                return
            outs.append(out)
            feat = out.shape[1:]
            chans = int(feat[0]) if len(feat) == 3 else int(feat[-1]) if len(feat) == 2 else None
            red = max(1, round(shape[-1] / int(feat[-1]))) if len(feat) == 3 and feat[-1] else None
            records[name] = {
                "name": name,
                "type": type(module).__name__,
                "shape": tuple(int(v) for v in feat),
                "channels": chans,
                "reduction": red,
                "leaf": not any(True for _ in module.children()),
                "skip": isinstance(module, _NOT_TAPS),
                "same_as": last_by_id.get(id(out)),
            }
            last_by_id[id(out)] = name

        return hook

    was = model.training
    model.eval()
    try:
        forward_hooked(model, [(m, make_hook(n, m)) for n, m in model.named_modules() if n], shape)
    finally:
        model.train(was)
    for r in records.values():
        r["calls"] = calls.get(r["name"], 0)
    return list(records.values())


def _tappable(r: dict) -> bool:
    return r["calls"] == 1 and r["channels"] is not None and not r["skip"] and len(r["shape"]) in (2, 3)


def _drop_stem(picks: list[dict], keep: int = 2) -> list[dict]:
    # A stem at reduction <= 2 carries little of a pathway; left out only when `keep` or more taps remain.
    rest = [r for r in picks if r["reduction"] is None or r["reduction"] > 2]
    return rest if len(rest) >= keep else picks


def _last_per_resolution(records: list[dict]) -> list[dict]:
    """The last record at each output resolution (stage outputs), in order."""
    last: dict[tuple, dict] = {}
    for r in records:
        last[r["shape"][1:]] = r
    keep = {id(r) for r in last.values()}
    return [r for r in records if id(r) in keep]


def discover_taps(model: nn.Module, input_shape: Sequence[int], trace: list[dict] | None = None) -> list[str]:
    """``taps: auto`` for a model without ``default_taps`` or ``feature_info``: its blocks, from one traced forward.

    Single-child wrappers are looked through. Then (1) the model's top-level blocks (non-leaf children returning
    feature maps or tokens: ``layer1..4`` of a ResNet, your own ``stem, block1, ...``) when there are at least three
    (the last at each resolution when more than eight); else (2) the children of the trunk, the module whose
    children span the most output resolutions (then: the most children): the last child at each resolution (VGG,
    MobileNet, EfficientNet, ConvNeXt, DenseNet, RegNet...), or, for token models, every child of the module with
    the most token-returning children (ViT encoder blocks). Stems at reduction <= 2 are left out when three or more
    taps remain. Modules run more than once, global pooling,
    heads and modules not returning a tensor are never taps.
    """
    trace = trace if trace is not None else trace_modules(model, input_shape)
    ok = {r["name"]: r for r in trace if _tappable(r)}

    def kids(name: str, module: nn.Module) -> list[dict]:
        return [
            ok[f"{name}.{k}" if name else k] for k, _ in module.named_children() if (f"{name}.{k}" if name else k) in ok
        ]

    name, node = "", model
    while len(list(node.children())) == 1:  # e.g. gencnp's TorchvisionTarget / TimmTarget wrappers (``model``)
        child_name, node = next(iter(node.named_children()))
        name = f"{name}.{child_name}" if name else child_name
    top = [r for r in kids(name, node) if not r["leaf"]]
    if len(top) >= 3:
        return [r["name"] for r in _drop_stem(top if len(top) <= 8 else _last_per_resolution(top), keep=3)]
    tokens = sum(len(r["shape"]) == 2 for r in ok.values()) > sum(len(r["shape"]) == 3 for r in ok.values())
    best, best_key = None, (0, 0)
    for n, m in model.named_modules():
        children = [r for r in kids(n, m) if (len(r["shape"]) == 2) == tokens]
        key = (len({r["shape"][1:] for r in children}), len(children))
        if len(children) >= 2 and key > best_key:
            best, best_key = children, key
    if best is None:
        return [r["name"] for r in top] if len(top) >= 2 else []
    if tokens:
        return [r["name"] for r in best]
    return [r["name"] for r in _drop_stem(_last_per_resolution(best), keep=3)]


def feature_info_taps(info, prefix: str = "") -> list[str]:
    """Tap names from timm's ``feature_info`` (every level; a stem at reduction <= 2 left out when two or more
    levels remain)."""
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    picks = [{"name": prefix + e["module"], "reduction": e.get("reduction")} for e in entries if e.get("module")]
    return [p["name"] for p in _drop_stem(picks)]


def resolve_taps(
    model: nn.Module, taps: str | Sequence[str] = "auto", input_shape: Sequence[int] | None = None
) -> list[str]:
    """Tap names: explicit dotted paths, or ``'auto'``: ``default_taps``, then timm's ``feature_info``, then blocks
    found by tracing one forward on ``input_shape`` (``discover_taps``). ``'auto:0,2,-1'`` keeps those positions of
    the ``auto`` list (timm's ``out_indices`` habit)."""
    if isinstance(taps, str) and taps != "auto" and not taps.startswith("auto:"):
        taps = [t.strip() for t in taps.split(",") if t.strip()]
    if isinstance(taps, str):
        names = list(getattr(model, "default_taps", None) or [])
        if not names:
            info = getattr(model, "feature_info", None)
            if info is not None:
                names = feature_info_taps(info)
        if not names and input_shape is not None:
            names = discover_taps(model, input_shape)
        if not names:
            raise ValueError(
                f"taps: auto found no blocks in {type(model).__name__}; name the taps explicitly, e.g. "
                f"taps: [{', '.join(n for n, _ in list(model.named_children())[:3])}] "
                "(python evaluate.py taps --target ... lists the candidates)."
            )
        if taps.startswith("auto:"):
            try:
                idx = [int(i) for i in taps[5:].split(",") if i.strip()]
                names = [names[i] for i in idx]
            except (ValueError, IndexError) as err:
                raise ValueError(
                    f"taps '{taps}': expected 'auto:i,j,...' with positions in the auto list {names} "
                    f"(0 to {len(names) - 1}, negative from the end)."
                ) from err
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
