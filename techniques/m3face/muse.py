"""M3Face's condition generator: text -> face segmentation or landmark image with Muse (aMUSEd), and editing a
condition image by Muse inpainting.

A Muse model is a diffusers aMUSEd folder (``transformer`` UVit2DModel, ``vqvae`` VQModel, ``scheduler``
AmusedScheduler, ``tokenizer``, ``text_encoder``). The English model uses CLIP's ``CLIPTextModelWithProjection``;
the multilingual one an M-CLIP encoder (``mclip.py``). Generation and editing run diffusers' own
``AmusedPipeline`` / ``AmusedInpaintPipeline`` (as the official generate.py and edit.py do), asked for the
token grid; the VQ decoder is then called here the way the pipelines call it, so callers also get the tokens.

One model was trained for both modalities: the caption is prefixed with ``"Generate face segmentation | "`` or
``"Generate face landmark |"`` (the authors' training script), and the same prefix selects the modality here.
Sampling draws from one seeded CPU generator, so a seed gives the same tokens on every device.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ...deps import require
from ...errors import InvalidInputError, ModelFileError

logger = logging.getLogger("likeness")

MODALITY_PREFIXES = {
    "segmentation": "Generate face segmentation | ",
    "landmark": "Generate face landmark |",
}
# component folder -> the diffusers class its config must name
DIFFUSERS_COMPONENTS = {"transformer": "UVit2DModel", "vqvae": "VQModel", "scheduler": "AmusedScheduler"}
CONFIG_FILES = {"transformer": "config.json", "vqvae": "config.json", "scheduler": "scheduler_config.json",
                "text_encoder": "config.json", "tokenizer": "tokenizer_config.json"}
CLIP, MCLIP = "clip", "mclip"
FEATURE = "M3Face's Muse (aMUSEd) condition generator"


@dataclass(eq=False)
class MuseModel:
    """A loaded Muse folder. The weights stay on ``offload_device`` between runs; a run moves them to ``device``."""

    name: str
    path: str
    transformer: Any
    vqvae: Any
    scheduler: Any
    tokenizer: Any
    text_encoder: Any
    text_encoder_kind: str          # CLIP or MCLIP
    device: torch.device            # where it runs
    dtype: torch.dtype              # transformer and text encoder (the VQ model stays float32)
    _pipelines: dict = field(default_factory=dict, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the pipelines make by default: the transformer's token grid times the VQ downscale."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    def pipeline(self, kind: str):
        """The diffusers pipeline ``"text"`` (AmusedPipeline) or ``"inpaint"``, built once. Each gets its own
        scheduler: the inpaint pipeline switches its scheduler to the linear masking schedule."""
        if kind not in self._pipelines:
            diffusers = require("diffusers", FEATURE)
            cls = diffusers.AmusedPipeline if kind == "text" else diffusers.AmusedInpaintPipeline
            scheduler = type(self.scheduler).from_config(self.scheduler.config)
            pipe = cls(vqvae=self.vqvae, tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                       transformer=self.transformer, scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)  # ComfyUI's bar reports progress instead of tqdm
            self._pipelines[kind] = pipe
        return self._pipelines[kind]

    def modules(self) -> tuple[torch.nn.Module, ...]:
        return self.transformer, self.vqvae, self.text_encoder


@dataclass
class MuseResult:
    image: torch.Tensor    # IMAGE [B, H, W, 3] float 0..1 on the CPU
    tokens: torch.Tensor   # [B, h, w] VQ codebook indices the image was decoded from


# --------------------------------------------------------------------------------------------------
# Loading


def _read_json(path: str, folder: str, component: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"Muse folder '{folder}': the {component} config {path} cannot be read ({exc}).") from exc


def _component_config(folder: str, component: str) -> dict:
    """The component's config; ModelFileError naming the folder and component when it is missing."""
    path = os.path.join(folder, component, CONFIG_FILES[component])
    if not os.path.isfile(path):
        raise ModelFileError(
            f"Muse folder '{folder}' has no {component} ({component}/{CONFIG_FILES[component]} is missing). An aMUSEd "
            f"folder holds transformer/, vqvae/, scheduler/, tokenizer/ and text_encoder/ (diffusers layout).")
    return _read_json(path, folder, component)


