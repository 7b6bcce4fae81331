"""Train ConsistentID (FacialEncoder + ID projector, optionally the attention processors) on the frozen UNet.

Every training image is its own identity example, as in the official trainer (JackAILab/ConsistentID
``train.py``), with our pipeline's pieces so that what is trained is what the encode node uses:

Once, before training (frozen encoders, no gradients):

1. the image's centred square -> ``resolution`` (the target); the face analyzer (buffalo_l) gives the largest
   face and its ArcFace vector on the full-resolution square (zeros without a face, as official);
2. the face parser labels that face; the facial regions are selected like at inference (face, first eye, first
   ear, nose, upper lip), each cut out of the square (everything else black) -> CLIP-H penultimate states; the
   filled region masks (resized, see :data:`MASK_DOWNSCALE`) are the localization targets; the non-background
   labels (hole-filled) are the "without background" mask;
3. the caption becomes ``caption + "Detail:" + marked facial caption`` (the encode node's assembly; the official
   trainer used "Caption:" + caption + " Detail:" + caption, the same shape), tokenised by ComfyUI with the
   feature-word positions; the plain text embedding comes from the frozen CLIP; the target goes through the VAE.
4. SDXL (an SDXL model and its two text encoders): the encode node's SDXL caption and joiner, the
   ``cat(CLIP-L, CLIP-G)`` text, and the model's pooled/size vector ``y = model.encode_adm(pooled, sizes)`` per
   example with the official trainer's size conds (original size, centre-crop top-left after the shorter side is
   resized to ``resolution``, target size); a dropped condition uses the empty caption's pooled output.

Per micro-batch (all randomness from the loop's generator, so a resumed run is exact):

- sigma uniform over the schedule, noise, ``x_t`` (the host's model sampling);
- condition dropout (p = 0.1): the empty caption (hence no fused tokens) and the zero-image CLIP states for the
  ID projector; the ArcFace vector is kept (official behaviour);
- ID tokens = projector(ArcFace, CLIP states) (PlusV2 shortcut as the base's pipeline: SDXL only); they enter
  every cross-attention through
  the engine's decoupled injector (``+ Attn(q, to_k_ip(id), to_v_ip(id))``), computed with autograd;
- fused text = FacialEncoder(plain text, region features) at the feature-word rows;
- the LoRA: frozen weight patches (processors not trained) or, when the processors train, a differentiable
  ``W + up @ down`` through ModelPatcher weight wrappers (what ComfyUI's own LoRA trainer uses);
- loss = noise loss (the host's eps-MSE; with p = 0.5 per image only inside the "without background" mask,
  a masked mean) + lambda * facial attention-localization loss (``localization.py``, lambda = 0.01).

:class:`ConsistentIDTask` is the trainer contract (:mod:`...trainers.task`); the shared loop
(:mod:`...trainers.loop`) does AdamW, accumulation, progress/cancel, atomic checkpoints, the resume policy,
data-parallel ranks and the loss curve. The result is saved in the official key layout (``image_proj_model.*``,
``adapter_modules.*``, ``FacialEncoder.*``; the official safetensors names), which the ConsistentID loader reads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...attention_patches import DecoupledInjector, find_unet_sites, install
from ...errors import CheckpointLayoutError, InvalidInputError
from ...host.attention import forward_transformer_options
from ...host.folders import save_dir
from ...host.training import load_for_training
from ...trainers import losses
from ...trainers.autograd import autograd_enabled, detach_inputs
from ...trainers.checkpoint import atomic_save
from ...trainers.datasets import center_square, resize_center_crop
from ...trainers.loop import LrGroup, StepContext, TrainConfig, TrainResult, check_run_settings, train
from ...trainers.task import TrainingTask, run_field
from ..faceid.apply import clip_hidden_states
from ..faceid.checkpoint import FaceIDCheckpoint
from ..faceid.lora import apply_lora, check_adapter_fits, lora_factors, transformer_blocks
from ..faceid.processors import LORA_TARGETS, AdapterWeights
from ..faceid.projection import projector_tokens
from .encode import REGION_LABEL, PipelineStyle, filled_region_mask, pipeline_style, region_images
from .loader import SDXL, check_base_matches, consistentid_base, load_consistentid_state_dict, model_base
from .localization import AttentionMapRecorder, facial_localization_loss, localization_sites, token_selector
from .tokens import facial_prompt, select_facial_regions, tokenize_facial_prompt

logger = logging.getLogger("likeness")

IDENTITY_NAME = "consistentid_train"
MASK_DOWNSCALE = 4          # region masks are kept at resolution / 4 (then resized per layer, antialiased)
ENCODE_CHUNK = 8
FILE_GROUPS = {"projector": "image_proj_model", "processors": "adapter_modules", "facial_encoder": "FacialEncoder"}
PARAM_GROUPS = ("image_proj", "FacialEncoder", "adapter_modules")   # trainable-name prefixes (loop lr groups)


@dataclass
class ConsistentIDTrainSettings:
    """Everything that shapes a ConsistentID training run; ``asdict`` minus the run fields is its resume fingerprint."""

    steps: int = run_field(1000)
    lr: float = 1e-4                      # official: 1e-4 for every trainable module
    batch_size: int = 1
    grad_accumulation: int = 1
    seed: int = 0
    checkpoint_every: int = run_field(50)
    resolution: int = 512                 # official: 512 (resize + centre crop)
    localization_weight: float = 0.01     # lambda of the facial loss (paper and code)
    condition_dropout: float = 0.1        # empty text + zero CLIP image (official p = 0.1)
    background_mask_prob: float = 0.5     # noise loss inside the person only, per image (official p = 0.5)
    train_processors: bool = False        # also LoRA + to_k_ip/to_v_ip (official: yes; small sets: overfits)
    weight_decay: float = 0.01            # official AdamW weight decay
    max_grad_norm: float | None = 1.0

    def check(self) -> None:
        check_run_settings(self.steps, self.batch_size, self.grad_accumulation, self.lr, self.resolution)
        if self.localization_weight < 0:
            raise InvalidInputError("the localization weight must not be negative (0 turns the facial loss off)")
        for name in ("condition_dropout", "background_mask_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidInputError(f"{name.replace('_', ' ')} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class FreshArchitecture:
    """Sizes of a ConsistentID built from scratch (defaults: the released SD1.5 model)."""
    num_tokens: int = 4
    id_dim: int = 512
    projector_depth: int = 4
    resampler_dim: int = 1024
    resampler_depth: int = 8
    resampler_heads: int = 16
    dim_head: int = 64
    lora_rank: int = 128


# --------------------------------------------------------------------------- trainable weights (official layout)

def _normal_clone(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (not inference-mode) float32 copy that owns its memory."""
    with torch.inference_mode(False), torch.no_grad():
        return tensor.detach().to(torch.float32).clone()


