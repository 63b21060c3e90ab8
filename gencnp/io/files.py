"""File output shared by every writer of the package: one permission rule (0644), atomic replacement, JSON-safe
values, figures.

- ``check_writable(path)``: fail before any work when ``path`` cannot be written (creates its folder).
- ``write_atomic(path, data)``: a temporary file in the same folder, fsync, ``os.replace``; a reader never sees a
  partial file and an interrupted write leaves the previous file as it was. Files are mode 0644.
- ``write_json(path, obj)``: ``json_safe(obj)`` written atomically.
- ``json_safe(obj)``: tensors, numpy scalars and tuples to plain JSON types, NaN and inf to ``null``.
- ``save_figure(fig, path, dpi)``: a matplotlib figure rendered in memory, written atomically, then closed.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "check_name_lengths",
    "check_writable",
    "check_writable_dir",
    "json_safe",
    "path_exists",
    "save_figure",
    "write_atomic",
    "write_json",
]


def _refused(err: OSError, default: type[OSError], what: str, fix: str) -> OSError:
    """``what (reason); nothing was written. fix`` as a ``PermissionError`` when ``err`` is one, else ``default``."""
    kind = PermissionError if isinstance(err, PermissionError) else default
    return kind(f"{what} ({err.strerror or err}); nothing was written. {fix}")


def check_writable(path: str | Path) -> Path:
    """Fail early, before any work or write, when ``path`` cannot be written; creates its directory if missing.

    Raises:
        PermissionError: the directory is not writable.
        FileNotFoundError / NotADirectoryError: the directory cannot be created or is not a directory.
        IsADirectoryError: ``path`` is a directory.
    """
    path = Path(path)
    directory = path.parent
    if path.is_dir():
        raise IsADirectoryError(
            f"cannot write '{path}': it is a directory; give a file path such as '{path}/bank.safetensors'."
        )
    if not directory.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _refused(
                err,
                FileNotFoundError,
                f"cannot create the directory '{directory}' for '{path.name}'",
                "Create it yourself, fix the parent's permissions, or choose a writable path.",
            ) from err
    if not directory.is_dir():
        raise NotADirectoryError(f"cannot write '{path}': '{directory}' is not a directory; choose another path.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write '{path}': the directory '{directory}' is not writable; nothing was written. Fix its "
            "permissions (chmod u+w) or choose another output path."
        )
    return path


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text written as UTF-8) to ``path`` atomically: a temporary file in the same directory, fsync, then ``os.replace``.

    The directory is created when missing. Whatever goes wrong (no permission, full disk, an exception or
    ``KeyboardInterrupt`` mid-write), an existing file at ``path`` is left as it was and the temporary file is
    removed.

    Raises:
        PermissionError: the directory cannot be written (checked before anything is touched).
        FileNotFoundError / NotADirectoryError: the directory cannot be created or is not a directory.
        IsADirectoryError: ``path`` is a directory.
    """
    path = check_writable(path)
    directory = path.parent
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise _refused(
            err,
            OSError,
            f"cannot write '{path}': creating a temporary file in '{directory}' failed",
            "Fix the directory's permissions or free space, or choose another output path.",
        ) from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                err.errno,
                f"no space left on the device (or quota exceeded) while writing '{path}' ({len(data)} bytes); the "
                f"previous file is unchanged and no partial file was left. Free space in '{directory}', or choose "
                "an output folder on another disk",
                str(path),
            ) from err
        raise
    try:  # make the rename itself durable; not every platform can open a directory
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with dict keys as strings, tuples as lists, tensors and numpy values as Python numbers, and NaN or
    infinite floats as ``None`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # tensors, numpy arrays and numpy scalars
        return json_safe(obj.tolist())
    return obj


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """``json_safe(obj)`` written atomically to ``path``."""
    return write_atomic(path, json.dumps(json_safe(obj), indent=indent))


def save_figure(fig, path: str | Path, dpi: int = 120, pad_inches: float = 0.15) -> Path:
    """Render ``fig`` into memory (format from the suffix, PNG by default), write it atomically, close it."""
    import matplotlib.pyplot as plt  # matplotlib only for callers that draw

    buf = io.BytesIO()
    try:
        fig.savefig(
            buf, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight", pad_inches=pad_inches
        )
    finally:
        plt.close(fig)
    return write_atomic(path, buf.getvalue())


def path_exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # ENAMETOOLONG and the like: it cannot exist
        return False


def check_name_lengths(path: str | Path, what: str, fix: str, existing: Path | None = None) -> None:
    """Raise ``ValueError`` when a component of ``path`` is longer than the filesystem allows (``NAME_MAX``, 255
    bytes on most), which would fail only when the first file is written."""
    existing = existing or Path("/")
    try:
        limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    long = [part for part in Path(path).parts if len(os.fsencode(part)) > limit]
    if long:
        shown = long[0] if len(long[0]) <= 40 else f"{long[0][:20]}...{long[0][-12:]}"
        raise ValueError(
            f"cannot write the {what} '{shown}': the path has a component of {len(os.fsencode(long[0]))} bytes, "
            f"longer than the filesystem's limit of {limit}; nothing was written. Use shorter folder or file names: "
            f"{fix}"
        )


def check_writable_dir(directory: str | Path, what: str, fix: str) -> None:
    """Raise when ``directory`` (existing, or to be created under its nearest existing parent) cannot be written.

    Nothing is created. Raises ``PermissionError`` (not writable), ``NotADirectoryError`` (a parent is a file) or
    ``ValueError`` (a name longer than the filesystem allows).
    """
    directory = Path(directory)
    probe = directory
    while not path_exists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    check_name_lengths(directory, what, fix, probe)
    if not probe.is_dir():
        raise NotADirectoryError(
            f"cannot write the {what} '{directory}': '{probe}' is a file, not a folder; nothing was written. Move "
            f"that file away, or choose another folder: {fix}"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "it is" if probe == directory else f"its parent '{probe}' is"
        raise PermissionError(
            f"cannot write the {what} '{directory}': {where} not writable; nothing was written. Fix the permissions "
            f"(chmod u+w '{probe}') or choose a writable folder: {fix}"
        )
