"""Escaping ComfyUI's ``torch.inference_mode()`` for in-graph training.

Every node runs under ``torch.inference_mode()``, so every tensor an upstream node produced (images,
latents, conditioning, even the UNet's weights) is an *inference tensor*. Autograd refuses to save such
a tensor for backward ("Inference tensors cannot be saved for backward"), refuses ``requires_grad`` on
it and refuses in-place updates. The rules this module implements:

- train inside :func:`autograd_enabled` (inference mode off, grad on);
- clone inference tensors before they enter autograd (:func:`detach_inputs`); an out-of-place op on an
  inference tensor outside inference mode gives a normal tensor, so a clone is enough;
- trainable tensors must be normal leaf tensors (:func:`make_trainable` swaps a normal copy into the
  same tensor object, so modules that hold it keep working);
- frozen weights that autograd has to *save* (every Linear/Conv/Norm between the trainable tensors and
  the loss) must be normal tensors too (:func:`release_inference_tensors`, same values, swapped in place).

:class:`InferenceTensorGuard` names the cause when one was missed: an op that fails while one of its
tensor arguments is an inference tensor and another one requires grad (checked on the tensors).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from torch.overrides import TorchFunctionMode

from ..errors import TrainingError

logger = logging.getLogger("likeness")


@contextlib.contextmanager
def autograd_enabled() -> Iterator[None]:
    """Inference mode off and gradients on, whatever the caller had (ComfyUI runs nodes in inference mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _normal_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor with the same values, dtype and device."""
    with torch.inference_mode(False), torch.no_grad():
        return tensor.clone()


def detach_inputs(value):
    """Return ``value`` with every inference tensor replaced by a normal copy (recursively in dict/list/tuple).

    Normal tensors are returned as they are (no copy), so this is cheap outside ComfyUI.
    """
    if isinstance(value, torch.Tensor):
        return _normal_copy(value) if value.is_inference() else value
    if isinstance(value, Mapping):
        return {k: detach_inputs(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(detach_inputs(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(detach_inputs(v) for v in value)
    return value


def _swap_in(tensor: torch.Tensor, replacement: torch.Tensor) -> bool:
    """Swap ``replacement``'s data into ``tensor`` (same Python object); False if torch refuses."""
    try:
        torch.utils.swap_tensors(tensor, replacement)
        return True
    except (RuntimeError, TypeError) as exc:  # weakrefs or autograd history on one of them
        logger.debug("swap_tensors refused (%s)", exc)
        return False


def make_trainable(tensor: torch.Tensor, name: str = "parameter") -> torch.Tensor:
    """Make ``tensor`` a normal floating leaf tensor with ``requires_grad=True``, in place when possible.

    An inference tensor (created while a node ran) gets its data swapped for a normal copy, so modules
    that hold this very Parameter object train it. Returns the tensor to optimise (the same object
    unless the swap was impossible, then a normal copy the caller must use instead).
    """
    if not tensor.is_floating_point():
        raise TypeError(f"trainable tensor '{name}' must be floating point, got {tensor.dtype}")
    with torch.inference_mode(False):
        if tensor.is_inference():
            copy = _normal_copy(tensor)
            if isinstance(tensor, torch.nn.Parameter):
                copy = torch.nn.Parameter(copy, requires_grad=False)
            if not _swap_in(tensor, copy):
                tensor = copy
        if tensor.grad_fn is not None:
            raise ValueError(f"trainable tensor '{name}' is not a leaf (it was computed from other tensors); "
                             "pass the parameter itself")
        tensor.requires_grad_(True)
    return tensor


def release_inference_tensors(module: torch.nn.Module) -> int:
    """Replace every inference-tensor parameter and buffer of ``module`` by a normal copy; returns the count.

    Values do not change and the module keeps the same Parameter objects (data swapped in place), so a
    shared host model stays valid for inference. Needed when gradients flow *through* frozen layers
    whose weights were created in inference mode. Frozen parameters keep ``requires_grad=False``.
    """
    count = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for key, tensor in list(store.items()):
                    if tensor is None or not tensor.is_inference():
                        continue
                    copy = tensor.clone()
                    if isinstance(tensor, torch.nn.Parameter):
                        copy = torch.nn.Parameter(copy, requires_grad=False)
                    if not _swap_in(tensor, copy):
                        store[key] = copy  # fall back to re-binding the attribute
                    count += 1
    if count:
        logger.debug("released %d inference tensors of %s for training", count, type(module).__name__)
    return count


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class InferenceTensorGuard(TorchFunctionMode):
    """While active, an op that fails on an inference tensor autograd would have to save raises a
    :class:`TrainingError` that says what to do (the loop runs the first micro-step under it)."""

    def __torch_function__(self, func, _types, args=(), kwargs=None):   # torch passes all four positionally
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except RuntimeError as exc:
            tensors = list(_tensors((args, kwargs)))
            if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) \
                    and any(torch.is_inference(t) for t in tensors):
                raise TrainingError(
                    "a tensor created in inference mode reached autograd (usually frozen model weights between the "
                    "trained tensors and the loss); list the model in the task's frozen_modules() or call "
                    "trainers.autograd.release_inference_tensors(model) before training, and clone inference "
                    "inputs") from exc
            raise