def adapter_group(adapter: AdapterWeights) -> dict[str, torch.Tensor]:
    """The ``adapter_modules`` group (``"{i}.to_q_lora.down.weight"``, ``"{i}.to_k_ip.weight"``, ...)."""
    group = {}
    for proc in adapter.processors:
        for target, (down, up) in proc.lora.items():
            group[f"{proc.index}.{target}_lora.down.weight"] = down
            group[f"{proc.index}.{target}_lora.up.weight"] = up
        for name in ("to_k_ip", "to_v_ip"):
            tensor = getattr(proc, name)
            if tensor is not None:
                group[f"{proc.index}.{name}.weight"] = tensor
    return group


class ConsistentIDWeights:
    """A trainable copy of ConsistentID's three weight groups.

    ``checkpoint`` is a :class:`FaceIDCheckpoint` built by the ConsistentID loader from cloned tensors, so the
    modules (``checkpoint.projector``, ``checkpoint.facial_encoder``) and the processor tensors
    (``checkpoint.adapter``) are exactly what inference uses; :meth:`trainable` names them by their official keys.
    """

    def __init__(self, checkpoint: FaceIDCheckpoint, metadata: dict[str, str] | None = None):
        if checkpoint.facial_encoder is None:
            raise InvalidInputError(f"{checkpoint.name} is not a ConsistentID model (no FacialEncoder).")
        self.checkpoint = checkpoint
        self.adapter_tensors = adapter_group(checkpoint.adapter)
        self.metadata = dict(metadata or {})

    @classmethod
    def from_groups(cls, groups: dict[str, dict[str, torch.Tensor]], source: str,
                    metadata: dict[str, str] | None = None) -> "ConsistentIDWeights":
        cloned = {g: {k: _normal_clone(t) for k, t in sd.items()} for g, sd in groups.items()}
        with torch.inference_mode(False):
            return cls(load_consistentid_state_dict(cloned, source=source), metadata)

    @classmethod
    def from_checkpoint(cls, checkpoint: FaceIDCheckpoint) -> "ConsistentIDWeights":
        """A copy of a loaded ConsistentID (the original stays untouched)."""
        if checkpoint.facial_encoder is None:
            raise InvalidInputError(f"{checkpoint.name} is not a ConsistentID model; connect a ConsistentID "
                                    "Loader (or nothing, to start from scratch).")
        groups = {"image_proj": checkpoint.projector.state_dict(), "adapter_modules": adapter_group(checkpoint.adapter),
                  "FacialEncoder": checkpoint.facial_encoder.state_dict()}
        return cls.from_groups(groups, f"copy of {checkpoint.source}", {"started_from": str(checkpoint.source)})

    @classmethod
    def fresh(cls, model_patcher, clip_dim: int, architecture: FreshArchitecture = FreshArchitecture(),
              seed: int = 0) -> "ConsistentIDWeights":
        """A new ConsistentID for ``model_patcher``'s UNet (official initialisation, seeded):

        projector and FacialEncoder with torch's default init; LoRA ``down ~ N(0, 1/rank)``, ``up = 0`` (so the
        model starts unchanged); ``to_k_ip`` / ``to_v_ip`` copied from each cross-attention's ``to_k`` / ``to_v``.
        """
        from ..faceid.projection import ProjPlusModel
        from .facial_encoder import FacialEncoder

        blocks = transformer_blocks(model_patcher)
        sites = find_unet_sites(model_patcher)
        context_dims = {s.context_dim for s in sites}
        if len(context_dims) != 1:
            raise InvalidInputError(f"the model's cross-attentions take contexts of widths {sorted(context_dims)}; "
                                    "ConsistentID needs one text width (SD1.5 or SDXL).")
        context = context_dims.pop()
        a = architecture
        model_sd = model_patcher.model.state_dict()
        generator = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng(devices=[]), autograd_enabled():
            torch.manual_seed(int(seed))
            projector = ProjPlusModel(context, a.id_dim, clip_dim, a.num_tokens, depth=a.projector_depth,
                                      heads=max(1, context // a.dim_head), dim_head=min(a.dim_head, context))
            encoder = FacialEncoder(embedding_dim=clip_dim, output_dim=context, resampler_dim=a.resampler_dim,
                                    depth=a.resampler_depth, heads=a.resampler_heads, dim_head=a.dim_head)
            processors: dict[str, torch.Tensor] = {}
            for ref in blocks:
                for attn, index in (("attn1", ref.attn1_processor), ("attn2", ref.attn2_processor)):
                    for target in LORA_TARGETS:
                        in_dim = context if attn == "attn2" and target in ("to_k", "to_v") else ref.channels
                        processors[f"{index}.{target}_lora.down.weight"] = torch.randn(
                            a.lora_rank, in_dim, generator=generator) / a.lora_rank
                        processors[f"{index}.{target}_lora.up.weight"] = torch.zeros(ref.channels, a.lora_rank)
                for name, source in (("to_k_ip", "to_k"), ("to_v_ip", "to_v")):
                    key = f"{ref.prefix}.attn2.{source}.weight"
                    if key not in model_sd:
                        raise CheckpointLayoutError(f"the model has no '{key}' to initialise {name} from.")
                    processors[f"{ref.attn2_processor}.{name}.weight"] = model_sd[key]
            groups = {"image_proj": projector.state_dict(), "adapter_modules": processors,
                      "FacialEncoder": encoder.state_dict()}
        return cls.from_groups(groups, "new ConsistentID", {"started_from": "scratch"})

    # ------------------------------------------------------------------ views
    @property
    def projector(self) -> torch.nn.Module:
        return self.checkpoint.projector

    @property
    def facial_encoder(self) -> torch.nn.Module:
        return self.checkpoint.facial_encoder

    @property
    def adapter(self) -> AdapterWeights:
        return self.checkpoint.adapter

    def trainable(self, train_processors: bool) -> dict[str, torch.Tensor]:
        """``{official name: tensor}`` of what trains (the processors only when asked)."""
        params = {f"image_proj.{k}": p for k, p in self.projector.named_parameters()}
        params.update({f"FacialEncoder.{k}": p for k, p in self.facial_encoder.named_parameters()})
        if train_processors:
            params.update({f"adapter_modules.{k}": t for k, t in self.adapter_tensors.items()})
        return params

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """Flat official safetensors layout: ``image_proj_model.*``, ``adapter_modules.*``, ``FacialEncoder.*``."""
        out = {f"{FILE_GROUPS['projector']}.{k}": t for k, t in self.projector.state_dict().items()}
        out.update({f"{FILE_GROUPS['processors']}.{k}": t for k, t in self.adapter_tensors.items()})
        out.update({f"{FILE_GROUPS['facial_encoder']}.{k}": t for k, t in self.facial_encoder.state_dict().items()})
        return {k: t.detach() for k, t in out.items()}

    def to(self, device) -> "ConsistentIDWeights":
        """Move every tensor in place (same objects; module parameters and processor tensors)."""
        with torch.inference_mode(False), torch.no_grad():
            self.projector.to(device)
            self.facial_encoder.to(device)
            for tensor in self.adapter_tensors.values():
                if tensor.device != torch.device(device):
                    tensor.data = tensor.data.to(device)
        return self

    def check_model(self, model_patcher) -> None:
        """The weights' base (SD1.5 / SDXL) is the model's; the processors fit its blocks and its text width."""
        check_base_matches(self.checkpoint, model_patcher)
        check_adapter_fits(self.adapter, transformer_blocks(model_patcher))
        widths = {s.context_dim for s in find_unet_sites(model_patcher)}
        if widths != {self.adapter.context_dim}:
            raise CheckpointLayoutError(f"this ConsistentID takes {self.adapter.context_dim}-d text but the model's "
                                        f"cross-attentions take {sorted(widths)}-d; use the matching base model.")


# --------------------------------------------------------------------------- examples (duck-typed host objects)

@dataclass
class ConsistentIDTrainingData:
    """Everything the loss needs per example, on the CPU (computed once)."""

    latents: torch.Tensor                 # [N, 4, h, w] model space
    contexts: list[torch.Tensor]          # [L_i, C] plain text embedding of the marked prompt (markers removed)
    positions: list[list[int]]            # feature-word rows of each context, in pairing order
    region_states: list[torch.Tensor]     # [R_i, T, D] CLIP penultimate states of the region crops
    region_masks: list[torch.Tensor]      # [R_i, m, m] region masks (localization targets)
    image_states: torch.Tensor            # [N, T, D] CLIP states of the whole image (ID projector input)
    arcfaces: torch.Tensor                # [N, id_dim] normed ArcFace vectors (zeros: no face)
    foreground: torch.Tensor              # [N, 1, h, w] "without background" mask (1 everywhere: no parse)
    empty_context: torch.Tensor           # [L0, C] the empty caption (condition dropout)
    zero_image_states: torch.Tensor       # [1, T, D] CLIP states of the zero image (condition dropout)
    adm: torch.Tensor | None = None       # [N, A] SDXL: the model's pooled/size vector y per example
    empty_adm: torch.Tensor | None = None  # [N, A] SDXL: y with the empty caption's pooled output (dropout)
    names: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    regions: list[list[str]] = field(default_factory=list)
    fingerprint: str = ""

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def get_batch(self, indices: list[int]) -> dict:
        index = torch.tensor(indices, dtype=torch.long)
        return {"latent": self.latents.index_select(0, index), "image_states": self.image_states.index_select(0, index),
                "arcface": self.arcfaces.index_select(0, index), "foreground": self.foreground.index_select(0, index),
                "context": [self.contexts[i] for i in indices], "positions": [list(self.positions[i]) for i in indices],
                "region_states": [self.region_states[i] for i in indices],
                "region_masks": [self.region_masks[i] for i in indices],
                **({} if self.adm is None else {"adm": self.adm.index_select(0, index),
                                                "empty_adm": self.empty_adm.index_select(0, index)})}


def identity_vector(analysis, id_dim: int) -> torch.Tensor:
    """The first face's normed ArcFace vector (zeros without a face); checks the width."""
    faces = analysis.first_face_per_image()
    face = faces[0] if faces else None
    if face is None:
        return torch.zeros(id_dim)
    if face.embedding is None:
        raise InvalidInputError("the face analyzer gives no identity embedding; ConsistentID needs the InsightFace "
                                "analyzer with the buffalo_l pack (a recognition model).")
    vector = torch.as_tensor(face.normed_embedding, dtype=torch.float32).reshape(-1)
    if vector.numel() != id_dim:
        raise InvalidInputError(f"ConsistentID needs {id_dim}-d ArcFace vectors (insightface buffalo_l); the analyzer "
                                f"{analysis.model_id} gives {vector.numel()}-d ones.")
    return vector


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[H, W] or [R, H, W] -> [.., h, w], antialiased bilinear."""
    squeeze = mask.ndim == 2
    x = mask.float().reshape(-1, 1, *mask.shape[-2:])
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = x[:, 0].clamp(0.0, 1.0)
    return x[0] if squeeze else x


def _encode_text(clip, tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(context [1, L, C], pooled [1, P] or None)`` on the CPU in fp32."""
    out = clip.encode_from_tokens(tokens, return_pooled=True)
    context, pooled = out if isinstance(out, tuple) else (out, None)
    return context.float().cpu(), None if pooled is None else pooled.float().cpu()


def sdxl_size_conds(height: int, width: int, resolution: int) -> dict[str, int]:
    """SDXL's size conds of a training image as the official trainer makes them (``encode_adm`` keywords): its
    original size, the top-left of the centre crop after the shorter side is resized to ``resolution`` (the
    rounding of :func:`resize_center_crop`), and the square target."""
    scale = resolution / min(height, width)
    resized_h, resized_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
    return {"height": int(height), "width": int(width), "crop_h": (resized_h - resolution) // 2,
            "crop_w": (resized_w - resolution) // 2, "target_height": resolution, "target_width": resolution}


@dataclass
class _Example:
    name: str
    target: torch.Tensor
    text: str
    context: torch.Tensor
    positions: list[int]
    regions: list[str]
    region_states: torch.Tensor
    region_masks: torch.Tensor
    image_states: torch.Tensor
    arcface: torch.Tensor
    foreground: torch.Tensor
    pooled: torch.Tensor | None
    size_conds: dict


def _example(name: str, image: torch.Tensor, caption: str, settings: ConsistentIDTrainSettings, clip, clip_vision,
             analyzer, parser, id_dim: int, style: PipelineStyle) -> _Example:
    from ...face_analysis.analyze import analyze
    from ...face_analysis.parsing import parse_faces

    square = center_square(image[..., :3].float()).clamp(0.0, 1.0)
    size = settings.resolution
    mask_size = (size // MASK_DOWNSCALE, size // MASK_DOWNSCALE)
    latent_size = (size // 8, size // 8)
    result = analyze(analyzer, square.unsqueeze(0), selection="largest", on_no_face="pass_through", embed=True)
    arcface = identity_vector(result.faces, id_dim)
    labels = None
    if result.faces.faces[0]:
        labels = parse_faces(parser, square.unsqueeze(0), result.faces).labels[0]
    regions = select_facial_regions(torch.unique(labels).tolist()) if labels is not None else []
    text, paired = facial_prompt(clip, caption, regions, style.caption, detail=style.detail)
    prompt_tokens = tokenize_facial_prompt(clip, text)
    positions = prompt_tokens.flat_positions
    if len(positions) != len(paired):
        raise InvalidInputError(f"'{name}': {len(positions)} <|facial|> markers but {len(paired)} facial regions.")
    context, pooled = _encode_text(clip, prompt_tokens.tokens)
    image_states = clip_hidden_states(clip_vision, square.unsqueeze(0)).cpu()[0]
    if paired:
        crops = region_images(square.unsqueeze(0), labels, paired)
        region_states = clip_hidden_states(clip_vision, crops).cpu()
        masks = torch.stack([filled_region_mask(labels, REGION_LABEL[r]) for r in paired])
        region_masks = _resize_mask(masks, mask_size)
    else:
        region_states = image_states.new_zeros(0, *image_states.shape)
        region_masks = torch.zeros(0, *mask_size)
    foreground = torch.ones(latent_size)
    if labels is not None and bool((labels > 0).any()):
        from scipy.ndimage import binary_fill_holes

        person = torch.from_numpy(binary_fill_holes((labels > 0).cpu().numpy()).astype("float32"))
        foreground = _resize_mask(person, latent_size)
    return _Example(name, resize_center_crop(square, size), text, context[0], positions, list(paired), region_states,
                    region_masks, image_states, arcface, foreground, pooled,
                    sdxl_size_conds(image.shape[0], image.shape[1], size))


def _vae_encode(vae, images: torch.Tensor) -> torch.Tensor:
    chunks = [vae.encode(images[i:i + ENCODE_CHUNK]).float().cpu() for i in range(0, images.shape[0], ENCODE_CHUNK)]
    return torch.cat(chunks)


def prepare_training_data(model_patcher, vae, clip, clip_vision, analyzer, parser,
                          sources: Iterable[tuple[str, torch.Tensor, str]], settings: ConsistentIDTrainSettings,
                          id_dim: int = 512) -> ConsistentIDTrainingData:
    """Analyse, parse and encode every ``(name, image [H, W, C], caption)`` once (see the module doc)."""
    settings.check()
    model_id = str(getattr(analyzer, "model_id", ""))
    if "buffalo_l" not in model_id and "w600k" not in model_id:
        logger.warning("ConsistentID training: the model expects insightface buffalo_l (w600k_r50) identity vectors; "
                       "the analyzer gives %s.", model_id or "unknown ones")
    base = model_base(model_patcher)
    with torch.no_grad():
        examples = [_example(n, img, cap, settings, clip, clip_vision, analyzer, parser, id_dim,
                             pipeline_style(base.base)) for n, img, cap in sources]
        if not examples:
            raise InvalidInputError("no training images")
        widths = {int(e.context.shape[-1]) for e in examples}
        if widths != {base.context_dim}:
            raise InvalidInputError(f"the CLIP gives {sorted(widths)}-d text but the {base.base} model takes "
                                    f"{base.context_dim}-d text; connect the model's own text encoder(s).")
        latents = model_patcher.model.process_latent_in(_vae_encode(vae, torch.stack([e.target for e in examples])))
        empty, empty_pooled = _encode_text(clip, clip.tokenize(""))
        empty = empty[0]
        zero_states = clip_hidden_states(clip_vision, None).cpu()
        adm, empty_adm = _pooled_size_vectors(model_patcher, examples, empty_pooled)
    faceless = [e.name for e in examples if not bool(e.arcface.any())]
    if faceless:
        logger.warning("ConsistentID training: no face in %d of %d image(s) (%s); they train with a zero identity "
                       "and no facial regions", len(faceless), len(examples), ", ".join(faceless[:8]))
    digest = hashlib.sha1()
    for e in examples:
        digest.update(f"{e.name}\0{e.text}\0{e.regions}\0".encode())
    digest.update(str((tuple(latents.shape), tuple(zero_states.shape))).encode())
    if adm is not None:   # SDXL runs also depend on the size conds (SD1.5 fingerprints stay as they were)
        digest.update(repr([e.size_conds for e in examples]).encode())
    return ConsistentIDTrainingData(
        latents=latents.float(), contexts=[e.context for e in examples], positions=[e.positions for e in examples],
        region_states=[e.region_states for e in examples], region_masks=[e.region_masks for e in examples],
        image_states=torch.stack([e.image_states for e in examples]),
        arcfaces=torch.stack([e.arcface for e in examples]),
        foreground=torch.stack([e.foreground for e in examples]).unsqueeze(1), empty_context=empty,
        zero_image_states=zero_states, names=[e.name for e in examples], texts=[e.text for e in examples],
        regions=[e.regions for e in examples], adm=adm, empty_adm=empty_adm, fingerprint=digest.hexdigest()[:16])


def _pooled_size_vectors(model_patcher, examples: list[_Example], empty_pooled: torch.Tensor | None
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SDXL: ``y`` of every example with its caption's and with the empty caption's pooled output ``[N, A]`` each
    (what ComfyUI's ``encode_adm`` makes of CONDITIONING); ``(None, None)`` for a text-only model."""
    model = model_patcher.model
    if not getattr(model, "adm_channels", 0):
        return None, None
    if empty_pooled is None or any(e.pooled is None for e in examples):
        raise InvalidInputError("this SDXL model needs the pooled output of its text encoders; connect its SDXL CLIP.")
    cpu = torch.device("cpu")
    adm = [model.encode_adm(pooled_output=e.pooled, device=cpu, **e.size_conds) for e in examples]
    empty = [model.encode_adm(pooled_output=empty_pooled, device=cpu, **e.size_conds) for e in examples]
    return torch.cat(adm).float(), torch.cat(empty).float()


# --------------------------------------------------------------------------- the ID branch and the LoRA with autograd

class TrainingIdentityKV:
    """Decoupled-injector provider for training: ``(tokens @ to_k_ip.T, tokens @ to_v_ip.T)`` of this step's
    per-row ID tokens ``[B, N, C]``, recomputed at every call with autograd (nothing cached or detached)."""

    def __init__(self, adapter: AdapterWeights):
        self.weights = {p.site_order: (p.to_k_ip, p.to_v_ip) for p in adapter.ip_processors()}
        self.tokens: torch.Tensor | None = None

    def __call__(self, site, kind: int):
        if kind != 0 or self.tokens is None:
            return None
        to_k, to_v = self.weights[site.order]
        tokens = self.tokens
        return tokens @ to_k.to(tokens.dtype).T, tokens @ to_v.to(tokens.dtype).T   # weights moved by open_session

    def __deepcopy__(self, memo):
        return self


class LoRAWeightDelta:
    """ModelPatcher weight wrapper ``W -> W + up @ down`` (differentiable in ``up`` and ``down``)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        self.up, self.down = up, down

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).to(weight.device, weight.dtype)

    def __deepcopy__(self, memo):
        return self


def remove_lora_wrappers(model_patcher) -> int:
    """Take our :class:`LoRAWeightDelta` s off the UNet's modules (ComfyUI leaves weight functions in place
    until the next full load); returns how many were removed."""
    removed = 0
    for module in model_patcher.model.modules():
        functions = getattr(module, "weight_function", None)
        if functions:
            kept = [f for f in functions if not isinstance(f, LoRAWeightDelta)]
            removed += len(functions) - len(kept)
            if len(kept) != len(functions):
                module.weight_function = kept
    return removed


def check_model(model_patcher) -> None:
    base = model_patcher.model
    if getattr(base, "adm_channels", 0) and model_base(model_patcher).base != SDXL:
        raise InvalidInputError("ConsistentID training supports SD1.5- and SDXL-family models; this model needs "
                                "another extra conditioning.")
    if getattr(base, "concat_keys", ()):
        raise InvalidInputError("ConsistentID training needs a normal (not an inpainting) model")


@dataclass
class TrainingSession:
    """A private, loaded clone with the ID injector, the map recorder and (optionally) trainable LoRA."""
    clone: object
    device: torch.device
    identity: TrainingIdentityKV
    recorder: AttentionMapRecorder

    def close(self) -> None:
        patch = install(self.clone)
        patch.remove(IDENTITY_NAME)
        patch.remove(self.recorder.name)
        remove_lora_wrappers(self.clone)


def open_session(model_patcher, weights: ConsistentIDWeights, train_processors: bool) -> TrainingSession:
    """Clone the model, attach the LoRA (weight patches, or weight wrappers when it trains), the decoupled ID
    injector and the attention-map recorder, load it for training."""
    check_model(model_patcher)
    weights.check_model(model_patcher)
    if train_processors:
        clone = model_patcher.clone()
        for key, (up, down) in lora_factors(weights.adapter, transformer_blocks(clone)).items():
            clone.add_weight_wrapper(key, LoRAWeightDelta(up, down))
    else:
        clone = apply_lora(model_patcher, weights.adapter, 1.0)
    identity = TrainingIdentityKV(weights.adapter)
    patch = install(clone)
    inherited = [i.name for i in patch.injectors]
    if inherited:
        # e.g. a model that already went through ConsistentID Encode: its frozen ID branch would train along
        for name in inherited:
            patch.remove(name)
        logger.warning("ConsistentID training: the input model carries identity-attention patches (%s); they are "
                       "left out while training (connect the plain checkpoint model).", ", ".join(inherited))
    patch.add(DecoupledInjector(IDENTITY_NAME, identity))
    sdxl = consistentid_base(weights.checkpoint).base == SDXL
    recorder = AttentionMapRecorder(localization_sites(patch.sites, sdxl))
    patch.add(recorder)
    device = load_for_training(clone)
    weights.to(device)
    return TrainingSession(clone, device, identity, recorder)


def _batch_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``[L_i, C]`` contexts, each repeated to the least common length (ComfyUI's batching rule)."""
    total = math.lcm(*(c.shape[0] for c in contexts))
    return torch.stack([c.repeat(total // c.shape[0], 1) for c in contexts])


@dataclass
class _TextConditioning:
    """A micro-batch's text: the batched context and, per row, the fused feature-word positions."""
    context: torch.Tensor              # [B, L, C]
    lengths: list[int]                 # each row's own context length
    positions: list[list[int]]         # feature-word rows of each context ([] = none / dropped)
    masks: list[tuple[int, torch.Tensor]]   # (row, its region masks) of the rows with fused regions
    rows: list[int]                    # the rows whose text was fused


# --------------------------------------------------------------------------- training

@dataclass
class ConsistentIDTrainOutput:
    weights: ConsistentIDWeights
    result: TrainResult
    info: dict = field(default_factory=dict)


class ConsistentIDTask(TrainingTask):
    """ConsistentID (a copy of ``weights``) trained on prepared data; the input model and weights stay untouched.

    :meth:`session` opens a :class:`TrainingSession` (a private loaded clone with the ID injector, the map
    recorder and the LoRA); the loss is the module doc's step, every random draw per row. ``stats`` collects
    ``(noise loss, facial loss)`` of every micro-batch.
    """

    technique = "consistentid"
    label = "ConsistentID training"

    def __init__(self, model_patcher, data: ConsistentIDTrainingData, settings: ConsistentIDTrainSettings,
                 weights: ConsistentIDWeights):
        settings.check()
        self.model_patcher = model_patcher
        self.data = data
        self.settings = settings
        self.weights = ConsistentIDWeights.from_groups(
            {"image_proj": weights.projector.state_dict(), "adapter_modules": weights.adapter_tensors,
             "FacialEncoder": weights.facial_encoder.state_dict()}, weights.checkpoint.source, weights.metadata)
        self.stats: list[tuple[float, float]] = []
        self.state: TrainingSession | None = None

    @contextlib.contextmanager
    def session(self):
        self.state = open_session(self.model_patcher, self.weights, self.settings.train_processors)
        clone = self.state.clone
        self.model_sampling = clone.get_model_object("model_sampling")
        self.options = forward_transformer_options(clone)
        self.dtype = clone.model.get_dtype() if hasattr(clone.model, "get_dtype") else torch.float32
        self.empty = detach_inputs(self.data.empty_context)
        self.zero_states = detach_inputs(self.data.zero_image_states)[0]
        try:
            yield self
        finally:
            self.state.close()
            self.weights.to("cpu")

    def trainables(self) -> dict[str, torch.Tensor]:
        return self.weights.trainable(self.settings.train_processors)

    def lr_groups(self) -> list[LrGroup]:
        s = self.settings
        return [LrGroup(lr=s.lr, prefix=p, weight_decay=s.weight_decay, name=p) for p in PARAM_GROUPS]

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.state.clone.model]

    def data_fingerprint(self) -> str:
        return self.data.fingerprint

    def metadata(self) -> dict[str, str]:
        return {"technique": self.technique, "started_from": self.weights.metadata.get("started_from", "")}

    def loss(self, batch: dict, ctx: StepContext) -> torch.Tensor:
        s, device, state = self.settings, self.state.device, self.state
        clean = batch["latent"].to(device)
        count = clean.shape[0]
        sigma = ctx.per_row(count, lambda n: losses.sample_sigmas(self.model_sampling, n, ctx.generator)).to(device)
        noise = ctx.randn(clean.shape, device=device)
        dropped = (ctx.rand((count,)) < s.condition_dropout).tolist()
        masked = (ctx.rand((count,)) < s.background_mask_prob).tolist()
        states = torch.stack([self.zero_states if d else x
                              for d, x in zip(dropped, batch["image_states"], strict=True)])
        tokens = projector_tokens(self.weights.projector, batch["arcface"].to(device), states.to(device),
                                  shortcut=self.weights.checkpoint.shortcut)
        text = self._text(batch, dropped)
        selector = valid = region_masks = None
        if s.localization_weight > 0 and text.masks:
            selector, valid = token_selector(text.positions, text.lengths, text.context.shape[1])
            region_masks = torch.zeros(count, valid.shape[1], *batch["region_masks"][text.rows[0]].shape[-2:])
            for i, m in text.masks:
                region_masks[i, :m.shape[0]] = m
        state.identity.tokens = tokens
        state.recorder.begin(None if selector is None else selector.to(device))   # once per step, not per site
        try:
            x_t = losses.noised(self.model_sampling, sigma, noise, clean)
            denoised = state.clone.model.apply_model(x_t.to(self.dtype), sigma,
                                                     c_crossattn=text.context.to(device, self.dtype),
                                                     transformer_options=self.options,
                                                     **self._extra_conds(batch, dropped)).float()
        finally:
            records = state.recorder.end()
            state.identity.tokens = None
        noise_loss = losses.noise_prediction_loss(self.model_sampling, sigma, x_t, denoised, clean,
                                                  self._background_weight(batch, masked))
        facial = noise_loss.new_zeros(())
        if selector is not None and records:
            facial = facial_localization_loss(records, region_masks.to(device), valid)
        self.stats.append((float(noise_loss.detach()), float(facial.detach())))
        return noise_loss + s.localization_weight * facial

    def _text(self, batch: dict, dropped: list[bool]) -> _TextConditioning:
        """The plain caption embeddings with the FacialEncoder's region vectors fused in at the feature words
        (one encoder call for every region of the batch); the empty caption for dropped rows."""
        device, encoder = self.state.device, self.weights.facial_encoder
        count = len(dropped)
        rows = [i for i in range(count) if not dropped[i] and batch["positions"][i]]
        region_vectors = []
        if rows:
            stacked = torch.cat([batch["region_states"][i] for i in rows]).to(device)
            region_vectors = list(encoder.encode_regions(stacked).split([len(batch["positions"][i]) for i in rows]))
        contexts, positions, masks = [], [], []
        for i in range(count):
            if dropped[i]:
                contexts.append(self.empty.to(device))
                positions.append([])
                continue
            plain = batch["context"][i].to(device)
            if i in rows:
                plain = encoder.fuse(plain.unsqueeze(0), region_vectors.pop(0), batch["positions"][i])[0]
                positions.append(batch["positions"][i])
                masks.append((i, batch["region_masks"][i]))
            else:
                positions.append([])
            contexts.append(plain)
        return _TextConditioning(_batch_contexts(contexts), [c.shape[0] for c in contexts], positions, masks, rows)

    def _extra_conds(self, batch: dict, dropped: list[bool]) -> dict:
        """SDXL: ``y`` per row (the empty caption's for dropped rows); nothing for a text-only model."""
        if "adm" not in batch:
            return {}
        rows = [batch["empty_adm"][i] if drop else batch["adm"][i] for i, drop in enumerate(dropped)]
        return {"y": torch.stack(rows).to(self.state.device, self.dtype)}

    def _background_weight(self, batch: dict, masked: list[bool]) -> torch.Tensor | None:
        """Per row: the "without background" mask (noise loss inside the person only) or all ones."""
        if not any(masked):
            return None
        ones = torch.ones_like(batch["foreground"][0])
        weights = [f if m else ones for m, f in zip(masked, batch["foreground"], strict=True)]
        return torch.stack(weights).to(self.state.device)

    def finish(self, result: TrainResult) -> ConsistentIDWeights:
        s, weights = self.settings, self.weights
        recent = self.stats[-8:]
        weights.metadata.update({
            "format": "consistentid", "trained_steps": str(result.step), "lr": str(s.lr),
            "batch_size": str(s.batch_size), "grad_accumulation": str(s.grad_accumulation),
            "seed": str(s.seed), "images": str(len(self.data)), "resolution": str(s.resolution),
            "localization_weight": str(s.localization_weight),
            "train_processors": str(s.train_processors).lower(),
            "final_loss": f"{result.losses[-1]:.6g}" if result.losses else "",
            "final_noise_loss": f"{sum(n for n, _ in recent) / len(recent):.6g}" if recent else "",
            "final_facial_loss": f"{sum(f for _, f in recent) / len(recent):.6g}" if recent else "",
        })
        return weights

    def write_result(self, artefact: ConsistentIDWeights, path: str) -> list[str]:
        return [save_trained(artefact, path)]


def train_on_data(model_patcher, data: ConsistentIDTrainingData, settings: ConsistentIDTrainSettings,
                  weights: ConsistentIDWeights, checkpoint_path: str | None = None, resume: str = "fresh",
                  **loop_options) -> tuple[ConsistentIDWeights, TrainResult]:
    """Train a copy of ``weights`` on prepared data; the input model and weights stay untouched.

    ``resume`` is the loop's policy (``auto`` / ``fresh`` / ``require``); ``loop_options`` go to
    :class:`TrainConfig` (``result_path``, ``progress_factory``, ``interrupt_check``, ``step_callback`` ...).
    """
    task = ConsistentIDTask(model_patcher, data, settings, weights)
    result = train(task, TrainConfig.from_settings(settings, checkpoint_path=checkpoint_path, resume=resume,
                                                   **loop_options))
    return result.artefact, result


def train_consistentid(model_patcher, vae, clip, clip_vision, analyzer, parser,
                       sources: Iterable[tuple[str, torch.Tensor, str]], settings: ConsistentIDTrainSettings,
                       start: FaceIDCheckpoint | None = None, architecture: FreshArchitecture = FreshArchitecture(),
                       checkpoint_path: str | None = None, resume: str = "fresh",
                       **loop_options) -> ConsistentIDTrainOutput:
    """Prepare the data, then train a copy of ``start`` (a loaded ConsistentID) or a new model."""
    settings.check()
    check_model(model_patcher)
    weights = initial_weights(model_patcher, clip_vision, settings, start, architecture)
    id_dim = weights.projector.proj[0].in_features
    data = prepare_training_data(model_patcher, vae, clip, clip_vision, analyzer, parser, sources, settings, id_dim)
    trained, result = train_on_data(model_patcher, data, settings, weights, checkpoint_path, resume, **loop_options)
    info = {"images": len(data), "names": data.names, "regions": data.regions, "texts": data.texts}
    return ConsistentIDTrainOutput(trained, result, info)


def initial_weights(model_patcher, clip_vision, settings: ConsistentIDTrainSettings,
                    start: FaceIDCheckpoint | None = None,
                    architecture: FreshArchitecture = FreshArchitecture()) -> ConsistentIDWeights:
    """What training starts from: a copy of ``start`` (a loaded ConsistentID) or a new, seeded model."""
    if start is not None:
        weights = ConsistentIDWeights.from_checkpoint(start)
    else:
        clip_dim = int(clip_hidden_states(clip_vision, None).shape[-1])
        weights = ConsistentIDWeights.fresh(model_patcher, clip_dim, architecture, settings.seed)
    weights.check_model(model_patcher)
    return weights


def evaluate_loss(model_patcher, weights: ConsistentIDWeights, data: ConsistentIDTrainingData,
                  settings: ConsistentIDTrainSettings, seed: int = 1234, rounds: int = 2) -> tuple[float, float]:
    """Mean ``(noise loss, facial loss)`` of ``weights`` over every example with fixed seeded draws (the same for
    any weights, so two models compare fairly). Condition dropout, background masking and LoRA training are off."""
    probe = dataclasses.replace(settings, condition_dropout=0.0, background_mask_prob=0.0, train_processors=False)
    task = ConsistentIDTask(model_patcher, data, probe, weights)
    generator = torch.Generator().manual_seed(seed)
    with task.session(), torch.no_grad():
        for _ in range(rounds):
            for start in range(0, len(data), settings.batch_size):
                rows = list(range(start, min(len(data), start + settings.batch_size)))
                task.loss(data.get_batch(rows), StepContext(0, 0, generator, {}))
    return (sum(n for n, _ in task.stats) / len(task.stats), sum(f for _, f in task.stats) / len(task.stats))


def run_paths(name: str) -> tuple[str, str]:
    """(model file, training checkpoint) of the run called ``name`` in the models folders: where the node and the
    command line write, so either one resumes a run the other started."""
    return (os.path.join(save_dir("likeness", "consistentid"), name + ".safetensors"),
            os.path.join(save_dir("likeness", "training/consistentid"), name + ".safetensors"))


def save_trained(weights: ConsistentIDWeights, path: str) -> str:
    """Write the official-layout safetensors file atomically (fsync'ed), with the training metadata."""
    return atomic_save(weights.file_state_dict(), path, weights.metadata)
