"""Training checkpoints: one safetensors file, written atomically, holding everything a bit-exact resume needs.

Layout of a training checkpoint (all tensors, no pickle):

- ``param.<name>``: the trainable tensors;
- ``optim.<name>.<key>``: the optimizer state of parameter ``<name>`` (AdamW: ``step``, ``exp_avg``,
  ``exp_avg_sq``); non-tensor state values are stored as float64 scalars (listed in the metadata);
- ``rng.generator``: the state of the loop's CPU generator (noise, timesteps, anything the loss draws);
- ``rng.torch_cpu``: torch's global CPU generator (for losses that use it, e.g. dropout);
- ``state.step`` (optimizer steps done), ``state.sampler_position`` (items the data sampler has handed
  out), ``state.losses`` (the loss of every finished step, for the loss curve).

The metadata (string → string) holds the format tag, the optimizer's non-tensor settings and whatever the
caller adds (technique, base model, the run's fingerprint).

Writes go through :func:`safetensors_io.atomic_save` (temp file + fsync + rename): a crash or SIGKILL at
any moment leaves either the previous complete checkpoint or the new complete one, never a torn file.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointLayoutError
from ..safetensors_io import atomic_save, load_tensors

logger = logging.getLogger("likeness")

FORMAT_KEY = "likeness.format"
FORMAT_TRAINING = "training_checkpoint/1"


# --------------------------------------------------------------------------- training state

@dataclass
class TrainingState:
    """What a training checkpoint holds (see the module docstring for the key layout)."""

    params: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)   # "<name>.<key>" -> tensor
    optimizer_scalars: list[str] = field(default_factory=list)         # keys stored from python numbers
    generator_state: torch.Tensor | None = None
    global_rng_state: torch.Tensor | None = None
    step: int = 0
    sampler_position: int = 0
    losses: list[float] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer,
                            names: Mapping[int, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Flatten ``optimizer``'s per-parameter state to ``{"<param name>.<key>": tensor}``.

    ``names`` maps ``id(parameter)`` to its name, so the file does not depend on group order.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: list[str] = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            name = names[id(param)]
            for key, value in state.items():
                full = f"{name}.{key}"
                if isinstance(value, torch.Tensor):
                    tensors[full] = value
                elif isinstance(value, (int, float)):
                    tensors[full] = torch.tensor(float(value), dtype=torch.float64)
                    scalars.append(full)
                else:
                    raise TypeError(f"optimizer state '{full}' of type {type(value).__name__} cannot be stored")
    return tensors, scalars


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: Mapping[int, str],
                         tensors: Mapping[str, torch.Tensor], scalars: list[str]) -> None:
    """Put state saved by :func:`optimizer_state_tensors` back into ``optimizer`` (current hyper-parameters kept)."""
    by_name: dict[str, dict] = {}
    for full, value in tensors.items():
        name, key = full.rsplit(".", 1)
        by_name.setdefault(name, {})[key] = float(value.item()) if full in scalars else value
    current = optimizer.state_dict()
    state: dict[int, dict] = {}
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            saved = by_name.pop(names[id(param)], None)
            if saved is not None:
                state[index] = saved
            index += 1
    if by_name:
        raise CheckpointLayoutError(f"optimizer state for unknown parameters: {sorted(by_name)[:5]}")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def save_training_state(path: str, state: TrainingState) -> str:
    """Write ``state`` atomically to ``path`` (safetensors); returns the path."""
    tensors: dict[str, torch.Tensor] = {f"param.{k}": v for k, v in state.params.items()}
    tensors.update({f"optim.{k}": v for k, v in state.optimizer.items()})
    if state.generator_state is not None:
        tensors["rng.generator"] = state.generator_state
    if state.global_rng_state is not None:
        tensors["rng.torch_cpu"] = state.global_rng_state
    tensors["state.step"] = torch.tensor(state.step, dtype=torch.int64)
    tensors["state.sampler_position"] = torch.tensor(state.sampler_position, dtype=torch.int64)
    tensors["state.losses"] = torch.tensor(state.losses, dtype=torch.float64)
    metadata = dict(state.metadata)
    metadata[FORMAT_KEY] = FORMAT_TRAINING
    metadata["optimizer_scalars"] = json.dumps(state.optimizer_scalars)
    return atomic_save(tensors, path, metadata)


def load_training_state(path: str) -> TrainingState:
    """Read a checkpoint written by :func:`save_training_state`."""
    tensors, metadata = load_tensors(path)
    if metadata.get(FORMAT_KEY) != FORMAT_TRAINING:
        raise CheckpointLayoutError(
            f"'{path}' is not a Likeness training checkpoint (format tag {metadata.get(FORMAT_KEY)!r}); "
            "resume needs the file the trainer wrote, not an exported adapter")
    try:
        state = TrainingState(
            params={k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")},
            optimizer={k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")},
            optimizer_scalars=json.loads(metadata.get("optimizer_scalars", "[]")),
            generator_state=tensors.get("rng.generator"),
            global_rng_state=tensors.get("rng.torch_cpu"),
            step=int(tensors["state.step"].item()),
            sampler_position=int(tensors["state.sampler_position"].item()),
            losses=[float(x) for x in tensors["state.losses"].tolist()],
            metadata={k: v for k, v in metadata.items() if k not in (FORMAT_KEY, "optimizer_scalars")},
        )
    except KeyError as exc:
        raise CheckpointLayoutError(f"training checkpoint '{path}' lacks {exc}; delete it to start over") from exc
    return state
