"""Target zoo, checkpoint loading and ``FrozenTarget``.

Names resolve in this order: gencnp's registry (``fmnist_cnn``, ``tiny_cnn``, ``small_cnn``, ``channel_toy``,
your own via ``register_target``), ``timm:<name>`` or a timm model name, ``torchvision:<name>`` or a
torchvision classifier name, then a dotted class path (``mypkg.mynet.MyNet``). Any importable ``nn.Module`` also
comes as ``{"class_path": "mypkg.mynet.MyNet", "init_args": {...}}`` (the LightningCLI convention). Pretrained
weights are fetched only when ``pretrained=True``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from gencnp.registry import Registry
from gencnp.taps import TapHooks, feature_info_taps, resolve_taps, split_shallow_deep

__all__ = [
    "register_target", "create_target", "list_targets", "load_weights", "load_target", "FrozenTarget", "tensor_hash",
    "ConvBlockNet", "TargetSpec", "arch_name", "read_target_spec", "resolve_target_spec", "check_input_size",
]  # fmt: skip

TARGETS = Registry("target")


def register_target(name: str | None = None):
    """Decorator registering a factory ``fn(num_classes, in_chans, pretrained, **kw) -> nn.Module``."""
    return TARGETS.register(name)


def list_targets() -> list[str]:
    """gencnp's registered targets (timm and torchvision names are accepted too)."""
    return TARGETS.names()


