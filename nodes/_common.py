"""Shared bits for node classes: the category root, small input-spec helpers, and the input checks every node
shares (the face analyzer, output file names)."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence

from ..errors import InvalidInputError, ModelFileError
from ..safetensors_io import longest_file_name

logger = logging.getLogger("likeness")

CATEGORY = "Likeness"


def category(sub: str) -> str:
    return f"{CATEGORY}/{sub}" if sub else CATEGORY


def float_input(default: float, lo: float, hi: float, step: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def int_input(default: int, lo: int, hi: int, tooltip: str, step: int = 1) -> tuple:
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def training_seed_input(tooltip: str, hi: int = 0xFFFFFFFFFFFFFFFF) -> tuple:
    """A trainer's seed: part of what a checkpoint must match to resume, so the frontend must not attach its
    "control after generate: randomize" widget (it does to every INT named seed unless told otherwise), or
    re-queueing a cancelled run would change the seed and refuse to resume."""
    return ("INT", {"default": 0, "min": 0, "max": hi, "control_after_generate": False, "tooltip": tooltip})


def percent_range_inputs(start_tip: str = "When the effect starts, as a fraction of the sampling schedule.",
                         end_tip: str = "When the effect ends, as a fraction of the sampling schedule.") -> dict:
    return {"start_at": float_input(0.0, 0.0, 1.0, 0.001, start_tip),
            "end_at": float_input(1.0, 0.0, 1.0, 0.001, end_tip)}


_FILE_STEM = re.compile(r"^[\w.\- ]+$")
STEM_PLACEHOLDER = "{}"


def check_analyzer(analyzer, input_name: str = "analyzer"):
    """``analyzer`` as given, or InvalidInputError when it is not a FACE_ANALYZER from one of the pack's loaders."""
    if not callable(getattr(analyzer, "detect", None)) or not hasattr(analyzer, "model_id"):
        raise InvalidInputError(f"'{input_name}' must come from a Likeness face analyzer loader node.")
    return analyzer


def longest_stem(outputs: Iterable[tuple[str, str]]) -> int:
    """The longest stem (bytes) that makes every output writable; ``outputs`` as in :func:`checked_file_stem`."""
    return min(longest_file_name(folder) - len(os.fsencode(template.replace(STEM_PLACEHOLDER, "")))
               for folder, template in outputs)


def run_outputs(run_paths: Callable[[str], Sequence[str]]) -> list[tuple[str, str]]:
    """The ``(folder, file name template)`` pairs of a trainer's ``run_paths(name)`` (called with "{}" as the
    name), so the name check and the trainer share one source of file names."""
    return [(os.path.dirname(path), os.path.basename(path)) for path in run_paths("{}")]


def checked_file_stem(name: str, input_name: str, outputs: Iterable[tuple[str, str]]) -> str:
    """A user-typed output name as a plain file stem (no folders, no extension), checked before any work starts.

    ``outputs`` are the files the node will write, as ``(folder, file name with "{}" where the stem goes)``.
    Every one of them, and the temporary folder the atomic writer makes next to it, must fit the file
    system's limits there (:func:`safetensors_io.longest_file_name`). InvalidInputError names ``input_name``.
    """
    stem = (name or "").strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or not _FILE_STEM.match(stem) or stem in (".", ".."):
        raise InvalidInputError(f"'{input_name}' {name!r} must be a plain file name (letters, digits, space, . _ -)")
    longest = longest_stem(outputs)
    if len(os.fsencode(stem)) > longest:
        raise InvalidInputError(f"'{input_name}' is {len(os.fsencode(stem))} characters (bytes) long; at most "
                                f"{longest} fit in the file names written here. Choose a shorter name.")
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


def file_stamp(resolver: Callable[..., str], *args) -> float:
    """A loader's IS_CHANGED: the modification time of ``resolver(*args)``, NaN (always re-run) when it cannot be
    found, so a file rewritten under the same name is read again."""
    try:
        return os.path.getmtime(resolver(*args))
    except OSError:
        return float("nan")


def resume_input() -> tuple:
    """The trainers' ``resume`` combo (the loop's one resume policy)."""
    return (["auto", "fresh", "require"], {"default": "auto", "tooltip": "auto: continue this name's checkpoint when "
            "it was written with the same images and settings, else start over (one warning) and replace it. fresh: "
            "start over and replace it. require: continue it, or stop with an error naming what differs."})
