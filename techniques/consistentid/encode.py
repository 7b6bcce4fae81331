"""ConsistentID encode: reference face -> patched MODEL + positive / negative CONDITIONING.

Follows the official SD1.5 pipeline (see ``tokens.py`` for the prompt and its quirks):

1. ID tokens: FaceID-Plus projector (no shortcut) on the buffalo_l ArcFace vector and CLIP-H penultimate states
   of the whole reference (224 center crop); uncond = projector(zeros, CLIP(zero input)). They enter through the
   engine's decoupled injector (``out += w * Attn(q, to_k_ip(id), to_v_ip(id))``) on every step; the rank-128
   LoRA is merged as weight patches.
2. Facial regions: BiSeNet labels of the reference; per kept region the reference with everything outside the
   (hole-filled) region mask blacked out -> CLIP-H penultimate states -> FacialEncoder region vector.
3. Text: the marked prompt, tokenised by ComfyUI; "text only" = the plain encoding; "fused" = the same tensor
   with the feature-word rows replaced by ``fuse(token, region)``. Negative = the negative prompt's encoding
   fused at the same rows with zero-image region vectors.
4. Delayed primacy: positive = [text only for schedule 0..merge_at, fused for merge_at..1] (timestep ranges);
   the official ``i <= start_merge_step`` with 30 of 50 steps is ``merge_at = 31/50 = 0.62``.

Several reference images: ArcFace vectors and full-image CLIP states are averaged; regions come from the
first image that has a face (documented choice; the official code takes one image).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import InvalidInputError
from ..faceid.apply import apply_faceid_adapter, clip_hidden_states, encode_id_tokens
from ..faceid.checkpoint import FaceIDCheckpoint
from ..faceid.mixing import average_identities
from .tokens import (
    FACIAL_MARKER,
    FACIAL_REGION_LABELS,
    FIXED_FACIAL_CAPTION,
    facial_prompt,
    select_facial_regions,
    tokenize_facial_prompt,
)

logger = logging.getLogger("likeness")

REGION_LABEL = {name: label for label, name in FACIAL_REGION_LABELS.items()}
DEFAULT_MERGE_AT = 31 / 50


@dataclass
class ConsistentIDResult:
    model: object
    positive: list
    negative: list
    regions: list[str] = field(default_factory=list)     # regions fused, in pairing order
    prompt_text: str = ""                                 # the marked text that was encoded
    positions: list[int] = field(default_factory=list)   # fused rows of the conditioning


def filled_region_mask(labels: torch.Tensor, label: int) -> torch.Tensor:
    """``labels == label`` with holes filled (the official code fills each external contour)."""
    from scipy.ndimage import binary_fill_holes

    mask = (labels == label).cpu().numpy()
    return torch.from_numpy(binary_fill_holes(mask).astype(np.float32))


def region_images(image: torch.Tensor, labels: torch.Tensor, regions: list[str]) -> torch.Tensor:
    """IMAGE ``[R,H,W,3]``: the reference ``[1,H,W,3]`` blacked out outside each region of ``labels`` [H,W]."""
    if image.shape[1:3] != labels.shape[-2:]:
        raise InvalidInputError(f"the parse map is {list(labels.shape[-2:])} but the image is "
                                f"{list(image.shape[1:3])}.")
    masks = [filled_region_mask(labels, REGION_LABEL[r]) for r in regions]
    if not masks:
        return image.new_zeros(0, *image.shape[1:])
    return image[:1] * torch.stack(masks).unsqueeze(-1).to(image.dtype)


def _encode(clip, tokens: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = clip.encode_from_tokens(tokens, return_pooled=True)
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def _negative_tokens(clip, negative: str, min_rows: int, key: str = "l") -> dict:
    """The negative prompt's tokens, extended with empty chunks so that row ``min_rows - 1`` exists."""
    tokens = clip.tokenize(negative)
    chunk = len(tokens[key][0])
    missing = -(-min_rows // chunk) - len(tokens[key])
    if missing > 0:
        empty = clip.tokenize("")[key][0]
        tokens = dict(tokens, **{key: tokens[key] + [list(empty) for _ in range(missing)]})
    return tokens


def _with(entry_options: dict, **values) -> dict:
    options = dict(entry_options)
    options.update(values)
    return options


def encode_consistentid(model, clip, clip_vision, checkpoint: FaceIDCheckpoint, images: torch.Tensor,
                        arcfaces: torch.Tensor, labels: torch.Tensor | None, prompt: str, negative: str,
                        id_weight: float = 1.0, merge_at: float = DEFAULT_MERGE_AT, lora_strength: float = 1.0,
                        caption: str = FIXED_FACIAL_CAPTION, mask: torch.Tensor | None = None,
                        region_image_index: int = 0) -> ConsistentIDResult:
    """The full encode (see the module doc). ``images`` IMAGE [B,H,W,3]; ``arcfaces`` [B,512] normed (zeros for
    an image without a face); ``labels`` [H,W] BiSeNet labels of ``images[region_image_index]``, the image the
    regions are cut from (None: no regions, plain text); ``mask`` limits the ID branch in space."""
    if checkpoint.facial_encoder is None:
        raise InvalidInputError(f"{checkpoint.name} is not a ConsistentID model.")
    if not 0.0 <= merge_at <= 1.0:
        raise InvalidInputError(f"merge_at must be within 0..1, got {merge_at}.")
    if FACIAL_MARKER in prompt:
        raise InvalidInputError("the prompt must not contain <|facial|>; the facial caption adds the markers.")

    encoder = checkpoint.facial_encoder
    device, dtype = next(encoder.parameters()).device, next(encoder.parameters()).dtype
    with torch.no_grad():
        # ID tokens (averaged over the reference images)
        full_clip = clip_hidden_states(clip_vision, images)
        zero_clip = clip_hidden_states(clip_vision, None)
        has_face = arcfaces.norm(dim=-1) > 0
        keep = has_face if bool(has_face.any()) else torch.ones_like(has_face)   # no face anywhere: zeros (official)
        arcface, mean_clip = average_identities(arcfaces[keep], full_clip[keep.to(full_clip.device)])
        id_tokens = encode_id_tokens(checkpoint, arcface, mean_clip, zero_clip, shortcut=False)

        # facial regions and the marked prompt
        present = [] if labels is None else torch.unique(labels).tolist()
        regions = select_facial_regions(present)
        text, paired = facial_prompt(clip, prompt, regions, caption)
        prompt_tokens = tokenize_facial_prompt(clip, text)
        positions = prompt_tokens.flat_positions
        if len(positions) != len(paired):
            raise InvalidInputError(f"{len(positions)} <|facial|> markers but {len(paired)} facial regions.")

        plain, pooled = _encode(clip, prompt_tokens.tokens)
        negative_tokens = _negative_tokens(clip, negative, (max(positions) + 1) if positions else 0)
        negative_plain, negative_pooled = _encode(clip, negative_tokens)
        if paired:
            crops = region_images(images[region_image_index:region_image_index + 1], labels, paired)
            region_vectors = encoder.encode_regions(clip_hidden_states(clip_vision, crops).to(device, dtype))
            zero_vectors = encoder.encode_regions(zero_clip.to(device, dtype)).expand(len(paired), -1)
            fused = encoder.fuse(plain.to(device, dtype), region_vectors, positions).to(plain.dtype).cpu()
            negative_fused = encoder.fuse(negative_plain.to(device, dtype), zero_vectors, positions).to(
                negative_plain.dtype).cpu()
        else:
            fused, negative_fused = plain, negative_plain
            logger.info("Likeness ConsistentID: no facial regions found; the prompt is used without fusion.")

    patched = apply_faceid_adapter(model, checkpoint, id_tokens, weight=id_weight, lora_strength=lora_strength,
                                   mask=mask, name="consistentid")
    options = {} if pooled is None else {"pooled_output": pooled}
    positive = []
    if merge_at > 0.0:
        positive.append([plain, _with(options, start_percent=0.0, end_percent=merge_at)])
    if merge_at < 1.0:
        positive.append([fused, _with(options, start_percent=merge_at, end_percent=1.0)])
    negative_cond = [[negative_fused, {} if negative_pooled is None else {"pooled_output": negative_pooled}]]
    return ConsistentIDResult(patched, positive, negative_cond, paired, text, positions)
