"""Train a Face Fusion adapter (only ``Linear_kf`` / ``Linear_vf`` per site) on the frozen UNet.

Each training image is its own identity example: its aligned face crop is the reference, the image is
the target. One step, per batch row i (paper §3, the pack's recorded choices in ``apply``):

1. draw sigma_i uniformly in the schedule (the host's ``model_sampling``) and noise ε_i;
2. the reference stream: row i's reference latent, noised to sigma_i with its own noise (``same_sigma``,
   the paper's reference-only style) or clean (``clean``), goes through the frozen UNet once without
   gradient and every site records ``h_f`` (the engine's capture, ``per_row``: row i sees only
   reference i);
3. the generation stream runs with the joint attention ``[K_text; Linear_kf(h_f)]`` and the loss is
   the host's noise loss (ε-MSE for SD1.5), optionally weighted up inside the face
   (``face_weight`` > 1, from the detected face box).

SDXL-style models also get ``y`` (``host.adm``: the caption's pooled embedding and the training size as
original and target size, crop 0, built by the model's own ``encode_adm`` as sampling builds it); row i's
reference pass copies row i's ``y``, as a reference at sampling copies its positive's.

:class:`FusionTask` is the trainer contract (:mod:`...trainers.task`); the shared loop
(:mod:`...trainers.loop`) runs it: AdamW, gradient accumulation, seeded per-row randomness, progress +
cancel, atomic checkpoints, the resume policy, data-parallel ranks, the loss curve.

On a Flux-family DiT the same step runs as :class:`~.flux_training.FluxFusionTask` (rectified-flow velocity loss,
``y`` + ``guidance``, bf16, per-block checkpointing); :func:`make_settings` and :func:`task_for` pick settings and
task from the model, so the node and the command line call the same functions for either kind of model.

References come from the face-analysis chain (``analyze`` + ``align_faces``: the ArcFace-template
crop, as at inference). Without an analyzer, or for an image without a detectable face, the middle of
the image is used instead (logged), and that image gets no face weighting.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ...attention_patches import ReferenceLatents, dit_model_of, install
from ...errors import InvalidInputError
from ...host.adm import adm_vector, needs_pooled
from ...host.attention import forward_transformer_options
from ...host.folders import save_dir
from ...host.training import load_for_training
from ...trainers import losses
from ...trainers.checkpoint import atomic_save
from ...trainers.datasets import center_square, resize_center_crop
from ...trainers.loop import LrGroup, StepContext, TrainConfig, TrainResult, check_run_settings, train
from ...trainers.task import TrainingTask, run_field
from .adapter import FusionAdapter, FusionAdapterBase, fusion_save_dir
from .apply import DEFAULT_REFERENCE_DOWNSAMPLE, INJECTOR_NAME, FusionIdentityLatents, FusionInjector

logger = logging.getLogger("likeness")

REFERENCE_NOISE = ("same_sigma", "clean")
REFERENCE_SIZES = (256, 384, 512)
FALLBACK_FRACTION = 0.6   # centre crop used as the reference when no face was found
ENCODE_CHUNK = 8


@dataclass
class FusionTrainSettings:
    """Everything that shapes a Face Fusion training run; ``asdict`` minus the run fields is its resume fingerprint."""

    steps: int = run_field(500)
    lr: float = 1e-4
    batch_size: int = 1
    grad_accumulation: int = 1
    seed: int = 0
    checkpoint_every: int = run_field(50)
    resolution: int = 512            # training images (square, centre-cropped)
    reference_size: int = 256        # aligned reference crop side
    crop_scale: float = 1.0          # >1 zooms the reference crop out (more hair / background)
    face_weight: float = 1.0         # loss weight inside the face box (1 = plain noise loss)
    reference_noise: str = "same_sigma"
    caption_dropout: float = 0.0     # probability of training a row with the empty caption
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    reference_downsample: int = DEFAULT_REFERENCE_DOWNSAMPLE   # as Apply Face Fusion's default (see apply.py)

    def check(self) -> None:
        check_run_settings(self.steps, self.batch_size, self.grad_accumulation, self.lr, self.resolution)
        if self.reference_size % 8 or not (self.reference_size % 112 == 0 or self.reference_size % 128 == 0):
            raise InvalidInputError(f"reference size must be one of {REFERENCE_SIZES}, got {self.reference_size}")
        if self.reference_noise not in REFERENCE_NOISE:
            raise InvalidInputError(f"reference noise must be one of {REFERENCE_NOISE}")
        if self.face_weight <= 0:
            raise InvalidInputError("face weight must be positive (1 = no face weighting)")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise InvalidInputError("caption dropout must lie in [0, 1)")
        if self.reference_downsample < 1:
            raise InvalidInputError("reference downsample must be >= 1 (1 = exact reference stream)")


# --------------------------------------------------------------------------- examples (host-independent)

@dataclass
class PreparedExamples:
    targets: torch.Tensor            # [N, S, S, 3] training images
    references: torch.Tensor         # [N, R, R, 3] aligned face crops (or centre crops)
    face_masks: torch.Tensor         # [N, S, S] soft face ellipse (all 0 when no face was found)
    captions: list[str]
    names: list[str]
    aligned: list[bool]              # the reference is an aligned face crop

    def __len__(self) -> int:
        return len(self.names)


def face_ellipse(bbox, scale: float, size: int, grow: float = 1.3) -> torch.Tensor:
    """A soft ellipse ``[size, size]`` covering the face box (pixel coords × ``scale``), grown a little."""
    x1, y1, x2, y2 = (float(v) * scale for v in bbox)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = max(1.0, (x2 - x1) / 2 * grow), max(1.0, (y2 - y1) / 2 * grow)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    r = torch.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2)
    return (1.0 - (r - 0.9) / 0.2).clamp(0.0, 1.0)  # 1 inside 0.9, soft edge to 1.1


def centre_reference(square: torch.Tensor, size: int, fraction: float = FALLBACK_FRACTION) -> torch.Tensor:
    """The middle ``fraction`` of a square image, resized to ``size`` (reference without a face analyzer)."""
    side = square.shape[0]
    inner = max(1, round(side * fraction))
    start = (side - inner) // 2
    return resize_center_crop(square[start:start + inner, start:start + inner], size)


def aligned_reference(analyzer, square: torch.Tensor, size: int, crop_scale: float):
    """(aligned crop ``[size, size, 3]``, face bbox) of the largest face, or (None, None)."""
    from ...face_analysis.align import align_faces
    from ...face_analysis.analyze import analyze

    batch = square.unsqueeze(0)
    result = analyze(analyzer, batch, selection="largest", on_no_face="pass_through", embed=False)
    faces = result.faces.faces[0]
    if not faces:
        return None, None
    aligned = align_faces(batch, result.faces, size=size, crop_scale=crop_scale)
    for i, passthrough in enumerate(aligned.passthrough or [False] * len(aligned)):
        if not passthrough:
            return aligned.crops[i].clamp(0.0, 1.0), faces[aligned.face_numbers[i]].bbox
    return None, None


def prepare_examples(sources: Iterable[tuple[str, torch.Tensor, str]], settings: FusionTrainSettings,
                     analyzer=None) -> PreparedExamples:
    """Training targets, reference crops and face masks from ``(name, image [H, W, C], caption)``.

    Each image is first cut to its centred square (so face coordinates map onto the training image),
    then resized to ``resolution``; the reference is aligned on the full-resolution square.
    """
    targets, references, masks, captions, names, aligned = [], [], [], [], [], []
    no_face = []
    for name, image, caption in sources:
        square = center_square(image[..., :3].float())
        targets.append(resize_center_crop(square, settings.resolution))
        crop, bbox = (None, None)
        if analyzer is not None:
            crop, bbox = aligned_reference(analyzer, square, settings.reference_size, settings.crop_scale)
        if crop is None:
            crop = centre_reference(square, settings.reference_size)
            if analyzer is not None:
                no_face.append(name)
        references.append(crop)
        masks.append(face_ellipse(bbox, settings.resolution / square.shape[0], settings.resolution)
                      if bbox is not None else torch.zeros(settings.resolution, settings.resolution))
        captions.append(caption)
        names.append(name)
        aligned.append(bbox is not None)
    if not names:
        raise InvalidInputError("no training images")
    if analyzer is None:
        logger.warning("Face Fusion training without a face analyzer: the references are centre crops of the "
                       "training images (connect a FACE_ANALYZER for aligned face crops, as used at inference)")
    elif no_face:
        logger.warning("Face Fusion training: no face found in %d of %d image(s) (%s); their references are centre "
                       "crops and they get no face weighting", len(no_face), len(names), ", ".join(no_face[:8]))
    return PreparedExamples(torch.stack(targets), torch.stack(references), torch.stack(masks), captions, names,
                            aligned)


# --------------------------------------------------------------------------- encoding (duck-typed host objects)

@dataclass
class FusionTrainingData:
    """What the loss needs per example, all on the CPU."""

    latents: torch.Tensor            # [N, C, h, w] model space (after process_latent_in; C = 4, Flux 16)
    references: torch.Tensor         # [N, C, hr, wr] VAE space (the capture applies process_latent_in)
    contexts: torch.Tensor           # [N, L, ctx]
    empty_context: torch.Tensor      # [1, L, ctx] (caption dropout)
    weights: torch.Tensor | None     # [N, 1, h, w] loss weights, None = plain MSE
    fingerprint: str                 # names + captions + sizes (resume refuses another data set)
    aligned: int = 0                 # examples whose reference is an aligned face crop
    pooled: torch.Tensor | None = None         # [N, P] pooled caption embeddings (SDXL-style models, FLUX.1), else None
    empty_pooled: torch.Tensor | None = None   # [1, P] of the empty caption

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def get_batch(self, indices: list[int]) -> dict:
        index = torch.tensor(indices, dtype=torch.long)
        return {"latent": self.latents.index_select(0, index), "reference": self.references.index_select(0, index),
                "context": self.contexts.index_select(0, index),
                "pooled": None if self.pooled is None else self.pooled.index_select(0, index),
                "weight": None if self.weights is None else self.weights.index_select(0, index)}


def _vae_encode(vae, images: torch.Tensor) -> torch.Tensor:
    chunks = [vae.encode(images[i:i + ENCODE_CHUNK]).float().cpu() for i in range(0, images.shape[0], ENCODE_CHUNK)]
    return torch.cat(chunks)


def _repeat_to(context: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a ``[1, 77·k, C]`` context to ``length`` tokens (what ComfyUI does to batch prompts of
    different lengths)."""
    return context.repeat(1, length // context.shape[1], 1) if context.shape[1] != length else context


@dataclass
class EncodedCaptions:
    contexts: torch.Tensor               # [N, L, C]
    empty: torch.Tensor                  # [1, L, C] the empty caption (caption dropout)
    pooled: torch.Tensor | None = None   # [N, P] pooled outputs, when asked for
    empty_pooled: torch.Tensor | None = None


def encode_captions(clip, captions: list[str], pooled: bool = False) -> EncodedCaptions:
    """Every caption's context (and, ``pooled``, its pooled output: SDXL's ``y`` needs it), each encoded once."""
    cache: dict[str, torch.Tensor] = {}
    pools: dict[str, torch.Tensor] = {}
    for text in list(dict.fromkeys(captions)) + [""]:
        if text not in cache:
            cond, pool = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            cache[text] = cond.float().cpu()
            if pooled:
                if pool is None:
                    raise InvalidInputError("this model needs the text encoder's pooled output, which this CLIP "
                                            "does not give; connect the CLIP of the model's checkpoint")
                pools[text] = pool.float().cpu().reshape(1, -1)
    length = math.lcm(*(c.shape[1] for c in cache.values()))
    cache = {k: _repeat_to(v, length) for k, v in cache.items()}
    out = EncodedCaptions(torch.cat([cache[c] for c in captions]), cache[""])
    if pooled:
        out.pooled, out.empty_pooled = torch.cat([pools[c] for c in captions]), pools[""]
    return out


def takes_pooled(model_patcher) -> bool:
    """Whether the model takes the caption's pooled embedding (SDXL-style ``y``; FLUX.1's ``vector_in``)."""
    dit = dit_model_of(model_patcher)
    if dit is not None:
        return getattr(dit, "vector_in", None) is not None
    return needs_pooled(model_patcher.model)


def encode_examples(model_patcher, vae, clip, examples: PreparedExamples,
                    settings: FusionTrainSettings) -> FusionTrainingData:
    """Encode targets and references with the VAE and the captions with CLIP (once, before training)."""
    base = model_patcher.model
    latents = base.process_latent_in(_vae_encode(vae, examples.targets)).float()
    references = _vae_encode(vae, examples.references)
    captions = encode_captions(clip, examples.captions, pooled=takes_pooled(model_patcher))
    weights = None
    if settings.face_weight != 1.0 and any(examples.aligned):
        weights = losses.region_weight(examples.face_masks, latents.shape, inside=settings.face_weight)
    digest = hashlib.sha1()
    for name, caption in zip(examples.names, examples.captions, strict=True):
        digest.update(f"{name}\0{caption}\0".encode())
    digest.update(str((tuple(latents.shape), tuple(references.shape))).encode())
    return FusionTrainingData(latents, references, captions.contexts, captions.empty, weights,
                              digest.hexdigest()[:16], sum(examples.aligned), captions.pooled, captions.empty_pooled)


# --------------------------------------------------------------------------- training

@dataclass
class FusionTrainOutput:
    adapter: FusionAdapterBase
    result: TrainResult
    info: dict = field(default_factory=dict)


def check_model(model_patcher) -> None:
    base = model_patcher.model
    if getattr(base, "concat_keys", ()):
        raise InvalidInputError("Face Fusion training needs a normal (not an inpainting) model")


class FusionTask(TrainingTask):
    """A Face Fusion adapter (a copy of ``adapter``, or a new one from the model) trained on encoded data.

    :meth:`session` trains on a private clone of the model, loaded for training, with the engine's patch
    installed; the input model and adapter stay untouched. The loss is the module doc's step, with every
    random draw per row (see :class:`StepContext`), so data-parallel ranks train what one process trains.
    """

    technique = "face_fusion"
    label = "Face Fusion training"

    def __init__(self, model_patcher, data: FusionTrainingData, settings: FusionTrainSettings,
                 adapter: FusionAdapterBase | None = None):
        settings.check()
        check_model(model_patcher)
        self.model_patcher = model_patcher
        self.data = data
        self.settings = settings
        self.adapter = copy.deepcopy(adapter) if adapter is not None else None
        self.clone = None

    @contextlib.contextmanager
    def session(self):
        clone = self.model_patcher.clone()
        self.device = load_for_training(clone)
        if self.adapter is None:
            self.adapter = self.new_adapter(clone)
        self.adapter.to(self.device)
        self.patch = install(clone)
        self.adapter.check_sites(self.patch.sites)
        self.model_sampling = clone.get_model_object("model_sampling")
        self.options = forward_transformer_options(clone)
        self.dtype = clone.model.get_dtype() if hasattr(clone.model, "get_dtype") else torch.float32
        self.clone = clone
        try:
            yield self
        finally:
            self.patch.remove(INJECTOR_NAME)
            self.adapter.to("cpu")

    def new_adapter(self, model_patcher) -> FusionAdapterBase:
        """The adapter a run without a starting adapter trains (a subclass makes its layout's)."""
        return FusionAdapter.from_model(model_patcher)

    def trainables(self) -> dict[str, torch.Tensor]:
        return {f"fusion.{name}": p for name, p in self.adapter.named_parameters()}

    def lr_groups(self) -> list[LrGroup]:
        return [LrGroup(lr=self.settings.lr, weight_decay=self.settings.weight_decay, name="fusion")]

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.clone.model]

    def data_fingerprint(self) -> str:
        return self.data.fingerprint

    def metadata(self) -> dict[str, str]:
        return {"technique": self.technique, "base": self.adapter.metadata.get("base", "unknown")}

    def loss(self, batch: dict, ctx: StepContext) -> torch.Tensor:
        s, device = self.settings, self.device
        clean = batch["latent"].to(device)
        count = clean.shape[0]
        sigma = ctx.per_row(count, lambda n: losses.sample_sigmas(self.model_sampling, n, ctx.generator)).to(device)
        noise = ctx.randn(clean.shape, device=device)
        context, pooled = batch["context"], batch.get("pooled")
        drop = ctx.rand((count,))
        if s.caption_dropout > 0:
            dropped = drop < s.caption_dropout
            context = torch.where(dropped.view(-1, 1, 1), self.data.empty_context, context)
            if pooled is not None:
                pooled = torch.where(dropped.view(-1, 1), self.data.empty_pooled, pooled)
        extra = self._extra_conds(pooled, count)
        self.patch.add(self._injector(batch["reference"], ctx))
        x_t = losses.noised(self.model_sampling, sigma, noise, clean)
        denoised = self.denoise(x_t, sigma, context.to(device, self.dtype), extra)
        weight = batch["weight"].to(device) if batch["weight"] is not None else None
        return losses.noise_prediction_loss(self.model_sampling, sigma, x_t, denoised, clean, weight)

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, extra: dict) -> torch.Tensor:
        """The frozen model's denoised prediction (fp32) with the Fusion injector installed (reference pass included)."""
        return self.clone.model.apply_model(x_t.to(self.dtype), sigma, c_crossattn=context,
                                            transformer_options=self.options, **extra).float()

    def _extra_conds(self, pooled: torch.Tensor | None, count: int) -> dict:
        """``{"y": ...}`` for an SDXL-style model (the training size as original and target size), else ``{}``."""
        size = self.settings.resolution
        if not needs_pooled(self.clone.model):
            return {}
        if pooled is None:
            raise InvalidInputError("this model needs pooled caption embeddings (SDXL-style); encode the training "
                                    "data for this model (encode_examples with its CLIP)")
        return {"y": adm_vector(self.clone.model, pooled, size, size, self.device).to(self.dtype)}

    def _injector(self, references: torch.Tensor, ctx: StepContext) -> FusionInjector:
        """A fresh injector per micro-batch: its reference rows, their noise and its capture belong to this step."""
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=ctx.generator))
        capture = "per_step" if self.settings.reference_noise == "same_sigma" else "cached_clean"
        injector = FusionInjector(self.adapter, [FusionIdentityLatents(references)], capture_mode=capture,
                                  per_row=True, noise_seed=seed,
                                  reference_downsample=self.settings.reference_downsample)
        # The reference noise of this process's rows of the global batch: the seed's draw for every row of it,
        # so a row's reference noise does not depend on how many processes share the batch.
        noise = ctx.per_row(references.shape[0], lambda n: torch.randn(
            (n, *references.shape[1:]), generator=torch.Generator().manual_seed(seed), dtype=torch.float32))
        injector.references = ReferenceLatents(injector.references.latents, seed, noise=noise)
        return injector

    def finish(self, result: TrainResult) -> FusionAdapterBase:
        s, adapter = self.settings, self.adapter
        adapter.metadata.update({
            "trained_steps": str(result.step), "lr": str(s.lr), "batch_size": str(s.batch_size),
            "grad_accumulation": str(s.grad_accumulation), "seed": str(s.seed), "images": str(len(self.data)),
            "resolution": str(s.resolution), "reference_size": str(s.reference_size),
            "reference_noise": s.reference_noise, "face_weight": str(s.face_weight),
            "reference_downsample": str(s.reference_downsample), "aligned_references": str(self.data.aligned),
            "final_loss": f"{result.losses[-1]:.6g}" if result.losses else "",
        })
        return adapter

    def write_result(self, artefact: FusionAdapterBase, path: str) -> list[str]:
        return [save_trained_adapter(artefact, path)]


