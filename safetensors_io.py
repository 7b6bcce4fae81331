"""Safetensors files written atomically and read with clear errors: the one place the pack writes weights.

Writes go to a temporary file in a private folder next to the target, are fsync'ed, then ``os.replace``d
over the target, and the directory is fsync'ed: a crash or SIGKILL at any moment leaves either the
previous complete file or the new complete one, never a torn file.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ModelFileError

_TEMP_SUFFIX = ".partial"


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def _write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write the file (a seam for tests that simulate a crash in the middle of a write)."""
    save_file(tensors, path, metadata=metadata)


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on Windows: the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(path: str) -> int:
    """Delete the temporary folders a killed writer left next to ``path``; returns how many."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temp_prefix(path)
    removed = 0
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(prefix) and name.endswith(_TEMP_SUFFIX):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
                removed += 1
    return removed


def atomic_save(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None) -> str:
    """Save ``tensors`` as safetensors at ``path`` atomically (temp file + fsync + rename); returns ``path``.

    The file is written inside a private temporary folder next to ``path`` (same file system, so the
    rename is atomic; and whatever temporary files the safetensors writer makes itself stay inside it).
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temp_files(path)
    prepared = {k: _storable(v) for k, v in tensors.items()}
    workdir = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=directory)
    try:
        temp = os.path.join(workdir, os.path.basename(path))
        _write_safetensors(prepared, temp, {str(k): str(v) for k, v in (metadata or {}).items()})
        _fsync_path(temp)
        os.replace(temp, path)
        _fsync_path(directory, directory=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return path


def _storable(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU tensor that owns its memory (safetensors refuses shared storage)."""
    with torch.inference_mode(False), torch.no_grad():
        return tensor.detach().to("cpu").contiguous().clone()


def load_tensors(path: str, what: str = "checkpoint",
                 hint: str = "delete it to start over") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file and its metadata; ModelFileError naming ``what`` and the path when it is missing
    or not a valid file (``hint``: what the user should do then)."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{what} '{path}' does not exist")
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{what} '{path}' is not a readable safetensors file ({exc}); {hint}") from exc
    return tensors, metadata
