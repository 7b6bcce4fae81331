"""The one training loop every in-graph trainer of the pack uses.

A technique supplies named trainable tensors, a loss function and its data; :func:`train` owns the rest:

- autograd inside ComfyUI's inference mode (inference mode off, grad on, inference inputs cloned,
  inference parameters swapped for normal copies in place);
- AdamW with learning-rate groups (by name prefix), gradient accumulation, optional clipping and warmup;
- all randomness from one seeded CPU generator handed to the loss, plus a seeded data sampler; the host's
  global RNG is forked, so training never disturbs it;
- the host progress bar (raises on cancel in ComfyUI) and interrupt checks between micro-steps;
- atomic safetensors checkpoints every N steps and at the end: parameters, optimizer state, both RNG
  states, the sampler position, the step and the loss history, so a resumed run is bit-identical to an
  uninterrupted one;
- cancel keeps the last good checkpoint; a validation hook every N steps; the loss-curve IMAGE.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError, TrainingError
from ..host.progress import Progress, check_interrupted, is_interrupt
from . import checkpoint as ckpt
from .autograd import autograd_enabled, detach_inputs, make_trainable
from .datasets import EpochSampler, collate
from .loss_curve import render_loss_curve

logger = logging.getLogger("likeness")


class TrainingCancelled(Exception):
    """Raised to stop training the way the host's cancel does (tests, callers without ComfyUI)."""


@dataclass
class LrGroup:
    """Parameters whose name starts with ``prefix`` ("" = all remaining) train with this lr / weight decay."""

    lr: float
    prefix: str = ""
    weight_decay: float = 0.01
    name: str = ""


@dataclass
class TrainConfig:
    steps: int                                   # optimizer steps in total (a resumed run continues to this)
    lr_groups: Sequence[LrGroup] | float         # a float = one group for every parameter
    batch_size: int = 1
    grad_accumulation: int = 1                   # micro-batches per optimizer step
    seed: int = 0
    checkpoint_every: int = 0                    # steps between checkpoints (0 = only at the end)
    checkpoint_path: str | None = None           # None = no checkpoints, no resume
    resume: bool = False                         # continue from checkpoint_path when it exists
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None
    warmup_steps: int = 0
    validate_every: int = 0
    validate_fn: Callable[[int, dict[str, torch.Tensor]], Any] | None = None
    label: str = "Training"
    on_cancel: str = "raise"                     # "raise" (what ComfyUI expects) or "return" a partial result
    metadata: dict[str, str] = field(default_factory=dict)    # stored in every checkpoint
    fingerprint: dict[str, Any] = field(default_factory=dict)  # must match to resume (plus seed, batch, ...)
    progress_factory: Callable[[int, str], Any] | None = None  # default: host Progress(total, label)
    interrupt_check: Callable[[], None] | None = None          # default: the host's interrupt check
    step_callback: Callable[[int, float], None] | None = None  # after every finished optimizer step


@dataclass
class StepContext:
    """What the loss function gets besides its batch."""

    step: int                       # 0-based optimizer step being computed
    micro_step: int                 # 0..grad_accumulation-1
    generator: torch.Generator      # the only randomness a loss may use (checkpointed)
    params: dict[str, torch.Tensor]

    def randn(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """Gaussian noise drawn on the CPU generator (device-independent, so resume is exact)."""
        return torch.randn(shape, generator=self.generator, dtype=dtype).to(device or "cpu")

    def rand(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, dtype=dtype).to(device or "cpu")


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


def _check_config(config: TrainConfig, data_size: int) -> None:
    if config.steps < 1:
        raise InvalidInputError("steps must be at least 1")
    if config.batch_size < 1 or config.grad_accumulation < 1:
        raise InvalidInputError("batch size and gradient accumulation must be at least 1")
    if data_size < 1:
        raise InvalidInputError("the training set is empty")
    if config.on_cancel not in ("raise", "return"):
        raise InvalidInputError("on_cancel must be 'raise' or 'return'")
    if config.resume and not config.checkpoint_path:
        raise InvalidInputError("resume needs a checkpoint path")


def _lr_groups(config: TrainConfig) -> list[LrGroup]:
    groups = config.lr_groups
    if isinstance(groups, (int, float)):
        return [LrGroup(lr=float(groups))]
    return list(groups)


def _build_optimizer(params: Mapping[str, torch.Tensor], config: TrainConfig) -> torch.optim.AdamW:
    groups = _lr_groups(config)
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
                    for g, tensors in zip(groups, assigned) if tensors]
    return torch.optim.AdamW(param_groups, betas=config.betas, eps=config.eps)


def _fingerprint(config: TrainConfig, data_size: int, params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    out = {"seed": int(config.seed), "batch_size": int(config.batch_size),
           "grad_accumulation": int(config.grad_accumulation), "data_size": int(data_size),
           "params": {k: list(v.shape) for k, v in params.items()}}
    out.update({k: v for k, v in config.fingerprint.items()})
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


# --------------------------------------------------------------------------- checkpoints

@dataclass
class _RunState:
    params: dict[str, torch.Tensor]
    names: dict[int, str]
    optimizer: torch.optim.AdamW
    generator: torch.Generator
    sampler: EpochSampler
    losses: list[float]
    step: int = 0


def _save(path: str, run: _RunState, config: TrainConfig, fingerprint: dict) -> None:
    optim_tensors, scalars = ckpt.optimizer_state_tensors(run.optimizer, run.names)
    metadata = dict(config.metadata)
    metadata["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    state = ckpt.TrainingState(params=run.params, optimizer=optim_tensors, optimizer_scalars=scalars,
                               generator_state=run.generator.get_state(), global_rng_state=torch.get_rng_state(),
                               step=run.step, sampler_position=run.sampler.position, losses=list(run.losses),
                               metadata=metadata)
    ckpt.save_training_state(path, state)
    logger.info("%s: checkpoint at step %d written to %s", config.label, run.step, path)


def _restore(path: str, run: _RunState, fingerprint: dict) -> None:
    state = ckpt.load_training_state(path)
    saved = json.loads(state.metadata.get("fingerprint", "{}"))
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {fingerprint.get(k)!r}"
                            for k in differing if k != "params")
        if "params" in differing:
            details = "the trainable tensors differ (names or shapes)" + (f"; {details}" if details else "")
        raise TrainingError(f"cannot resume from '{path}': {details}. Use the settings of the interrupted run, "
                            "or turn resume off (or pick another name) to start a new run.")
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
    run.step = state.step


