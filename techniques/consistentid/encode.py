"""ConsistentID encode: reference face -> patched MODEL + positive / negative CONDITIONING, SD1.5 or SDXL.

Follows the official pipelines (see ``tokens.py`` for the prompt and its quirks):

1. ID tokens: FaceID-Plus projector on the buffalo_l ArcFace vector and CLIP-H penultimate states of the whole
   reference (224 center crop); uncond = projector(zeros, CLIP(zero input)). SD1.5 runs it without the PlusV2
   shortcut, SDXL with it (the checkpoint's ``shortcut``, see ``loader.py``). They enter through the engine's
   decoupled injector (``out += w * Attn(q, to_k_ip(id), to_v_ip(id))``) on every step; the rank-128 LoRA is merged
   as weight patches. The file's base must match the model's (:func:`.loader.check_base_matches`).
2. Facial regions: BiSeNet labels of the reference; per kept region the reference with everything outside the
   (hole-filled) region mask blacked out -> CLIP-H penultimate states -> FacialEncoder region vector.
3. Text: the marked prompt, tokenised by ComfyUI; "fused" = its encoding with the feature-word rows replaced by
   ``fuse(token, region)``. On SDXL the encoding is ComfyUI's ``cat(CLIP-L, CLIP-G)`` penultimate states (the
   official ``concat([text_embeds, text_embeds_2])``) with CLIP-G's pooled output, and the rows are the CLIP-L
   token positions. Negative = the negative prompt's encoding fused at the same rows with zero-image region vectors.
4. Delayed primacy: positive = [text only for schedule 0..merge_at, fused for merge_at..1] (timestep ranges);
   the official ``i <= start_merge_step`` with 30 of 50 steps is ``merge_at = 31/50 = 0.62``. "Text only" is the
   marked text without markers on SD1.5, and the user's prompt alone on SDXL (that pipeline encodes ``prompt``
   there); each entry carries its own pooled output.

Several reference images: ArcFace vectors and full-image CLIP states are averaged; regions come from the
first image that has a face (documented choice; the official code takes one image). The SDXL pipeline parses the
reference at 1280 px; the pack's face parser uses its own resolution for both bases (documented choice).
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
from .loader import SDXL, check_base_matches
from .tokens import (
    DETAIL,
    DETAIL_SDXL,
    FACIAL_MARKER,
    FACIAL_REGION_LABELS,
    FIXED_FACIAL_CAPTION,
    FIXED_FACIAL_CAPTION_SDXL,
    facial_prompt,
    select_facial_regions,
    tokenize_facial_prompt,
)

logger = logging.getLogger("likeness")

REGION_LABEL = {name: label for label, name in FACIAL_REGION_LABELS.items()}
DEFAULT_MERGE_AT = 31 / 50


@dataclass(frozen=True)
class PipelineStyle:
    """What the official SD1.5 and SDXL pipelines do differently around the same modules."""
    caption: str                  # the built-in facial caption
    detail: str                   # joins prompt and caption
    plain_is_user_prompt: bool    # the text-only conditioning encodes the user's prompt alone (SDXL)


SD15_STYLE = PipelineStyle(FIXED_FACIAL_CAPTION, DETAIL, plain_is_user_prompt=False)
SDXL_STYLE = PipelineStyle(FIXED_FACIAL_CAPTION_SDXL, DETAIL_SDXL, plain_is_user_prompt=True)


def pipeline_style(base: str) -> PipelineStyle:
    return SDXL_STYLE if base == SDXL else SD15_STYLE


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


def _negative_tokens(clip, negative: str, min_rows: int) -> dict:
    """The negative prompt's tokens, every text encoder's stream extended with empty chunks so that row
    ``min_rows - 1`` exists (SDXL's "g" and "l" streams stay the same length)."""
    tokens = dict(clip.tokenize(negative))
    empty = None
    for key, chunks in tokens.items():
        missing = -(-min_rows // len(chunks[0])) - len(chunks)
        if missing > 0:
            empty = clip.tokenize("") if empty is None else empty
            tokens[key] = chunks + [list(empty[key][0]) for _ in range(missing)]
    return tokens


def _with(entry_options: dict, **values) -> dict:
    options = dict(entry_options)
    options.update(values)
    return options


def _identity_tokens(checkpoint: FaceIDCheckpoint, clip_vision, images: torch.Tensor, arcfaces: torch.Tensor,
                     zero_clip: torch.Tensor):
    """Cond/uncond ID tokens of the reference images (ArcFace and CLIP states averaged over the faces found)."""
    full_clip = clip_hidden_states(clip_vision, images)
    has_face = arcfaces.norm(dim=-1) > 0
    keep = has_face if bool(has_face.any()) else torch.ones_like(has_face)   # no face anywhere: zeros (official)
    arcface, mean_clip = average_identities(arcfaces[keep], full_clip[keep.to(full_clip.device)])
    return encode_id_tokens(checkpoint, arcface, mean_clip, zero_clip, shortcut=checkpoint.shortcut)


def _check_width(encoded: torch.Tensor, width: int, base: str) -> None:
    if encoded.shape[-1] != width:
        raise InvalidInputError(f"the CLIP gives {encoded.shape[-1]}-d text but this ConsistentID ({base}) takes "
                                f"{width}-d text; connect the text encoder(s) of the model it is used with.")


@dataclass
class _Texts:
    """The encoded texts of one encode: text only, fused, negative (each with its pooled output or None)."""
    plain: tuple
    fused: tuple
    negative: tuple
    regions: list[str]
    text: str
    positions: list[int]


def _encode_texts(clip, clip_vision, encoder, style: PipelineStyle, width: int, base: str, prompt: str, negative: str,
                  caption: str, region_crop, labels: torch.Tensor | None, zero_clip: torch.Tensor) -> _Texts:
    """Marked prompt -> text-only, fused and negative conditioning tensors (see the module doc, steps 2-3)."""
    device, dtype = next(encoder.parameters()).device, next(encoder.parameters()).dtype
    present = [] if labels is None else torch.unique(labels).tolist()
    text, paired = facial_prompt(clip, prompt, select_facial_regions(present), caption, detail=style.detail)
    prompt_tokens = tokenize_facial_prompt(clip, text)
    positions = prompt_tokens.flat_positions
    if len(positions) != len(paired):
        raise InvalidInputError(f"{len(positions)} <|facial|> markers but {len(paired)} facial regions.")
    marked, pooled = _encode(clip, prompt_tokens.tokens)
    _check_width(marked, width, base)
    plain = _encode(clip, clip.tokenize(prompt)) if style.plain_is_user_prompt else (marked, pooled)
    negative_plain, negative_pooled = _encode(clip, _negative_tokens(clip, negative,
                                                                     (max(positions) + 1) if positions else 0))
    if not paired:
        logger.info("Likeness ConsistentID: no facial regions found; the prompt is used without fusion.")
        return _Texts(plain, (marked, pooled), (negative_plain, negative_pooled), [], text, positions)
    crops = region_images(region_crop, labels, paired)
    region_vectors = encoder.encode_regions(clip_hidden_states(clip_vision, crops).to(device, dtype))
    zero_vectors = encoder.encode_regions(zero_clip.to(device, dtype)).expand(len(paired), -1)
    fused = encoder.fuse(marked.to(device, dtype), region_vectors, positions).to(marked.dtype).cpu()
    negative_fused = encoder.fuse(negative_plain.to(device, dtype), zero_vectors, positions).to(
        negative_plain.dtype).cpu()
    return _Texts(plain, (fused, pooled), (negative_fused, negative_pooled), paired, text, positions)


def _entry(encoded: tuple, **options) -> list:
    tensor, pooled = encoded
    return [tensor, options if pooled is None else _with(options, pooled_output=pooled)]


def encode_consistentid(model, clip, clip_vision, checkpoint: FaceIDCheckpoint, images: torch.Tensor,
                        arcfaces: torch.Tensor, labels: torch.Tensor | None, prompt: str, negative: str,
                        id_weight: float = 1.0, merge_at: float = DEFAULT_MERGE_AT, lora_strength: float = 1.0,
                        caption: str | None = None, mask: torch.Tensor | None = None,
                        region_image_index: int = 0) -> ConsistentIDResult:
    """The full encode (see the module doc). ``images`` IMAGE [B,H,W,3]; ``arcfaces`` [B,512] normed (zeros for
    an image without a face); ``labels`` [H,W] BiSeNet labels of ``images[region_image_index]``, the image the
    regions are cut from (None: no regions, plain text); ``caption``: None = the official one of the model's base;
    ``mask`` limits the ID branch in space."""
    if checkpoint.facial_encoder is None:
        raise InvalidInputError(f"{checkpoint.name} is not a ConsistentID model.")
    if not 0.0 <= merge_at <= 1.0:
        raise InvalidInputError(f"merge_at must be within 0..1, got {merge_at}.")
    if FACIAL_MARKER in prompt:
        raise InvalidInputError("the prompt must not contain <|facial|>; the facial caption adds the markers.")
    base = check_base_matches(checkpoint, model)
    style = pipeline_style(base.base)
    with torch.no_grad():
        zero_clip = clip_hidden_states(clip_vision, None)
        id_tokens = _identity_tokens(checkpoint, clip_vision, images, arcfaces, zero_clip)
        crop = images[region_image_index:region_image_index + 1]
        texts = _encode_texts(clip, clip_vision, checkpoint.facial_encoder, style, base.context_dim, base.base,
                              prompt, negative, style.caption if caption is None else caption, crop, labels,
                              zero_clip)

    patched = apply_faceid_adapter(model, checkpoint, id_tokens, weight=id_weight, lora_strength=lora_strength,
                                   mask=mask, name="consistentid")
    positive = []
    if merge_at > 0.0:
        positive.append(_entry(texts.plain, start_percent=0.0, end_percent=merge_at))
    if merge_at < 1.0:
        positive.append(_entry(texts.fused, start_percent=merge_at, end_percent=1.0))
    return ConsistentIDResult(patched, positive, [_entry(texts.negative)], texts.regions, texts.text,
                              texts.positions)
