"""A tiny SDXL text encoder for host tests: ComfyUI's ``SDXLClipModel`` layout (CLIP-L hidden states, CLIP-G
hidden states concatenated, CLIP-G's projected pooled output) with both towers shrunk.

Both towers are 32 wide, so the context is 64 (the tiny SDXL UNet's ``context_dim``); CLIP-G's pooled output
(as wide as the tower: ComfyUI's text projection is square) is widened to 1280 by one fixed extra Linear, the
width ``model_base.SDXL.encode_adm`` puts into ``y`` (the real CLIP-G is 1280 wide). Tokenizers are ComfyUI's
real SDXL tokenizers (CLIP-L pads with the end token, CLIP-G with 0). Nothing imports ComfyUI at module level.
"""
from __future__ import annotations

import functools

TOWER_WIDTH = 32          # each tower; the context is twice this
POOLED_DIM = 1280         # CLIP-G projection (SDXL's y starts with it)


def _tower_config() -> dict:
    from host_support import tiny_text_config

    return tiny_text_config(TOWER_WIDTH, layers=3)   # layer_idx -2 needs more than two layers


@functools.lru_cache(maxsize=2)
def _cached_sdxl_clip(seed: int):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import torch

    from host_support import init_weights

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            torch.nn.Module.__init__(self)
            options = dict(model_options or {})
            self.clip_l = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=_tower_config(), return_projected_pooled=False,
                model_options={**options, "model_name": "clip_l"})
            self.clip_g = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=_tower_config(), return_projected_pooled=True,
                special_tokens={"start": 49406, "end": 49407, "pad": 0}, model_options={**options, "model_name": "clip_g"})
            self.pooled_projection = torch.nn.Linear(TOWER_WIDTH, POOLED_DIM, bias=False, dtype=dtype,
                                                     device=device).requires_grad_(False)   # frozen like the towers
            self.dtypes = {dtype}

        def encode_token_weights(self, token_weight_pairs):
            cond, pooled = super().encode_token_weights(token_weight_pairs)
            return cond, self.pooled_projection(pooled.to(self.pooled_projection.weight.dtype))

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    init_weights(clip.cond_stage_model, seed)
    return clip


def build_tiny_sdxl_clip(seed: int = 0):
    """A ``comfy.sd.CLIP`` shaped like SDXL's: ``CLIPTextEncode`` gives ``[1, 77, 64]`` plus ``pooled_output``
    ``[1, 1280]`` (matches the tiny SDXL UNet of ``host_support``)."""
    return _cached_sdxl_clip(seed).clone()
