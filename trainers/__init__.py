"""The pack's shared training loop (see :mod:`.loop`), checkpoints, datasets and diffusion losses."""
from __future__ import annotations

from .loop import LrGroup, StepContext, TrainConfig, TrainingCancelled, TrainResult, is_cancel, train

__all__ = ["LrGroup", "StepContext", "TrainConfig", "TrainResult", "TrainingCancelled", "is_cancel", "train"]