# --------------------------------------------------------------------------- the loop

def _optimizer_step(run: _RunState, loss_fn, data, config: TrainConfig, interrupt: Callable[[], None]) -> float:
    run.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(config.grad_accumulation):
        interrupt()
        batch = detach_inputs(_fetch(data, run.sampler.next_indices(config.batch_size)))
        try:
            output = loss_fn(batch, StepContext(run.step, micro, run.generator, run.params))
        except RuntimeError as exc:
            if "Inference tensors" in str(exc):
                raise TrainingError(
                    "a tensor created in inference mode reached autograd (usually frozen model weights between "
                    "the trained tensors and the loss); call trainers.autograd.release_inference_tensors(model) "
                    "before training, and clone inference inputs") from exc
            raise
        loss = output[0] if isinstance(output, tuple) else output
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError("the loss function must return a scalar tensor (or a tuple starting with one)")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"the loss became {value} at step {run.step + 1}; lower the learning rate "
                                "(the last checkpoint is kept)")
        if loss.requires_grad:
            (loss / config.grad_accumulation).backward()
        total += value
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(run.params.values()), config.max_grad_norm)
    _set_warmup_lr(run.optimizer, run.step, config.warmup_steps)
    run.optimizer.step()
    return total / config.grad_accumulation


def train(params: Mapping[str, torch.Tensor], loss_fn: Callable, data, config: TrainConfig) -> TrainResult:
    """Train ``params`` (name → tensor, updated in place) to minimise ``loss_fn(batch, ctx)`` over ``data``.

    ``data`` is a sequence of samples (``len`` + ``[i]``; batches are collated by ``data.collate`` or
    :func:`trainers.datasets.collate`) or anything with ``get_batch(indices)``. The loss returns a scalar
    tensor (or a tuple starting with one) and draws any randomness from ``ctx.generator``.
    """
    data_size = len(data)
    _check_config(config, data_size)
    path = os.path.abspath(config.checkpoint_path) if config.checkpoint_path else None
    interrupt = config.interrupt_check or check_interrupted
    with autograd_enabled(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        trainable = {name: make_trainable(tensor, name) for name, tensor in params.items()}
        fingerprint = _fingerprint(config, data_size, trainable)
        run = _RunState(params=trainable, names={id(t): n for n, t in trainable.items()},
                        optimizer=_build_optimizer(trainable, config),
                        generator=torch.Generator().manual_seed(config.seed),
                        sampler=EpochSampler(data_size, config.seed), losses=[])
        checkpoint_step = None
        if config.resume and path and os.path.isfile(path):
            _restore(path, run, fingerprint)
            checkpoint_step = run.step
            logger.info("%s: resumed from %s at step %d of %d", config.label, path, run.step, config.steps)
        elif config.resume:
            logger.info("%s: no checkpoint at %s yet, starting a new run", config.label, path)
        start_step = run.step
        progress = (config.progress_factory or (lambda total, label: Progress(total, label)))(config.steps, config.label)
        progress.update_absolute(min(run.step, config.steps))
        validations: list[tuple[int, Any]] = []
        cancelled = False
        try:
            while run.step < config.steps:
                loss = _optimizer_step(run, loss_fn, data, config, interrupt)
                run.step += 1
                run.losses.append(loss)
                last = run.step == config.steps
                if path and ((config.checkpoint_every and run.step % config.checkpoint_every == 0) or last):
                    _save(path, run, config, fingerprint)
                    checkpoint_step = run.step
                if config.validate_fn and config.validate_every and run.step % config.validate_every == 0:
                    with torch.no_grad(), torch.random.fork_rng(devices=[]):
                        validations.append((run.step, config.validate_fn(run.step, trainable)))
                if config.step_callback:
                    config.step_callback(run.step, loss)
                progress.update_absolute(run.step)  # raises in ComfyUI when the user pressed cancel
        except BaseException as exc:
            if not is_cancel(exc):
                logger.error("%s stopped at step %d by an error; last checkpoint: %s", config.label, run.step,
                             f"step {checkpoint_step} in {path}" if checkpoint_step is not None else "none")
                raise
            logger.warning("%s cancelled at step %d of %d; last checkpoint: %s", config.label, run.step,
                           config.steps, f"step {checkpoint_step} in {path} (resume to continue)"
                           if checkpoint_step is not None else "none")
            if config.on_cancel == "raise":
                raise
            cancelled = True
        finally:
            for tensor in trainable.values():
                tensor.requires_grad_(False)
                tensor.grad = None
        curve = render_loss_curve(run.losses, title=config.label,
                                  resumed_at=start_step if start_step else None)
    return TrainResult(params={k: v.detach() for k, v in trainable.items()}, losses=list(run.losses),
                       start_step=start_step, step=run.step, loss_curve=curve, checkpoint_path=path,
                       checkpoint_step=checkpoint_step, validations=validations, cancelled=cancelled)
