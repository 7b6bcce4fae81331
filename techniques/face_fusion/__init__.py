"""Face Fusion ("Fusion is all you need", arXiv 2409.19111): reference-face keys/values joined to the
text keys in every cross-attention (one softmax), multi-reference (Eq. 6), multi-identity (Eq. 7).

The pack is the method's first implementation (no official code or weights): ``adapter`` holds the
trainable ``Linear_kf`` / ``Linear_vf`` per site and their file format (``flux_adapter``: the per-block
projections of a Flux-family DiT's reference keys/values), ``apply`` the joint injector (UNet cross-attention or
DiT joint attention) and the apply function; the trainer lives in ``training`` (``flux_training`` on a DiT).
"""
from __future__ import annotations

from .adapter import (
                      FusionAdapter,
                      FusionAdapterBase,
                      fusion_adapter_path,
                      fusion_save_dir,
                      list_fusion_adapters,
                      load_fusion_adapter,
                      new_fusion_adapter,
                      save_fusion_adapter,
)
from .apply import UNCOND_MODES, FusionIdentityLatents, FusionInjector, apply_face_fusion, encode_reference_images
from .flux_adapter import FluxFusionAdapter

__all__ = ["FluxFusionAdapter", "FusionAdapter", "FusionAdapterBase", "FusionIdentityLatents", "FusionInjector",
           "UNCOND_MODES", "apply_face_fusion", "encode_reference_images", "fusion_adapter_path", "fusion_save_dir",
           "list_fusion_adapters", "load_fusion_adapter", "new_fusion_adapter", "save_fusion_adapter"]
