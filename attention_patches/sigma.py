"""When and where an injector acts: a sigma range from start/end percent, and per-site weights.

The percent → sigma conversion needs the model's ``model_sampling`` and runs once per model sampling
object (once per sampling run in practice), never per attention call. The engine reads the current
sigma to the host once per UNet call (in its APPLY_MODEL wrapper) and every attention call of that
pass compares plain floats, so there is no GPU→CPU sync inside the attention sites.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import InvalidInputError
from .sites import AttentionSite

SITE_WEIGHT_MODES = ("all", "input", "middle", "output", "double", "single", "custom")
UNET_SITE_WEIGHT_MODES = ("all", "input", "middle", "output", "custom")
DIT_SITE_WEIGHT_MODES = ("all", "double", "single", "custom")


@dataclass
class SigmaRange:
    """Active while ``sigma_end <= sigma <= sigma_start``; percents are of the sampling schedule.

    ``start_percent=0, end_percent=1`` is always active (no model needed).
    """

    start_percent: float = 0.0
    end_percent: float = 1.0
    _resolved: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (0.0 <= self.start_percent <= 1.0 and 0.0 <= self.end_percent <= 1.0):
            raise InvalidInputError(f"start/end must lie in 0..1, got {self.start_percent}, {self.end_percent}")
        if self.start_percent > self.end_percent:
            raise InvalidInputError(f"start ({self.start_percent}) must not be after end ({self.end_percent})")

    @property
    def always(self) -> bool:
        return self.start_percent <= 0.0 and self.end_percent >= 1.0

    def sigmas(self, model_sampling: Any) -> tuple[float, float]:
        """(sigma_start, sigma_end) for this model sampling, computed once and memoised."""
        if model_sampling is None:
            return (float("inf"), 0.0)
        key = id(model_sampling)
        hit = self._resolved.get(key)
        if hit is None or hit[0] is not model_sampling:
            hit = (model_sampling, *resolve_sigmas(self.start_percent, self.end_percent,
                                                   model_sampling.percent_to_sigma))
            self._resolved = {key: hit}  # one entry: a new model sampling replaces the old
        return hit[1], hit[2]

    def contains(self, sigma: float, model_sampling: Any = None) -> bool:
        if self.always:
            return True
        hi, lo = self.sigmas(model_sampling)
        return lo <= sigma <= hi


def resolve_sigmas(start_percent: float, end_percent: float,
                   percent_to_sigma: Callable[[float], float]) -> tuple[float, float]:
    """(sigma_start, sigma_end) from percents; start 0 means "from the first step" (infinite sigma)."""
    hi = float("inf") if start_percent <= 0.0 else float(percent_to_sigma(start_percent))
    lo = 0.0 if end_percent >= 1.0 else float(percent_to_sigma(end_percent))
    return hi, lo


@dataclass(frozen=True)
class SiteWeights:
    """A weight multiplier per site.

    Modes: ``all`` (1 everywhere); ``input`` / ``middle`` / ``output`` (1 on that part of the UNet,
    ``others`` elsewhere); ``double`` / ``single`` (1 on that kind of DiT block, ``others`` elsewhere); ``custom`` (``values`` in site call order, or ``{site index: weight}``;
    sites not listed get ``others``).
    """

    mode: str = "all"
    others: float = 0.25
    values: tuple[float, ...] = ()
    by_index: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in SITE_WEIGHT_MODES:
            raise InvalidInputError(f"site weight mode must be one of {SITE_WEIGHT_MODES}, got {self.mode!r}")

    @classmethod
    def parse(cls, mode: str, custom: str = "", others: float = 0.25) -> "SiteWeights":
        """From node inputs. ``custom`` is ``"1, 0.5, 0"`` (call order) or ``"0:1, 7:0.5"`` (index:weight)."""
        if mode != "custom":
            return cls(mode=mode, others=others)
        text = custom.strip()
        if not text:
            raise InvalidInputError("site weights 'custom' needs a list, e.g. '1, 1, 0.5' or '0:1, 7:0.5'")
        try:
            items = [t.strip() for t in text.replace(";", ",").split(",") if t.strip()]
            if all(":" in t for t in items):
                pairs = tuple((int(a), float(b)) for a, b in (t.split(":", 1) for t in items))
                return cls(mode="custom", others=others, by_index=pairs)
            return cls(mode="custom", others=others, values=tuple(float(t) for t in items))
        except ValueError as exc:
            raise InvalidInputError(f"could not read custom site weights {custom!r}: {exc}") from exc

    def weight(self, site: AttentionSite) -> float:
        if self.mode == "all":
            return 1.0
        if self.mode == "custom":
            if self.by_index:
                return dict(self.by_index).get(site.index, self.others)
            return self.values[site.index] if site.index < len(self.values) else self.others
        return 1.0 if site.group == self.mode else self.others

    def table(self, sites: Sequence[AttentionSite]) -> dict[int, float]:
        """``{site.index: weight}`` for all sites (precomputed once per install)."""
        return {s.index: float(self.weight(s)) for s in sites}