class ConvBlockNet(nn.Module):
    """Blocks of ``conv3x3 (no bias) - BatchNorm - ReLU``, optional 2x2 max-pools, GAP, linear head.

    Taps (``default_taps``) are the block outputs ``blocks.0`` ... ``blocks.{n-1}``.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 64, 128), pool_after: Sequence[int] = (0, 2),
                 num_classes: int = 10, in_chans: int = 1):  # fmt: skip
        super().__init__()
        layers, c_in = [], in_chans
        for i, c in enumerate(channels):
            block = [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            if i in pool_after:
                block.append(nn.MaxPool2d(2))
            layers.append(nn.Sequential(*block))
            c_in = c
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)
        self.num_classes = num_classes
        self.default_taps = [f"blocks.{i}" for i in range(len(channels))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(x)).flatten(1))


@register_target("fmnist_cnn")
def fmnist_cnn(num_classes: int = 10, in_chans: int = 1, pretrained: bool = False) -> nn.Module:
    """Default target (docs/design.md section 4): 32-64-64-128 channels, pools after blocks 1 and 3; D = 288."""
    _no_pretrained("fmnist_cnn", pretrained)
    return ConvBlockNet((32, 64, 64, 128), (0, 2), num_classes, in_chans)


@register_target("small_cnn")
def small_cnn(num_classes: int = 10, in_chans: int = 1, pretrained: bool = False) -> nn.Module:
    """A lighter 16-32-32-64 variant of ``fmnist_cnn``."""
    _no_pretrained("small_cnn", pretrained)
    return ConvBlockNet((16, 32, 32, 64), (0, 2), num_classes, in_chans)


@register_target("tiny_cnn")
def tiny_cnn(num_classes: int = 4, in_chans: int = 1, pretrained: bool = False) -> nn.Module:
    """Three 8-16-16 blocks: for tests and the synthetic configs."""
    _no_pretrained("tiny_cnn", pretrained)
    return ConvBlockNet((8, 16, 16), (0,), num_classes, in_chans)


class ChannelToy(nn.Module):
    """Toy with a known answer: class k is decided only by channel k of tap ``route``.

    ``stem`` (1x1 conv, identity) copies input channel k to channel k; ``route`` is a ReLU; the head sums
    channel k into logit k. Feed inputs whose channel k is positive for class k and zero elsewhere (see
    ``channel_toy_batch``): at ``route`` all channels but k are exactly zero, so the pathway must keep k.
    """

    def __init__(self, num_classes: int = 4, in_chans: int | None = None):
        super().__init__()
        k = num_classes
        self.stem = nn.Conv2d(in_chans or k, k, 1, bias=False)
        self.route = nn.ReLU()
        self.mix = nn.Conv2d(k, k, 1, bias=False)
        self.post = nn.ReLU()
        self.head = nn.Linear(k, k)
        with torch.no_grad():
            self.stem.weight.copy_(torch.eye(k, in_chans or k).reshape(k, in_chans or k, 1, 1))
            self.mix.weight.copy_(torch.eye(k).reshape(k, k, 1, 1))
            self.head.weight.copy_(4 * torch.eye(k))
            self.head.bias.fill_(-1.0)
        self.default_taps = ["stem", "route", "mix", "post"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.post(self.mix(self.route(self.stem(x)))).mean(dim=(2, 3)))


@register_target("channel_toy")
def channel_toy(num_classes: int = 4, in_chans: int | None = None, pretrained: bool = False) -> nn.Module:
    _no_pretrained("channel_toy", pretrained)
    return ChannelToy(num_classes, in_chans)


def channel_toy_batch(n: int, num_classes: int = 4, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs for ``channel_toy``: channel ``y`` holds positive values, every other channel is zero."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.zeros(n, num_classes, size, size)
    x[torch.arange(n), y] = 0.5 + torch.rand(n, size, size, generator=g)
    return x, y


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"'{name}' has no pretrained weights; train it with configs/*/target.yaml or pass a checkpoint.")


class TimmTarget(nn.Module):
    """A timm model with explicit arguments (``timm.create_model`` itself cannot be a config class_path)."""

    def __init__(self, name: str, num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, **kwargs):
        super().__init__()
        import timm

        self.model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
        info = getattr(self.model, "feature_info", None) or []
        # Every feature level; a stem at reduction <= 2 (e.g. ResNet's act1) is left out when two or more remain.
        self.default_taps = feature_info_taps(info, prefix="model.")
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TorchvisionTarget(nn.Module):
    """A torchvision classifier by name; ResNets tap ``layer1..4`` (block outputs), others name taps."""

    def __init__(self, name: str, num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, **kwargs):
        super().__init__()
        import torchvision

        weights = "DEFAULT" if pretrained else None
        self.model = torchvision.models.get_model(name, weights=weights, **({} if pretrained else {"num_classes": num_classes}), **kwargs)
        if pretrained and num_classes != 1000:
            raise ValueError(f"pretrained torchvision '{name}' has 1000 classes; fine-tune it or set num_classes: 1000.")
        if in_chans != 3:
            raise ValueError(
                f"torchvision '{name}' expects 3 input channels, got in_chans={in_chans}; set in_chans: 3 for the "
                "model and the data (data modules repeat a grey channel: data.init_args.in_chans: 3)."
            )
        self.default_taps = [f"model.layer{i}" for i in range(1, 5)] if hasattr(self.model, "layer4") else []
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def arch_name(arch: str | Mapping) -> str:
    """A readable name of a target spec: the name itself, or the class path of a ``class_path`` spec."""
    if isinstance(arch, Mapping):
        return str(arch.get("class_path"))
    return str(arch)


def _import_module_class(path: str) -> type:
    """The ``nn.Module`` subclass a dotted path names; only module classes are ever built from a path."""
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"class_path '{path}' must be a dotted path 'module.Class' (e.g. 'mynet.MyNet').")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"class_path '{path}': module '{module_name}' cannot be imported ({err}). Run from the folder holding "
            f"{module_name.replace('.', '/')}.py (train.py, evaluate.py and the pipeline put the working directory on "
            "sys.path), add its folder to PYTHONPATH, or pip install the package."
        ) from err
    cls = getattr(module, attr, None)
    if cls is None:
        close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=3, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(f"class_path '{path}': module '{module_name}' has no attribute '{attr}'.{hint}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"class_path '{path}' is {cls!r}, not an nn.Module subclass; a target must be a torch module class.")
    return cls


def _from_class_path(spec: Mapping, num_classes: int, in_chans: int | None, pretrained: bool, **kwargs) -> nn.Module:
    """Build ``class_path(**init_args)``; ``num_classes``/``in_chans`` are passed when the class takes them and
    ``init_args`` leaves them out (a different value there is an error naming both)."""
    extra = sorted(set(spec) - {"class_path", "init_args"})
    if "class_path" not in spec or extra:
        raise ValueError(
            f"a target given as a mapping needs 'class_path' (and optionally 'init_args') only, got keys {sorted(spec)}; "
            "e.g. {class_path: mynet.MyNet, init_args: {width: 32}}."
        )
    path = str(spec["class_path"])
    if pretrained:
        raise ValueError(f"target '{path}': gencnp fetches no pretrained weights for class_path targets; load them in "
                         "your module, or pass a checkpoint (target_checkpoint / checkpoint).")  # fmt: skip
    cls = _import_module_class(path)
    args = dict(spec.get("init_args") or {})
    args.update(kwargs)
    params = inspect.signature(cls.__init__).parameters
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if value is None or key not in params:
            continue
        if key in args and args[key] != value:
            raise ValueError(
                f"target '{path}': init_args {key}={args[key]} but the model's {key} is {value}; set both to the "
                "same value (or drop it from init_args: gencnp passes it)."
            )
        args[key] = value
    try:
        return cls(**args)
    except TypeError as err:
        raise TypeError(f"target '{path}' could not be built with init_args {args}: {err}") from err


def create_target(name: str | Mapping, num_classes: int = 10, in_chans: int | None = None, pretrained: bool = False,
                  **kwargs) -> nn.Module:  # fmt: skip
    """Build a target by name (registry, then ``timm:``/timm names, then ``torchvision:``/torchvision names, then a
    dotted class path), or from ``{"class_path": ..., "init_args": {...}}``.

    ``in_chans=None`` means the family's own default: 3 for timm and torchvision, the factory's default for
    registered targets (1 for gencnp's CNNs).
    """
    if isinstance(name, Mapping):
        return _from_class_path(name, num_classes, in_chans, pretrained, **kwargs)
    if not isinstance(name, str):
        raise TypeError(f"a target is a name or a {{class_path, init_args}} mapping, got {type(name).__name__}.")
    if name in TARGETS:
        chans = {} if in_chans is None else {"in_chans": in_chans}
        return TARGETS.create(name, num_classes=num_classes, pretrained=pretrained, **chans, **kwargs)
    import timm

    if name.startswith("timm:") or (":" not in name and timm.is_model(name)):
        return TimmTarget(name.removeprefix("timm:"), num_classes, 3 if in_chans is None else in_chans, pretrained, **kwargs)
    tv = _torchvision_names()
    if name.startswith("torchvision:") or name in tv:
        return TorchvisionTarget(name.removeprefix("torchvision:"), num_classes, 3 if in_chans is None else in_chans,
                                 pretrained, **kwargs)  # fmt: skip
    if "." in name and ":" not in name and name.rpartition(".")[0]:
        return _from_class_path({"class_path": name}, num_classes, in_chans, pretrained, **kwargs)
    known = list_targets()
    close = difflib.get_close_matches(name, known + tv + timm.list_models(), n=4, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise KeyError(
        f"unknown target architecture '{name}'.{hint} gencnp targets: {', '.join(known)}; any timm model "
        "(timm.list_models()) or torchvision classifier (torchvision.models.list_models()) also works, or your own "
        "nn.Module by class path (arch: mynet.MyNet, or {class_path: mynet.MyNet, init_args: {...}}; the working "
        "directory is importable), or register a factory with @register_target('name')."
    )


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint: safetensors, Lightning ``.ckpt`` or a plain ``torch.save`` dict.

    Every ``torch.load`` uses ``weights_only=True``: a crafted pickle is refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; train one (python train.py fit --config ...) or fix the path.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:
            raise ValueError(f"checkpoint '{path}' is not a readable safetensors file ({err}); re-export it.") from err
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"checkpoint '{path}' could not be loaded safely (weights_only=True): {str(err).splitlines()[0]}. "
            "It is truncated, altered, or holds arbitrary Python objects; gencnp never unpickles code. "
            "Re-save it with torch.save(model.state_dict(), path) or as safetensors."
        ) from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        from gencnp.checkpointing import verify_state_hash

        verify_state_hash(obj, f"checkpoint '{path}'")  # altered tensor bytes load silently otherwise
        meta = {k: v for k, v in obj.items() if k != "state_dict" and k not in ("optimizer_states", "lr_schedulers")}
        return obj["state_dict"], meta
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ValueError(f"checkpoint '{path}' holds {type(obj).__name__}, not a state dict of tensors.")


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
            if any(k.endswith(("head.weight", "head.bias", "fc.weight", "fc.bias", "classifier.weight")) for k in best.keys() & own.keys()):
                detail.append("a head mismatch usually means num_classes differs between the checkpoint and the config")
        raise ValueError(" ".join(parts) + ": " + "; ".join(detail) + ". Use the matching arch/num_classes or another checkpoint.")
    model.load_state_dict(best)


def state_mismatch(own: dict, state: dict, limit: int = 8) -> list[str]:
    """Why ``state`` does not load into a model whose ``state_dict()`` is ``own``: missing keys, unexpected keys and
    shape mismatches (checkpoint vs model), each as one phrase listing up to ``limit`` entries; empty when it fits."""
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in sorted(own.keys() & state.keys())
              if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]  # fmt: skip
    out = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            sep = "; " if label == "shape mismatches" else ", "
            out.append(f"{label}: {sep.join(items[:limit])}{' ...' if len(items) > limit else ''}")
    return out


def load_target(arch: str | Mapping, checkpoint: str | None = None, num_classes: int = 10, in_chans: int | None = 1,
                pretrained: bool = False, **kwargs) -> nn.Module:  # fmt: skip
    """``create_target`` plus ``load_weights`` when a checkpoint is given."""
    model = create_target(arch, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint, arch)
    return model


# ----- target specs: how to rebuild a target, recorded in its checkpoints -----
TargetSpec = dict  # {"arch": name or {class_path, init_args}, "num_classes", "in_chans", "image_size", "kwargs"}
SPEC_KEY = "gencnp_target"
SPEC_DEFAULTS = {"arch": "fmnist_cnn", "num_classes": 10, "in_chans": 1, "image_size": 28, "kwargs": {}}


def make_target_spec(arch: str | Mapping, num_classes: int, in_chans: int, image_size: int,
                     kwargs: Mapping | None = None) -> TargetSpec:  # fmt: skip
    """The spec a target checkpoint records (``checkpoint['gencnp_target']``): enough to rebuild the model."""
    arch = dict(arch) if isinstance(arch, Mapping) else str(arch)
    return {"arch": arch, "num_classes": int(num_classes), "in_chans": int(in_chans), "image_size": int(image_size),
            "kwargs": dict(kwargs or {})}  # fmt: skip


def spec_from_meta(meta: Mapping) -> TargetSpec | None:
    """The target spec of a checkpoint's metadata: its ``gencnp_target`` section, else the hyper-parameters of a
    ``TargetClassifier`` checkpoint (older files); ``None`` for plain state dicts."""
    spec = meta.get(SPEC_KEY)
    if isinstance(spec, Mapping) and "arch" in spec:
        return make_target_spec(spec["arch"], spec["num_classes"], spec["in_chans"], spec["image_size"], spec.get("kwargs"))
    hp = meta.get("hyper_parameters")
    if isinstance(hp, Mapping) and "arch" in hp and str(hp.get("_class_path", "")).endswith("TargetClassifier"):
        return make_target_spec(hp["arch"], hp.get("num_classes", 10), hp.get("in_chans", 1), hp.get("image_size", 28),
                                hp.get("model_kwargs"))  # fmt: skip
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


def resolve_target_spec(given: Mapping, recorded: Mapping | None, source: str, names: Mapping | None = None) -> TargetSpec:
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


def build_target(arch: str | Mapping | None, checkpoint: str | None, num_classes: int | None, in_chans: int | None,
                 image_size: int | None, kwargs: Mapping | None = None, recorded: Mapping | None = None,
                 names: Mapping | None = None) -> tuple[nn.Module, TargetSpec, bool]:  # fmt: skip
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
    sizes = sorted({s for s in (*range(h + 1, h + 33), 32, 48, 64, 96, 112, 128, 160, 192, 224, 256, 288, 384, 512)
                    if s > h})  # fmt: skip
    works = next((s for s in sizes if _probe(model, (c, s, s)) is None), None)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    fix = (f"the smallest square side that works is {works}: set image_size: {works} for the model and the data "
           "(data modules resize: data.init_args.image_size)" if works else
           f"no square side up to {sizes[-1]} works either; check in_chans and the model's own size arguments "
           "(e.g. timm img_size in model_kwargs)")  # fmt: skip
    raise ValueError(f"target '{name}' cannot run on inputs of shape {shape} (C, H, W): {first}. {fix}.") from err


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
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer (sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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

    def __init__(self, model: nn.Module, taps: str | Sequence[str] = "auto", input_shape: Sequence[int] = (1, 28, 28),
                 shallow_taps: Sequence[str] | int | None = None, arch: str | None = None,
                 channels_last: bool = False):  # fmt: skip
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
        self.shallow_names, self.deep_names = split_shallow_deep(self.tap_names, shallow_taps) if len(self.tap_names) > 1 else (self.tap_names, [])
        self.hooks = TapHooks(self.model, self.tap_names)
        with torch.no_grad():
            probe = torch.zeros(2, *self.input_shape)
            try:
                logits, feats = self.forward(probe, record=True, check=False)
            except RuntimeError as err:
                check_input_size(self.model, self.input_shape, self.arch)  # names the smallest workable size
                raise ValueError(f"target '{self.arch}' cannot run on inputs of shape {self.input_shape}: {err}") from err
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

    def forward(self, x: torch.Tensor, masks=None, fill=None, record: bool = False, check: bool = True,
                first_tap: torch.Tensor | None = None):  # fmt: skip
        """Logits ``[B, K]``; with ``record=True`` also the tap outputs (list, tap order).

        Args:
            masks: per-tap ``[B, C_l]`` masks in tap order, or ``{tap name: mask}`` (or ``None``): the masked
                forward ``H(x; m)``.
            fill: per-tap ``[C_l]`` values of removed channels (mean ablation), or ``None`` for zeros.
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
            if first_tap is not None and (first_tap.shape[0] != x.shape[0] or tuple(first_tap.shape[1:]) != self.tap_shapes[0]):
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
        handles = []
        h_in = self.input_shape[-1]
        for name, mod in self.model.named_modules():
            if not name:
                continue

            def hook(m, a, out, name=name):
                if isinstance(out, torch.Tensor) and out.dim() in (3, 4) and name not in seen:
                    c = out.shape[-1] if out.dim() == 3 else out.shape[1]
                    red = max(1, h_in // out.shape[-1]) if out.dim() == 4 else 0
                    seen[name] = (int(c), int(red))

            handles.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, *self.input_shape))
        finally:
            for h in handles:
                h.remove()
        return [(n, c, r) for n, (c, r) in seen.items()]
