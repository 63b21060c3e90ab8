"""``PathwayPredictionWriter``: stream per-sample pathways from ``trainer.predict`` to safetensors shards.

Each process writes its own shards into ``output_dir`` (atomically), one per batch (``write_interval='batch'``,
memory stays flat) or one per dataloader at the end (``'epoch'``, predictions held in memory until then):

- ``pathways-rank{R:03d}-dl{d}-batch{i:06d}.safetensors`` or ``pathways-rank{R:03d}-dl{d}.safetensors``;
- tensors ``pathway`` (``uint8 [B, ceil(D/8)]`` bits packed big-endian along channels, ``numpy.packbits``, or
  ``bool [B, D]`` with ``pack_bits=False``), ``y_hat`` int64 ``[B]``, ``kept`` float32 ``[B]``, ``prediction``
  int64 ``[B]``, ``label`` int64 ``[B]`` (when the data has labels) and ``batch_indices`` int64 ``[B]`` (dataset
  indices, when the loader reports them);
- metadata ``"gencnp"``: JSON with ``format_version``, ``kind`` (``"gencnp.PathwayPredictions"``), ``packed``,
  ``num_channels`` (``D``), ``taps``, ``tap_channels``, ``target_arch``, ``target_hash``, ``split``, ``rank``,
  ``world_size``, ``dataloader_idx``, ``batch_idx`` and ``num_samples``.

``load_predictions(output_dir)`` reads every shard back (bits unpacked, samples ordered by dataset index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors import safe_open
from safetensors.torch import save

from gencnp.io.files import check_writable, write_atomic

__all__ = ["PathwayPredictionWriter", "load_predictions", "SHARD_GLOB"]

FORMAT_VERSION = 1
KIND = "gencnp.PathwayPredictions"
SHARD_GLOB = "pathways-rank*.safetensors"
_FIELDS = {"y_hat": torch.int64, "kept": torch.float32, "prediction": torch.int64, "label": torch.int64}


class PathwayPredictionWriter(BasePredictionWriter):
    """Write ``GenCNP.predict_step`` outputs (pathways, ``y_hat``, ``kept``, ``prediction``, ``label``) to shards.

    Args:
        output_dir: folder of the shard files (created when missing).
        write_interval: ``'batch'`` (a shard per batch, flat memory) or ``'epoch'`` (a shard per dataloader).
        pack_bits: store pathways as packed bits (8x smaller) rather than ``bool``.
        overwrite: remove this writer's old shards (``pathways-rank*.safetensors`` only) from ``output_dir`` before
            predicting; when ``False``, existing shards are an error (mixing runs would corrupt the set).
    """

    def __init__(
        self,
        output_dir: str = "runs/fashion_mnist/predictions",
        write_interval: Literal["batch", "epoch"] = "batch",
        pack_bits: bool = True,
        overwrite: bool = True,
    ):
        if write_interval not in ("batch", "epoch"):
            raise ValueError(f"write_interval must be 'batch' or 'epoch', got '{write_interval}'.")
        super().__init__(write_interval)
        self.output_dir = Path(output_dir)
        self.pack_bits = pack_bits
        self.overwrite = overwrite

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            check_writable(self.output_dir / "probe.safetensors")
            old = sorted(self.output_dir.glob(SHARD_GLOB))
            if old and not self.overwrite:
                raise ValueError(
                    f"'{self.output_dir}' already holds {len(old)} pathway shards; choose an empty output_dir "
                    "or set overwrite: true to replace them."
                )
            for f in old:
                f.unlink()
        trainer.strategy.barrier("PathwayPredictionWriter.start")

    def _meta(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        dataloader_idx: int,
        batch_idx: int | None,
        num_samples: int,
    ) -> dict[str, Any]:
        target = getattr(pl_module, "target", None)
        dm = trainer.datamodule
        return {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "packed": self.pack_bits,
            "num_channels": int(getattr(target, "num_channels", 0)) or None,
            "taps": list(getattr(target, "tap_names", [])),
            "tap_channels": list(getattr(target, "tap_channels", [])),
            "target_arch": getattr(target, "arch", None),
            "target_hash": target.tensor_hash() if hasattr(target, "tensor_hash") else None,
            "split": getattr(dm, "predict_split", None) if dm is not None else None,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "dataloader_idx": dataloader_idx,
            "batch_idx": batch_idx,
            "num_samples": num_samples,
        }

    def _tensors(self, outputs: list[dict], indices: list | None) -> dict[str, torch.Tensor]:
        if not outputs or any(not isinstance(o, dict) or "pathway" not in o for o in outputs):
            raise TypeError(
                "PathwayPredictionWriter expects predict_step to return dicts with 'pathway' [B, D] "
                "(GenCNP.predict_step)."
            )
        pathway = torch.cat([o["pathway"].detach().cpu().bool() for o in outputs])
        out = {"pathway": pack(pathway) if self.pack_bits else pathway.contiguous()}
        for key, dtype in _FIELDS.items():
            parts = [o.get(key) for o in outputs]
            if all(p is not None for p in parts):
                out[key] = torch.cat([p.detach().cpu().reshape(-1).to(dtype) for p in parts]).contiguous()
        if indices:
            flat = [int(i) for batch in indices for i in batch]
            if len(flat) == len(pathway):
                out["batch_indices"] = torch.tensor(flat, dtype=torch.int64)
        return out

    def _write(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        write_atomic(self.output_dir / name, save(tensors, metadata={"gencnp": json.dumps(meta, sort_keys=True)}))

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        tensors = self._tensors([prediction], [batch_indices] if batch_indices is not None else None)
        meta = self._meta(trainer, pl_module, dataloader_idx, batch_idx, len(tensors["pathway"]))
        self._write(
            f"pathways-rank{trainer.global_rank:03d}-dl{dataloader_idx}-batch{batch_idx:06d}.safetensors", tensors, meta
        )

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        per_loader = [predictions] if predictions and isinstance(predictions[0], dict) else list(predictions)
        for d, outputs in enumerate(per_loader):
            if not outputs:
                continue
            idx = batch_indices[d] if d < len(batch_indices) else None
            tensors = self._tensors(list(outputs), idx)
            meta = self._meta(trainer, pl_module, d, None, len(tensors["pathway"]))
            self._write(f"pathways-rank{trainer.global_rank:03d}-dl{d}.safetensors", tensors, meta)


def pack(pathways: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, D]`` -> uint8 ``[B, ceil(D/8)]`` (``numpy.packbits`` along channels, big-endian bit order)."""
    return torch.from_numpy(np.packbits(pathways.cpu().numpy().astype(bool), axis=1))


