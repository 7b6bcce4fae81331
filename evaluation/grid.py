"""The evaluation grid: identities × prompts × seeds × workflow variants, as a list of cells.

Why: ``python <pack> eval`` answers "which method or setting keeps this person best" only when every
variant generates the same pictures (same identity photo, prompt and seed). This module builds that
grid from folders and command-line values and names every cell stably, so a run can be resumed.

Identities. An identity is a folder of photos of one person (``.png .jpg .jpeg .webp .bmp``). The
*reference* photo is the one the workflow gets: the file named ``reference.*`` if there is one, else
the first file in name order. Every other photo is *held out*: the workflow never sees it, and the
metrics use it as a second real photo of the same person (the copy-paste check's ceiling). A folder
given to ``--identities`` that holds no photos but sub-folders is a folder of identities.

Variants. Several workflow files, and/or ``--sweep NODE.INPUT=v1,v2,...`` (repeatable: the product of
all sweeps). ``v1,v2`` are split on commas and each value is read as JSON when it parses, else kept as
text (as ``run --set``); ``NODE.INPUT=[...]`` gives the values as one JSON list (for texts with commas).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import InvalidInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_STEM = "reference"


class GridError(InvalidInputError):
    """The grid cannot be built: no photos, a malformed sweep, clashing variant names."""


# --------------------------------------------------------------------------------------------------
# Identities


@dataclass(frozen=True)
class Identity:
    name: str                 # the folder's name
    reference: str            # the photo the workflow gets
    held_out: tuple[str, ...]  # the other photos (never shown to the workflow)


def _photos(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    return [os.path.join(folder, n) for n in names]


def split_identity(folder: str) -> Identity:
    """The reference photo (``reference.*``, else the first by name) and the held-out rest of one folder."""
    photos = _photos(folder)
    if not photos:
        raise GridError(f"identity folder '{folder}' holds no photos ({', '.join(IMAGE_EXTENSIONS)}).")
    named = [p for p in photos if os.path.splitext(os.path.basename(p))[0].lower() == REFERENCE_STEM]
    reference = named[0] if named else photos[0]
    held_out = tuple(p for p in photos if p != reference)
    return Identity(os.path.basename(os.path.normpath(folder)), os.path.abspath(reference),
                    tuple(os.path.abspath(p) for p in held_out))


def find_identities(paths: Sequence[str]) -> list[Identity]:
    """Identities from folders: a folder with photos is one identity, a folder of folders holds several."""
    found: list[Identity] = []
    for path in paths:
        if not os.path.isdir(path):
            raise GridError(f"identity folder '{path}' does not exist.")
        if _photos(path):
            found.append(split_identity(path))
            continue
        subfolders = sorted(e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
        identities = [split_identity(sub) for sub in subfolders if _photos(sub)]
        if not identities:
            raise GridError(f"'{path}' holds neither photos nor identity folders with photos.")
        found += identities
    names = [i.name for i in found]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise GridError(f"several identity folders are named {', '.join(clashes)}: rename one (the name keys "
                        f"the results).")
    return found


# --------------------------------------------------------------------------------------------------
# Sweeps and variants


@dataclass(frozen=True)
class Sweep:
    node: str
    input: str
    values: tuple[Any, ...]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def parse_sweep(text: str) -> Sweep:
    """``NODE.INPUT=v1,v2,...`` (or ``NODE.INPUT=[json, list]``) -> :class:`Sweep`."""
    key, sep, raw = text.partition("=")
    node, dot, name = key.strip().rpartition(".")
    if not sep or not dot or not node or not name or not raw.strip():
        raise GridError(f"--sweep '{text}' is not NODE.INPUT=v1,v2,... (e.g. --sweep KSampler.cfg=4,6,8).")
    values: Any = None
    if raw.strip().startswith("["):
        try:
            values = json.loads(raw)
        except ValueError:
            values = None
    if not isinstance(values, list):
        values = [_value(part) for part in raw.split(",")]
    if not values or any(v == "" for v in values):
        raise GridError(f"--sweep '{text}' has an empty value.")
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise GridError(f"--sweep '{text}' repeats a value.")
    return Sweep(node, name, tuple(values))


@dataclass(frozen=True)
class Variant:
    name: str
    workflow: str                                  # the workflow file
    settings: tuple[tuple[str, str, Any], ...] = ()  # (node, input, value) applied like run --set


def _setting_label(node: str, name: str, value: Any) -> str:
    shown = value if isinstance(value, str) else json.dumps(value)
    return f"{node}.{name}={shown}"


def build_variants(workflows: Sequence[str], sweeps: Sequence[Sweep]) -> list[Variant]:
    """Every workflow with every combination of the sweeps' values; names are unique and readable."""
    if not workflows:
        raise GridError("no workflow given.")
    stems = [os.path.splitext(os.path.basename(w))[0] for w in workflows]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise GridError(f"several workflow files are named {', '.join(clashes)}: the file name names the variant, "
                        f"copy one under another name.")
    combos = list(itertools.product(*[[(s.node, s.input, v) for v in s.values] for s in sweeps]))
    variants = []
    for workflow, stem in zip(workflows, stems, strict=True):
        for combo in combos:
            labels = [_setting_label(*setting) for setting in combo]
            if len(workflows) == 1 and labels:
                name = ", ".join(labels)
            else:
                name = f"{stem} [{', '.join(labels)}]" if labels else stem
            variants.append(Variant(name, os.path.abspath(workflow), tuple(combo)))
    return variants


# --------------------------------------------------------------------------------------------------
# Cells


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe form of ``text`` (letters, digits, ``-_.=``), at most ``limit`` characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-.") or "x"
    return cleaned[:limit]


@dataclass(frozen=True)
class Cell:
    variant: Variant
    identity: Identity
    prompt_index: int
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        """Stable, unique within a grid, and safe as a file name: the resume bookkeeping's key."""
        return f"{self.variant_slug}__{slug(self.identity.name, 40)}__p{self.prompt_index:02d}__s{self.seed}"

    @property
    def variant_slug(self) -> str:
        return variant_slug(self.variant.name)


def variant_slug(name: str) -> str:
    """A variant's name as a file name; a short hash of the full name keeps truncated names apart."""
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:6]
    return f"{slug(name, 48)}-{digest}"


def build_cells(variants: Iterable[Variant], identities: Sequence[Identity], prompts: Sequence[str],
                seeds: Sequence[int]) -> list[Cell]:
    """The grid, variant by variant (so ComfyUI's cache keeps a variant's models loaded between cells)."""
    if not identities or not prompts or not seeds:
        raise GridError("the grid is empty: it needs at least one identity, one prompt and one seed.")
    if len(set(seeds)) != len(seeds):
        raise GridError("--seeds repeats a seed.")
    return [Cell(variant, identity, index, prompt, seed)
            for variant in variants for identity in identities
            for index, prompt in enumerate(prompts) for seed in seeds]


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or a range ``0-3`` (inclusive) or a mix: ``0-2,10``."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            if dash and low:
                seeds += list(range(int(low), int(high) + 1))
            else:
                seeds.append(int(part))
        except ValueError as exc:
            raise GridError(f"--seeds '{text}': '{part}' is not a seed or a range like 0-3.") from exc
    return seeds