def text_encoder_kind(folder: str) -> str:
    """CLIP or MCLIP, from what ``text_encoder/config.json`` names; ModelFileError for anything else."""
    from .mclip import MCLIP_ARCHITECTURES, MCLIP_MODEL_TYPE

    config = _component_config(folder, "text_encoder")
    architectures = tuple(config.get("architectures") or ())
    model_type = config.get("model_type")
    if "CLIPTextModelWithProjection" in architectures or model_type == "clip_text_model":
        return CLIP
    if model_type == MCLIP_MODEL_TYPE or set(architectures) & set(MCLIP_ARCHITECTURES):
        return MCLIP
    raise ModelFileError(
        f"Muse folder '{folder}': text_encoder names model_type {model_type!r}, architectures {list(architectures)}; "
        "supported are CLIPTextModelWithProjection (English Muse) and M-CLIP (MultilingualCLIP, multilingual Muse).")


def _check_diffusers_classes(folder: str) -> None:
    for component, expected in DIFFUSERS_COMPONENTS.items():
        found = _component_config(folder, component).get("_class_name")
        if found != expected:
            raise ModelFileError(f"Muse folder '{folder}': {component} is a {found!r}, expected {expected}.")


def _loaded(folder: str, component: str, load):
    """``load()``, with a failure reported as a ModelFileError naming the folder and component."""
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelFileError(f"Muse folder '{folder}': the {component} cannot be loaded ({exc}).") from exc


def _load_tokenizer(folder: str, kind: str, text_config):
    """The tokenizer its config names (AutoTokenizer); a folder without ``tokenizer_config.json`` (bare vocabulary
    files) is read as the tokenizer of its text encoder. Its length is held to what the encoder has positions for."""
    import transformers

    path = os.path.join(folder, "tokenizer")
    if not os.path.isdir(path):
        _component_config(folder, "tokenizer")   # raises: the folder has no tokenizer
    if os.path.isfile(os.path.join(path, CONFIG_FILES["tokenizer"])):
        cls = transformers.AutoTokenizer
    else:
        cls = transformers.CLIPTokenizer if kind == CLIP else transformers.XLMRobertaTokenizer
    tokenizer = _loaded(folder, "tokenizer", lambda: cls.from_pretrained(path))
    # XLM-R numbers positions after the padding index, so it has pad_token_id + 1 fewer usable positions
    offset = text_config.pad_token_id + 1 if kind == MCLIP else 0
    tokenizer.model_max_length = min(tokenizer.model_max_length, text_config.max_position_embeddings - offset)
    return tokenizer


def _load_text_side(folder: str, kind: str, dtype: torch.dtype):
    import transformers

    from .mclip import MCLIPTextEncoder

    encoder_cls = transformers.CLIPTextModelWithProjection if kind == CLIP else MCLIPTextEncoder
    text_encoder = _loaded(folder, "text_encoder", lambda: encoder_cls.from_pretrained(
        os.path.join(folder, "text_encoder")).to(dtype).eval())
    return _load_tokenizer(folder, kind, text_encoder.config), text_encoder


def _check_dimensions(folder: str, kind: str) -> None:
    """The text encoder's pooled and sequence widths must be what the transformer was built for (checked on the
    configs, before any weights are read)."""
    text = _component_config(folder, "text_encoder")
    transformer = _component_config(folder, "transformer")
    pooled = text.get("projection_dim") if kind == CLIP else text.get("numDims")
    pairs = {"pooled text embedding (cond_embed_dim)": (pooled, transformer.get("cond_embed_dim")),
             "text hidden states (encoder_hidden_size)": (text.get("hidden_size"),
                                                          transformer.get("encoder_hidden_size"))}
    for what, (have, want) in pairs.items():
        if have != want:
            raise ModelFileError(f"Muse folder '{folder}': the text_encoder gives a {what} of width {have}, "
                                 f"the transformer expects {want}. The components come from different models.")


