"""Resume bookkeeping of ``eval``: one record per finished cell, and the metric cache by content hash.

Why: an evaluation grid runs for hours; a crash, Ctrl-C or a killed job must cost at most the cell that
was running. A cell counts as finished only when its record exists, and the record is written last
(after its images and metrics), atomically (temporary file, fsync, rename), so a killed run leaves
either no record or a complete one. The record keeps a fingerprint of what was generated (the workflow
with the cell's inputs bound and the photo's content hash): a cell whose workflow or photo changed
since is run again rather than reported with stale images.

Metrics are cached per image under a key of the image's content hash plus everything the values depend
on (references, prompt, metric names, model identities), so re-running a report, adding a variant or
resuming never measures the same image twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """The sha256 of ``value``'s canonical JSON (sorted keys): equal values, equal hashes."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def atomic_write_json(path: str, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False))


def read_json(path: str) -> Any | None:
    """The JSON at ``path``; None when it is missing or unreadable (a torn file cannot exist, but a
    hand-edited one can: it is then treated as absent and recomputed)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# Cell records


@dataclass
class CellRecord:
    key: str
    fingerprint: str
    images: list[str]              # paths relative to the output folder
    seconds: float                 # wall time of the workflow run
    peak_memory_mb: float
    memory_kind: str               # what peak_memory_mb measures (see evaluation/cost.py)


class CellStore:
    """``<out>/cells/<key>.json``: the finished cells of one output folder."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.folder = os.path.join(out_dir, "cells")

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key + ".json")

    def load(self, key: str) -> CellRecord | None:
        data = read_json(self.path(key))
        if not isinstance(data, dict):
            return None
        try:
            return CellRecord(**data)
        except TypeError:  # written by another version: recompute
            return None

    def finished(self, key: str, fingerprint: str) -> CellRecord | None:
        """The record of a cell finished with this fingerprint, else None (missing, made from other inputs, or
        an image of it deleted since)."""
        record = self.load(key)
        if record is None or record.fingerprint != fingerprint:
            return None
        return record if all(os.path.isfile(os.path.join(self.out_dir, p)) for p in record.images) else None

    def save(self, record: CellRecord) -> None:
        atomic_write_json(self.path(record.key), asdict(record))


# --------------------------------------------------------------------------------------------------
# Metric cache


class MetricCache:
    """``<out>/metric_cache/<key>.json``: metric values of one image in one context; ``misses`` counts the
    lookups that found nothing (the images measured)."""

    def __init__(self, out_dir: str):
        self.folder = os.path.join(out_dir, "metric_cache")
        self.misses = 0

    @staticmethod
    def key(image_sha256: str, context: dict) -> str:
        return json_sha256({"image": image_sha256, "context": context})

    def get(self, key: str) -> dict[str, float] | None:
        data = read_json(os.path.join(self.folder, key + ".json"))
        if isinstance(data, dict):
            return data
        self.misses += 1
        return None

    def put(self, key: str, values: dict[str, float]) -> None:
        atomic_write_json(os.path.join(self.folder, key + ".json"), values)
