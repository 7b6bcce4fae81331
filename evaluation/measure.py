"""Metrics of ``eval``'s generated images, each image measured once: :func:`~.metrics.compute_metrics` behind
the content-hash cache of :class:`~.records.MetricCache`.

Why: the same image is reported again on every resumed run and every re-written table; measuring it again
(CLIP, DINO, face analysis) would cost more than many generations. The cache key is the image's sha256 plus
everything its values depend on: the identity's reference and second photo (by content), the prompt, the
metric names and the names of the metric models.

What each image is compared with: the identity's reference photo (the one the workflow got) and, for the
copy-paste check, its first held-out photo (the second real photo; without one the check is left out).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidInputError
from .grid import Cell, Identity
from .metrics import METRICS, MetricModels, available_metrics, compute_metrics, parse_metric_names
from .records import MetricCache, file_sha256

EVAL_INPUTS = ("second_photos", "prompts")  # what eval can give compute_metrics besides images and references


def load_image(path: str) -> torch.Tensor:
    """IMAGE ``[1,H,W,3]`` float in 0..1 from a file (RGB; alpha and palettes converted)."""
    from PIL import Image

    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]


class Measurer:
    """Metric values per generated image, computed on a cache miss only (``cache.misses`` counts them)."""

    def __init__(self, models: MetricModels, metrics: str | None, out_dir: str, model_ids: dict):
        self.models = models
        self.names = parse_metric_names(metrics) if metrics else None
        unsupported = [n for n in self.names or () if set(METRICS[n].inputs) - set(EVAL_INPUTS)]
        if unsupported and metrics.strip().lower() == "all":
            self.names = [n for n in self.names if n not in unsupported]
        elif unsupported:
            raise InvalidInputError(f"eval cannot measure {', '.join(unsupported)} (it needs inputs a generation grid "
                                    f"does not have: {', '.join(sorted(set().union(*(METRICS[n].inputs for n in unsupported))))}).")
        self.cache = MetricCache(out_dir)
        self.model_ids = model_ids
        self._hashes: dict[str, str] = {}

    def _sha(self, path: str) -> str:
        if path not in self._hashes:
            self._hashes[path] = file_sha256(path)
        return self._hashes[path]

    def context(self, cell: Cell) -> dict:
        second = cell.identity.held_out[0] if cell.identity.held_out else None
        return {"reference": self._sha(cell.identity.reference), "second": second and self._sha(second),
                "prompt": cell.prompt, "metrics": self.names, "models": self.model_ids}

    def rows(self, cell: Cell, image_paths: list[str]) -> list[dict]:
        """One dict of metric columns (and ``notes``) per image, from the cache or measured now."""
        context = self.context(cell)
        keys = [MetricCache.key(file_sha256(p), context) for p in image_paths]
        values = [self.cache.get(k) for k in keys]
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            measured = self._compute([image_paths[i] for i in missing], cell.identity, cell.prompt)
            for i, row in zip(missing, measured, strict=True):
                self.cache.put(keys[i], row)
                values[i] = row
        return values

    def _compute(self, paths: list[str], identity: Identity, prompt: str) -> list[dict]:
        second = load_image(identity.held_out[0]) if identity.held_out else None
        if self.names is None:
            names = available_metrics(self.models, second_photos=second, prompts=prompt)
        else:  # the copy-paste check needs a held-out photo: left out (empty cells) for identities without one
            names = [n for n in self.names if second is not None or "second_photos" not in METRICS[n].inputs]
        if not names:  # no metric model given: the rows hold time and memory only
            return [{} for _ in paths]
        reference = load_image(identity.reference)
        images = [load_image(p) for p in paths]
        same_size = len({tuple(i.shape) for i in images}) == 1
        batches = [torch.cat(images)] if same_size else images  # one batch unless the workflow made mixed sizes
        rows: list[dict] = []
        for batch in batches:
            measured = compute_metrics(batch, references=reference, second_photos=second,
                                       prompts=[prompt] * batch.shape[0], metrics=names, models=self.models)
            rows += [{k: v for k, v in row.items() if k != "image"} for row in measured]
        return rows
