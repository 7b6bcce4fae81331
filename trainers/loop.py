"""The one training loop every trainer of the pack runs: ``train(task, config) -> TrainResult``.

A :class:`~.task.TrainingTask` supplies named trainable tensors, a loss, its data and a settings
dataclass; :func:`train` owns the rest:

- autograd inside ComfyUI's inference mode (inference mode off, grad on, inference inputs cloned,
  inference parameters and the task's frozen modules swapped for normal copies in place);
- AdamW with learning-rate groups (by name prefix), gradient accumulation, optional clipping and warmup;
- all randomness from one seeded CPU generator handed to the loss, plus a seeded data sampler; the host's
  global RNG is forked, so training never disturbs it;
- the host progress bar (raises on cancel in ComfyUI) and interrupt checks between micro-steps;
- atomic safetensors checkpoints every N steps and at the end: parameters, optimizer state, both RNG
  states, the sampler position, the step and the loss history, so a resumed run is bit-identical to an
  uninterrupted one;
- one resume policy (:data:`RESUME_MODES`): ``auto`` resumes a checkpoint whose fingerprint (the task's
  settings, data and trainables) matches and otherwise starts fresh with one warning; ``fresh`` ignores
  (and later replaces) a checkpoint; ``require`` raises :class:`NoCheckpointError` without one and
  :class:`ResumeMismatchError` (naming the differing fields) for a mismatch;
- data parallel when the process group is initialised (``torchrun``, see :mod:`.distributed`): each rank
  takes its share of the global batch, gradients are averaged, rank 0 checkpoints, logs and reports;
- cancel keeps the last good checkpoint; a validation hook every N steps (and at the end); the loss curve;
- the task's artefact (``task.finish``), written by ``task.write_result`` to ``result_path`` (rank 0) when
  the run finished.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError, NoCheckpointError, ResumeMismatchError, TrainingError
from ..host.progress import Progress, check_interrupted, is_interrupt
from . import checkpoint as ckpt
from . import distributed
from .autograd import InferenceTensorGuard, autograd_enabled, detach_inputs, make_trainable, release_inference_tensors
from .datasets import EpochSampler, collate
from .distributed import World
from .loss_curve import render_loss_curve
from .task import LrGroup, StepContext, TrainingTask

logger = logging.getLogger("likeness")

RESUME_MODES = ("auto", "fresh", "require")

__all__ = ["RESUME_MODES", "LrGroup", "StepContext", "TrainConfig", "TrainResult", "TrainingCancelled",
           "TrainingTask", "check_run_settings", "is_cancel", "train"]


class TrainingCancelled(Exception):
    """Raised to stop training the way the host's cancel does (tests, callers without ComfyUI)."""


@dataclass
class TrainConfig:
    steps: int                                   # optimizer steps in total (a resumed run continues to this)
    batch_size: int = 1                          # rows per micro-batch, over all processes of a parallel run
    grad_accumulation: int = 1                   # micro-batches per optimizer step
    seed: int = 0
    checkpoint_every: int = 0                    # steps between checkpoints (0 = only at the end)
    checkpoint_path: str | None = None           # None = no checkpoints, no resume
    resume: str = "fresh"                        # one of RESUME_MODES
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None
    warmup_steps: int = 0
    validate_every: int = 0                      # task.validate every N steps (0 = never during training)
    validate_at_end: bool = False                # task.validate once more at the last step
    on_cancel: str = "raise"                     # "raise" (what ComfyUI expects) or "return" a partial result
    result_path: str | None = None               # a finished run's artefact is written here (rank 0)
    progress_factory: Callable[[int, str], Any] | None = None  # default: host Progress(total, label)
    interrupt_check: Callable[[], None] | None = None          # default: the host's interrupt check
    step_callback: Callable[[int, float], None] | None = None  # after every finished optimizer step

    @classmethod
    def from_settings(cls, settings: Any, **options: Any) -> "TrainConfig":
        """The loop fields a settings dataclass has under the same names (steps, batch_size, seed,
        checkpoint_every, max_grad_norm ...), with ``options`` on top."""
        names = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(settings)}
        return cls(**{**{name: getattr(settings, name) for name in names}, **options})


@dataclass
class TrainResult:
    params: dict[str, torch.Tensor]      # trained values (detached, requires_grad off)
    losses: list[float]                  # one per optimizer step, including steps before a resume
    start_step: int                      # step this run started at (> 0 after a resume)
    step: int                            # steps done in total
    loss_curve: torch.Tensor             # IMAGE [1, H, W, 3]
    checkpoint_path: str | None
    checkpoint_step: int | None          # step of the last checkpoint on disk
    validations: list[tuple[int, Any]] = field(default_factory=list)
    cancelled: bool = False
    artefact: Any = None                 # task.finish(result): the trained adapter / weights / identity
    result_files: list[str] = field(default_factory=list)   # what task.write_result wrote (rank 0)