def unpack(packed: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 ``[B, ceil(D/8)]`` -> bool ``[B, D]``."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), axis=1, count=num_channels).astype(bool))


def load_predictions(output_dir: str | Path, dataloader_idx: int = 0) -> dict[str, Any]:
    """Every shard of one dataloader in ``output_dir``, concatenated: ``pathway`` bool ``[N, D]``, ``y_hat``,
    ``kept``, ``prediction``, ``label``, ``batch_indices`` ``[N]`` (ordered by dataset index when known) and
    ``meta`` (the first shard's metadata).

    Raises:
        FileNotFoundError: no shard in ``output_dir``.
        ValueError: shards from different targets, taps or packings.
    """
    files = sorted(Path(output_dir).glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(
            f"no pathway shards ({SHARD_GLOB}) in '{output_dir}'; run train.py predict with PathwayPredictionWriter."
        )
    parts, meta0 = [], None
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            meta = json.loads((sf.metadata() or {}).get("gencnp", "{}"))
            if meta.get("kind") != KIND or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"'{f}' is not a gencnp pathway shard of format_version {FORMAT_VERSION}.")
            if meta["dataloader_idx"] != dataloader_idx:
                continue
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        key = ("target_hash", "taps", "tap_channels", "packed", "num_channels")
        if meta0 is None:
            meta0 = meta
        elif any(meta[k] != meta0[k] for k in key):
            raise ValueError(
                f"shard '{f}' differs from '{files[0]}' in {[k for k in key if meta[k] != meta0[k]]}; "
                "keep one run's shards per folder."
            )
        if meta["packed"]:
            tensors["pathway"] = unpack(tensors["pathway"], meta["num_channels"])
        parts.append(tensors)
    if not parts:
        raise FileNotFoundError(f"no pathway shards for dataloader {dataloader_idx} in '{output_dir}'.")
    keys = set.intersection(*(set(p) for p in parts))
    out: dict[str, Any] = {k: torch.cat([p[k] for p in parts]) for k in keys}
    if "batch_indices" in out:
        order = torch.argsort(out["batch_indices"], stable=True)
        out = {k: v[order] for k, v in out.items()}
    out["meta"] = meta0
    return out