def is_dit(model_patcher) -> bool:
    return dit_model_of(model_patcher) is not None


def settings_class(model_patcher) -> type[FusionTrainSettings]:
    """The settings of a Fusion training run on this model (Flux-family DiTs have their own)."""
    if is_dit(model_patcher):
        from .flux_training import FluxFusionTrainSettings

        return FluxFusionTrainSettings
    return FusionTrainSettings


def make_settings(model_patcher, **values) -> FusionTrainSettings:
    """The settings for this model from a node's or the command line's values: the values its settings class has
    (the Flux-only ones are dropped for a UNet), ``reference_downsample`` only on a UNet (a DiT's reference pass
    keeps every key)."""
    cls = settings_class(model_patcher)
    known = {f.name for f in dataclasses.fields(cls)}
    if is_dit(model_patcher):
        known.discard("reference_downsample")
    return cls(**{name: value for name, value in values.items() if name in known and value is not None})


def task_for(model_patcher, data: FusionTrainingData, settings: FusionTrainSettings,
             adapter: FusionAdapterBase | None = None) -> FusionTask:
    """:class:`FusionTask` on a UNet, :class:`~.flux_training.FluxFusionTask` on a Flux-family DiT."""
    if is_dit(model_patcher):
        from .flux_training import FluxFusionTask

        return FluxFusionTask(model_patcher, data, settings, adapter)
    return FusionTask(model_patcher, data, settings, adapter)


