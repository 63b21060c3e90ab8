"""Taps: named modules of a target whose outputs are read (features) and masked (pathways).

The hooks themselves live in ``gencnp.targets.hooks`` (re-exported here); this module adds ``list_taps``, the
``python evaluate.py taps`` listing of a model's candidate taps.
"""

from __future__ import annotations

from gencnp.targets import hooks
from gencnp.targets.hooks import *  # noqa: F403  (taps re-exports every name of the hooks)
from gencnp.targets.hooks import resolve_taps, trace_modules
from gencnp.targets.loading import build_target

__all__ = [*hooks.__all__, "list_taps"]


def list_taps(
    target: str | dict = "fmnist_cnn",
    target_checkpoint: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    image_size: int | None = None,
    model_kwargs: dict | None = None,
    taps: str = "auto",
    all: bool = False,
) -> str:  # noqa: A002  (a CLI flag: --all)
    """A model's candidate taps with their channels, and what ``taps`` (default ``auto``) picks.

    ``python evaluate.py taps --target resnet18 --in_chans 3 --image_size 64`` (or ``--target_checkpoint FILE``,
    whose recorded spec gives the rest). Lists block-level modules (and every tappable module with ``--all true``);
    modules run more than once per forward are marked: they cannot be taps.
    """
    model, spec, _ = build_target(target, target_checkpoint, num_classes, in_chans, image_size, model_kwargs)
    shape = (spec["in_chans"], spec["image_size"], spec["image_size"])
    trace = trace_modules(model, shape)
    picked = resolve_taps(model, taps, shape)
    depth = max((n.count(".") for n in picked), default=0) + 1
    rows = [
        r
        for r in trace
        if r["channels"] is not None
        and len(r["shape"]) in (2, 3)
        and not r["skip"]
        and (all or r["name"] in picked or (not r["leaf"] and r["name"].count(".") <= depth))
    ]
    lines = [
        f"target {spec['arch']} on inputs {shape} (C, H, W); taps '{taps}' picks {len(picked)}: {', '.join(picked)}",
        f"{'':2}{'module':<48} {'type':<24} {'output':<18} {'channels':>8} {'reduction':>9}",
    ]
    for r in rows:
        mark = "*" if r["name"] in picked else ("x" if r["calls"] != 1 else " ")
        red = "tokens" if len(r["shape"]) == 2 else str(r["reduction"])
        lines.append(f"{mark:2}{r['name']:<48} {r['type']:<24} {str(list(r['shape'])):<18} {r['channels']:>8} {red:>9}")
    lines.append(
        "* picked; x run more than once per forward (not tappable). Name taps in the config "
        "(taps: [a, b, ...]) or pick positions of the auto list: taps: 'auto:0,2,-1'."
    )
    text = "\n".join(lines)
    print(text)
    return text