def is_cancel(exc: BaseException) -> bool:
    """The user stopped the run (host cancel, Ctrl-C, or :class:`TrainingCancelled`)."""
    return isinstance(exc, (TrainingCancelled, KeyboardInterrupt)) or is_interrupt(exc)


# --------------------------------------------------------------------------- set-up helpers

def check_run_settings(steps: int, batch_size: int, grad_accumulation: int, lr: float, resolution: int) -> None:
    """The checks every trainer's settings share (early, before any data is prepared)."""
    if steps < 1 or batch_size < 1 or grad_accumulation < 1:
        raise InvalidInputError("steps, batch size and gradient accumulation must be at least 1")
    if not 0.0 < lr <= 1.0:
        raise InvalidInputError(f"learning rate must lie in (0, 1], got {lr}")
    if resolution % 64 or resolution < 64:
        raise InvalidInputError(f"resolution must be a multiple of 64, got {resolution}")


def _check_config(config: TrainConfig, task: TrainingTask, world: World) -> None:
    if config.steps < 1:
        raise InvalidInputError("steps must be at least 1")
    if config.batch_size < 1 or config.grad_accumulation < 1:
        raise InvalidInputError("batch size and gradient accumulation must be at least 1")
    if len(task.data) < 1:
        raise InvalidInputError("the training set is empty")
    if config.on_cancel not in ("raise", "return"):
        raise InvalidInputError("on_cancel must be 'raise' or 'return'")
    if config.resume not in RESUME_MODES:
        raise InvalidInputError(f"resume must be one of {', '.join(RESUME_MODES)}, got {config.resume!r}")
    if config.resume == "require" and not config.checkpoint_path:
        raise InvalidInputError("resume 'require' needs a checkpoint path")
    if world.distributed and not task.shardable:
        raise InvalidInputError(f"{task.label} cannot train data-parallel (its loss is not a mean over batch rows); "
                                "run it in one process")
    if world.distributed and config.batch_size % world.size:
        raise InvalidInputError(f"the batch size ({config.batch_size}) must be a multiple of the number of "
                                f"processes ({world.size}): every process takes an equal share of each batch")


def _build_optimizer(params: Mapping[str, torch.Tensor], groups: list[LrGroup],
                     config: TrainConfig) -> torch.optim.AdamW:
    assigned: list[list[torch.Tensor]] = [[] for _ in groups]
    for name, tensor in params.items():
        for i, group in enumerate(groups):
            if name.startswith(group.prefix):
                assigned[i].append(tensor)
                break
        else:
            raise InvalidInputError(f"parameter '{name}' matches no learning-rate group "
                                    f"(prefixes {[g.prefix for g in groups]})")
    param_groups = [{"params": tensors, "lr": g.lr, "initial_lr": g.lr, "weight_decay": g.weight_decay,
                     "name": g.name or g.prefix or "all"}
                    for g, tensors in zip(groups, assigned, strict=True) if tensors]
    return torch.optim.AdamW(param_groups, betas=config.betas, eps=config.eps)