def train_on_data(model_patcher, data: FusionTrainingData, settings: FusionTrainSettings,
                  adapter: FusionAdapterBase | None = None, checkpoint_path: str | None = None, resume: str = "fresh",
                  **loop_options) -> tuple[FusionAdapterBase, TrainResult]:
    """Train a copy of ``adapter`` (or a new one from the model) on encoded data; see :func:`train_face_fusion`."""
    task = task_for(model_patcher, data, settings, adapter)
    result = train(task, TrainConfig.from_settings(settings, checkpoint_path=checkpoint_path, resume=resume,
                                                   **loop_options))
    return result.artefact, result


def train_face_fusion(model_patcher, vae, clip, sources: Iterable[tuple[str, torch.Tensor, str]],
                      settings: FusionTrainSettings, analyzer=None, adapter: FusionAdapterBase | None = None,
                      checkpoint_path: str | None = None, resume: str = "fresh", **loop_options) -> FusionTrainOutput:
    """Train (or continue training a copy of) a Fusion adapter; the input model and adapter stay untouched.

    ``resume`` is the loop's policy (``auto`` / ``fresh`` / ``require``); ``loop_options`` go to
    :class:`TrainConfig` (``result_path``, ``progress_factory``, ``interrupt_check``, ``step_callback`` ...).
    """
    settings.check()
    check_model(model_patcher)
    examples = prepare_examples(sources, settings, analyzer)
    data = encode_examples(model_patcher, vae, clip, examples, settings)
    trained, result = train_on_data(model_patcher, data, settings, adapter, checkpoint_path, resume, **loop_options)
    info = {"images": len(examples), "aligned": sum(examples.aligned), "names": examples.names}
    return FusionTrainOutput(trained, result, info)


