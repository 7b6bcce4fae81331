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
_TEMP_RANDOM_CHARS = 8          # the random part of a tempfile.mkdtemp name
# The temporary folder is named "." + file name + "." + random + ".partial": this much longer than the file name.
TEMP_NAME_OVERHEAD = 2 + _TEMP_RANDOM_CHARS + len(_TEMP_SUFFIX)
# Used where the file system does not report its limits (Windows): NTFS names, and MAX_PATH without long paths.
_FALLBACK_NAME_MAX, _FALLBACK_PATH_MAX = 255, 260


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def _name_limits(directory: str) -> tuple[int, int]:
    """The file system's longest file name and longest path (with its terminating NUL) at ``directory``, in
    bytes; asked of the nearest folder that exists, since ``directory`` may not be created yet."""
    existing = directory
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    limits = []
    for name, fallback in (("PC_NAME_MAX", _FALLBACK_NAME_MAX), ("PC_PATH_MAX", _FALLBACK_PATH_MAX)):
        try:
            value = os.pathconf(existing, name)
        except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or not reported here
            value = -1
        limits.append(value if value > 0 else fallback)
    return limits[0], limits[1]


def longest_file_name(directory: str) -> int:
    """The longest file name, in bytes, that :func:`atomic_save` can write into ``directory``.

    Both paths of a write must fit the file system: the temporary folder next to the file (its name is the
    file name plus ``TEMP_NAME_OVERHEAD``) within the name limit, and the temporary file inside it
    (``directory/folder/name``) within the path limit; the final path is shorter than either.
    """
    directory = os.path.abspath(directory)
    name_max, path_max = _name_limits(directory)
    used_by_directory = len(os.fsencode(directory)) + 2 * len(os.sep) + 1    # + separators + the NUL
    by_path = (path_max - used_by_directory - TEMP_NAME_OVERHEAD) // 2
    return max(0, min(name_max - TEMP_NAME_OVERHEAD, by_path))


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
