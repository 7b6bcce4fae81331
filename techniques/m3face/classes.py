"""M3Face's face-parsing class set and the label orders of the parsers, matched by class NAME.

M3Face bundles DML-CSR, which labels the 19 CelebAMask-HQ classes in one order; the pack's parser
(BiSeNet, :mod:`likeness.face_analysis.parsing`) labels the same classes in another order and spells
three of them differently (eyeglasses / eye_g, earring / ear_r, necklace / neck_l). Both orders are
data (``data/label_orders.json``, with their sources); every conversion goes through the names, so an
index is never carried from one order into the other.

``l_*`` / ``r_*`` follow the pack's parser: the image-left and image-right part (see
:mod:`likeness.face_analysis.parsing.regions`). Which one M3Face's masks colour as ``l_eye`` is
learnt together with the colours by the palette calibration.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import InvalidInputError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
M3FACE_ORDER = "dml_csr_celebamask_hq"
PACK_PARSER_ORDER = "bisenet_zllrunning"


@dataclass(frozen=True)
class LabelOrder:
    """One parser's class names, index = label id."""

    name: str
    labels: tuple[str, ...]
    source: str


@functools.lru_cache(maxsize=1)
def _label_data() -> tuple[dict[str, LabelOrder], dict[str, str]]:
    with open(os.path.join(DATA_DIR, "label_orders.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    orders = {name: LabelOrder(name, tuple(spec["labels"]), spec["source"]) for name, spec in data["orders"].items()}
    return orders, dict(data["aliases"])


def label_order(name: str) -> LabelOrder:
    orders = _label_data()[0]
    if name not in orders:
        raise InvalidInputError(f"unknown label order '{name}'; known: {', '.join(orders)}.")
    return orders[name]


def m3face_classes() -> tuple[str, ...]:
    """M3Face's class names in M3Face's (DML-CSR) label order."""
    return label_order(M3FACE_ORDER).labels


def canonical_name(name: str, what: str = "class name") -> str:
    """``name`` as M3Face spells it (case, spaces and the BiSeNet spellings folded); unknown names raise."""
    key = str(name).strip().lower().replace(" ", "_").replace("-", "_")
    key = _label_data()[1].get(key, key)
    if key not in m3face_classes():
        raise InvalidInputError(f"unknown face class {what} '{name}'. Known classes: {', '.join(m3face_classes())} "
                                f"(also accepted: {', '.join(_label_data()[1])}).")
    return key


def index_map(from_order: str, to_order: str) -> np.ndarray:
    """``lookup[i]`` = the ``to_order`` id of the class that has id ``i`` in ``from_order`` (by name)."""
    source, target = label_order(from_order), label_order(to_order)
    target_index = {canonical_name(n): i for i, n in enumerate(target.labels)}
    lookup = np.array([target_index[canonical_name(n)] for n in source.labels], dtype=np.int64)
    if sorted(lookup.tolist()) != list(range(len(target.labels))):
        raise InvalidInputError(f"label orders '{from_order}' and '{to_order}' do not name the same classes.")
    return lookup


def _id_range(labels) -> tuple[int, int]:
    if isinstance(labels, torch.Tensor):
        return (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
    array = np.asarray(labels)
    return (int(array.min()), int(array.max())) if array.size else (0, 0)


def convert_labels(labels, from_order: str, to_order: str):
    """A label map (numpy array or tensor of ids, any shape) re-indexed from one order to another by name."""
    lookup = index_map(from_order, to_order)
    low, high = _id_range(labels)
    if low < 0 or high >= len(lookup):
        raise InvalidInputError(f"a label map in order '{from_order}' holds ids outside 0..{len(lookup) - 1}.")
    if isinstance(labels, torch.Tensor):
        return torch.from_numpy(lookup).to(labels.device)[labels.long()].to(labels.dtype)
    array = np.asarray(labels)
    return lookup[array.astype(np.int64)].astype(array.dtype)
