"""Data-parallel training with ``torch.distributed`` (one process per device, launched by ``torchrun``).

The loop (:mod:`.loop`) runs unchanged in every process; this module gives it the few collective steps:

- every rank draws the same global micro-batch from the same seeded sampler and keeps its own equal,
  disjoint share of the rows (:meth:`World.shard`), so the sharding is deterministic and a resumed run
  continues exactly;
- after the micro-steps of an optimizer step, the trainable tensors' gradients are averaged across
  ranks (:func:`average_gradients`: one ``all_reduce`` per device and dtype over the flattened gradients).
  The trainables are loose tensors, not one ``nn.Module``, so this is the whole of what
  ``DistributedDataParallel`` would add; every rank then takes the same AdamW step and the tensors stay
  identical without further traffic (they are broadcast from rank 0 once, at the start);
- only rank 0 writes checkpoints, logs and shows progress; every rank resumes from the same file.

For a loss that is an equal-weight mean over rows the averaged gradient is the gradient of the global
batch, so N processes train the same tensors as one process with the same global batch (up to float
summation order). Backends: NCCL on CUDA (each process on the GPU of its ``LOCAL_RANK``), gloo on the CPU.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("likeness")

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank ``rank`` of ``size`` processes (0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's equal share of a global batch's indices (contiguous; the loop checks divisibility)."""
        share = len(indices) // self.size
        return list(indices[self.rank * share:(self.rank + 1) * share])


def current_world() -> World:
    """The initialised process group's rank and size, or a one-process world."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_distributed() -> bool:
    """True in a process started by ``torchrun`` (or an equivalent launcher) with more than one process."""
    return all(name in os.environ for name in LAUNCH_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def init_from_environment() -> World:
    """Join the process group the launcher describes; one-process world when not launched distributed.

    Call before the host model is loaded: on CUDA this selects the GPU of ``LOCAL_RANK``, which the host
    then loads the model onto.
    """
    if not launched_distributed():
        return World()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    world = current_world()
    logger.info("data-parallel training: rank %d of %d (%s)", world.rank, world.size, dist.get_backend())
    return world


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _groups(tensors: Iterable[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return groups


def average_gradients(params: Iterable[torch.Tensor], world: World) -> None:
    """Replace every parameter's gradient by its mean over the ranks (a missing gradient counts as zeros)."""
    with torch.no_grad():
        for group in _groups(params).values():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world.size
            offset = 0
            for param in group:
                count = param.numel()
                param.grad = flat[offset:offset + count].view_as(param).clone()
                offset += count


def average_value(value: float, world: World, device: torch.device) -> float:
    """The mean of a number over the ranks (the loss of an optimizer step)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world.size


def broadcast_parameters(params: Iterable[torch.Tensor]) -> None:
    """Rank 0's values into every rank's tensors (in place)."""
    with torch.no_grad():
        for group in _groups(params).values():
            flat = torch.cat([p.detach().reshape(-1) for p in group])
            dist.broadcast(flat, src=0)
            offset = 0
            for param in group:
                count = param.numel()
                param.copy_(flat[offset:offset + count].view_as(param))
                offset += count


def barrier() -> None:
    dist.barrier()
