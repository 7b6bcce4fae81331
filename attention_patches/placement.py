"""Where the injectors shared by a model's clones live.

The injectors of a patch are shared with the patches of the model's clones (``__deepcopy__`` shares them),
but ComfyUI moves each clone on its own: it calls ``to(load_device)`` on the clone it loads and
``to(offload_device)`` on a clone it detaches, including from ``ModelPatcher.__del__`` when a clone is
garbage-collected, which may happen while a sibling clone is sampling. So one clone's offload must not pull
the shared tensors away from a sibling that still has them on its device.

:class:`Placement` is shared by a patch and all patches cloned from it. Each patch records the device
ComfyUI last asked it for; the shared injectors go to the newest request for a device other than the CPU
among the patches still alive, or to the newest request when every one is for the CPU (all offloaded).
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch


class Placement:
    """The device requests of the live patches of one model lineage (see the module doc)."""

    def __init__(self) -> None:
        self._requests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._order = itertools.count()

    def request(self, holder: Any, device: torch.device) -> torch.device:
        """Record that ComfyUI moved ``holder``'s model to ``device``; returns where the shared injectors go."""
        self._requests[holder] = (next(self._order), device)
        requests = list(self._requests.values())
        on_accelerator = [r for r in requests if r[1].type != "cpu"]
        return max(on_accelerator or requests, key=lambda r: r[0])[1]

    def __deepcopy__(self, memo):  # shared by the clones of a patch
        return self
