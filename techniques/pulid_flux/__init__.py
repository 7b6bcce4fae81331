"""PuLID-FLUX (Guo et al., "PuLID: Pure and Lightning ID Customization via Contrastive Alignment", FLUX.1 release
v0.9.x): an ID encoder (IDFormer) over antelopev2 + EVA02-CLIP-L-14-336 features, and ID cross-attentions whose
output is added to the image tokens after every 2nd double and every 4th single block.

``encoders`` holds the modules (released key layout), ``checkpoint`` the file loader.
"""
from __future__ import annotations

from .checkpoint import PulidFluxModel, build_pulid_flux, load_pulid_flux, pulid_flux_from_state_dict, state_dict_of
from .encoders import CrossAttentionConfig, IDCrossAttention, IDFormer, IDFormerConfig

__all__ = ["CrossAttentionConfig", "IDCrossAttention", "IDFormer", "IDFormerConfig", "PulidFluxModel",
           "build_pulid_flux", "load_pulid_flux", "pulid_flux_from_state_dict", "state_dict_of"]
