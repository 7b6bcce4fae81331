"""The pack's one training loop (:mod:`.loop`), its task contract (:mod:`.task`), checkpoints, datasets,
diffusion losses and data-parallel support (:mod:`.distributed`)."""
from __future__ import annotations

from .loop import RESUME_MODES, LrGroup, StepContext, TrainConfig, TrainingCancelled, TrainResult, is_cancel, train
from .task import TrainingTask, run_field

__all__ = ["RESUME_MODES", "LrGroup", "StepContext", "TrainConfig", "TrainResult", "TrainingCancelled",
           "TrainingTask", "is_cancel", "run_field", "train"]
