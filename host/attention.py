"""Host side of the identity-attention engine (imports ``comfy`` lazily, inside functions).

- :func:`host_base_attention`: ComfyUI's ``optimized_attention`` (the backend the user chose: SDPA,
  xformers, sage, ...) in the engine's ``(q, k, v, heads, extra_options)`` form, so an unweighted site is
  computed exactly as the unpatched model computes it.
- :func:`forward_transformer_options`: the ``transformer_options`` a direct ``apply_model`` call needs so
  that the pack's APPLY_MODEL wrapper runs (what ComfyUI's sampler does in ``prepare_model_patcher``);
  trainers use it to run the same patched forward as sampling.
- :func:`percent_to_sigma`: through the model's ``model_sampling``.
"""
from __future__ import annotations

import copy
from typing import Any, Callable


def host_base_attention() -> Callable | None:
    """``fn(q, k, v, heads, extra_options)`` calling ComfyUI's optimized attention, or None outside the host."""
    try:
        from comfy.ldm.modules import attention as comfy_attention
    except ImportError:
        return None

    def base(q, k, v, heads, extra_options):
        # Same call as CrossAttention.forward (attn_precision, and the override hook via transformer_options).
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                                   transformer_options=extra_options)

    return base


def forward_transformer_options(model_patcher: Any) -> dict:
    """A copy of the patcher's ``transformer_options`` with its wrappers/callbacks merged in, ready for
    ``model_patcher.model.apply_model(x, sigma, c_crossattn=..., transformer_options=...)``."""
    options = copy.copy(model_patcher.model_options.get("transformer_options", {}))
    wrappers = {}
    for kind, by_key in getattr(model_patcher, "wrappers", {}).items():
        merged = [fn for fns in by_key.values() for fn in fns]
        if merged:
            wrappers[kind] = {"likeness": merged}
    options["wrappers"] = wrappers
    return options


def percent_to_sigma(model_patcher: Any, percent: float) -> float:
    return float(model_patcher.get_model_object("model_sampling").percent_to_sigma(percent))
