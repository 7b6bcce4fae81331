"""Exception types of the pack. Each message says what went wrong and what to do about it.

ComfyUI shows a failed node's exception as ``module.QualName`` (``execution.full_type_name``), and it imports a
custom-node pack under its folder path, so a class defined here would print as
``/home/me/ComfyUI/custom_nodes/likeness.errors.NoFaceError``. Every pack exception therefore reports
:data:`PUBLIC_MODULE` as its module: the UI shows ``likeness.NoFaceError``.
"""
from __future__ import annotations

from .deps import MissingDependencyError  # re-exported: one place to import errors from

PUBLIC_MODULE = "likeness"

MissingDependencyError.__module__ = PUBLIC_MODULE


class LikenessError(Exception):
    """Base class: a user-facing problem with inputs, files or settings (never a pack bug)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = PUBLIC_MODULE   # also for subclasses elsewhere (cli.manifest, cli.fetch)


LikenessError.__module__ = PUBLIC_MODULE


class InvalidInputError(LikenessError, ValueError):
    """An input tensor or value has the wrong shape, range or type."""


class UnsupportedModelError(InvalidInputError):
    """The MODEL is of a family this technique does not run on (e.g. a UNet technique given a Flux DiT)."""


class PathNotAllowedError(InvalidInputError):
    """A path named by a workflow lies outside the folders the ComfyUI server may read (host/paths.py)."""


class NoFaceError(LikenessError):
    """No face was found where one is required.

    The message is ``problem`` plus ``advice``; the advice names what the user can change, and only inputs of
    the node that failed: code shared by several nodes raises with its own advice and a node whose inputs
    differ re-raises with :meth:`with_advice`.
    """

    def __init__(self, problem: str, advice: str = ""):
        self.problem = problem
        self.advice = advice
        super().__init__(f"{problem} {advice}".strip())

    def with_advice(self, advice: str) -> NoFaceError:
        """The same problem with other advice (raise it ``from`` this one)."""
        return type(self)(self.problem, advice)


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