def load_muse(folder: str, device_preference: str = "auto", name: str | None = None) -> MuseModel:
    """Load an aMUSEd folder. ModelFileError names the folder and the missing, unknown or broken component."""
    from ...host.devices import half_precision_dtype, offload_device, torch_device

    diffusers = require("diffusers", FEATURE)
    if not os.path.isdir(folder):
        raise ModelFileError(f"Muse folder '{folder}' does not exist.")
    _check_diffusers_classes(folder)
    kind = text_encoder_kind(folder)
    _check_dimensions(folder, kind)
    device = torch_device(device_preference)
    dtype = half_precision_dtype(device)
    transformer = _loaded(folder, "transformer", lambda: diffusers.UVit2DModel.from_pretrained(
        os.path.join(folder, "transformer"), torch_dtype=dtype).eval())
    vqvae = _loaded(folder, "vqvae", lambda: diffusers.VQModel.from_pretrained(os.path.join(folder, "vqvae")).eval())
    scheduler = _loaded(folder, "scheduler", lambda: diffusers.AmusedScheduler.from_pretrained(
        os.path.join(folder, "scheduler")))
    tokenizer, text_encoder = _load_text_side(folder, kind, dtype)
    model = MuseModel(name or os.path.basename(os.path.normpath(folder)), folder, transformer, vqvae, scheduler,
                      tokenizer, text_encoder, kind, device, dtype)
    _move(model, offload_device())
    logger.info("Likeness: Muse '%s' loaded (%s text encoder, %d px, %s on %s)", model.name, kind, model.resolution,
                str(dtype).removeprefix("torch."), device)
    return model


# --------------------------------------------------------------------------------------------------
# Running


def _move(model: MuseModel, device: torch.device) -> None:
    for module in model.modules():
        module.to(device)


class _OnDevice:
    """Moves the model to its run device and, whatever happens, back to the offload device afterwards."""

    def __init__(self, model: MuseModel):
        self.model = model

    def __enter__(self) -> MuseModel:
        _move(self.model, self.model.device)
        return self.model

    def __exit__(self, *exc) -> None:
        from ...host.devices import offload_device

        _move(self.model, offload_device())


def prefixed_prompt(prompt: str, modality: str) -> str:
    """The text the Muse model was trained on: the modality's prefix, then the caption."""
    if modality not in MODALITY_PREFIXES:
        raise InvalidInputError(f"modality must be one of {sorted(MODALITY_PREFIXES)}, not {modality!r}.")
    return MODALITY_PREFIXES[modality] + (prompt or "").strip()


def _progress_callback(total: int):
    from ...host.progress import Progress

    progress = Progress(total, "Muse")

    def callback(step: int, _timestep, _latents) -> None:
        # step counts the whole schedule (inpainting with strength < 1 starts part-way). update_absolute raises
        # the host's interrupt exception when cancel was pressed.
        progress.update_absolute(step + 1)

    return callback


def decode_tokens(model: MuseModel, tokens: torch.Tensor) -> torch.Tensor:
    """VQ tokens [B, h, w] -> IMAGE [B, h*f, w*f, 3] on the CPU, decoded as the aMUSEd pipelines decode."""
    vqvae = model.vqvae
    batch, height, width = tokens.shape
    with torch.inference_mode():
        pixels = vqvae.decode(tokens.to(vqvae.device), force_not_quantize=True,
                              shape=(batch, height, width, vqvae.config.latent_channels)).sample.clip(0, 1)
    return pixels.permute(0, 2, 3, 1).float().cpu()


