"""Out-of-distribution sets a user brings: a folder of images (torchvision ImageFolder layout, or flat) or any data
module given by class path, converted to the target's input and normalised like the in-distribution data.

A config entry is either ``{name, path}`` (optional ``limit``) or ``{name, data: {class_path, init_args}}``
(optional ``split``, default ``test``, and ``limit``)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import functional as TF

from gencnp.data.base import convert_images

__all__ = ["OODSource", "parse_sources"]

_KEYS = {"name", "path", "data", "split", "limit"}


@dataclass
class OODSource:
    """One out-of-distribution set: ``name`` and either a folder ``path`` or a data module ``data`` (its ``split``)."""

    name: str
    path: str | None = None
    data: object | None = None
    split: str = "test"
    limit: int | None = None

    def describe(self) -> str:
        if self.path is not None:
            return f"images under {self.path}"
        return f"{type(self.data).__module__}.{type(self.data).__name__} ({self.split} split)"

    def images(self, input_shape: tuple[int, ...], mean: list[float], std: list[float], n: int, seed: int):
        """Up to ``min(n, limit)`` images (a seeded subset when there are more), normalised with the
        in-distribution ``mean``/``std``: ``[N, C, H, W]``."""
        n = min(n, self.limit) if self.limit is not None else n
        if self.path is not None:
            files = sorted(p for p in Path(self.path).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            pick = _subset(len(files), n, seed)
            pixels = torch.stack([_read(files[i], input_shape) for i in pick])
            return _normalise(pixels, mean, std)
        ds = self.data.split(self.split)
        pick = _subset(len(ds), n, seed)
        x = torch.stack([ds[i][0] for i in pick]).float()
        own_mean, own_std = getattr(self.data, "mean", None), getattr(self.data, "std", None)
        if own_mean is not None and own_std is not None:  # the module's own normalisation -> the target's
            c = x.shape[1]
            m = torch.as_tensor(own_mean, dtype=x.dtype).flatten().expand(c)
            s = torch.as_tensor(own_std, dtype=x.dtype).flatten().expand(c)
            x = _normalise((x * s.view(1, -1, 1, 1) + m.view(1, -1, 1, 1)).clamp(0, 1), mean, std)
        return x


def _subset(total: int, n: int, seed: int) -> list[int]:
    if total <= n:
        return list(range(total))
    return sorted(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def _read(path: Path, input_shape: tuple[int, ...]) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            img = im.convert("RGB" if input_shape[0] == 3 else "L")
            t = TF.to_tensor(img)
    except Exception as err:  # noqa: BLE001  (PIL raises many types for broken files)
        raise ValueError(
            f"OOD image '{path}' cannot be decoded ({type(err).__name__}: {err}); replace or delete it."
        ) from err
    return convert_images(t, input_shape[0], input_shape[-1]) if tuple(t.shape[-2:]) != input_shape[1:] else t


def _normalise(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=pixels.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype).view(1, -1, 1, 1)
    return (pixels - m) / s


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ValueError(f"class_path '{class_path}' must be a dotted path, e.g. gencnp.FashionMNISTDataModule.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"OOD data class_path '{class_path}' cannot be imported ({err}); fix the path.") from err


def _source(entry: dict, input_shape: tuple[int, ...], i: int) -> OODSource:
    if not isinstance(entry, dict) or "name" not in entry or ("path" in entry) == ("data" in entry):
        raise ValueError(
            f"ood[{i}] must be {{name, path}} (a folder of images) or {{name, data: {{class_path, init_args}}}} "
            f"(a data module), got {entry!r}."
        )
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ValueError(f"ood[{i}] ('{entry['name']}') has unknown keys {unknown}; allowed: {sorted(_KEYS)}.")
    name, limit = str(entry["name"]), entry.get("limit")
    if "path" in entry:
        folder = Path(entry["path"])
        if not folder.is_dir() or not any(p.suffix.lower() in IMG_EXTENSIONS for p in folder.rglob("*")):
            raise FileNotFoundError(
                f"OOD set '{name}': '{folder}' is not a folder holding images ({', '.join(IMG_EXTENSIONS)}); give "
                "an ImageFolder root (<path>/<class>/<image>) or a flat folder of images."
            )
        return OODSource(name, path=str(folder), limit=limit)
    spec = entry["data"]
    if isinstance(spec, dict) and "class_path" in spec:
        data = _import(spec["class_path"])(**(spec.get("init_args") or {}))
    else:
        data = spec  # already a data module (Python callers)
    shape = tuple(getattr(data, "input_shape", ()))
    if shape != tuple(input_shape):
        c, s = input_shape[0], input_shape[-1]
        raise ValueError(
            f"OOD set '{name}' ({type(data).__name__}) gives images of shape {list(shape)}, but the target takes "
            f"{list(input_shape)}; set `in_chans: {c}` and `image_size: {s}` in its data init_args (the data module "
            "converts channels and resizes), or drop the set."
        )
    split = entry.get("split", "test")
    if split not in ("train", "val", "test"):
        raise ValueError(f"OOD set '{name}': split must be 'train', 'val' or 'test', got '{split}'.")
    return OODSource(name, data=data, split=split, limit=limit)


def parse_sources(entries: list[dict] | None, input_shape: tuple[int, ...]) -> list[OODSource]:
    """Check every entry (paths exist, class paths import, shapes fit the target) before any work; names unique."""
    sources = [_source(e, tuple(input_shape), i) for i, e in enumerate(entries or [])]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"OOD set names must be unique, got {names}.")
    return sources
