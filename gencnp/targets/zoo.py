"""Target zoo: gencnp's registered classifiers, timm and torchvision wrappers, and ``create_target``.

Names resolve in this order: gencnp's registry (``fmnist_cnn``, ``tiny_cnn``, ``small_cnn``, ``channel_toy``,
your own via ``register_target``), ``timm:<name>`` or a timm model name, ``torchvision:<name>`` or a
torchvision classifier name, then a dotted class path (``mypkg.mynet.MyNet``). Any importable ``nn.Module`` also
comes as ``{"class_path": "mypkg.mynet.MyNet", "init_args": {...}}`` (the LightningCLI convention). Pretrained
weights are fetched only when ``pretrained=True``. ``gencnp.targets.loading`` re-exports every name.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping, Sequence

import torch
import torchvision
from torch import nn

from gencnp.registry import Registry
from gencnp.targets.hooks import feature_info_taps

__all__ = [
    "TARGETS",
    "register_target",
    "list_targets",
    "create_target",
    "arch_name",
    "ConvBlockNet",
    "ChannelToy",
    "channel_toy_batch",
    "TimmTarget",
    "TorchvisionTarget",
]

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

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 64, 128),
        pool_after: Sequence[int] = (0, 2),
        num_classes: int = 10,
        in_chans: int = 1,
    ):
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
        raise ValueError(
            f"'{name}' has no pretrained weights; train it with configs/*/target.yaml or pass a checkpoint."
        )


class TimmTarget(nn.Module):
    """A timm model with explicit arguments (``timm.create_model`` itself cannot be a config class_path)."""

    def __init__(self, name: str, num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, **kwargs):
        super().__init__()
        import timm  # timm only for timm targets (a slow import)

        self.model = timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
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
        weights = "DEFAULT" if pretrained else None
        self.model = torchvision.models.get_model(
            name, weights=weights, **({} if pretrained else {"num_classes": num_classes}), **kwargs
        )
        if pretrained and num_classes != 1000:
            raise ValueError(
                f"pretrained torchvision '{name}' has 1000 classes; fine-tune it or set num_classes: 1000."
            )
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
        raise TypeError(
            f"class_path '{path}' is {cls!r}, not an nn.Module subclass; a target must be a torch module class."
        )
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
        raise ValueError(
            f"target '{path}': gencnp fetches no pretrained weights for class_path targets; load them in "
            "your module, or pass a checkpoint (target_checkpoint / checkpoint)."
        )
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


def create_target(
    name: str | Mapping, num_classes: int = 10, in_chans: int | None = None, pretrained: bool = False, **kwargs
) -> nn.Module:
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
    import timm  # timm only past gencnp's own names (a slow import)

    if name.startswith("timm:") or (":" not in name and timm.is_model(name)):
        return TimmTarget(
            name.removeprefix("timm:"), num_classes, 3 if in_chans is None else in_chans, pretrained, **kwargs
        )
    tv = _torchvision_names()
    if name.startswith("torchvision:") or name in tv:
        return TorchvisionTarget(
            name.removeprefix("torchvision:"), num_classes, 3 if in_chans is None else in_chans, pretrained, **kwargs
        )
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