def _fingerprint(task: TrainingTask, config: TrainConfig, params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    out = task.fingerprint(params)
    out.update({"seed": int(config.seed), "batch_size": int(config.batch_size),
                "grad_accumulation": int(config.grad_accumulation)})
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def _fetch(data, indices: list[int]):
    if hasattr(data, "get_batch"):
        return data.get_batch(indices)
    items = [data[i] for i in indices]
    return data.collate(items) if hasattr(data, "collate") else collate(items)


def _set_warmup_lr(optimizer: torch.optim.Optimizer, step: int, warmup: int) -> None:
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


class _SilentProgress:
    """Progress of the ranks other than 0 (one bar per run)."""

    def update_absolute(self, value: int, preview=None) -> None:
        pass


# --------------------------------------------------------------------------- run state, checkpoints, resume

@dataclass
class _RunState:
    params: dict[str, torch.Tensor]
    names: dict[int, str]
    optimizer: torch.optim.AdamW
    generator: torch.Generator
    sampler: EpochSampler
    world: World
    label: str
    losses: list[float] = field(default_factory=list)
    step: int = 0
    start_step: int = 0
    checkpoint_step: int | None = None
    validations: list[tuple[int, Any]] = field(default_factory=list)

    def log(self, level: int, message: str, *args) -> None:
        """Log on rank 0 only (every rank runs the same loop)."""
        if self.world.is_main:
            logger.log(level, "%s: " + message, self.label, *args)


def _start(task: TrainingTask, config: TrainConfig, world: World) -> _RunState:
    """Trainable tensors, released frozen modules, optimizer, generator and sampler of a fresh run."""
    trainable = {name: make_trainable(tensor, name) for name, tensor in task.trainables().items()}
    released = sum(release_inference_tensors(module) for module in task.frozen_modules())
    if released and world.is_main:
        logger.info("%s: %d frozen model tensors made autograd-usable (same values)", task.label, released)
    return _RunState(params=trainable, names={id(t): n for n, t in trainable.items()},
                     optimizer=_build_optimizer(trainable, task.lr_groups(), config),
                     generator=torch.Generator().manual_seed(config.seed),
                     sampler=EpochSampler(len(task.data), config.seed), world=world, label=task.label)


def _save(path: str, run: _RunState, metadata: dict[str, str], fingerprint: dict) -> None:
    optim_tensors, scalars = ckpt.optimizer_state_tensors(run.optimizer, run.names)
    metadata = dict(metadata)
    metadata["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    state = ckpt.TrainingState(params=run.params, optimizer=optim_tensors, optimizer_scalars=scalars,
                               generator_state=run.generator.get_state(), global_rng_state=torch.get_rng_state(),
                               step=run.step, sampler_position=run.sampler.position, losses=list(run.losses),
                               metadata=metadata)
    ckpt.save_training_state(path, state)
    run.log(logging.INFO, "checkpoint at step %d written to %s", run.step, path)


def fingerprint_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint value, value now)}`` of every field that differs (missing = None)."""
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def _restore(state: ckpt.TrainingState, run: _RunState) -> None:
    with torch.no_grad():
        for name, tensor in run.params.items():
            tensor.copy_(state.params[name].to(tensor.device, tensor.dtype))
    ckpt.load_optimizer_state(run.optimizer, run.names, state.optimizer, state.optimizer_scalars)
    if state.generator_state is not None:
        run.generator.set_state(state.generator_state)
    if state.global_rng_state is not None:
        torch.set_rng_state(state.global_rng_state)
    run.sampler.position = state.sampler_position
    run.losses[:] = state.losses
    run.step = run.start_step = run.checkpoint_step = state.step


def _resume(path: str | None, run: _RunState, fingerprint: dict, mode: str, steps: int) -> None:
    """Apply the resume policy (see the module doc) to the checkpoint at ``path``."""
    exists = path is not None and os.path.isfile(path)
    if mode == "fresh" or not exists:
        if mode == "require":
            raise NoCheckpointError(f"resume is 'require' but there is no training checkpoint at '{path}'; set "
                                    "resume to 'auto' or 'fresh' to start a new run")
        if exists:
            run.log(logging.INFO, "resume 'fresh': starting a new run; it replaces the checkpoint %s", path)
        elif mode == "auto" and path:
            run.log(logging.INFO, "no checkpoint at %s yet, starting a new run", path)
        return
    state = ckpt.load_training_state(path)
    differences = fingerprint_differences(json.loads(state.metadata.get("fingerprint", "{}")), fingerprint)
    if differences:
        error = ResumeMismatchError(path, differences)
        if mode == "require":
            raise error
        run.log(logging.WARNING, "the checkpoint %s belongs to another run (%s); starting a new run (resume 'auto'), "
                "which replaces it", path, error.details)
        return
    _restore(state, run)
    run.log(logging.INFO, "resumed from %s at step %d of %d", path, run.step, steps)


# --------------------------------------------------------------------------- the loop

def _micro_step(task: TrainingTask, run: _RunState, config: TrainConfig, micro: int) -> float:
    """Loss and backward of one micro-batch (this rank's rows of it); returns the loss value."""
    indices = run.sampler.next_indices(config.batch_size)
    batch = detach_inputs(_fetch(task.data, run.world.shard(indices)))
    ctx = StepContext(run.step, micro, run.generator, run.params, shard=run.world.rank, shards=run.world.size)
    first = run.step == run.start_step and micro == 0   # a missed inference tensor shows on the first call
    with InferenceTensorGuard() if first else contextlib.nullcontext():
        output = task.loss(batch, ctx)
    loss = output[0] if isinstance(output, tuple) else output
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise TypeError("the loss must be a scalar tensor (or a tuple starting with one)")
    if loss.requires_grad:
        (loss / config.grad_accumulation).backward()
    return float(loss.detach())


def _optimizer_step(task: TrainingTask, run: _RunState, config: TrainConfig, interrupt: Callable[[], None]) -> float:
    run.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(config.grad_accumulation):
        interrupt()
        total += _micro_step(task, run, config, micro)
    value = total / config.grad_accumulation
    if run.world.distributed:
        distributed.average_gradients(run.params.values(), run.world)
        value = distributed.average_value(value, run.world, next(iter(run.params.values())).device)
    if not math.isfinite(value):
        raise TrainingError(f"the loss became {value} at step {run.step + 1}; lower the learning rate "
                            "(the last checkpoint is kept)")
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(run.params.values()), config.max_grad_norm)
    _set_warmup_lr(run.optimizer, run.step, config.warmup_steps)
    run.optimizer.step()
    return value


