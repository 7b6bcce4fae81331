"""M3Face Imagic editing: reconstruct one photo with a frozen ControlNet-guided SD model, then edit it.

The procedure follows M3Face's edit script as its public DEV prototype has it (``training/imagic/edit.py``,
see the pack's M3Face notes); both training stages are :class:`~...trainers.task.TrainingTask` s run by the
pack's one loop (progress, cancel, atomic checkpoints, exact resume, loss curve):

1. **Embedding** (:class:`EmbeddingStage`): the target prompt's text-encoder output is optimised (Adam,
   lr 1e-3, 500 steps) to reconstruct the photo: per step a fresh noise and a uniform timestep, the noised
   photo latent goes through the ControlNet (fed the *original* condition map and the embedding) and the UNet
   with its residuals; the loss is the model's noise loss (epsilon-MSE for SD1.5). UNet and ControlNet are frozen.
2. **Fine-tune** (:class:`FinetuneStage`): with that embedding fixed, UNet weights are trained on the same
   loss (Adam, lr 5e-5, 1000 steps): the official up-block subset (:mod:`.imagic_weights`), or a LoRA on its
   attention layers for small GPUs. The ControlNet stays frozen and keeps the original condition map.

Sampling then uses :meth:`.imagic_embedding.ImagicEmbedding.interpolate` with the *edited* condition map
(stock Apply ControlNet) on the fine-tuned MODEL, which carries the trained weights as ComfyUI weight
patches (the shared model is never modified). Adam is the loop's AdamW with weight decay 0 (the same update).

Where the pack differs from the script, by design: the photo latent is what ComfyUI's VAE Encode gives (the
script draws one sample of the posterior), the timestep is drawn through the model's own schedule object,
and the ControlNet residuals come from ComfyUI's ControlNet exactly as at sampling time (hint resized to the
latent, strength applied).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import InvalidInputError
from ...host.attention import forward_transformer_options
from ...host.controlnet import training_control
from ...host.folders import LORA_SUBFOLDER, save_dir
from ...host.training import load_for_training
from ...host.weights import add_lora_state_dict
from ...safetensors_io import atomic_save
from ...trainers import losses
from ...trainers.datasets import center_square, resize_center_crop
from ...trainers.loop import LrGroup, StepContext, TrainConfig, TrainingCancelled, TrainResult, train
from ...trainers.memory import checkpointed_blocks, trims_cpu_memory
from ...trainers.precision import check_precision, compute_dtype, compute_precision
from ...trainers.task import TrainingTask, run_field
from ..facea_net.lora import autograd_safe_weights
from .imagic_embedding import ImagicEmbedding, save_embedding
from .imagic_weights import (
    DEFAULT_LAYERS,
    UP_BLOCK_LAYERS,
    subset_lora,
    subset_parameter_names,
    trainable_copies,
    weight_diffs,
)

logger = logging.getLogger("likeness")

FINETUNE_MODES = ("up_blocks", "lora")
STEM = "{}"
# kind -> (ComfyUI folder, subfolder, file name with STEM where the run's name goes)
RUN_FILES = {
    "embedding": ("likeness", "m3face_imagic", STEM + ".safetensors"),
    "weights": ("loras", LORA_SUBFOLDER, "m3face_imagic_" + STEM + ".safetensors"),
    "embedding_checkpoint": ("likeness", "training", "m3face_imagic_" + STEM + "_embedding.safetensors"),
    "finetune_checkpoint": ("likeness", "training", "m3face_imagic_" + STEM + "_finetune.safetensors"),
}


# ------------------------------------------------------------------------------------- settings

@dataclass
class EmbeddingStageSettings:
    """Stage 1; ``asdict`` minus the run fields is its resume fingerprint."""

    steps: int = run_field(500)
    lr: float = 1e-3
    seed: int = 0
    control_strength: float = 1.0
    precision: str = "auto"
    checkpoint_every: int = run_field(100)
    label: str = run_field("M3Face Imagic 1/2: embedding")


@dataclass
class FinetuneStageSettings:
    """Stage 2; ``asdict`` minus the run fields is its resume fingerprint."""

    steps: int = run_field(1000)
    lr: float = 5e-5
    mode: str = "up_blocks"
    layers: str = DEFAULT_LAYERS
    lora_rank: int = 0                       # 0 in up_blocks mode
    seed: int = 0
    control_strength: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = run_field(False)   # same training, less memory
    checkpoint_every: int = run_field(100)
    label: str = run_field("M3Face Imagic 2/2: fine-tune")


@dataclass
class ImagicSettings:
    """Everything that shapes an Imagic run (defaults: the official edit script's)."""

    embedding_steps: int = 500
    embedding_lr: float = 1e-3
    finetune_steps: int = 1000
    finetune_lr: float = 5e-5
    mode: str = "up_blocks"
    layers: str = DEFAULT_LAYERS
    lora_rank: int = 16
    seed: int = 0
    resolution: int = 512
    control_strength: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100

    def check(self) -> None:
        if self.embedding_steps < 1 or self.finetune_steps < 1:
            raise InvalidInputError("Both Imagic stages need at least one step.")
        for name in ("embedding_lr", "finetune_lr"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise InvalidInputError(f"{name} must lie in (0, 1], got {getattr(self, name)}.")
        if self.mode not in FINETUNE_MODES:
            raise InvalidInputError(f"Imagic fine-tune mode must be one of {', '.join(FINETUNE_MODES)}.")
        if self.layers not in UP_BLOCK_LAYERS:
            raise InvalidInputError(f"Imagic layers must be one of {', '.join(UP_BLOCK_LAYERS)}.")
        if self.mode == "lora" and self.lora_rank < 1:
            raise InvalidInputError("The LoRA rank must be at least 1.")
        if self.resolution % 64 or self.resolution < 64:
            raise InvalidInputError(f"The Imagic resolution must be a multiple of 64, got {self.resolution}.")
        check_precision(self.precision)

    def embedding_stage(self) -> EmbeddingStageSettings:
        return EmbeddingStageSettings(steps=self.embedding_steps, lr=self.embedding_lr, seed=self.seed,
                                      control_strength=self.control_strength, precision=self.precision,
                                      checkpoint_every=self.checkpoint_every)

    def finetune_stage(self) -> FinetuneStageSettings:
        return FinetuneStageSettings(steps=self.finetune_steps, lr=self.finetune_lr, mode=self.mode,
                                     layers=self.layers, lora_rank=self.lora_rank if self.mode == "lora" else 0,
                                     seed=self.seed, control_strength=self.control_strength,
                                     precision=self.precision, gradient_checkpointing=self.gradient_checkpointing,
                                     checkpoint_every=self.checkpoint_every)


# ------------------------------------------------------------------------------------- data

def _digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class ImagicData:
    """The one training item: the photo's model-space latent; ``fingerprint`` names the photo, the condition
    map and the embedding the stage starts from (resume refuses anything else)."""

    latent: torch.Tensor        # [1, 4, h, w] CPU float
    fingerprint: str

    def __len__(self) -> int:
        return 1

    def get_batch(self, indices: list[int]) -> dict:
        return {"latent": self.latent.index_select(0, torch.tensor(indices, dtype=torch.long))}


def single_image(image: torch.Tensor, what: str) -> torch.Tensor:
    """The one image ``[1, H, W, 3]`` of an IMAGE input (Imagic edits one photo with one condition map)."""
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[-1] < 3:
        raise InvalidInputError(f"'{what}' must be one image [1, H, W, 3]; got {tuple(image.shape)}.")
    return image[..., :3]


def encode_photo(model_patcher, vae, photo: torch.Tensor, resolution: int) -> torch.Tensor:
    """The photo cut to its centred square, resized to ``resolution`` and VAE-encoded into model space."""
    pixels = resize_center_crop(center_square(photo[0].float()), resolution)[None]
    with torch.no_grad():
        latent = vae.encode(pixels)
        return model_patcher.model.process_latent_in(latent).float().cpu()


# ------------------------------------------------------------------------------------- the two stages

class _ImagicStage(TrainingTask):
    """What both stages share: the model and ControlNet loaded for training, frozen, and the noise loss."""

    technique = "m3face_imagic"
    shardable = False             # one photo: nothing to split between data-parallel ranks
    control_needs_grad = False    # stage 1 sends gradients through the ControlNet to the embedding

    def __init__(self, model_patcher, control_net, hint: torch.Tensor, data: ImagicData, settings):
        self.model_patcher = model_patcher
        self.control_net = control_net
        self.hint = hint
        self.data = data
        self.settings = settings
        self.label = settings.label

    @contextlib.contextmanager
    def session(self):
        s = self.settings
        with training_control(self.control_net, self.hint, self.model_patcher, s.control_strength) as control, \
                contextlib.ExitStack() as stack:
            self.device = load_for_training(self.model_patcher, control.patchers)
            self.base = self.model_patcher.model
            self.unet = self.base.diffusion_model
            self.sampling = self.model_patcher.get_model_object("model_sampling")
            self.options = forward_transformer_options(self.model_patcher)
            self.control = control
            self.compute_dtype = compute_dtype(s.precision, self.device)
            for module in (self.unet, *control.modules):
                stack.enter_context(autograd_safe_weights(module))
            self.enter_stage(stack)
            yield self

    def enter_stage(self, stack: contextlib.ExitStack) -> None:
        """Stage-specific set-up inside the session (trainable tensors, adapters)."""

    @abstractmethod
    def context(self, ctx: StepContext) -> torch.Tensor:
        """The text context of this step's UNet and ControlNet calls."""

    def data_fingerprint(self) -> str:
        return self.data.fingerprint

    def loss(self, batch: dict, ctx: StepContext) -> torch.Tensor:
        latent = batch["latent"].to(self.device)
        context = self.context(ctx)
        sigma = losses.sample_sigmas(self.sampling, latent.shape[0], ctx.generator).to(self.device)
        noise = ctx.randn(latent.shape, device=self.device)
        x_t = losses.noised(self.sampling, sigma, noise, latent)
        with compute_precision(self.compute_dtype, self.device):
            with torch.set_grad_enabled(self.control_needs_grad):
                control = self.control.residuals(x_t, sigma, context)
            denoised = self.base.apply_model(x_t, sigma, c_crossattn=context,
                                             transformer_options=self.control.transformer_options(self.options,
                                                                                                 control))
        return losses.noise_prediction_loss(self.sampling, sigma, x_t, denoised.float(), latent)


class EmbeddingStage(_ImagicStage):
    """Stage 1: the target embedding, optimised to reconstruct the photo (the models frozen)."""

    control_needs_grad = True

    def __init__(self, model_patcher, control_net, hint, data: ImagicData, settings: EmbeddingStageSettings,
                 target: torch.Tensor, pooled: torch.Tensor | None = None):
        super().__init__(model_patcher, control_net, hint, data, settings)
        with torch.inference_mode(False):
            self.target = target.detach().float().cpu().clone()
            self.pooled = None if pooled is None else pooled.detach().float().cpu().clone()
            self.embedding = self.target.clone()

    def enter_stage(self, stack: contextlib.ExitStack) -> None:
        self.embedding = self.embedding.to(self.device)

    def trainables(self) -> dict[str, torch.Tensor]:
        return {"embedding": self.embedding}

    def lr_groups(self) -> list[LrGroup]:
        return [LrGroup(lr=self.settings.lr, weight_decay=0.0, name="embedding")]

    def context(self, ctx: StepContext) -> torch.Tensor:
        return ctx.params["embedding"]

    def finish(self, result: TrainResult) -> ImagicEmbedding:
        optimized = result.params["embedding"].detach().float().cpu().clone()
        metadata = {**dataclasses.asdict(self.settings), "trained_steps": result.step,
                    "final_loss": result.losses[-1] if result.losses else None}
        return ImagicEmbedding(self.target, optimized, self.pooled, metadata)

    def write_result(self, artefact: ImagicEmbedding, path: str) -> list[str]:
        return [save_embedding(artefact, path)]


class FinetuneStage(_ImagicStage):
    """Stage 2: UNet weights (the up-block subset, or a LoRA on its attention) with the embedding fixed."""

    def __init__(self, model_patcher, control_net, hint, data: ImagicData, settings: FinetuneStageSettings,
                 embedding: torch.Tensor):
        super().__init__(model_patcher, control_net, hint, data, settings)
        with torch.inference_mode(False):   # nodes run in inference mode; the LoRA saves the context for backward
            self.embedding = embedding.detach().float().cpu().clone()
        self.weights: dict[str, torch.Tensor] = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.lora = None

    def enter_stage(self, stack: contextlib.ExitStack) -> None:
        s = self.settings
        self.fixed_context = self.embedding.to(self.device)
        if s.mode == "up_blocks":
            names = subset_parameter_names(self.unet, s.layers)
            params = dict(self.unet.named_parameters())
            self.originals = {n: params[n] for n in names}
            self.weights = stack.enter_context(trainable_copies(self.unet, names))
        else:
            self.lora = subset_lora(self.unet, s.layers, s.lora_rank, s.seed)
            stack.enter_context(self.lora.attached(self.unet))
        stack.enter_context(checkpointed_blocks(self.unet, s.gradient_checkpointing, trims_cpu_memory(self.device)))

    def trainables(self) -> dict[str, torch.Tensor]:
        if self.lora is None:
            return {f"unet.{name}": p for name, p in self.weights.items()}
        out = {}
        for name, adapter in self.lora.items():
            out[f"lora.{name}.down"] = adapter.down
            out[f"lora.{name}.up"] = adapter.up
        return out

    def lr_groups(self) -> list[LrGroup]:
        return [LrGroup(lr=self.settings.lr, weight_decay=0.0, name=self.settings.mode)]

    def context(self, ctx: StepContext) -> torch.Tensor:
        return self.fixed_context

    def finish(self, result: TrainResult) -> dict[str, torch.Tensor]:
        """The trained weights as a ComfyUI LoRA-format state dict (``.diff`` keys, or LoRA up/down/alpha)."""
        if self.lora is not None:
            return self.lora.native_state_dict()
        trained = {name: result.params[f"unet.{name}"] for name in self.originals}
        return weight_diffs(trained, self.originals)

    def write_result(self, artefact: dict[str, torch.Tensor], path: str) -> list[str]:
        metadata = {"likeness.technique": "m3face_imagic", "mode": self.settings.mode, "layers": self.settings.layers}
        return [atomic_save(artefact, path, metadata)]


# ------------------------------------------------------------------------------------- the run

@dataclass
class ImagicOutput:
    model: Any                                  # MODEL clone with the fine-tuned weights as patches
    embedding: ImagicEmbedding
    weights: dict[str, torch.Tensor]            # ComfyUI LoRA-format state dict of the fine-tune
    embedding_result: TrainResult
    finetune_result: TrainResult
    loss_curve: torch.Tensor                    # IMAGE [1, H, 2W, 3]: stage 1 | stage 2


def run_paths(name: str) -> dict[str, str]:
    """The files of the Imagic run called ``name``: embedding, fine-tuned weights and both checkpoints."""
    return {kind: os.path.join(save_dir(folder, sub), template.replace(STEM, name))
            for kind, (folder, sub, template) in RUN_FILES.items()}


def _finetune_resume(resume: str, embedding_result: TrainResult, steps: int) -> str:
    """Stage 2's resume mode: ``require`` holds only when stage 1 had finished before this run (otherwise there
    cannot be a stage-2 checkpoint for the new embedding yet)."""
    if resume == "require" and embedding_result.start_step < steps:
        return "auto"
    return resume


def run_imagic(model_patcher, vae, control_net, photo: torch.Tensor, condition: torch.Tensor,
               target: torch.Tensor, settings: ImagicSettings, pooled: torch.Tensor | None = None,
               paths: dict[str, str] | None = None, resume: str = "fresh", **loop_options) -> ImagicOutput:
    """Both Imagic stages on one photo and its original condition map; see the module doc.

    ``paths`` (from :func:`run_paths`): the checkpoints (both stages resume per ``resume``) and the result
    files; without it nothing is written. ``loop_options`` go to both stages' :class:`TrainConfig`
    (``progress_factory``, ``step_callback``, ``interrupt_check`` ...).
    """
    settings.check()
    photo, hint = single_image(photo, "photo"), single_image(condition, "condition")
    paths = paths or {}
    latent = encode_photo(model_patcher, vae, photo, settings.resolution)
    with torch.inference_mode(False):
        fingerprint = _digest(latent, hint, target)
    first_settings = settings.embedding_stage()
    first = train(EmbeddingStage(model_patcher, control_net, hint, ImagicData(latent, fingerprint), first_settings,
                                 target, pooled),
                  TrainConfig.from_settings(first_settings, checkpoint_path=paths.get("embedding_checkpoint"),
                                            resume=resume, result_path=paths.get("embedding"), **loop_options))
    if first.cancelled:
        raise TrainingCancelled()
    embedding: ImagicEmbedding = first.artefact
    second_settings = settings.finetune_stage()
    data = ImagicData(latent, _digest(latent, hint, target, embedding.optimized))
    second = train(FinetuneStage(model_patcher, control_net, hint, data, second_settings, embedding.optimized),
                   TrainConfig.from_settings(second_settings, checkpoint_path=paths.get("finetune_checkpoint"),
                                             resume=_finetune_resume(resume, first, first_settings.steps),
                                             result_path=paths.get("weights"), **loop_options))
    if second.cancelled:
        raise TrainingCancelled()
    patched = add_lora_state_dict(model_patcher, second.artefact, 1.0)
    curve = torch.cat([first.loss_curve, second.loss_curve], dim=2)
    return ImagicOutput(patched, embedding, second.artefact, first, second, curve)
