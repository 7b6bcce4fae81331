"""Shared bits for node classes: the category root and small input-spec helpers."""
from __future__ import annotations

import logging
import re
from typing import Callable

from ..errors import InvalidInputError, ModelFileError

logger = logging.getLogger("likeness")

CATEGORY = "Likeness"


def category(sub: str) -> str:
    return f"{CATEGORY}/{sub}" if sub else CATEGORY


def float_input(default: float, lo: float, hi: float, step: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def int_input(default: int, lo: int, hi: int, tooltip: str, step: int = 1) -> tuple:
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def percent_range_inputs(start_tip: str = "When the effect starts, as a fraction of the sampling schedule.",
                         end_tip: str = "When the effect ends, as a fraction of the sampling schedule.") -> dict:
    return {"start_at": float_input(0.0, 0.0, 1.0, 0.001, start_tip),
            "end_at": float_input(1.0, 0.0, 1.0, 0.001, end_tip)}


_FILE_STEM = re.compile(r"^[\w.\- ]+$")


def checked_file_stem(name: str) -> str:
    """A user-typed output name as a plain file stem (no folders, no extension), or InvalidInputError."""
    stem = (name or "").strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or not _FILE_STEM.match(stem) or stem in (".", ".."):
        raise InvalidInputError(f"name {name!r} must be a plain file name (letters, digits, space, . _ -)")
    return stem


def file_choices(list_fn: Callable[[], list[str]], placeholder: str) -> list[str]:
    """A loader's combo choices: ``list_fn()``, or ``[placeholder]`` when it finds nothing or fails (a broken or
    unreadable models folder must not hide the node; the placeholder explains what to install)."""
    try:
        return list(list_fn()) or [placeholder]
    except Exception:  # noqa: BLE001 - any failure of a folder listing
        logger.debug("Likeness: listing files for a loader failed", exc_info=True)
        return [placeholder]


def resolved_path(resolver: Callable[..., str], *args) -> str:
    """``resolver(*args)`` (a models-folder lookup), its FileNotFoundError turned into a ModelFileError whose message
    says which folders were searched."""
    try:
        return resolver(*args)
    except FileNotFoundError as exc:
        raise ModelFileError(str(exc)) from exc


def resume_input() -> tuple:
    """The trainers' ``resume`` combo (the loop's one resume policy)."""
    return (["auto", "fresh", "require"], {"default": "auto", "tooltip": "auto: continue this name's checkpoint when "
            "it was written with the same images and settings, else start over (one warning) and replace it. fresh: "
            "start over and replace it. require: continue it, or stop with an error naming what differs."})
