"""Shared check of the trainers' resume contract: a run cancelled at a step and resumed equals a straight run."""
from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch


def straight_and_resumed(train: Callable[..., tuple[Any, Any]], model, data, settings, folder: str, cancel_step: int):
    """``train(model, data, settings, checkpoint_path=, step_callback=, resume=)`` run straight, and again cancelled
    at ``cancel_step`` then resumed with ``resume="require"`` (under inference mode, as ComfyUI runs a node).

    Returns ``(straight, straight_result, resumed, resumed_result, checkpointed_step)``: the step the cancelled run's
    checkpoint holds."""
    from likeness.trainers import TrainingCancelled
    from likeness.trainers import checkpoint as ckpt

    def cancel(step, loss):
        if step == cancel_step:
            raise TrainingCancelled("user pressed cancel")

    straight_path, resumed_path = os.path.join(folder, "straight.safetensors"), os.path.join(folder, "resumed.safetensors")
    with torch.inference_mode():
        straight, straight_result = train(model, data, settings, checkpoint_path=straight_path)
        with pytest.raises(TrainingCancelled):
            train(model, data, settings, checkpoint_path=resumed_path, step_callback=cancel)
        checkpointed = ckpt.load_training_state(resumed_path).step
        resumed, resumed_result = train(model, data, settings, checkpoint_path=resumed_path, resume="require")
    return straight, straight_result, resumed, resumed_result, checkpointed
