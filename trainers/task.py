"""The trainer contract: what a technique hands the one loop (:func:`trainers.loop.train`).

A :class:`TrainingTask` is one training run of one technique (Face Fusion adapter, ConsistentID, FaceA-Net
identity). It supplies:

- ``trainables()``: the named tensors to optimise (updated in place) and ``lr_groups()``: their AdamW groups;
- ``loss(batch, ctx)``: a scalar for one micro-batch of ``data``; every random draw comes from ``ctx``
  (:class:`StepContext`), so a resumed run is bit-identical and a data-parallel run matches one process;
- ``data``: ``len`` plus ``get_batch(indices)`` (or ``[i]`` and an optional ``collate``);
- ``settings``: a dataclass. ``dataclasses.asdict(settings)`` is the resume fingerprint, except the fields
  declared with :func:`run_field` (how long and how often: steps, checkpoint interval, previews), which may
  change between a run and its resume;
- ``finish(result)`` and ``write_result(artefact, path)``: the trained artefact and its file(s); the loop
  calls both at the end of a run (the writer on rank 0, when the config names a result path).

Optional hooks: ``session()`` (what must hold while the loop runs: a loaded model clone, patches),
``frozen_modules()`` (modules the gradient flows through without training them: the loop makes their
inference-mode weights autograd-usable), ``validate(step)`` (previews) and ``metadata()`` (stored in
every checkpoint).

``shardable`` says the loss is a mean over the rows of a batch with equal weight per row, so ranks of a
data-parallel run may each take a share of the rows and average their gradients (see
:mod:`.distributed`); a task whose loss mixes rows otherwise sets it False and trains in one process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

import torch

if TYPE_CHECKING:
    from .loop import TrainResult

RUN_FIELD = "likeness.run_field"   # dataclass field metadata key: not part of the resume fingerprint


def run_field(default: Any) -> Any:
    """A settings field that may change when a run resumes (steps, checkpoint interval, previews)."""
    return dataclasses.field(default=default, metadata={RUN_FIELD: True})


def settings_fingerprint(settings: Any) -> dict[str, Any]:
    """``dataclasses.asdict(settings)`` without its :func:`run_field` fields, JSON-normalised."""
    if not dataclasses.is_dataclass(settings):
        raise TypeError(f"training settings must be a dataclass instance, got {type(settings).__name__}")
    skipped = {f.name for f in dataclasses.fields(settings) if f.metadata.get(RUN_FIELD)}
    values = {k: v for k, v in dataclasses.asdict(settings).items() if k not in skipped}
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def trainables_fingerprint(params: Mapping[str, torch.Tensor]) -> str:
    """A short text naming the trainable tensors' count and a digest of their names and shapes."""
    digest = hashlib.sha1(json.dumps({k: list(v.shape) for k, v in sorted(params.items())}).encode())
    return f"{len(params)} tensors #{digest.hexdigest()[:12]}"


@dataclass
class LrGroup:
    """Parameters whose name starts with ``prefix`` ("" = all remaining) train with this lr / weight decay."""

    lr: float
    prefix: str = ""
    weight_decay: float = 0.01
    name: str = ""


@dataclass
class StepContext:
    """What the loss gets besides its batch.

    In a data-parallel run the global micro-batch is split in ``shards`` equal parts and this process holds
    part ``shard``; :meth:`per_row` (and :meth:`randn` / :meth:`rand`) draws for the whole micro-batch and
    keeps this process's rows, so every row gets the same draw whatever the number of processes and the
    generators of all processes stay in step.
    """

    step: int                       # 0-based optimizer step being computed
    micro_step: int                 # 0..grad_accumulation-1
    generator: torch.Generator      # the only randomness a loss may use (checkpointed)
    params: dict[str, torch.Tensor]
    shard: int = 0
    shards: int = 1

    def per_row(self, rows: int, draw: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """This process's ``rows`` rows of ``draw(n)``, a random draw of ``n`` rows for the global micro-batch."""
        if self.shards == 1:
            return draw(rows)
        return draw(rows * self.shards)[self.shard * rows:(self.shard + 1) * rows]

    def randn(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """Gaussian noise, ``shape[0]`` = this process's rows, drawn on the CPU generator (device-independent,
        so resume is exact)."""
        shape = tuple(shape)
        noise = self.per_row(shape[0], lambda n: torch.randn((n, *shape[1:]), generator=self.generator, dtype=dtype))
        return noise.to(device or "cpu")

    def rand(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """Uniform [0, 1) values per row, like :meth:`randn`."""
        shape = tuple(shape)
        values = self.per_row(shape[0], lambda n: torch.rand((n, *shape[1:]), generator=self.generator, dtype=dtype))
        return values.to(device or "cpu")


class TrainingTask(ABC):
    """One training run of one technique, as the loop consumes it (see the module doc)."""

    technique: str = ""         # recorded in checkpoints; part of the fingerprint
    label: str = "Training"     # progress bar and log lines
    shardable: bool = True      # the loss is an equal-weight mean over rows (data-parallel ranks may split them)
    settings: Any
    data: Any

    @abstractmethod
    def trainables(self) -> dict[str, torch.Tensor]:
        """Name -> tensor to optimise (called inside :meth:`session`; the tensors are updated in place)."""

    @abstractmethod
    def lr_groups(self) -> list[LrGroup]:
        """AdamW groups by name prefix; every trainable must match one."""

    @abstractmethod
    def loss(self, batch: Any, ctx: StepContext) -> torch.Tensor | tuple:
        """A scalar tensor (or a tuple starting with one) for one micro-batch; randomness from ``ctx`` only."""

    @abstractmethod
    def finish(self, result: "TrainResult") -> Any:
        """The trained artefact (adapter, weights, identity) with the run's metadata."""

    @abstractmethod
    def write_result(self, artefact: Any, path: str) -> list[str]:
        """Write ``artefact`` (from :meth:`finish`) atomically; ``path`` is its main file. Returns the files."""

    def session(self) -> ContextManager[Any]:
        """What must hold while the loop runs (entered before :meth:`trainables`); nothing by default."""
        return contextlib.nullcontext()

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules between the trainables and the loss that do not train (their inference tensors are released)."""
        return []

    def validate(self, step: int) -> Any:
        """A preview / validation value at ``step`` (the loop calls it when ``validate_every`` is set)."""
        return None

    def data_fingerprint(self) -> str:
        """Identifies the training data (resume refuses other data); by default its size."""
        return str(len(self.data))

    def metadata(self) -> dict[str, str]:
        """Strings stored in every checkpoint."""
        return {"technique": self.technique}

    def fingerprint(self, params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """What must match for a checkpoint to resume: the settings, the data and the trainable tensors."""
        out = settings_fingerprint(self.settings)
        out.update({"technique": self.technique, "data": self.data_fingerprint(), "data_size": len(self.data),
                    "trainables": trainables_fingerprint(params)})
        return out
