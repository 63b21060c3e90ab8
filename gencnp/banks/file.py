"""The pathway-bank file (format described in ``gencnp.banks.bank``): its checksum, its bytes, and a validating reader.

Reading never unpickles: the file is parsed by ``safetensors`` and ``json`` only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["FORMAT_VERSION", "KIND", "DEFAULT_BANK", "REEXPORT", "checksum", "bank_bytes", "read_bank_file"]

FORMAT_VERSION = 1
KIND = "gencnp.PathwayBank"
DEFAULT_BANK = "runs/fashion_mnist/bank.safetensors"
REEXPORT = "re-export the bank: python train.py predict --config configs/<data>/bank.yaml --ckpt_path <generator>.ckpt"
REQUIRED = (
    "kind",
    "target_arch",
    "target_hash",
    "taps",
    "tap_channels",
    "class_names",
    "tau",
    "class_source",
    "split",
    "total",
)


def checksum(meta_json: str, counts: np.ndarray, n: np.ndarray) -> str:
    """sha256 over the UTF-8 metadata string, then the little-endian int64 bytes of ``counts`` and ``n``."""
    h = hashlib.sha256(meta_json.encode("utf-8"))
    h.update(np.ascontiguousarray(counts, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(n, dtype="<i8").tobytes())
    return h.hexdigest()


def bank_bytes(meta: dict[str, Any], counts: torch.Tensor, n: torch.Tensor) -> bytes:
    """The file content of a bank with metadata ``meta`` and tensors ``counts [K, D]``, ``n [K]``."""
    try:
        meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"bank.info must be JSON-serialisable without NaN/Inf ({err}); store plain numbers and strings."
        ) from err
    counts, n = counts.contiguous().to(torch.int64), n.contiguous().to(torch.int64)
    digest = checksum(meta_json, counts.numpy(), n.numpy())
    return st_save({"counts": counts, "n": n}, metadata={"gencnp": meta_json, "sha256": digest})


def _looks_like_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON starting with ``{``.
    (Its first byte is the length's lowest byte, so it can be 0x80, a pickle's first byte too.)"""
    if len(data) < 9:
        return False
    n = int.from_bytes(data[:8], "little")
    return 8 + n <= len(data) and data[8:9] == b"{"


def _parse(path: Path, damaged: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the ``__metadata__`` of the safetensors file at ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"pathway bank '{path}' does not exist; fix the path, or {REEXPORT}.")
    data = path.read_bytes()
    if not _looks_like_safetensors(data) and (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
        # a zip (torch.save) or a pickle, never a bank
        raise ValueError(
            f"'{path}' is a torch checkpoint or pickle (e.g. a .ckpt), not a pathway bank (one .safetensors file "
            "written by PathwayBankWriter); nothing was read from it. Pass the bank file (e.g. "
            f"{DEFAULT_BANK}), or export one from this checkpoint: python train.py predict --config "
            "configs/<data>/bank.yaml --ckpt_path <generator>.ckpt"
        )
    try:
        tensors = st_load(data)
        (hlen,) = np.frombuffer(data[:8], dtype="<u8")
        header = json.loads(data[8 : 8 + int(hlen)])
    except Exception as err:
        raise ValueError(
            f"{damaged}: it is not a readable safetensors file ({err}). It was truncated or altered "
            f"(an interrupted copy?); copy it again, or {REEXPORT}."
        ) from err
    return tensors, header.get("__metadata__") or {}


def _metadata(path: Path, file_meta: dict[str, str], damaged: str) -> dict[str, Any]:
    """The bank's ``gencnp`` metadata document, checked to be one of this format version."""
    if "gencnp" not in file_meta:
        raise ValueError(
            f"'{path}' is a safetensors file but not a gencnp pathway bank (no 'gencnp' metadata); "
            "pass a file written by PathwayBank.save or PathwayBankWriter."
        )
    try:
        meta = json.loads(file_meta["gencnp"])
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
    except ValueError as err:
        raise ValueError(
            f"{damaged}: its 'gencnp' metadata is not valid JSON ({err}); the header was altered; {REEXPORT}."
        ) from err
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"pathway bank '{path}' has format_version {version!r}, but this gencnp reads format_version "
            f"{FORMAT_VERSION} only. Upgrade gencnp to the version that wrote it "
            f"({meta.get('gencnp_version', 'unknown')}), "
            f"or {REEXPORT} with this one."
        )
    return meta


def read_bank_file(path: str | Path) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """``(meta, counts, n)`` of a bank file whose structure, checksum and required metadata keys are valid.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a bank, is truncated or altered, or has an unknown ``format_version``.
    """
    path = Path(path)
    damaged = f"pathway bank '{path}' is damaged"
    tensors, file_meta = _parse(path, damaged)
    meta = _metadata(path, file_meta, damaged)
    if set(tensors) != {"counts", "n"}:
        raise ValueError(f"{damaged}: expected tensors 'counts' and 'n', found {sorted(tensors)}; {REEXPORT}.")
    counts, n = tensors["counts"], tensors["n"]
    if counts.dtype != torch.int64 or n.dtype != torch.int64:
        raise ValueError(f"{damaged}: counts and n must be int64, found {counts.dtype} and {n.dtype}; {REEXPORT}.")
    digest = checksum(file_meta["gencnp"], counts.numpy(), n.numpy())
    if file_meta.get("sha256") != digest:
        raise ValueError(
            f"{damaged}: its checksum does not match its content (sha256 {str(file_meta.get('sha256'))[:12]} "
            f"recorded, {digest[:12]} computed): the metadata or the counts were altered after saving. "
            f"Restore the original file, or {REEXPORT}."
        )
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{damaged}: its metadata lacks {missing}; {REEXPORT}.")
    if meta["kind"] != KIND:
        raise ValueError(f"'{path}' holds a '{meta['kind']}', not a pathway bank ('{KIND}'); pass a bank file.")
    return meta, counts, n


def check_tensors(counts: torch.Tensor, n: torch.Tensor, k: int, d: int, total: int) -> list[str]:
    """Why ``counts`` and ``n`` do not fit a ``K = k``, ``D = d`` bank of ``total`` samples (empty when they do)."""
    problems = []
    if tuple(counts.shape) != (k, d):
        problems.append(f"counts has shape {list(counts.shape)}, metadata says [K, D] = [{k}, {d}]")
    if tuple(n.shape) != (k,):
        problems.append(f"n has shape {list(n.shape)}, metadata says [K] = [{k}]")
    if not problems:
        if bool((n < 0).any()) or bool((counts < 0).any()) or bool((counts > n[:, None]).any()):
            problems.append("counts must satisfy 0 <= counts[c, j] <= n[c]")
        if int(n.sum()) != total:
            problems.append(f"n sums to {int(n.sum())}, metadata total is {total}")
    return problems
