"""Target loading and ``FrozenTarget``: checkpoints into models, the target spec checkpoints record, and the frozen
classifier GEN-CNP explains.

Models come from ``gencnp.targets.zoo`` (names, timm, torchvision, class paths; every name is re-exported here);
checkpoint files are read by ``gencnp.io.checkpoints.read_state_dict`` (no Lightning import).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from gencnp.io.checkpoints import read_state_dict, state_hash
from gencnp.targets.hooks import TapHooks, forward_hooked, resolve_taps, split_shallow_deep
from gencnp.targets.zoo import (  # noqa: F401  (re-exported: targets is where callers and configs find them)
    TARGETS,
    ChannelToy,
    ConvBlockNet,
    TimmTarget,
    TorchvisionTarget,
    arch_name,
    channel_toy,
    channel_toy_batch,
    create_target,
    fmnist_cnn,
    list_targets,
    register_target,
    small_cnn,
    tiny_cnn,
)

__all__ = [
    "register_target",
    "create_target",
    "list_targets",
    "load_weights",
    "load_target",
    "FrozenTarget",
    "tensor_hash",
    "ConvBlockNet",
    "TargetSpec",
    "arch_name",
    "read_target_spec",
    "resolve_target_spec",
    "check_input_size",
    "read_state_dict",
]


def load_weights(model: nn.Module, path: str | Path, arch: str | Mapping | None = None) -> dict:
    """Load a checkpoint into ``model``, stripping a Lightning prefix (``model.``, ``target.model.``, ...).

    Raises:
        ValueError: listing missing keys, unexpected keys and shape mismatches (e.g. a class-count mismatch).
    """
    state, meta = read_state_dict(path)
    _load_state(model, state, meta, path, arch)
    return meta


def _load_state(model: nn.Module, state: dict, meta: dict, path, arch) -> None:
    own = model.state_dict()
    best, best_hits = state, -1
    prefixes = {""} | {k[: k.index(".") + 1] for k in state if "." in k}
    prefixes |= {"target.model.", "model.model.", "module."}
    for prefix in prefixes:
        cand = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        hits = len(own.keys() & cand.keys())
        if hits > best_hits:
            best, best_hits = cand, hits
    # The other way round: a plain torchvision/timm state dict ("conv1.weight") for a wrapper ("model.conv1.weight").
    for prefix in {k[: k.index(".") + 1] for k in own if "." in k}:
        cand = {prefix + k: v for k, v in state.items()}
        hits = len(own.keys() & cand.keys())
        if hits > best_hits:
            best, best_hits = cand, hits
    detail = state_mismatch(own, best)
    if detail:
        ck_arch = (meta.get("hyper_parameters") or {}).get("arch")
        parts = [f"checkpoint '{path}' does not fit target '{arch_name(arch) if arch else type(model).__name__}'"]
        if ck_arch and arch and ck_arch != arch:
            parts.append(f"(it was trained for arch '{arch_name(ck_arch)}')")
        if any(d.startswith("shape mismatches") for d in detail):
            if any(
                k.endswith(("head.weight", "head.bias", "fc.weight", "fc.bias", "classifier.weight"))
                for k in best.keys() & own.keys()
            ):
                detail.append("a head mismatch usually means num_classes differs between the checkpoint and the config")
        raise ValueError(
            " ".join(parts) + ": " + "; ".join(detail) + ". Use the matching arch/num_classes or another checkpoint."
        )
    model.load_state_dict(best)


def state_mismatch(own: dict, state: dict, limit: int = 8) -> list[str]:
    """Why ``state`` does not load into a model whose ``state_dict()`` is ``own``: missing keys, unexpected keys and
    shape mismatches (checkpoint vs model), each as one phrase listing up to ``limit`` entries; empty when it fits."""
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    out = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            sep = "; " if label == "shape mismatches" else ", "
            out.append(f"{label}: {sep.join(items[:limit])}{' ...' if len(items) > limit else ''}")
    return out


def load_target(
    arch: str | Mapping,
    checkpoint: str | None = None,
    num_classes: int = 10,
    in_chans: int | None = 1,
    pretrained: bool = False,
    **kwargs,
) -> nn.Module:
    """``create_target`` plus ``load_weights`` when a checkpoint is given."""
    model = create_target(arch, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint, arch)
    return model


# ----- target specs: how to rebuild a target, recorded in its checkpoints -----
TargetSpec = dict  # {"arch": name or {class_path, init_args}, "num_classes", "in_chans", "image_size", "kwargs"}
SPEC_KEY = "gencnp_target"
SPEC_DEFAULTS = {"arch": "fmnist_cnn", "num_classes": 10, "in_chans": 1, "image_size": 28, "kwargs": {}}


def make_target_spec(
    arch: str | Mapping, num_classes: int, in_chans: int, image_size: int, kwargs: Mapping | None = None
) -> TargetSpec:
    """The spec a target checkpoint records (``checkpoint['gencnp_target']``): enough to rebuild the model."""
    arch = dict(arch) if isinstance(arch, Mapping) else str(arch)
    return {
        "arch": arch,
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "image_size": int(image_size),
        "kwargs": dict(kwargs or {}),
    }


def spec_from_meta(meta: Mapping) -> TargetSpec | None:
    """The target spec of a checkpoint's metadata: its ``gencnp_target`` section, else the hyper-parameters of a
    ``TargetClassifier`` checkpoint (older files); ``None`` for plain state dicts."""
    spec = meta.get(SPEC_KEY)
    if isinstance(spec, Mapping) and "arch" in spec:
        return make_target_spec(
            spec["arch"], spec["num_classes"], spec["in_chans"], spec["image_size"], spec.get("kwargs")
        )
    hp = meta.get("hyper_parameters")
    if isinstance(hp, Mapping) and "arch" in hp and str(hp.get("_class_path", "")).endswith("TargetClassifier"):
        return make_target_spec(
            hp["arch"],
            hp.get("num_classes", 10),
            hp.get("in_chans", 1),
            hp.get("image_size", 28),
            hp.get("model_kwargs"),
        )
    return None


def read_target_spec(path: str | Path) -> TargetSpec | None:
    """The target spec recorded in a checkpoint file (``None`` when it records none, e.g. a plain state dict)."""
    return spec_from_meta(read_state_dict(path)[1])


def _same(key: str, a, b) -> bool:
    if key == "arch":

        def norm(v):
            if isinstance(v, Mapping):
                return (str(v.get("class_path")), dict(v.get("init_args") or {}))
            return str(v).removeprefix("timm:").removeprefix("torchvision:")

        return norm(a) == norm(b)
    if key == "kwargs":
        return dict(a or {}) == dict(b or {})
    return a == b


def resolve_target_spec(
    given: Mapping, recorded: Mapping | None, source: str, names: Mapping | None = None
) -> TargetSpec:
    """Merge explicit target settings with a recorded spec.

    Args:
        given: ``arch``, ``num_classes``, ``in_chans``, ``image_size``, ``kwargs``; ``None`` means "not given".
        recorded: the spec a checkpoint records, or ``None``.
        source: what recorded it, for messages (e.g. "target_checkpoint 'runs/x/best.ckpt'").
        names: the caller's argument name of each key (e.g. ``{"arch": "target", "kwargs": "target_kwargs"}``).

    Raises:
        ValueError: an explicit value differs from the recorded one (the message names both).
    """
    names = {**{k: k for k in SPEC_DEFAULTS}, **(names or {})}
    out = {}
    for key, default in SPEC_DEFAULTS.items():
        value, rec = given.get(key), (recorded or {}).get(key)
        if value is not None and rec is not None and not _same(key, value, rec):
            raise ValueError(
                f"{names[key]} is {value!r} but {source} was trained with {names[key]} {rec!r}; drop {names[key]} "
                f"(it is read from the checkpoint) or set it to {rec!r}, or use a checkpoint trained with {value!r}."
            )
        out[key] = value if value is not None else rec if rec is not None else default
    return make_target_spec(**out)


def build_target(
    arch: str | Mapping | None,
    checkpoint: str | None,
    num_classes: int | None,
    in_chans: int | None,
    image_size: int | None,
    kwargs: Mapping | None = None,
    recorded: Mapping | None = None,
    names: Mapping | None = None,
) -> tuple[nn.Module, TargetSpec, bool]:
    """Build a target from explicit settings, the spec its checkpoint records, and a spec recorded elsewhere.

    Settings left ``None`` come from the checkpoint's spec (``checkpoint['gencnp_target']``), then from
    ``recorded`` (e.g. the spec a GEN-CNP checkpoint stored), then from ``SPEC_DEFAULTS``.

    Returns:
        ``(model, spec, loaded)``; ``loaded`` is False when ``checkpoint`` is missing but ``recorded`` is given: the
        model is built from the spec and its weights must come from elsewhere (a GEN-CNP checkpoint embedding them).
    """
    given = {"arch": arch, "num_classes": num_classes, "in_chans": in_chans, "image_size": image_size, "kwargs": kwargs}
    state, meta, loaded = None, {}, False
    if checkpoint and (Path(checkpoint).is_file() or recorded is None):
        state, meta = read_state_dict(checkpoint)  # FileNotFoundError with the fix when missing
        loaded = True
    file_spec = spec_from_meta(meta) if loaded else None
    if file_spec is not None:
        spec = resolve_target_spec(given, file_spec, f"target_checkpoint '{checkpoint}'", names)
        if recorded is not None:
            resolve_target_spec(spec, recorded, "the GEN-CNP checkpoint's recorded target", names)
    else:
        spec = resolve_target_spec(given, recorded, "the recorded target spec", names)
    model = create_target(spec["arch"], num_classes=spec["num_classes"], in_chans=spec["in_chans"], **spec["kwargs"])
    if loaded:
        _load_state(model, state, meta, checkpoint, spec["arch"])
    return model, spec, loaded or not checkpoint


def check_input_size(model: nn.Module, input_shape: Sequence[int], arch: str | Mapping | None = None) -> None:
    """Run ``model`` once on zeros of ``input_shape`` ``(C, H, W)``; raise ``ValueError`` with the smallest workable
    side when it cannot (e.g. a network that shrinks a 28x28 image to nothing)."""
    shape = tuple(int(s) for s in input_shape)
    err = _probe(model, shape)
    if err is None:
        return
    name = arch_name(arch) if arch is not None else type(model).__name__
    c, h = shape[0], shape[-1]
    sizes = sorted(
        {s for s in (*range(h + 1, h + 33), 32, 48, 64, 96, 112, 128, 160, 192, 224, 256, 288, 384, 512) if s > h}
    )
    works = next((s for s in sizes if _probe(model, (c, s, s)) is None), None)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    fix = (
        f"the smallest square side that works is {works}: set image_size: {works} for the model and the data "
        "(data modules resize: data.init_args.image_size)"
        if works
        else f"no square side up to {sizes[-1]} works either; check in_chans and the model's own size arguments "
        "(e.g. timm img_size in model_kwargs)"
    )
    raise ValueError(
        f"target '{name}' cannot run on inputs of shape {shape} (C, H, W): {first.rstrip('.')}. {fix}."
    ) from err


def _probe(model: nn.Module, shape: tuple[int, ...]) -> Exception | None:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    except (RuntimeError, ValueError, AssertionError, IndexError) as err:  # timm asserts on img_size, convs raise
        return err
    finally:
        model.train(was)
    return None


def tensor_hash(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer (sorted by name): the
    checkpoints' ``state_hash`` of ``module.state_dict()``."""
    return state_hash(module.state_dict())


