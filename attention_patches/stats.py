"""Opt-in counters of the engine's work, for tests and benchmarks.

A patch object counts nothing unless an :class:`EngineStats` is attached to it (constructor argument
``stats=``, or :func:`~.patch.attach_stats` on a model clone); clones of that model share the attached
object (it observes a model and what is cloned from it).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """``site_calls``: identity work (joint or decoupled) done per site index; ``capture_passes``:
    reference UNet passes run; ``capture_seconds``: wall time spent in them."""

    site_calls: collections.Counter = field(default_factory=collections.Counter)
    capture_passes: int = 0
    capture_seconds: float = 0.0

    def __deepcopy__(self, memo):  # shared by the clones of the model it is attached to
        return self