def _validate(task: TrainingTask, run: _RunState) -> None:
    if run.world.is_main:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            run.validations.append((run.step, task.validate(run.step)))


def _run_steps(task: TrainingTask, run: _RunState, config: TrainConfig, path: str | None, fingerprint: dict,
               progress, interrupt: Callable[[], None]) -> None:
    metadata = task.metadata()
    while run.step < config.steps:
        loss = _optimizer_step(task, run, config, interrupt)
        run.step += 1
        run.losses.append(loss)
        last = run.step == config.steps
        if path and ((config.checkpoint_every and run.step % config.checkpoint_every == 0) or last):
            if run.world.is_main:
                _save(path, run, metadata, fingerprint)
            run.checkpoint_step = run.step
        if config.validate_every and run.step % config.validate_every == 0:
            _validate(task, run)
        if config.step_callback:
            config.step_callback(run.step, loss)
        progress.update_absolute(run.step)  # raises in ComfyUI when the user pressed cancel
    if config.validate_at_end and not (run.validations and run.validations[-1][0] == run.step):
        _validate(task, run)


def _stopped(exc: BaseException, run: _RunState, config: TrainConfig, path: str | None) -> None:
    """Log why the run stopped; re-raise unless it is a cancel with ``on_cancel="return"``."""
    last = f"step {run.checkpoint_step} in {path}" if run.checkpoint_step is not None else "none"
    if not is_cancel(exc):
        run.log(logging.ERROR, "stopped at step %d by an error; last checkpoint: %s", run.step, last)
        raise exc
    run.log(logging.WARNING, "cancelled at step %d of %d; last checkpoint: %s", run.step, config.steps,
            last + " (resume to continue)" if run.checkpoint_step is not None else last)
    if config.on_cancel == "raise":
        raise exc


def _prepare(task: TrainingTask, config: TrainConfig, world: World, path: str | None) -> tuple[_RunState, dict]:
    """A fresh or resumed run state (identical on every rank) and the run's fingerprint."""
    torch.manual_seed(config.seed)
    run = _start(task, config, world)
    fingerprint = _fingerprint(task, config, run.params)
    _resume(path, run, fingerprint, config.resume, config.steps)
    if world.distributed:
        distributed.broadcast_parameters(run.params.values())
        distributed.barrier()  # every rank has read the checkpoint before rank 0 may replace it
    return run, fingerprint


def train(task: TrainingTask, config: TrainConfig) -> TrainResult:
    """Train ``task``'s trainable tensors (in place) to minimise its loss over its data (see the module doc)."""
    world = distributed.current_world()
    _check_config(config, task, world)
    path = os.path.abspath(config.checkpoint_path) if config.checkpoint_path else None
    interrupt = config.interrupt_check or check_interrupted
    cancelled = False
    with autograd_enabled(), torch.random.fork_rng(devices=[]), task.session():
        run, fingerprint = _prepare(task, config, world, path)
        factory = config.progress_factory or (lambda total, label: Progress(total, label))
        progress = factory(config.steps, task.label) if world.is_main else _SilentProgress()
        progress.update_absolute(min(run.step, config.steps))
        try:
            _run_steps(task, run, config, path, fingerprint, progress, interrupt)
        except BaseException as exc:
            _stopped(exc, run, config, path)
            cancelled = True
        finally:
            for tensor in run.params.values():
                tensor.requires_grad_(False)
                tensor.grad = None
        curve = render_loss_curve(run.losses, title=task.label, resumed_at=run.start_step or None)
    result = TrainResult(params={k: v.detach() for k, v in run.params.items()}, losses=list(run.losses),
                         start_step=run.start_step, step=run.step, loss_curve=curve, checkpoint_path=path,
                         checkpoint_step=run.checkpoint_step, validations=run.validations, cancelled=cancelled)
    result.artefact = task.finish(result)
    if config.result_path and world.is_main and not cancelled:
        result.result_files = task.write_result(result.artefact, os.path.abspath(config.result_path))
        logger.info("%s: wrote %s", task.label, ", ".join(result.result_files))
    return result
