"""Pathway banks (docs/design.md section 6): per-class selection frequencies of channels, saved as one safetensors file.

A bank holds, for every class ``c`` of a frozen target, how many of its samples kept each of the ``D`` tap
channels in their pathway (``counts [K, D]``) and how many samples it saw (``n [K]``). The selection frequency
is ``f_c = counts_c / n_c`` and the binary **class pathway** is ``M_c = f_c >= tau``, with ``tau`` chosen on the
validation split (``gencnp.callbacks.PathwayBankWriter``) and stored. A new sample of class ``c`` is then
explained without the generator as ``H(x; M_c)`` (``PathwayBank.apply``). Memory is ``O(K * D)`` whatever the
number of samples; banks built on several processes or data shards add up (``merge``).

File format (``format_version`` 1)
----------------------------------
One `safetensors <https://github.com/huggingface/safetensors>`_ file, never a pickle:

- tensors: ``counts`` int64 ``[K, D]`` and ``n`` int64 ``[K]`` (``0 <= counts[c, j] <= n[c]``);
- header metadata (``__metadata__``, string to string):

  - ``"gencnp"``: a JSON document with ``format_version`` (1), ``kind`` (``"gencnp.PathwayBank"``),
    ``target_arch``, ``target_hash`` (sha256 over the target's tensor names, dtypes, shapes and bytes;
    ``gencnp.targets.loading.tensor_hash``), ``taps`` (tap names in pathway order), ``tap_channels`` (``C_l`` per tap,
    ``D = sum``), ``class_names`` (``K`` names), ``tau`` (float in ``(0, 1]`` or ``null``), ``class_source``
    (``"pred"``: the target's prediction, or ``"label"``), ``split`` (the data split counted), ``total``
    (``sum(n)``), ``gencnp_version``, ``created_utc`` (ISO 8601) and ``info`` (free-form provenance, e.g. the
    tau search table);
  - ``"sha256"``: hex sha256 over the UTF-8 bytes of the ``"gencnp"`` string, then the little-endian bytes of
    ``counts``, then those of ``n`` (C order). Any change to metadata or data after saving is detected.

Channel ``j`` of the pathway belongs to tap ``l`` when ``sum(tap_channels[:l]) <= j < sum(tap_channels[:l+1])``.
Reading a bank needs only ``safetensors`` and ``numpy``::

    import json, numpy as np
    from safetensors import safe_open
    with safe_open("runs/fashion_mnist/bank.safetensors", framework="np") as f:
        meta, counts, n = json.loads(f.metadata()["gencnp"]), f.get_tensor("counts"), f.get_tensor("n")
    class_pathways = counts / np.maximum(n, 1)[:, None] >= meta["tau"]  # bool [K, D], rows in meta["class_names"]

Files are written atomically (a temporary file in the same directory, then ``os.replace``): an interrupted save
leaves the previous bank intact.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gencnp.banks.file import DEFAULT_BANK, FORMAT_VERSION, KIND, REEXPORT, bank_bytes, check_tensors, read_bank_file
from gencnp.banks.file import checksum as _checksum  # noqa: F401  (the name tests use)
from gencnp.io.class_views import shown_classes
from gencnp.io.files import check_writable, save_figure, write_atomic, write_json
from gencnp.pathways.selection import check_tau as _check_tau
from gencnp.pathways.selection import choose_tau
from gencnp.targets.loading import FrozenTarget
from gencnp.version import __version__

__all__ = [
    "PathwayBank",
    "inspect_bank",
    "choose_tau",
    "write_atomic",
    "check_writable",
    "FORMAT_VERSION",
    "DEFAULT_TAUS",
]

DEFAULT_TAUS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.10, ..., 0.95


def _diff_names(ours: Sequence[str], theirs: Sequence[str], limit: int = 4) -> str:
    diffs = [f"#{i} {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if len(ours) != len(theirs):
        diffs.append(f"{len(ours)} vs {len(theirs)} entries")
    return "; ".join(diffs[:limit]) + (" ..." if len(diffs) > limit else "")


def _frozen(target: Any) -> FrozenTarget:
    """The ``FrozenTarget`` itself, or the one a system (``GenCNP.target``) holds."""
    if isinstance(target, FrozenTarget):
        return target
    inner = getattr(target, "target", None)
    if isinstance(inner, FrozenTarget):
        return inner
    raise TypeError(f"expected a FrozenTarget (or a GenCNP model holding one), got {type(target).__name__}.")


class PathwayBank:
    """Per-class channel selection counts of a frozen target; class pathways ``M_c = f_c >= tau``.

    Args:
        class_names: ``K`` class names, in class-index order.
        tap_names: tap names in pathway order.
        tap_channels: ``C_l`` per tap; ``D = sum(tap_channels)``.
        target_arch: the target's architecture name (as ``create_target`` takes it).
        target_hash: ``FrozenTarget.tensor_hash()`` of the target the pathways were computed on.
        class_source: ``'pred'`` (samples counted under the target's prediction) or ``'label'``.
        split: the data split counted (``'train'`` by default).
        tau: threshold in ``(0, 1]`` (``None`` until chosen).

    Attributes:
        counts: int64 ``[K, D]``, samples of class ``c`` whose pathway kept channel ``j``.
        n: int64 ``[K]``, samples counted per class.
        info: JSON-serialisable provenance saved with the bank (e.g. the tau search).
    """

    def __init__(
        self,
        class_names: list[str],
        tap_names: list[str],
        tap_channels: list[int],
        target_arch: str,
        target_hash: str,
        class_source: str = "pred",
        split: str = "train",
        tau: float | None = None,
    ):
        class_names, tap_names = [str(c) for c in class_names], [str(t) for t in tap_names]
        tap_channels = [int(c) for c in tap_channels]
        if not class_names:
            raise ValueError("class_names is empty; a bank needs at least one class (e.g. datamodule.class_names).")
        if len(set(class_names)) != len(class_names):
            dup = sorted({c for c in class_names if class_names.count(c) > 1})
            raise ValueError(f"class_names must be unique; {dup} appear more than once.")
        if not tap_names or len(tap_names) != len(tap_channels):
            raise ValueError(
                f"got {len(tap_names)} tap names and {len(tap_channels)} channel counts; pass one channel count per "
                "tap (FrozenTarget.tap_names and .tap_channels)."
            )
        if any(c < 1 for c in tap_channels):
            raise ValueError(f"tap_channels must be positive, got {tap_channels}.")
        if class_source not in ("pred", "label"):
            raise ValueError(f"class_source must be 'pred' or 'label', got '{class_source}'.")
        self.class_names = class_names
        self.tap_names = tap_names
        self.tap_channels = tap_channels
        self.target_arch = str(target_arch)
        self.target_hash = str(target_hash)
        self.class_source = class_source
        self.split = str(split)
        self._tau = _check_tau(tau)
        self._class_taus: list[float] | None = None
        self.counts = torch.zeros(self.num_classes, self.num_channels, dtype=torch.int64)
        self.n = torch.zeros(self.num_classes, dtype=torch.int64)
        self.info: dict[str, Any] = {}
        self.metadata: dict[str, Any] = {}  # the file's metadata after load()

    @classmethod
    def for_target(
        cls,
        target: FrozenTarget,
        class_names: Sequence[str] | None = None,
        class_source: str = "pred",
        split: str = "train",
        tau: float | None = None,
    ) -> PathwayBank:
        """An empty bank fitted to ``target`` (a ``FrozenTarget`` or a GenCNP model; class names default to
        ``'0' ... 'K-1'``)."""
        target = _frozen(target)
        names = list(class_names) if class_names is not None else [str(k) for k in range(target.num_classes)]
        if len(names) != target.num_classes:
            raise ValueError(
                f"got {len(names)} class names for target '{target.arch}' with {target.num_classes} classes."
            )
        return cls(
            names, target.tap_names, target.tap_channels, target.arch, target.tensor_hash(), class_source, split, tau
        )

    # ----- sizes and tau -----
    @property
    def num_classes(self) -> int:
        """``K``."""
        return len(self.class_names)

    @property
    def num_channels(self) -> int:
        """``D = sum(tap_channels)``."""
        return sum(self.tap_channels)

    @property
    def tau(self) -> float | None:
        """Threshold of the class pathways, in ``(0, 1]``, or ``None`` until chosen."""
        return self._tau

    @tau.setter
    def tau(self, value: float | None) -> None:
        self._tau = _check_tau(value)

    @property
    def class_taus(self) -> list[float] | None:
        """A threshold per class (``M_c = f_c >= tau_c``, chosen on validation), or ``None``: every class at ``tau``."""
        return self._class_taus

    @class_taus.setter
    def class_taus(self, value: Sequence[float] | None) -> None:
        if value is not None:
            value = [_check_tau(float(v), "class tau") for v in value]
            if len(value) != self.num_classes:
                raise ValueError(f"class_taus needs one tau per class ({self.num_classes}), got {len(value)}.")
        self._class_taus = value

    def __repr__(self) -> str:
        return (
            f"PathwayBank(target={self.target_arch!r}, K={self.num_classes}, D={self.num_channels}, "
            f"samples={int(self.n.sum())}, tau={self.tau}, split={self.split!r}, class_source={self.class_source!r})"
        )

    # ----- accumulation -----
    @torch.no_grad()
    def update(self, pathways: torch.Tensor, classes: torch.Tensor) -> None:
        """Add a batch: ``counts[classes[i]] += pathways[i]``, ``n[classes[i]] += 1`` (one ``index_add``).

        Args:
            pathways: bool ``[B, D]`` (or 0/1 numbers) in tap order.
            classes: int ``[B]`` in ``[0, K)``, the class source of each sample.
        """
        if not isinstance(pathways, torch.Tensor) or not isinstance(classes, torch.Tensor):
            raise TypeError(f"update takes tensors, got {type(pathways).__name__} and {type(classes).__name__}.")
        if pathways.dim() != 2 or pathways.shape[1] != self.num_channels:
            raise ValueError(
                f"pathways must be [B, D] with D = {self.num_channels} (taps {self.tap_names}), got "
                f"{list(pathways.shape)}; pass the flat pathway (GenCNP.explain(x)['pathway'])."
            )
        if classes.dim() != 1 or classes.shape[0] != pathways.shape[0]:
            raise ValueError(f"classes must be [B] = [{pathways.shape[0]}], got {list(classes.shape)}.")
        if classes.is_floating_point() or classes.dtype == torch.bool:
            raise TypeError(f"classes must be an integer tensor, got {classes.dtype}.")
        if pathways.shape[0] == 0:
            return
        p = pathways.detach().cpu()
        if p.dtype != torch.bool:
            if not bool(((p == 0) | (p == 1)).all()):
                raise ValueError("pathways must be binary (bool, or numbers equal to 0 or 1); threshold them first.")
            p = p != 0
        c = classes.detach().cpu().long()
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(
                f"classes must lie in [0, {self.num_classes}) for {self.num_classes} class names, "
                f"got values in [{lo}, {hi}]."
            )
        self.counts.index_add_(0, c, p.to(torch.int64))
        self.n += torch.bincount(c, minlength=self.num_classes)

    def _mismatches(self, other: PathwayBank) -> list[str]:
        out = []
        for attr in ("target_arch", "target_hash", "tap_names", "tap_channels", "class_names", "class_source"):
            a, b = getattr(self, attr), getattr(other, attr)
            if a != b:
                out.append(f"{attr}: {a} vs {b}")
        return out

    def merge(self, other: PathwayBank) -> PathwayBank:
        """Add ``other``'s counts to this bank (other shards or processes of the same export); returns ``self``.

        Raises:
            ValueError: the banks differ in target, taps, classes or class source, or hold different taus.
        """
        if not isinstance(other, PathwayBank):
            raise TypeError(f"merge takes a PathwayBank, got {type(other).__name__}.")
        bad = self._mismatches(other)
        if bad:
            raise ValueError(
                "cannot merge banks built differently: " + "; ".join(bad) + ". Merge only banks exported "
                "for the same target, taps, classes and class source."
            )
        if self.tau is not None and other.tau is not None and self.tau != other.tau:
            raise ValueError(
                f"cannot merge banks with tau {self.tau} and {other.tau}; set one bank's tau to the other's "
                "(or both to None and choose tau again on validation)."
            )
        if self.class_taus != other.class_taus and None not in (self.class_taus, other.class_taus):
            raise ValueError("cannot merge banks with different class_taus; set both to None and choose again.")
        self.counts += other.counts
        self.n += other.n
        self.tau = self.tau if self.tau is not None else other.tau
        self.class_taus = self.class_taus if self.class_taus is not None else other.class_taus
        if other.split != self.split:
            self.split = "+".join(sorted(set(self.split.split("+")) | set(other.split.split("+"))))
        return self

    # ----- class pathways -----
    def frequencies(self) -> torch.Tensor:
        """Selection frequencies ``f_c = counts_c / n_c``: float64 ``[K, D]`` in ``[0, 1]`` (0 for unseen classes)."""
        return self.counts.double() / self.n.clamp_min(1).double()[:, None]

    def class_pathways(self, tau: float | None = None) -> torch.Tensor:
        """Binary class pathways ``M_c = f_c >= tau``: bool ``[K, D]`` (a class with ``n_c = 0`` keeps nothing).

        Args:
            tau: threshold in ``(0, 1]``; the stored ``tau`` when ``None``.
        """
        if tau is None and self.class_taus is not None:
            return self.frequencies() >= torch.tensor(self.class_taus, dtype=torch.float64)[:, None]
        tau = _check_tau(tau) if tau is not None else self.tau
        if tau is None:
            raise ValueError(
                "this bank has no tau yet; pass class_pathways(tau=...) or set bank.tau (PathwayBankWriter "
                "chooses it on the validation split)."
            )
        # Same float64 division as the numpy recipe in the module docstring, so both give identical pathways.
        return self.frequencies() >= tau

    def check_target(self, target: FrozenTarget, source: str = "this bank") -> None:
        """Raise one ``ValueError`` naming every way ``target`` differs from the one the bank was built on."""
        target = _frozen(target)
        problems = []
        if str(target.arch) != self.target_arch:
            problems.append(
                f"target architecture: the bank was built on '{self.target_arch}', the given target is "
                f"'{target.arch}'; configure target: {self.target_arch} with its checkpoint"
            )
        if target.tensor_hash() != self.target_hash:
            problems.append(
                f"target tensor hash: the bank was built on '{self.target_arch}' with hash {self.target_hash[:12]}, "
                f"the given target '{target.arch}' has hash {target.tensor_hash()[:12]} (other weights); load the "
                "target checkpoint the bank was exported with, or export a bank for this target"
            )
        if list(target.tap_names) != self.tap_names:
            problems.append(
                f"taps: the bank has {self.tap_names}, the target {list(target.tap_names)}; configure the "
                f"target with taps: {self.tap_names}"
            )
        elif list(target.tap_channels) != self.tap_channels:
            diff = [
                f"{t}: {a} vs {b}" for t, a, b in zip(self.tap_names, self.tap_channels, target.tap_channels) if a != b
            ]
            problems.append(
                f"tap channels (bank vs target): {', '.join(diff)}; use the target architecture "
                f"'{self.target_arch}' the bank was built on"
            )
        if target.num_classes != self.num_classes:
            problems.append(f"classes: the bank has {self.num_classes}, the target {target.num_classes}")
        if problems:
            raise ValueError(f"{source} does not fit the given target: " + "; ".join(problems) + f"; or {REEXPORT}.")

    def check_classes(self, class_names: Sequence[str], source: str = "this bank") -> None:
        """Raise a ``ValueError`` when ``class_names`` differs from the bank's class list (order included)."""
        names = [str(c) for c in class_names]
        if names != self.class_names:
            raise ValueError(
                f"{source} was built for classes {self.class_names}, but the given class list is {names} "
                f"(differences: {_diff_names(self.class_names, names)}). Pass the class names the bank was built "
                f"with (same order), or {REEXPORT} on this data."
            )

    def apply(
        self,
        target: FrozenTarget,
        x: torch.Tensor,
        classes: torch.Tensor | None = None,
        fill: torch.Tensor | Sequence[torch.Tensor | None] | bool | None = None,
        tau: float | None = None,
    ) -> torch.Tensor:
        """Transfer: logits ``H(x; M_c)`` ``[B, K]`` of each sample through its class pathway, without a generator.

        Gradients flow to ``x`` when it requires them (pathway-gradient attribution).

        Args:
            target: the frozen target the bank was built on (checked by tensor hash, taps and channels).
            x: ``[B, C, H, W]`` images, normalised as for the target.
            classes: ``[B]`` class of each sample; the target's own prediction ``argmax H(x)`` when ``None``.
            fill: mean ablation values, ``[D]`` or per tap ``[C_l]``; when ``None``, the model's own (``GenCNP.fills()``)
                if ``target`` is a GenCNP model, else zeros. Pass ``fill=False`` for zeros with a GenCNP model.
            tau: threshold (the stored one when ``None``).
        """
        if fill is None and callable(getattr(target, "fills", None)):
            fill = target.fills()  # the model's ablation: mean fill under mean ablation, None (zeros) otherwise
        elif fill is False:
            fill = None
        target = _frozen(target)
        self.check_target(target)
        if classes is None:
            with torch.no_grad():
                classes = target(x).argmax(1)
        classes = torch.as_tensor(classes, device=x.device).long()
        if classes.shape != (x.shape[0],):
            raise ValueError(f"classes must be [B] = [{x.shape[0]}], got {list(classes.shape)}.")
        if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise ValueError(
                f"classes must lie in [0, {self.num_classes}), "
                f"got values in [{int(classes.min())}, {int(classes.max())}]."
            )
        masks = self.class_pathways(tau).to(x.device)[classes].to(x.dtype)
        if isinstance(fill, torch.Tensor):
            if fill.shape != (self.num_channels,):
                raise ValueError(
                    f"fill must be [D] = [{self.num_channels}] or one [C_l] tensor per tap, got {list(fill.shape)}."
                )
            fill = list(torch.split(fill.to(x.device), self.tap_channels))
        return target(x, masks=list(torch.split(masks, self.tap_channels, dim=1)), fill=fill)

    # ----- summaries -----
    def summary(self, tau: float | None = None) -> dict[str, dict[str, Any]]:
        """Per class: ``n``, ``kept`` (fraction of the ``D`` channels in ``M_c``; ``None`` without tau),
        ``per_tap`` (kept fraction per tap) and ``mean_frequency`` (mean of ``f_c``)."""
        per_class = tau is None and self.class_taus is not None
        tau = tau if tau is not None else self.tau
        freq = self.frequencies()
        masks = self.class_pathways(None if per_class else tau).double() if (tau is not None or per_class) else None
        out = {}
        for k, name in enumerate(self.class_names):
            row: dict[str, Any] = {"n": int(self.n[k]), "mean_frequency": float(freq[k].mean())}
            if per_class:
                row["tau"] = self.class_taus[k]
            if masks is not None:
                row["kept"] = float(masks[k].mean())
                row["per_tap"] = {
                    t: float(part.mean()) for t, part in zip(self.tap_names, torch.split(masks[k], self.tap_channels))
                }
            else:
                row["kept"], row["per_tap"] = None, {t: None for t in self.tap_names}
            out[name] = row
        return out

    # ----- file -----
    def _metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "target_arch": self.target_arch,
            "target_hash": self.target_hash,
            "taps": self.tap_names,
            "tap_channels": self.tap_channels,
            "class_names": self.class_names,
            "tau": self.tau,
            "class_taus": self.class_taus,
            "class_source": self.class_source,
            "split": self.split,
            "total": int(self.n.sum()),
            "gencnp_version": __version__,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "info": self.info,
        }

    def to_bytes(self) -> bytes:
        """The bank's file content (see the module docstring)."""
        return bank_bytes(self._metadata(), self.counts, self.n)

    def save(self, path: str | Path) -> Path:
        """Write the bank to ``path`` (one safetensors file) atomically; returns the path.

        Raises:
            PermissionError: the directory is not writable (nothing is touched).
        """
        if bool((self.counts > self.n[:, None]).any()) or bool((self.counts < 0).any()):
            raise ValueError(
                "bank counts are inconsistent (a count exceeds its class's n or is negative); "
                "update counts only through update() and merge()."
            )
        return write_atomic(path, self.to_bytes())

    @classmethod
    def load(
        cls, path: str | Path, target: FrozenTarget | None = None, class_names: Sequence[str] | None = None
    ) -> PathwayBank:
        """Read and validate a bank file; with ``target`` / ``class_names``, check that the bank fits them.

        Never unpickles: the file is parsed by ``safetensors`` and ``json`` only.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is truncated, altered or inconsistent, has an unknown ``format_version``, or does
                not fit ``target`` (tensor hash, taps, channel counts) or ``class_names``; the message names every
                mismatch and how to fix it.
        """
        path = Path(path)
        meta, counts, n = read_bank_file(path)
        damaged = f"pathway bank '{path}' is damaged"
        try:
            bank = cls(
                meta["class_names"],
                meta["taps"],
                meta["tap_channels"],
                meta["target_arch"],
                meta["target_hash"],
                meta["class_source"],
                meta["split"],
                meta["tau"],
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{damaged}: its metadata is invalid ({err}); {REEXPORT}.") from err
        problems = check_tensors(counts, n, bank.num_classes, bank.num_channels, meta["total"])
        if problems:
            raise ValueError(f"{damaged}: " + "; ".join(problems) + f"; {REEXPORT}.")
        bank.counts, bank.n = counts.clone(), n.clone()
        try:
            bank.class_taus = meta.get("class_taus")  # absent in files written before per-class taus
        except (TypeError, ValueError) as err:
            raise ValueError(f"{damaged}: its class_taus are invalid ({err}); {REEXPORT}.") from err
        bank.info = dict(meta.get("info") or {})
        bank.metadata = meta
        if target is not None:
            bank.check_target(target, source=f"pathway bank '{path}'")
        if class_names is not None:
            bank.check_classes(class_names, source=f"pathway bank '{path}'")
        return bank


def _shown(bank: PathwayBank, summary: dict) -> tuple[list[int], str]:
    """The classes the heatmap and the screen table show (``class_views.shown_classes``, by class-pathway kept)."""
    kept = [float("nan") if summary[c]["kept"] is None else summary[c]["kept"] for c in bank.class_names]
    if all(v != v for v in kept):  # no tau chosen yet: rank by samples
        return shown_classes([float(summary[c]["n"]) for c in bank.class_names], "samples")
    return shown_classes(kept, "class-pathway kept fraction")


def _draw_heatmap(bank: PathwayBank, png: Path, title_path: str) -> None:
    from matplotlib.figure import Figure  # matplotlib only when a heatmap is drawn

    summary = bank.summary()
    rows, note = _shown(bank, summary)
    freq = bank.frequencies().numpy()[rows]
    k, d = freq.shape
    fig = Figure(figsize=(min(20.0, max(8.0, d / 24)), min(30.0, max(3.2, 0.38 * k + 1.8))), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(freq, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    labels = []
    for name in [bank.class_names[c] for c in rows]:
        row = summary[name]
        kept = f", kept {100 * row['kept']:.0f}%" if row["kept"] is not None else ""
        labels.append(f"{name} (n={row['n']}{kept})")
    step = max(1, math.ceil(k / 60))
    ax.set_yticks(range(0, k, step), labels[::step], fontsize=8)
    bounds = np.cumsum([0, *bank.tap_channels])
    for b in bounds[1:-1]:
        ax.axvline(b - 0.5, color="white", linewidth=1.2)
    centres = (bounds[:-1] + bounds[1:]) / 2 - 0.5
    ax.set_xticks(centres, [f"{t}\n({c} ch)" for t, c in zip(bank.tap_names, bank.tap_channels)], fontsize=8)
    ax.set_xlabel(f"channel j of the pathway (D = {d}), grouped by tap")
    ax.set_ylabel(f"class c (source: {bank.class_source})")
    tau = f"tau = {bank.tau:g}" if bank.tau is not None else "tau not chosen"
    ax.set_title(
        f"Pathway bank {title_path}\n{bank.target_arch}, {bank.split} split, {int(bank.n.sum())} samples, {tau}"
        + (f"\n{note}" if note else ""),
        fontsize=10,
    )
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01)
    cbar.set_label("selection frequency f_c[j]" + (f"  (M_c: f_c >= {bank.tau:g})" if bank.tau is not None else ""))
    if bank.tau is not None:
        cbar.ax.axhline(bank.tau, color="red", linewidth=1.5)
    save_figure(fig, png, dpi=120)


def inspect_bank(bank: str = DEFAULT_BANK, out_dir: str | None = None) -> str:
    """Print a pathway bank's metadata and per-class summary, and draw its class-by-channel heatmap.

    Uses only the bank file: no model, no data.

    Args:
        bank: path of a ``.safetensors`` bank written by ``PathwayBank.save`` / ``PathwayBankWriter``.
        out_dir: folder for the heatmap PNG (``<bank stem>_heatmap.png``); the bank's folder when unset.

    Returns:
        The path of the heatmap PNG.
    """
    b = PathwayBank.load(bank)
    meta = b.metadata
    summary = b.summary()
    lines = [
        f"pathway bank {bank}",
        f"  format_version {meta['format_version']}, written by gencnp {meta.get('gencnp_version', '?')} "
        f"at {meta.get('created_utc', '?')}",
        f"  target {b.target_arch} (tensor hash {b.target_hash[:16]}...)",
        f"  taps ({len(b.tap_names)}, D = {b.num_channels}): "
        + ", ".join(f"{t} [{c}]" for t, c in zip(b.tap_names, b.tap_channels)),
        f"  classes K = {b.num_classes}, class source '{b.class_source}', split '{b.split}', {int(b.n.sum())} samples",
        f"  tau {b.tau if b.tau is not None else 'not chosen'}",
    ]
    rule = b.info.get("tau_rule")
    if rule:
        lines.append(f"  tau rule: {rule}")
    width = max(len("class"), *(len(c) for c in b.class_names))
    head = f"{'class':<{width}}  {'n':>7}  {'kept':>6}  {'mean f':>6}  " + "  ".join(f"{t:>10}" for t in b.tap_names)
    lines += ["", head, "-" * len(head)]
    pct = lambda v: "   -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731
    out = Path(out_dir) if out_dir is not None else Path(bank).parent
    out.mkdir(parents=True, exist_ok=True)
    rows, note = _shown(b, summary)
    if note:  # many classes: the table on screen shows the selection, the full one goes to CSV/JSON
        table = out / f"{Path(bank).stem}_classes.json"
        write_json(table, summary)
        lines.insert(len(lines) - 3, f"  per-class table: {note}; all classes in {table}")
    for name, row in [(b.class_names[c], summary[b.class_names[c]]) for c in rows]:
        taps = "  ".join(f"{pct(row['per_tap'][t]):>10}" for t in b.tap_names)
        lines.append(f"{name:<{width}}  {row['n']:>7}  {pct(row['kept'])}  {row['mean_frequency']:6.3f}  {taps}")
    png = out / f"{Path(bank).stem}_heatmap.png"
    _draw_heatmap(b, png, Path(bank).name)
    lines += ["", f"heatmap: {png}"]
    print("\n".join(lines))
    return str(png)