class _ReachedFirstTap(Exception):
    """Raised by ``FrozenTarget.first_tap_output``'s hook to stop the forward at the first tap."""

    def __init__(self, output: torch.Tensor):
        super().__init__("first tap reached")
        self.output = output


class FrozenTarget(nn.Module):
    """A classifier frozen for explanation: eval mode forever, no gradients to its weights, taps resolved.

    Args:
        model: the classifier ``x [B, C, H, W] -> logits [B, K]``.
        taps: dotted module paths, or ``'auto'``.
        input_shape: ``(C, H, W)`` the target expects; used to measure tap channels and check inputs.
        shallow_taps: names or count of the shallow taps (default: first ``ceil(L/2)``).
        channels_last: keep the model's weights and its inputs in ``channels_last`` memory format (optional speed
            setting: oneDNN convolutions skip their layout conversions; the logits agree to float rounding).
    """

    def __init__(
        self,
        model: nn.Module,
        taps: str | Sequence[str] = "auto",
        input_shape: Sequence[int] = (1, 28, 28),
        shallow_taps: Sequence[str] | int | None = None,
        arch: str | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.model = model
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.arch = arch_name(arch) if arch else type(model).__name__
        # Set when the weights are still to come (a GEN-CNP checkpoint embedding them): forward refuses until then.
        self.weights_pending: str | None = None
        self.input_shape = tuple(int(s) for s in input_shape)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.tap_names = resolve_taps(model, taps, self.input_shape)
        self.shallow_names, self.deep_names = (
            split_shallow_deep(self.tap_names, shallow_taps) if len(self.tap_names) > 1 else (self.tap_names, [])
        )
        self.hooks = TapHooks(self.model, self.tap_names)
        with torch.no_grad():
            probe = torch.zeros(2, *self.input_shape)
            try:
                logits, feats = self.forward(probe, record=True, check=False)
            except RuntimeError as err:
                check_input_size(self.model, self.input_shape, self.arch)  # names the smallest workable size
                raise ValueError(
                    f"target '{self.arch}' cannot run on inputs of shape {self.input_shape}: {err}"
                ) from err
        self.num_classes = int(logits.shape[1])
        self.tap_channels = [int(f.shape[-1] if f.dim() == 3 else f.shape[1]) for f in feats]
        self.tap_shapes = [tuple(f.shape[1:]) for f in feats]
        self._hash: str | None = None

    @property
    def num_channels(self) -> int:
        """``D``: total channels over taps."""
        return sum(self.tap_channels)

    def train(self, mode: bool = True) -> FrozenTarget:
        # A parent's .train() must not flip BatchNorm back to batch statistics.
        super().train(False)
        return self

    def tensor_hash(self) -> str:
        if self._hash is None:
            self._hash = tensor_hash(self.model)
        return self._hash

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"target '{self.arch}' expects images of shape [B, {', '.join(map(str, self.input_shape))}], got "
                f"{list(x.shape)}; resize the data or set the target's input shape (in_chans/image_size) to match."
            )

    @torch.no_grad()
    def first_tap_output(self, x: torch.Tensor) -> torch.Tensor:
        """The first tap's unmasked output for ``x``, running the model only that far (the rest is skipped): what
        ``forward(..., first_tap=...)`` takes. Only where ``hooks.can_skip_first``."""
        if not self.hooks.can_skip_first:
            raise ValueError(
                f"the first tap '{self.tap_names[0]}' contains another tap; its output cannot stand alone."
            )
        if self.weights_pending:
            raise FileNotFoundError(self.weights_pending)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)

        def stop(module, args, out):
            raise _ReachedFirstTap(out)

        handle = self.hooks._first.register_forward_hook(stop)
        self.hooks.start(record=False, masks=None, fill=None, first=None)
        try:
            self.model(x)
        except _ReachedFirstTap as reached:
            return reached.output
        finally:
            self.hooks.clear()
            handle.remove()
        raise RuntimeError(f"the first tap '{self.tap_names[0]}' did not run in the model's forward.")

    def forward(
        self,
        x: torch.Tensor,
        masks=None,
        fill=None,
        record: bool = False,
        check: bool = True,
        first_tap: torch.Tensor | None = None,
    ):
        """Logits ``[B, K]``; with ``record=True`` also the tap outputs (list, tap order).

        Args:
            masks (list | dict | None): per-tap ``[B, C_l]`` masks in tap order, or ``{tap name: mask}`` (or ``None``): the masked
                forward ``H(x; m)``.
            fill (list | None): per-tap ``[C_l]`` values of removed channels (mean ablation), or ``None`` for zeros.
            first_tap: the first tap's *unmasked* output for ``x`` (``feats[0]`` of a recorded pass on the same
                inputs, rows in the same order). The first tap's module is then not run again; a masked pass after
                a recorded one skips that much work (for ``fmnist_cnn`` the whole first block, the costliest at
                28x28). Ignored where the first tap contains another tap (``hooks.can_skip_first``).
        """
        if self.weights_pending:
            raise FileNotFoundError(self.weights_pending)
        if isinstance(masks, Mapping):
            masks = self.masks_by_name(masks)
        if check:
            self.check_input(x)
            if first_tap is not None and (
                first_tap.shape[0] != x.shape[0] or tuple(first_tap.shape[1:]) != self.tap_shapes[0]
            ):
                raise ValueError(
                    f"first_tap must be the first tap's output [{x.shape[0]}, {', '.join(map(str, self.tap_shapes[0]))}] "
                    f"for these {x.shape[0]} inputs, got {list(first_tap.shape)}; pass feats[0] of a recorded pass."
                )
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        self.hooks.start(record=record, masks=masks, fill=fill, first=first_tap)
        try:
            logits = self.model(x)
            feats = list(self.hooks.features) if record else None
        finally:
            self.hooks.clear()
        if logits.dtype in (torch.bfloat16, torch.float16):  # autocast: losses, metrics and reports compare float32
            logits = logits.float()
        return (logits, feats) if record else logits

    def masks_by_name(self, masks: Mapping[str, torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Per-tap masks in tap order from ``{tap name: [B, C_l] mask}`` (taps left out are not masked)."""
        unknown = [k for k in masks if k not in self.tap_names]
        if unknown:
            raise KeyError(f"masks for unknown taps {unknown}; this target's taps are {self.tap_names}.")
        return [masks.get(n) for n in self.tap_names]

    def candidate_taps(self) -> list[tuple[str, int, int]]:
        """``(name, channels, reduction)`` for every module returning a feature map, in execution order."""
        seen: dict[str, tuple[int, int]] = {}
        h_in = self.input_shape[-1]

        def make_hook(name: str):
            def hook(m, a, out):
                if isinstance(out, torch.Tensor) and out.dim() in (3, 4) and name not in seen:
                    c = out.shape[-1] if out.dim() == 3 else out.shape[1]
                    red = max(1, h_in // out.shape[-1]) if out.dim() == 4 else 0
                    seen[name] = (int(c), int(red))

            return hook

        forward_hooked(
            self.model, [(mod, make_hook(name)) for name, mod in self.model.named_modules() if name], self.input_shape
        )
        return [(n, c, r) for n, (c, r) in seen.items()]
