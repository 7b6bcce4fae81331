"""Exception types of the pack. Each message says what went wrong and what to do about it."""
from __future__ import annotations

from .deps import MissingDependencyError  # noqa: F401  (re-exported: one place to import errors from)


class LikenessError(Exception):
    """Base class: a user-facing problem with inputs, files or settings (never a pack bug)."""


class InvalidInputError(LikenessError, ValueError):
    """An input tensor or value has the wrong shape, range or type."""


class PathNotAllowedError(InvalidInputError):
    """A path named by a workflow lies outside the folders the ComfyUI server may read (host/paths.py)."""


class NoFaceError(LikenessError):
    """No face was found where one is required."""


class ModelFileError(LikenessError):
    """A model file is missing, unreadable, truncated or of the wrong kind."""


class CheckpointLayoutError(ModelFileError):
    """A checkpoint's keys or shapes do not match the architecture it is loaded as."""


class IncompatibleEmbedsError(LikenessError):
    """Identity embeddings from different models (or dimensions) were mixed."""


class TrainingError(LikenessError):
    """Training cannot go on (diverged, resume mismatch); the last good checkpoint is kept."""
