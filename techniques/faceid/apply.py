"""Applying a FaceID-family adapter to a model: ID tokens, LoRA weight patches, the decoupled ID branch.

Shared by the FaceID / FaceID-Plus / PlusV2 apply, Face-MakeUp (its adapter half) and ConsistentID:

- :func:`clip_hidden_states`: CLIP-H penultimate hidden states of an IMAGE, and of the all-zero *normalised*
  input the official code uses for the unconditional branch (an image filled with the CLIP pixel mean).
- :func:`encode_id_tokens`: cond tokens ``projector(arcface, clip)`` and uncond tokens
  ``projector(zeros, clip(zero image))``.
- :func:`apply_faceid_adapter`: a model clone with the LoRA as weight patches (exact, see ``lora.py``) and
  the engine's :class:`DecoupledInjector` fed by :class:`IdentityKV` (``out += w * Attn(q, K_ip, V_ip)``).
- :func:`apply_face_makeup` / :func:`apply_instantid`: the adapter half plus the ID-fed ControlNet attached to
  the conditioning (Face-MakeUp's pose net, InstantID's IdentityNet), fed the cond / uncond ID tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...attention_patches import DecoupledInjector, SigmaRange, install
from ...attention_patches.injectors import stacking_name
from ...errors import InvalidInputError
from .checkpoint import FaceIDCheckpoint
from .ip_weights import IdentityKV
from .lora import apply_lora, check_model_fits
from .mixing import CLIP_PIXEL_MEAN
from .projection import projector_tokens


@dataclass
class IDTokens:
    """Projected identity tokens for positive and negative chunks, ``[B, N, context]`` each."""
    cond: torch.Tensor
    uncond: torch.Tensor


def zero_clip_image(clip_vision, size: int | None = None) -> torch.Tensor:
    """An IMAGE ``[1,S,S,3]`` that the CLIP preprocessing maps to all zeros (filled with its pixel mean)."""
    mean = getattr(clip_vision, "image_mean", CLIP_PIXEL_MEAN)
    side = size or int(getattr(clip_vision, "image_size", 224))
    return torch.tensor(mean, dtype=torch.float32).view(1, 1, 1, 3).expand(1, side, side, 3).contiguous()


def clip_hidden_states(clip_vision, image: torch.Tensor | None) -> torch.Tensor:
    """Penultimate hidden states ``[B, N, D]`` of ``image`` (IMAGE ``[B,H,W,C]``), center-cropped like the
    official CLIPImageProcessor; ``image=None`` encodes the zero (unconditional) input."""
    pixels = zero_clip_image(clip_vision) if image is None else image
    output = clip_vision.encode_image(pixels, crop=True)
    return output["penultimate_hidden_states"].float()


def encode_id_tokens(checkpoint: FaceIDCheckpoint, arcface: torch.Tensor, clip_hidden: torch.Tensor | None = None,
                     uncond_clip_hidden: torch.Tensor | None = None, s_scale: float = 1.0,
                     shortcut: bool | None = None) -> IDTokens:
    """Cond and uncond ID tokens. ``arcface`` [B,512] (normed buffalo_l); ``clip_hidden`` [B,257,1280] for the
    Plus family (ignored by FaceID); ``uncond_clip_hidden`` = CLIP of the zero input."""
    use_shortcut = checkpoint.shortcut if shortcut is None else bool(shortcut)
    arcface = torch.as_tensor(arcface).float()
    arcface = arcface.unsqueeze(0) if arcface.dim() == 1 else arcface
    with torch.no_grad():
        if not checkpoint.needs_clip_vision:
            cond = projector_tokens(checkpoint.projector, arcface)
            uncond = projector_tokens(checkpoint.projector, torch.zeros_like(arcface))
            return IDTokens(cond, uncond)
        if clip_hidden is None or uncond_clip_hidden is None:
            raise InvalidInputError(f"{checkpoint.name} needs a CLIP vision model (CLIP-ViT-H) for its ID tokens.")
        uncond_clip = uncond_clip_hidden.expand(clip_hidden.shape[0], -1, -1) if uncond_clip_hidden.shape[0] == 1 \
            else uncond_clip_hidden
        cond = projector_tokens(checkpoint.projector, arcface, clip_hidden, use_shortcut, s_scale)
        uncond = projector_tokens(checkpoint.projector, torch.zeros_like(arcface), uncond_clip, use_shortcut, s_scale)
    return IDTokens(cond, uncond)


def apply_faceid_adapter(model_patcher, checkpoint: FaceIDCheckpoint, tokens: IDTokens, weight: float = 1.0,
                         lora_strength: float = 1.0, start_at: float = 0.0, end_at: float = 1.0,
                         mask: torch.Tensor | None = None, name: str | None = None):
    """A clone of ``model_patcher`` with the adapter's LoRA patches and the decoupled ID branch.

    ``weight`` is the official IP ``scale``; ``lora_strength`` scales the merged LoRA (1 = as trained);
    ``start_at``/``end_at`` limit the ID branch to part of the schedule; ``mask`` (MASK) limits it in space.
    Weight 0 and LoRA strength 0 leave the model's output unchanged. An adapter for another base model (SD1.5 on
    SDXL or the reverse) raises CheckpointLayoutError naming both.
    """
    check_model_fits(model_patcher, checkpoint.adapter, checkpoint.source)
    patched = apply_lora(model_patcher, checkpoint.adapter, lora_strength)
    if weight != 0.0:
        provider = IdentityKV(checkpoint.adapter, tokens.cond, tokens.uncond)   # follows the model's device
        patch = install(patched)
        injector = DecoupledInjector(stacking_name(patch.injectors, name or checkpoint.variant.value), provider,
                                     weight=weight, sigma_range=SigmaRange(start_at, end_at), region=mask)
        patch.add(injector)   # a second application stacks (its own name), as its LoRA does
    return patched


def arcface_from_faces(analysis, expected_dim: int = 512, raw: bool = False) -> torch.Tensor:
    """``[B, D]`` identity vectors, the first selected face of each image (zeros without a face, as the official
    code does): L2-normalised for the FaceID family (trained on insightface buffalo_l / w600k_r50 vectors), the
    raw embedding with ``raw=True`` (InstantID: ``face_info['embedding']`` of antelopev2 / glintr100)."""
    import logging

    faces = analysis.first_face_per_image()
    if all(f is None or f.embedding is None for f in faces):
        raise InvalidInputError("FACES holds no identity embedding (no face found, or an analyzer without a "
                                "recognition model). Use the InsightFace loader with buffalo_l.")
    dims = {int(f.embedding.shape[-1]) for f in faces if f is not None and f.embedding is not None}
    if dims != {expected_dim}:
        raise InvalidInputError(f"this model needs {expected_dim}-d ArcFace vectors (insightface buffalo_l); FACES has "
                                f"{sorted(dims)}-d embeddings from {analysis.model_id}.")
    trained_on = ("antelopev2", "glintr100") if raw else ("buffalo_l", "w600k")
    if not any(name in str(analysis.model_id) for name in trained_on):
        logging.getLogger("likeness").warning("Likeness: this model was trained on %s (%s) embeddings; FACES came "
                                              "from %s.", *trained_on, analysis.model_id)
    rows = [torch.zeros(expected_dim) if f is None or f.embedding is None
            else torch.as_tensor(f.embedding if raw else f.normed_embedding, dtype=torch.float32).reshape(-1)
            for f in faces]
    return torch.stack(rows)


def apply_face_makeup(model_patcher, checkpoint: FaceIDCheckpoint, tokens: IDTokens, positive: list, negative: list,
                      pose_map: torch.Tensor, weight: float = 0.6, lora_strength: float = 1.0,
                      controlnet_strength: float = 0.2, start_at: float = 0.0, end_at: float = 1.0,
                      control_net=None) -> tuple:
    """The whole Face-MakeUp: the adapter half on the model and the pose ControlNet on the conditioning.

    The ControlNet (built once per checkpoint and cached on it unless ``control_net`` is given) is attached to
    every positive entry with the cond ID tokens and every negative entry with the uncond ones as its
    cross-attention context. Returns ``(model, positive, negative)``; all-zero strengths change nothing.
    """
    from .checkpoint import Variant
    from .controlnet import build_id_controlnet

    if checkpoint.variant != Variant.FACE_MAKEUP or checkpoint.controlnet is None:
        raise InvalidInputError(f"{checkpoint.name} is not Face-MakeUp (no 'controlnet' group); use the FaceID Apply "
                                "node for FaceID / Plus / PlusV2 files.")
    model = apply_faceid_adapter(model_patcher, checkpoint, tokens, weight=weight, lora_strength=lora_strength,
                                 start_at=start_at, end_at=end_at)
    if controlnet_strength == 0.0:
        return model, positive, negative
    if control_net is None:
        control_net = getattr(checkpoint, "_comfy_controlnet", None)
        if control_net is None:
            control_net = build_id_controlnet(checkpoint.controlnet, checkpoint.controlnet_shape)
            checkpoint._comfy_controlnet = control_net
    positive, negative = _attach_both(positive, negative, control_net, pose_map, tokens, controlnet_strength,
                                      start_at, end_at)
    return model, positive, negative


def _attach_both(positive: list, negative: list, control_net, hint: torch.Tensor, tokens: IDTokens, strength: float,
                 start_at: float, end_at: float) -> tuple[list, list]:
    """The ControlNet on the positive entries with the cond ID tokens and on the negative ones with the uncond."""
    from .controlnet import attach_id_controlnet

    return (attach_id_controlnet(positive, control_net, hint, tokens.cond, strength, start_at, end_at),
            attach_id_controlnet(negative, control_net, hint, tokens.uncond, strength, start_at, end_at))


def apply_instantid(model_patcher, checkpoint: FaceIDCheckpoint, tokens: IDTokens, positive: list, negative: list,
                    kps_map: torch.Tensor, control_net=None, weight: float = 0.8, controlnet_strength: float = 0.8,
                    start_at: float = 0.0, end_at: float = 1.0, mask: torch.Tensor | None = None) -> tuple:
    """The whole InstantID: its 16 ID tokens in every cross-attention (the decoupled injector, ``weight`` = the
    official ``ip_adapter_scale``) and the IdentityNet attached to the conditioning with the cond / uncond ID
    tokens as its context and ``kps_map`` (IMAGE, the 5-keypoint map) as its hint, ``controlnet_strength`` =
    the official ``controlnet_conditioning_scale``. Returns ``(model, positive, negative)``; ``control_net=None``
    or strength 0 runs the adapter half only, and all-zero weights change nothing."""
    from .checkpoint import Variant
    from .controlnet import check_controlnet_context

    if checkpoint.variant != Variant.INSTANTID:
        raise InvalidInputError(f"{checkpoint.name} is not InstantID's ip-adapter.bin; use the FaceID / Face-MakeUp "
                                "Apply nodes for it.")
    model = apply_faceid_adapter(model_patcher, checkpoint, tokens, weight=weight, lora_strength=0.0,
                                 start_at=start_at, end_at=end_at, mask=mask)
    if control_net is None or controlnet_strength == 0.0:
        return model, positive, negative
    check_controlnet_context(control_net, tokens.cond, checkpoint.name)
    positive, negative = _attach_both(positive, negative, control_net, kps_map, tokens, controlnet_strength,
                                      start_at, end_at)
    return model, positive, negative