def encode_tokens(model: MuseModel, image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] -> the VQ token grid [B, H/f, W/f] (what the inpaint pipeline starts from)."""
    vqvae = model.vqvae
    with torch.inference_mode():
        latents = vqvae.encode(image.permute(0, 3, 1, 2).to(vqvae.device, vqvae.dtype)).latents
        batch, _, height, width = latents.shape
        return vqvae.quantize(latents)[2][2].reshape(batch, height, width).cpu()


def _output_size(model: MuseModel, size: int) -> int:
    """``size`` (0: the model's own resolution), refused unless the VQ grid can take it."""
    size = int(size) or model.resolution
    if size % model.vae_scale_factor:
        raise InvalidInputError(f"'size' {size} is not a multiple of the Muse VQ downscale {model.vae_scale_factor}.")
    return size


def text_to_condition(model: MuseModel, prompt: str, modality: str, steps: int = 12, guidance: float = 10.0,
                      temperature: float = 2.0, seed: int = 0, batch_size: int = 1, size: int = 0) -> MuseResult:
    """Generate ``batch_size`` square condition images of ``size`` pixels (0: the model's resolution, from its
    config); the temperature decays linearly to 0 over the steps."""
    from ...host.progress import check_interrupted

    text = prefixed_prompt(prompt, modality)
    size = _output_size(model, size)
    check_interrupted()
    generator = torch.Generator("cpu").manual_seed(int(seed))
    with _OnDevice(model), torch.inference_mode():
        tokens = model.pipeline("text")(
            text, height=size, width=size, num_inference_steps=int(steps), guidance_scale=float(guidance),
            generator=generator, num_images_per_prompt=int(batch_size), temperature=(float(temperature), 0.0),
            output_type="latent", callback=_progress_callback(int(steps))).images
        image = decode_tokens(model, tokens)
    return MuseResult(image, tokens.cpu())


def _check_edit_inputs(model: MuseModel, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask as [B, H, W] for the image batch; InvalidInputError for sizes the VQ grid cannot take."""
    factor = model.vae_scale_factor
    _, height, width, _ = image.shape
    if height % factor or width % factor:
        raise InvalidInputError(f"'condition' is {width}x{height}; the Muse VQ model needs sides that are multiples "
                                f"of {factor} (the model's own size is {model.resolution}). Resize it first.")
    mask = mask if mask.ndim == 3 else mask.unsqueeze(0)
    if mask.shape[0] not in (1, image.shape[0]):
        raise InvalidInputError(f"'mask' has {mask.shape[0]} masks for {image.shape[0]} condition images; give one "
                                "mask or one per image.")
    return mask.expand(image.shape[0], -1, -1)


def token_mask(model: MuseModel, mask: torch.Tensor, size) -> torch.Tensor:
    """MASK [1, H', W'] -> [1, 1, h, w] on the token grid of an image of ``size`` (H, W): the share of white pixels
    in each token's cell. The pipeline binarises it at 0.5, so a token is regenerated when at least half of its
    cell is white (handing the pipeline the full-size mask would sample one pixel per token)."""
    height, width = (int(side) // model.vae_scale_factor for side in size)
    return torch.nn.functional.interpolate(mask.unsqueeze(1).float(), size=(height, width), mode="area")


def edit_condition(model: MuseModel, image: torch.Tensor, mask: torch.Tensor, prompt: str, modality: str,
                   steps: int = 12, guidance: float = 10.0, temperature: float = 2.0, seed: int = 0,
                   strength: float = 1.0) -> MuseResult:
    """Regenerate the masked part (white = regenerate; a token where at least half of its cell is white) of each
    condition image under the prompt; the other tokens are kept, as in diffusers' AmusedInpaintPipeline."""
    from ...host.progress import check_interrupted

    text = prefixed_prompt(prompt, modality)
    masks = _check_edit_inputs(model, image, mask)
    check_interrupted()
    generator = torch.Generator("cpu").manual_seed(int(seed))
    pipe = model.pipeline("inpaint")
    tokens = []
    with _OnDevice(model), torch.inference_mode():
        for index in range(image.shape[0]):
            condition = image[index:index + 1].permute(0, 3, 1, 2).float()
            mask_image = token_mask(model, masks[index:index + 1], condition.shape[-2:])
            if not bool((mask_image >= 0.5).any()):
                # nothing to regenerate: the scheduler would still re-mask one token, so the image only round-trips
                logger.warning("Likeness M3Face Edit Condition: the mask of image %d covers no token; kept as is.", index)
                tokens.append(encode_tokens(model, image[index:index + 1]))
                continue
            tokens.append(pipe(text, image=condition, mask_image=mask_image, strength=float(strength),
                               num_inference_steps=int(steps), guidance_scale=float(guidance), generator=generator,
                               temperature=(float(temperature), 0.0), output_type="latent",
                               callback=_progress_callback(int(steps))).images.cpu())
        tokens = torch.cat(tokens)
        result = decode_tokens(model, tokens)
    return MuseResult(result, tokens)
