"""PuLID-FLUX (Guo et al., "PuLID: Pure and Lightning ID Customization via Contrastive Alignment", FLUX.1 release
v0.9.x): an ID encoder (IDFormer) over antelopev2 + EVA02-CLIP-L-14-336 features, and ID cross-attentions whose
output is added to the image tokens after every 2nd double and every 4th single block.

``encoders`` holds the modules (released key layout), ``checkpoint`` the file loader, ``embeds`` the typed ID
tokens (PULID_FLUX_EMBEDS), ``injector`` the engine injector and the apply function.
"""
from __future__ import annotations

from .checkpoint import PulidFluxModel, build_pulid_flux, load_pulid_flux, pulid_flux_from_state_dict, state_dict_of
from .embeds import PulidFluxEmbeds, load_pulid_embeds, save_pulid_embeds
from .encoders import CrossAttentionConfig, IDCrossAttention, IDFormer, IDFormerConfig
from .injector import UNCOND_MODES, PulidFluxInjector, apply_pulid_flux, ca_schedule

__all__ = ["CrossAttentionConfig", "IDCrossAttention", "IDFormer", "IDFormerConfig", "PulidFluxEmbeds",
           "PulidFluxInjector", "PulidFluxModel", "UNCOND_MODES", "apply_pulid_flux", "build_pulid_flux",
           "ca_schedule", "load_pulid_embeds", "load_pulid_flux", "pulid_flux_from_state_dict", "save_pulid_embeds",
           "state_dict_of"]
