"""Exception types of the pack. Each message says what went wrong and what to do about it."""
from __future__ import annotations

from .deps import MissingDependencyError  # noqa: F401  (re-exported: one place to import errors from)


class LikenessError(Exception):
    """Base class: a user-facing problem with inputs, files or settings (never a pack bug)."""


class InvalidInputError(LikenessError, ValueError):
    """An input tensor or value has the wrong shape, range or type."""


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


class ResumeMismatchError(TrainingError):
    """A training checkpoint belongs to another run: other settings, data or trainable tensors.

    ``differences`` maps every differing fingerprint field to ``(value in the checkpoint, value now)``.
    """

    def __init__(self, path: str, differences: dict[str, tuple[object, object]]):
        self.path = path
        self.differences = dict(differences)
        super().__init__(f"cannot resume from '{path}': {self.details}. Use the settings of the interrupted run, "
                         "or set resume to 'fresh' (or pick another name) to start a new run.")

    @property
    def details(self) -> str:
        """``"field: checkpoint <value> vs now <value>; ..."``"""
        return "; ".join(f"{name}: checkpoint {saved!r} vs now {now!r}"
                         for name, (saved, now) in self.differences.items())

    @property
    def fields(self) -> list[str]:
        """Names of the differing fields."""
        return list(self.differences)

    def __reduce__(self):  # picklable (errors cross process boundaries under torch.multiprocessing)
        return type(self), (self.path, self.differences)


class NoCheckpointError(TrainingError):
    """Resume was required but there is no training checkpoint to resume from."""
