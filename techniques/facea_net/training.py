"""FaceA-Net identity training: attribute-driven reconstruction with [feat] embeddings and a UNet LoRA.

Per reference photo (3-5 of one person): the largest face is cropped with context to the working size,
its regions (face, left eye, right eye, nose, mouth) are masked, and the crop, and each region's
masked image, are encoded by the VAE once. Every optimizer step then trains on a batch whose first half
is the *global task* (inpaint the masked face, prompt "a <class> face [feat_face]...") and whose second
half is the *local task* (inpaint one randomly chosen attribute, "a <class> <attribute> [feat_v]..."),
the loss being eps-MSE inside each mask only, averaged per task and summed (the paper's Eq. 2).

Inputs are built the way ComfyUI's InpaintModelConditioning builds them at inference: a 9-channel
inpainting UNet sees [noisy latent, mask, masked-image latent]; a normal 4-channel UNet sees the noisy
latent only (it inpaints with a latent noise mask at inference). SD1.5 inpainting is the default (the
paper's); an SDXL (inpainting) model also gets ``y``: the task prompt's pooled embedding and the working
crop's size as original and target size (``host.adm``, the model's own ``encode_adm``), and Face Inpaint
gives the sampler the same size conds. The identity records the family it was trained on (``base``).

Trainable: rank-r LoRA adapters on the attention projections (lr 1.2e-4) and the [feat] vectors
(lr 2e-3), through the pack's one training loop (progress, cancel, atomic checkpoints, exact resume,
loss curve). *Attribute transfer* continues a trained identity on another person's photos with the
local task of the chosen attributes only (~100 steps), training the LoRA and those attributes' feats.

The model is used through ComfyUI's ``BaseModel`` interface (``apply_model``, ``model_sampling``,
``process_latent_in``, ``diffusion_model``) and the VAE through ``encode``/``decode``; loading the
ModelPatcher and sampling the previews (ComfyUI's own sampler, as at inference) go through the host
adapters (``host.training``, ``host.sampling``), so this module imports nothing from ComfyUI.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...attention_patches.sites import find_unet_sites, unet_family
from ...errors import InvalidInputError, NoFaceError
from ...host.adm import adm_vector, needs_pooled, size_conds
from ...host.sampling import conditioning, sample_latent
from ...host.training import load_for_training
from ...trainers import losses as diffusion_losses
from ...trainers.loop import LrGroup, TrainConfig, TrainResult, train
from ...trainers.memory import checkpointed_blocks, trims_cpu_memory
from ...trainers.precision import check_precision, compute_dtype, compute_precision
from ...trainers.task import TrainingTask, run_field
from .files import identity_file, save_trained_identity
from .identity import ATTRIBUTES, DEFAULT_FEAT_TOKENS, TASKS, Identity
from .inpaint import CropInfo, crop_image, crop_region_masks, grow_mask, make_crop_info, masked_pixels
from .lora import IdentityLoRA, autograd_safe_weights, check_identity_fits
from .prompt import TaskTemplate, encode_task_template

logger = logging.getLogger("likeness")

LATENT_SCALE = 8
PREVIEW_SAMPLER, PREVIEW_SCHEDULER = "euler", "normal"


@dataclass
class TrainSettings:
    """Everything that shapes a FaceA-Net training run (defaults: the paper's recipe); ``asdict`` minus the run
    fields is its resume fingerprint."""

    class_word: str = "person"
    feat_tokens: int | None = None          # None: 3 for "man", 4 otherwise
    steps: int = run_field(600)
    rank: int = 48
    lr_lora: float = 1.2e-4
    lr_embed: float = 2e-3
    batch_size: int = 4
    seed: int = 0
    attributes: tuple[str, ...] = ATTRIBUTES
    working_size: int = 512
    context: float = 2.0                    # crop side / face box long side
    face_grow: int = 8                      # mask growth in working pixels
    attribute_grow: int = 4
    mask_shape: str = "box"                 # "box" (the paper's detector boxes) or "region" (parsed shape)
    local_only: bool = False                # attribute transfer: local task only
    train_feats: tuple[str, ...] | None = None   # None: every task trained; else only these tasks' feats
    gradient_checkpointing: bool = run_field(False)   # same training, less memory
    precision: str = "auto"                 # "auto" (bf16 where native, else fp32), "bf16", "fp32"
    checkpoint_every: int = run_field(100)
    preview_every: int = run_field(0)       # steps between validation previews (0 = none during training)
    final_preview: bool = run_field(True)   # one preview of the finished identity
    preview_steps: int = run_field(12)
    preview_cfg: float = run_field(4.0)
    label: str = run_field("FaceA-Net identity")

    def __post_init__(self):
        if not self.class_word.strip():
            raise InvalidInputError("The class word is empty; use 'man', 'woman' or 'person'.")
        if self.feat_tokens is None:
            self.feat_tokens = DEFAULT_FEAT_TOKENS.get(self.class_word.strip().lower(), 4)
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown:
            raise InvalidInputError(f"Unknown attributes {unknown}; choose from {', '.join(ATTRIBUTES)}.")
        if self.local_only and not self.attributes:
            raise InvalidInputError("The local-only task (attribute transfer) needs at least one attribute.")
        if self.mask_shape not in ("box", "region"):
            raise InvalidInputError(f"mask_shape must be 'box' or 'region', got {self.mask_shape!r}.")
        check_precision(self.precision)
        if self.working_size % LATENT_SCALE:
            raise InvalidInputError(f"The working size must be a multiple of {LATENT_SCALE}, got {self.working_size}.")

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.attributes) if self.local_only else ("face",) + tuple(self.attributes)


# ------------------------------------------------------------------------------------- references

@dataclass
class Reference:
    """One reference photo prepared for training (working-crop pixels and masks, CPU tensors)."""

    crop: torch.Tensor                 # [h,w,3]
    masks: dict[str, torch.Tensor]     # task -> [h,w] binary
    info: CropInfo
    embedding: np.ndarray | None = None


NO_FACE_ADVICE = ("Every photo the FaceA-Net trainer gets ('images', and 'validation_image' when connected) needs "
                  "one clearly visible face: replace the listed image(s), crop them closer, or leave them out.")


def analyze_largest(analyzer, images: torch.Tensor, embed: bool = True) -> list:
    """The largest face of every image of an IMAGE batch (the face analysis chain, with its retries);
    NoFaceError names the images without one."""
    from ...face_analysis.analyze import analyze

    result = analyze(analyzer, images, selection="largest", on_no_face="error", embed=embed,
                     no_face_advice=NO_FACE_ADVICE)
    return [faces[0] for faces in result.faces.faces]


def prepare_references(images: torch.Tensor, analyzer, settings: TrainSettings, parser=None,
                       with_embeddings: bool = True) -> list[Reference]:
    """Crop every reference around its largest face to a square working crop and build its task masks."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] < 3:
        raise InvalidInputError(f"Reference images must be an IMAGE [B,H,W,3]; got {tuple(images.shape)}.")
    faces = analyze_largest(analyzer, images, with_embeddings)
    refs = []
    for i, face in enumerate(faces):
        image = images[i, ..., :3].float().cpu()
        info = make_crop_info(face.bbox, image.shape[:2], settings.context, settings.working_size, i, square=True)
        crop = crop_image(image, info)
        masks = crop_region_masks(face, info, settings.tasks, crop, parser, settings.mask_shape)
        binary = {}
        for task, mask in masks.items():
            grow = settings.face_grow if task == "face" else settings.attribute_grow
            binary[task] = grow_mask((mask > 0.5).float(), grow)
            if binary[task].sum() < 1:
                raise NoFaceError(f"The {task.replace('_', ' ')} region of reference image {i + 1} is empty; "
                                  "use a frontal photo where the whole face is visible.")
        refs.append(Reference(crop=crop, masks=binary, info=info, embedding=getattr(face, "embedding", None)))
    return refs


def latent_masks(mask: torch.Tensor, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(model-input mask, loss mask) ``[1,h,w]`` at latent size from a pixel mask ``[H,W]``.

    The input mask is what ComfyUI's concat_cond feeds an inpainting UNet (bilinear resize, rounded);
    the loss mask covers every latent cell the region touches.
    """
    m = mask[None, None].float()
    model_in = F.interpolate(m, size=latent_hw, mode="bilinear", align_corners=False).round()
    loss = F.adaptive_max_pool2d(m, latent_hw)
    if model_in.sum() < 1:  # a tiny region vanished in the rounding: fall back to its footprint
        model_in = loss.clone()
    return model_in[0], loss[0]


def encode_references(refs: Sequence[Reference], vae, base_model, tasks: Sequence[str]) -> list[dict]:
    """VAE-encode each reference and each task's masked image; the training items of the loop."""
    items = []
    for ref in refs:
        pixels = [ref.crop] + [masked_pixels(ref.crop, ref.masks[t]) for t in tasks]
        with torch.no_grad():
            latents = vae.encode(torch.stack(pixels))
            latents = base_model.process_latent_in(latents).float().cpu()
        latent_hw = tuple(latents.shape[-2:])
        model_in, loss = zip(*(latent_masks(ref.masks[t], latent_hw) for t in tasks), strict=True)
        items.append({"latent": latents[0], "masked": latents[1:], "mask_in": torch.stack(model_in),
                      "loss_mask": torch.stack(loss)})
    return items


# ------------------------------------------------------------------------------------- the model

def model_in_channels(base_model) -> int:
    channels = int(getattr(base_model.diffusion_model, "in_channels", 4))
    if channels not in (4, 9):
        raise InvalidInputError(f"The model's UNet takes {channels} input channels; FaceA-Net needs an SD-style "
                                "UNet (9 = inpainting model, 4 = normal model with a noise mask).")
    return channels


# ------------------------------------------------------------------------------------- training

@dataclass
class TrainingOutput:
    identity: Identity
    lora_state: dict[str, torch.Tensor]
    result: TrainResult
    previews: list[tuple[int, torch.Tensor, float | None]] = field(default_factory=list)  # step, [h,w,3], sim

    @property
    def losses(self) -> list[float]:
        return self.result.losses


class IdentityTask(TrainingTask):
    """One FaceA-Net identity run (templates, parameters and encoded references) as the loop's task.

    Its loss sums the global task's and the local task's per-row means, so rows of one batch are not
    exchangeable: it trains in one process (``shardable`` False).
    """

    technique = "facea_net"
    shardable = False

    def __init__(self, model, clip, vae, refs: Sequence[Reference], settings: TrainSettings,
                 base_identity: Identity | None = None, base_lora: dict[str, torch.Tensor] | None = None,
                 validation_ref: Reference | None = None, analyzer=None):
        self.settings = settings
        self.label = settings.label
        self.patcher = model
        load_for_training(model)
        self.base_model = getattr(model, "model", model)
        self.unet = self.base_model.diffusion_model
        self.in_channels = model_in_channels(self.base_model)
        self.family = unet_family(find_unet_sites(self.unet))
        if base_identity is not None:
            check_identity_fits(base_identity, self.unet)
        self.vae = vae
        self.analyzer = analyzer
        self.refs = list(refs)
        self.validation_ref = validation_ref
        self.base_identity = base_identity
        tasks = settings.tasks
        class_word = base_identity.class_word if base_identity else settings.class_word
        self.class_word = class_word
        with torch.inference_mode(False):
            self.templates: dict[str, TaskTemplate] = {}
            for task in (TASKS if base_identity else tasks):
                inherited = base_identity is not None and task in base_identity.feats
                n = base_identity.n_tokens(task) if inherited else settings.feat_tokens
                self.templates[task] = encode_task_template(clip, class_word, task, n)
            self.feats = {t: self._initial_feat(t) for t in self.templates}
            self.lora = IdentityLoRA.for_model(self.unet, rank=settings.rank, seed=settings.seed)
            if base_lora is not None:
                self.lora.load_native(base_lora)
            self.data = encode_references(self.refs, vae, self.base_model, tasks)
            # the previews' negative prompt (and its pooled output, for SDXL's y)
            self.negative, self.negative_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        self.task_index = {t: i for i, t in enumerate(tasks)}
        self.compute_dtype = compute_dtype(settings.precision, next(self.unet.parameters()).device)
        logger.info("%s: computing in %s (precision %s)", settings.label,
                    "bf16 mixed precision" if self.compute_dtype else "fp32", settings.precision)
        trained = settings.train_feats if settings.train_feats is not None else tasks
        self.trained_feats = tuple(t for t in trained if t in self.feats)

    def _initial_feat(self, task: str) -> torch.Tensor:
        base = self.base_identity
        if base is not None and task in base.feats:
            return base.feats[task].detach().float().clone()
        t = self.templates[task]
        return t.cond[0, t.positions].detach().float().clone()  # start as the plain prompt: no change at step 0

    # ---- the contract ---------------------------------------------------------------------------
    def trainables(self) -> dict[str, torch.Tensor]:
        out = {f"feat.{t}": self.feats[t] for t in self.trained_feats}
        for name, adapter in self.lora.adapters.items():
            out[f"lora.{name}.down"] = adapter.down
            out[f"lora.{name}.up"] = adapter.up
        return out

    def lr_groups(self) -> list[LrGroup]:
        return [LrGroup(lr=self.settings.lr_embed, prefix="feat.", weight_decay=0.0, name="feat"),
                LrGroup(lr=self.settings.lr_lora, prefix="lora.", weight_decay=0.01, name="lora")]

    @contextlib.contextmanager
    def session(self):
        """The LoRA on the UNet's attention, its weights autograd-usable without copies, optional checkpointing."""
        with torch.inference_mode(False), self.lora.attached(self.unet), autograd_safe_weights(self.unet), \
                checkpointed_blocks(self.unet, self.settings.gradient_checkpointing, self.release_memory):
            yield self

    def data_fingerprint(self) -> str:
        """The reference crops and masks (pixels, before the VAE: the same on every device)."""
        digest = hashlib.sha1()
        for ref in self.refs:
            digest.update(ref.crop.contiguous().numpy().tobytes())
            for task in sorted(ref.masks):
                digest.update(task.encode() + ref.masks[task].contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def fingerprint(self, params: dict[str, torch.Tensor]) -> dict:
        return {**super().fingerprint(params), "class_word": self.class_word, "in_channels": self.in_channels}

    def metadata(self) -> dict[str, str]:
        return {"technique": self.technique, "class_word": self.class_word}

    def validate(self, step: int) -> tuple[torch.Tensor, float | None]:
        return self.preview(step)

    # ---- one batch ------------------------------------------------------------------------------
    def batch_tasks(self, size: int, generator: torch.Generator) -> list[str]:
        """Global task for the first half of the batch, random attributes for the rest (local task); an odd
        middle item (e.g. batch size 1) is global or local with equal odds."""
        attributes = list(self.settings.attributes)
        if self.settings.local_only:
            n_global = 0
        elif not attributes:
            n_global = size
        else:
            n_global = size // 2 + (int(torch.rand((), generator=generator) < 0.5) if size % 2 else 0)
        picks = torch.randint(len(attributes) or 1, (size - n_global,), generator=generator).tolist()
        return ["face"] * n_global + [attributes[p] for p in picks]

    def conditioning(self, tasks: Sequence[str]) -> torch.Tensor:
        return torch.cat([self.templates[t].with_feats(self.feats[t]) for t in tasks], dim=0)

    def pooled(self, tasks: Sequence[str]) -> torch.Tensor | None:
        """The task prompts' pooled embeddings ``[B, P]`` (None when the text encoder gives none)."""
        pools = [self.templates[t].pooled for t in tasks]
        return None if any(p is None for p in pools) else torch.cat(pools, dim=0)

    def extra_conds(self, tasks: Sequence[str], height: int, width: int, device) -> dict:
        """``{"y": ...}`` for an SDXL-style model (pooled task prompts, the crop's size), else ``{}``."""
        y = adm_vector(self.base_model, self.pooled(tasks), height, width, device)
        return {} if y is None else {"y": y}

    def loss(self, batch: dict, ctx) -> tuple[torch.Tensor, dict]:
        ms = self.base_model.model_sampling
        device = next(self.unet.parameters()).device
        latent = batch["latent"].to(device)
        size = latent.shape[0]
        tasks = self.batch_tasks(size, ctx.generator)
        rows = torch.arange(size)
        cols = torch.tensor([self.task_index[t] for t in tasks])
        loss_mask = batch["loss_mask"][rows, cols].to(device)
        sigma = diffusion_losses.sample_sigmas(ms, size, ctx.generator).to(device)
        noise = ctx.randn(latent.shape, device=device)
        x_t = diffusion_losses.noised(ms, sigma, noise, latent)
        c_concat = None
        if self.in_channels == 9:
            c_concat = torch.cat([batch["mask_in"][rows, cols], batch["masked"][rows, cols]], dim=1).to(device)
        cond = self.conditioning(tasks).to(device)
        extra = self.extra_conds(tasks, latent.shape[-2] * LATENT_SCALE, latent.shape[-1] * LATENT_SCALE, device)
        with compute_precision(self.compute_dtype, device):
            denoised = self.base_model.apply_model(x_t, sigma, c_concat=c_concat, c_crossattn=cond, **extra)
        prediction, target = diffusion_losses.native_space(ms, sigma, x_t, denoised, latent)
        error = ((prediction.float() - target.float()) ** 2 * loss_mask).flatten(1).sum(1)
        per_item = error / (loss_mask.flatten(1).sum(1) * latent.shape[1]).clamp_min(1e-8)
        is_global = torch.tensor([t == "face" for t in tasks], device=device)
        total = per_item.new_zeros(())
        for group in (is_global, ~is_global):
            if bool(group.any()):
                total = total + per_item[group].mean()
        return total, {"tasks": tasks}

    # ---- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def preview(self, step: int, _params=None) -> tuple[torch.Tensor, float | None]:
        """Inpaint the held-out reference's face with the current identity and score it."""
        ref = self.validation_ref or self.refs[0]
        mask = ref.masks["face"] if "face" in ref.masks else next(iter(ref.masks.values()))
        tasks = ["face"] if "face" in self.feats else [self.trained_feats[0]]
        image = self.sample_preview(ref.crop, mask, self.conditioning(tasks), self.pooled(tasks))
        score = identity_similarity(self.analyzer, image, ref.embedding)
        logger.info("%s: preview at step %d, identity similarity %s", self.settings.label, step,
                    "n/a" if score is None else f"{score:.3f}")
        return image, score

    def sample_preview(self, crop: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor,
                       pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Inpaint ``crop`` [h,w,3] inside ``mask`` [h,w] with ComfyUI's sampler (euler, normal schedule),
        prepared as InpaintModelConditioning + a latent noise mask prepare inference; returns [h,w,3]."""
        s = self.settings
        pixels, mask = crop[None, ..., :3], mask[None].float()
        noise_mask = mask.reshape(1, 1, *mask.shape[-2:])
        values = {"concat_latent_image": self.vae.encode(masked_pixels(pixels, mask)), "concat_mask": noise_mask,
                  **size_conds(self.base_model, *crop.shape[:2])}
        positive, negative = conditioning(cond), conditioning(self.negative)
        if needs_pooled(self.base_model):   # SDXL: each prompt's pooled output, as CLIPTextEncode gives it
            positive, negative = (conditioning(cond, pooled_output=pooled),
                                  conditioning(self.negative, pooled_output=self.negative_pooled))
        samples = sample_latent(self.patcher, positive, negative,
                                self.vae.encode(pixels), seed=s.seed, steps=s.preview_steps, cfg=s.preview_cfg,
                                sampler_name=PREVIEW_SAMPLER, scheduler=PREVIEW_SCHEDULER, noise_mask=noise_mask,
                                cond_values=values)
        return self.vae.decode(samples)[0, ..., :3].float().clamp(0, 1).cpu()

    @property
    def release_memory(self) -> bool:
        return trims_cpu_memory(next(self.unet.parameters()).device)

    def finish(self, result: TrainResult) -> TrainingOutput:
        feats = {t: f.detach().float().cpu().clone() for t, f in self.feats.items()}
        lora_state = self.lora.native_state_dict()
        embeddings = [r.embedding for r in self.refs if r.embedding is not None]
        base = self.base_identity
        if base is not None:
            reference = base.reference_embedding
            model_id = base.embedding_model_id
        else:
            reference = _mean_embedding(embeddings)
            model_id = getattr(self.analyzer, "model_id", "") if reference is not None else ""
        s = self.settings
        meta = dict(base.metadata) if base is not None else {}
        meta.update({"technique": "FaceA-Net", "rank": s.rank, "in_channels": self.in_channels, "base": self.family,
                     "working_size": s.working_size, "references": len(self.refs)})
        if base is not None:
            meta.setdefault("history", [])
            meta["history"] = list(meta["history"]) + [{"attribute_transfer": list(s.attributes), "steps": result.step}]
        else:
            meta.update({"steps": result.step, "precision": "bf16" if self.compute_dtype else "fp32",
                         "lr_lora": s.lr_lora, "lr_embed": s.lr_embed, "batch_size": s.batch_size,
                         "seed": s.seed, "attributes": list(s.attributes)})
        identity = Identity(feats=feats, class_word=self.class_word, lora_name=base.lora_name if base else "",
                            metadata=meta, name=base.name if base else "", lora=lora_state,
                            reference_embedding=reference, embedding_model_id=model_id)
        previews = [(step, value[0], value[1]) for step, value in result.validations]
        return TrainingOutput(identity=identity, lora_state=lora_state, result=result, previews=previews)

    def write_result(self, artefact: TrainingOutput, path: str) -> list[str]:
        """The identity file at ``path`` and its LoRA, named after it, in models/loras/likeness/."""
        return list(save_trained_identity(artefact.identity, artefact.lora_state,
                                          os.path.splitext(os.path.basename(path))[0], path))


def run_paths(name: str) -> tuple[str, str]:
    """(identity file, training checkpoint) of the identity called ``name`` (named in :mod:`.files`)."""
    return identity_file("identity", name), identity_file("checkpoint", name)


def _mean_embedding(embeddings) -> torch.Tensor | None:
    if not embeddings:
        return None
    vectors = torch.stack([torch.as_tensor(np.asarray(e), dtype=torch.float32) for e in embeddings])
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-8)
    mean = vectors.mean(0)
    return mean / mean.norm().clamp_min(1e-8)


def identity_similarity(analyzer, image: torch.Tensor, reference) -> float | None:
    """Cosine similarity between the largest face in ``image`` [h,w,3] and a reference embedding, when the
    analyzer can embed and finds a face; None otherwise."""
    if analyzer is None or reference is None:
        return None
    try:
        face = analyze_largest(analyzer, image[None], embed=True)[0]
    except NoFaceError:
        return None
    if getattr(face, "embedding", None) is None:
        return None
    a = torch.as_tensor(np.asarray(face.embedding), dtype=torch.float32).reshape(-1)
    b = torch.as_tensor(np.asarray(reference), dtype=torch.float32).reshape(-1)
    if a.shape != b.shape:
        return None
    return float(F.cosine_similarity(a[None], b[None]).item())


def train_identity(model, clip, vae, images: torch.Tensor, analyzer, settings: TrainSettings,
                   parser=None, validation_image: torch.Tensor | None = None,
                   base_identity: Identity | None = None, base_lora: dict[str, torch.Tensor] | None = None,
                   checkpoint_path: str | None = None, resume: str = "fresh", **loop_options) -> TrainingOutput:
    """Train (or, with ``base_identity``, continue) a FaceA-Net identity from reference IMAGEs.

    ``validation_image`` (optional, [1,H,W,3]) is held out and inpainted for the previews; without it the
    first reference is used. ``resume`` is the loop's policy; ``loop_options`` go to :class:`TrainConfig`
    (``result_path``: the identity file, its LoRA beside it in models/loras/likeness/; ``progress_factory``,
    ``step_callback``, ``interrupt_check`` ...).
    """
    refs = prepare_references(images, analyzer, settings, parser)
    validation_ref = None
    if validation_image is not None:
        validation_ref = prepare_references(validation_image[:1], analyzer, settings, parser)[0]
    task = IdentityTask(model, clip, vae, refs, settings, base_identity=base_identity, base_lora=base_lora,
                        validation_ref=validation_ref, analyzer=analyzer)
    return train_identity_task(task, checkpoint_path, resume, **loop_options)


def train_identity_task(task: IdentityTask, checkpoint_path: str | None = None, resume: str = "fresh",
                        **loop_options) -> TrainingOutput:
    """Run ``task`` through the loop: previews every ``preview_every`` steps and (``final_preview``) at the end."""
    s = task.settings
    config = TrainConfig.from_settings(s, checkpoint_path=checkpoint_path, resume=resume,
                                       validate_every=s.preview_every, validate_at_end=s.final_preview,
                                       **loop_options)
    return train(task, config).artefact


def attribute_transfer_settings(base: TrainSettings, attributes: Sequence[str], steps: int = 100) -> TrainSettings:
    """Settings for continuing an identity with another person's attribute(s): local task only, LoRA
    plus those attributes' [feat] vectors trained."""
    from dataclasses import replace

    attributes = tuple(attributes)
    return replace(base, steps=steps, attributes=attributes, local_only=True, train_feats=attributes)
