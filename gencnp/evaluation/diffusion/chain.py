"""Tracing a target into the plain chain of modules that pixel diffusion linearises (``trace_chain``).

Supported targets are plain chains of ``SUPPORTED_MODULES``, each run once, with nothing but flattening between
them; up to the last tap only spatial modules. Anything else is refused with the module's name and type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SUPPORTED_MODULES", "UnsupportedModuleError", "Step", "trace_chain"]

SUPPORTED_MODULES = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Linear,
    nn.Dropout,
    nn.Identity,
)
_SPATIAL = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Identity)


class UnsupportedModuleError(TypeError):
    """The target holds a module the frozen linearisation does not know."""


@dataclass
class Step:
    """One module of the chain, with the spatial sizes it saw on the probe input."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]  # per-sample input shape
    out_shape: tuple[int, ...]  # per-sample output shape
    tap: int | None = None  # index of the tap whose output this step produces


def trace_chain(model: nn.Module, tap_names: Sequence[str], input_shape: Sequence[int]) -> list[Step]:
    """The chain of steps one seeded probe forward of ``model`` runs, with the taps marked.

    Raises:
        KeyError: a tap is not a module of ``model``.
        UnsupportedModuleError: a module of another type runs in the forward.
        ValueError: the forward is not a plain chain, a module runs twice, BatchNorm is in training mode, or a tap
            is not the output of one of the chain's modules.
    """
    tap_names = list(tap_names)
    modules = dict(model.named_modules())
    missing = [t for t in tap_names if t not in modules]
    if missing:
        raise KeyError(f"taps {missing} not found in {type(model).__name__}; name block outputs, e.g. 'blocks.0'.")
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and m.training:
            raise ValueError(
                f"BatchNorm '{n}' is in training mode; call model.eval() (or wrap it in FrozenTarget) first."
            )
    x0, y0, records, tap_out = _record(model, [modules[t] for t in tap_names], tuple(input_shape))
    _check_modules(records, type(model).__name__)
    steps = _chain(records, x0, y0)
    for ti, t in enumerate(tap_names):
        hit = [i for i, (_, _, _, o) in enumerate(records) if o is tap_out.get(ti)]
        if not hit:
            raise ValueError(f"tap '{t}' is not the output of a module of the chain; tap block outputs.")
        steps[hit[-1]].tap = ti
    order = [s.tap for s in steps if s.tap is not None]
    if order != sorted(order) or len(order) != len(tap_names):
        raise ValueError(
            f"taps {tap_names} are not in depth order (or two taps share an output); list them shallow to deep."
        )
    _check_before_last_tap(steps)
    return steps


def _record(model: nn.Module, taps: list[nn.Module], input_shape: tuple[int, ...]) -> tuple:
    """One forward on a seeded probe ``[2, *input_shape]``: the probe, the output, ``(name, module, input, output)``
    per leaf call in run order, and each tap module's output by tap index."""
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    if isinstance(model, SUPPORTED_MODULES) and not list(model.children()):
        leaves = [("", model)]
    records: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    tap_out: dict[int, torch.Tensor] = {}
    handles = []
    for name, mod in leaves:
        handles.append(mod.register_forward_hook(lambda m, a, o, name=name: records.append((name, m, a[0], o))))
    for ti, mod in enumerate(taps):
        handles.append(mod.register_forward_hook(lambda m, a, o, ti=ti: tap_out.__setitem__(ti, o)))
    p = next(iter(model.parameters()), None)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *input_shape, generator=g).to(
        device=p.device if p is not None else "cpu", dtype=p.dtype if p is not None else torch.float32
    )
    try:
        with torch.no_grad():
            y0 = model(x0)
    finally:
        for h in handles:
            h.remove()
    return x0, y0, records, tap_out


def _check_modules(records: list[tuple], model_name: str) -> None:
    """Every recorded leaf call is a supported module, run once."""
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
        raise ValueError(f"{model_name} ran no leaf module; nothing to linearise.")


def _chain(records: list[tuple], x0: torch.Tensor, y0: torch.Tensor) -> list[Step]:
    """The recorded calls as steps, checked to form a plain chain from the probe ``x0`` to the output ``y0``."""
    steps: list[Step] = []
    prev: torch.Tensor = x0
    prev_name = "<input>"
    for name, mod, inp, out in records:
        same = inp is prev or (inp.shape == prev.shape and inp.data_ptr() == prev.data_ptr())
        flat = (
            isinstance(mod, (nn.Linear, nn.Flatten))
            and inp.dim() == 2
            and inp.shape[1] == prev[0].numel()
            and torch.equal(inp, prev.flatten(1))
        )
        if not (same or flat):
            raise ValueError(
                f"module '{name}' does not receive the output of '{prev_name}' (the forward has a skip connection "
                "or a functional op between them); pixel diffusion supports plain chains of modules only."
            )
        steps.append(Step(name, mod, tuple(inp.shape[1:]), tuple(out.shape[1:])))
        prev, prev_name = out, name
    if not (y0 is prev or (y0.shape == prev.shape and torch.equal(y0, prev))):
        raise ValueError(
            f"the model's output is not the output of its last module '{prev_name}' (a functional op "
            "follows it); pixel diffusion supports plain chains of modules only."
        )
    return steps


def _check_before_last_tap(steps: list[Step]) -> None:
    """Up to the last tap the chain holds spatial modules only, zero-padded convolutions and BatchNorm with statistics."""
    last_tap = max(i for i, s in enumerate(steps) if s.tap is not None)
    for s in steps[: last_tap + 1]:
        if not isinstance(s.module, _SPATIAL):
            raise ValueError(
                f"module '{s.name}' ({type(s.module).__name__}) comes before the last tap; taps must be "
                "feature maps ahead of pooling and the head."
            )
        if isinstance(s.module, nn.Conv2d) and s.module.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"Conv2d '{s.name}' uses padding_mode='{s.module.padding_mode}'; only zero padding is supported."
            )
        if isinstance(s.module, nn.BatchNorm2d) and s.module.running_var is None:
            raise ValueError(
                f"BatchNorm '{s.name}' has no running statistics (track_running_stats=False); it is not affine per input."
            )