def evaluate_loss(model_patcher, adapter: FusionAdapterBase, data: FusionTrainingData, settings: FusionTrainSettings,
                  seed: int = 1234, rounds: int = 2) -> float:
    """Mean noise loss of ``adapter`` over every example, ``rounds`` times, with fixed seeded sigmas and
    noise (the same draws for every adapter, so two adapters compare fairly)."""
    task = task_for(model_patcher, data, settings, adapter)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with task.session(), torch.no_grad():
        for _ in range(rounds):
            for start in range(0, len(data), settings.batch_size):
                rows = list(range(start, min(len(data), start + settings.batch_size)))
                loss = task.loss(data.get_batch(rows), StepContext(0, 0, generator, {}))
                total += float(loss) * len(rows)
                count += len(rows)
    return total / count


def run_paths(name: str) -> tuple[str, str]:
    """(adapter file, training checkpoint) of the run called ``name`` in the models folders: where the node and
    the command line write, so either one resumes a run the other started."""
    return (os.path.join(fusion_save_dir(), name + ".safetensors"),
            os.path.join(save_dir("likeness", "training/fusion"), name + ".safetensors"))


def save_trained_adapter(adapter: FusionAdapterBase, path: str) -> str:
    """Write the adapter file (the engine's key scheme and metadata) atomically, fsync'ed."""
    return atomic_save(adapter.file_state_dict(), path, adapter.file_metadata())
