"""Where a tensor owner shared by several holders lives (injectors shared by clones, adapters by injectors).

An injector is shared by the patches of a model's clones (``__deepcopy__`` shares it) and an adapter module
may be shared by the injectors of several models, but ComfyUI moves each model on its own: it calls
``to(load_device)`` on the model it loads and ``to(offload_device)`` on a model it detaches, including from
``ModelPatcher.__del__`` when a clone is garbage-collected, which may happen while another model holding the
same tensors is sampling. So one holder's offload must not pull shared tensors away from a holder that
still has them on its device.

:func:`place` records, per owner, the device each live holder last asked for; the owner goes to the newest
request for a device other than the CPU, or to the newest request when every one is for the CPU (all
offloaded). Holders and owners are held weakly: a collected holder's request no longer counts.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

_ORDER = itertools.count()
_REQUESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # owner -> {holder: (order, device)}


def place(owner: Any, holder: Any, device: torch.device) -> torch.device:
    """Record that ``holder`` (now) wants ``owner`` on ``device``; returns the device ``owner`` goes to."""
    requests = _REQUESTS.get(owner)
    if requests is None:
        requests = _REQUESTS[owner] = weakref.WeakKeyDictionary()
    requests[holder] = (next(_ORDER), device)
    live = list(requests.values())
    on_accelerator = [r for r in live if r[1].type != "cpu"]
    return max(on_accelerator or live, key=lambda r: r[0])[1]
