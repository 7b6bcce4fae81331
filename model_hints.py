"""What to tell a user whose model file is missing: the folder it belongs in and the command that fetches it.

Every loader node describes its files with one :class:`ModelFolder`. When the file a workflow names is not
there (an empty dropdown, or a workflow shared from another machine), the node's ``VALIDATE_INPUTS`` returns
:meth:`ModelFolder.choice_problem` (ComfyUI shows it instead of a bare "Value not in list") and ``load``
raises :class:`~.errors.ModelFileError` with :meth:`ModelFolder.missing_message`. Both name the folder, every
path searched, and ``python custom_nodes/<pack> models fetch ID`` with the IDs of ``models_manifest.json``
that install into that folder, then any other way (for files the pack trains itself: the node that makes them).
"""
from __future__ import annotations

import functools
import logging
import os
import shlex
from dataclasses import dataclass
from typing import Sequence

logger = logging.getLogger("likeness")

PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def pack_command() -> str:
    """How to call the pack's command line from the ComfyUI folder (where the server is started)."""
    parent, name = os.path.split(PACK_DIR)
    if os.path.basename(parent) == "custom_nodes":
        return "python " + shlex.quote(f"custom_nodes/{name}")
    return "python " + shlex.quote(PACK_DIR)


@functools.lru_cache(maxsize=1)
def _manifest_folders() -> tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]:
    """(id, folder, alt_folders, installed file names) of every manifest entry; empty when it is unreadable."""
    from .cli.manifest import load_manifest
    from .errors import LikenessError

    try:
        entries = load_manifest()
    except LikenessError as exc:   # a broken manifest must not break a loader's error message
        logger.debug("Likeness: model manifest unreadable for hints (%s)", exc)
        return ()
    return tuple((e.id, e.folder, e.alt_folders, e.installed_files + (e.filename,)) for e in entries)


def fetch_ids(folders: Sequence[str], wanted: str | None = None) -> list[str]:
    """Manifest IDs that install into one of ``folders`` (relative to models/, or below them); when ``wanted``
    (a file or pack name) matches one of them, only that one."""
    prefixes = [f.strip("/") for f in folders]

    def inside(folder: str) -> bool:
        return any(folder == p or folder.startswith(p + "/") for p in prefixes)

    found = [(entry_id, (folder,) + alt, files) for entry_id, folder, alt, files in _manifest_folders()
             if inside(folder) or any(inside(a) for a in alt)]
    if wanted:
        name = os.path.basename(str(wanted).replace("\\", "/")).lower()
        exact = [entry_id for entry_id, places, files in found
                 if name in {f.lower() for f in files} or name in {os.path.basename(p).lower() for p in places}]
        if exact:
            return exact
    return [entry_id for entry_id, _, _ in found]


def fetch_advice(ids: Sequence[str]) -> str:
    """``Get it with `python custom_nodes/likeness models fetch ID` ...`` for the given IDs ('' for none)."""
    if not ids:
        return ""
    commands = " or ".join(f"`{pack_command()} models fetch {entry_id}`" for entry_id in ids)
    return f"Get it with {commands} (run in the ComfyUI folder), or copy the file there yourself."


@dataclass(frozen=True)
class ModelFolder:
    """Where one loader's files live: ``models/<folder>/<subfolder>`` (``folder`` is the folder_paths key, so
    extra_model_paths.yaml locations are searched too) and any other way to get a file (e.g. the node that
    trains one), said after the fetch command."""

    label: str                       # what the files are, e.g. "ConsistentID weights"
    folder: str                      # folder_paths key: "likeness", "insightface"
    subfolders: tuple[str, ...]      # below every search path of ``folder``
    other_way: str = ""              # e.g. "Train one with the Train Face Fusion node."

    @property
    def relative(self) -> list[str]:
        return [f"{self.folder}/{sub}" if sub else self.folder for sub in self.subfolders]

    def searched(self) -> list[str]:
        """Every directory searched (each configured path of ``folder`` with each subfolder)."""
        from .host.folders import folder_candidates

        try:
            bases = folder_candidates(self.folder)
        except Exception:  # noqa: BLE001 - a broken folder configuration must not hide the message
            logger.debug("Likeness: folder lookup for %s failed", self.folder, exc_info=True)
            bases = []
        return [os.path.join(base, sub) if sub else base for base in bases for sub in self.subfolders]

    def missing_message(self, name: str | None = None) -> str:
        """The message for a missing file (``name``: the one a workflow asked for; None: the folder is empty)."""
        where = " or ".join(f"models/{r}" for r in self.relative)
        what = f"'{name}' is not in {where}" if name else f"No {self.label} found in {where}"
        searched = ", ".join(self.searched()) or "no folder is configured"
        advice = " ".join(part for part in (fetch_advice(fetch_ids(self.relative, name)), self.other_way) if part)
        return f"{what} (looked in: {searched}). {advice}".strip()

    def choice_problem(self, value: str, choices: Sequence[str], placeholder: str | None = None) -> bool | str:
        """For ``VALIDATE_INPUTS``: True when ``value`` is one of the files found, else the message to show
        (``placeholder``: the dropdown entry shown when the folder is empty)."""
        if value in choices and value != placeholder:
            return True
        return self.missing_message(None if value == placeholder else value)
