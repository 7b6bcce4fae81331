"""CLIP (image and text towers) and DINO encoders for the metrics, loaded from local transformers folders.

A folder is what ``save_pretrained`` writes (``config.json`` + ``model.safetensors``; CLIP also its tokenizer,
``vocab.json`` + ``merges.txt``), named relative to ``models/likeness/evaluation/`` or given as a path (held to
the model folders inside a ComfyUI server, host/paths.py). Loading never downloads (``local_files_only``).

Preprocessing is done here in torch on the whole batch (the checkpoints' own recipe, without PIL round trips):

- CLIP: shortest side resized to the model's image size (bicubic, antialiased), centre crop, CLIP mean/std
  (``preprocessor_config.json`` when the folder has one);
- DINO: shortest side resized to 256/224 of the image size, centre crop, ImageNet mean/std (DINO's
  evaluation transform). The embedding is the final layer-normed class token (what DINO's linear probe and the
  DreamBooth DINO score use).

Both return unit vectors, so a cosine is a dot product.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, ModelFileError

logger = logging.getLogger("likeness")

EVALUATION_SUBFOLDER = "evaluation"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE_RATIO = 256 / 224

_CACHE: dict[tuple[str, str, str], object] = {}
_LOCK = threading.Lock()


def fetch_command(name: str, family: str) -> str:
    """The ``models fetch`` command for the manifest files of folder ``name`` (else of every ``family`` folder)."""
    from ..model_hints import fetch_ids, pack_command

    ids = [i for i in fetch_ids([f"likeness/{EVALUATION_SUBFOLDER}"], name) if i.startswith(family)]
    return f"Get the official one with `{pack_command()} models fetch {' '.join(ids)}`." if ids else ""


def resolve_model_folder(name: str, what: str, family: str) -> str:
    """A transformers folder: a name under ``models/likeness/evaluation/`` or a path; clear error when absent."""
    if os.path.isabs(name):
        from ..host.paths import MODEL, resolve_user_path
        path = resolve_user_path(name, MODEL, f"{what} folder")
    else:
        from ..host.folders import resolve
        try:
            path = resolve("likeness", name, subfolder=EVALUATION_SUBFOLDER)
        except FileNotFoundError as exc:
            raise ModelFileError(f"{what} folder: {exc} Put the model's transformers folder (config.json, weights) in "
                                 f"models/likeness/{EVALUATION_SUBFOLDER}/. {fetch_command(name, family)}".rstrip()
                                 ) from exc
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelFileError(f"{path} is not a transformers model folder (no config.json); the {what} needs the folder "
                             f"save_pretrained writes (config.json, model.safetensors).")
    return path


def list_model_folders() -> list[str]:
    """Names of the transformers folders (holding a config.json) under ``models/likeness/evaluation/``."""
    from ..host.folders import list_files

    return sorted({os.path.dirname(f) for f in list_files("likeness", EVALUATION_SUBFOLDER, {".json"})
                   if os.path.basename(f) == "config.json" and os.path.dirname(f)})


def _model_type(path: str) -> str:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        return str(json.load(handle).get("model_type", ""))


def _preprocessor(path: str, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config_path = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(config_path):
        return tuple(mean), tuple(std)
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    return tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))


def _cached(key: tuple[str, str, str], build):
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def _device(device) -> torch.device:
    from ..host.devices import torch_device
    return torch_device(device) if isinstance(device, str) else torch.device(device)


def to_model_input(images: torch.Tensor, side: int, resize_side: int, mean, std) -> torch.Tensor:
    """IMAGE ``[B,H,W,3]`` 0..1 -> normalised ``[B,3,side,side]``: shortest side to ``resize_side``, centre crop."""
    pixels = images[..., :3].permute(0, 3, 1, 2).float()
    height, width = pixels.shape[-2:]
    scale = resize_side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    pixels = pixels[:, :, top:top + side, left:left + side]
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def _batched(images: torch.Tensor, batch_size: int, encode) -> torch.Tensor:
    chunks = [encode(images[start:start + batch_size]) for start in range(0, images.shape[0], max(1, batch_size))]
    return F.normalize(torch.cat(chunks).float(), dim=-1).cpu()


@dataclass
class ClipEncoder:
    """transformers CLIPModel with its tokenizer: projected, unit-length image and text embeddings."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    image_size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_images(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """IMAGE ``[B,H,W,3]`` -> ``[B,D]`` unit vectors."""
        def encode(chunk):
            pixels = to_model_input(chunk, self.image_size, self.image_size, self.mean, self.std)
            dtype = next(self.model.parameters()).dtype
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, dtype)).pooler_output
            return self.model.visual_projection(pooled)

        with torch.inference_mode():
            return _batched(images, batch_size, encode)

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Prompts -> ``[N,D]`` unit vectors (truncated to the text tower's 77 tokens)."""
        limit = int(self.model.config.text_config.max_position_embeddings)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                        max_length=limit, return_tensors="pt")
                text = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                             attention_mask=tokens["attention_mask"].to(self.device))
                out.append(self.model.text_projection(text.pooler_output))
        return F.normalize(torch.cat(out).float(), dim=-1).cpu()


@dataclass
class DinoEncoder:
    """transformers ViTModel with DINO weights: unit-length final class-token embeddings."""

    model: torch.nn.Module
    name: str
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def embed_images(self, images: torch.Tensor, batch_size: int = 16, crop: bool = True) -> torch.Tensor:
        """IMAGE ``[B,H,W,3]`` -> ``[B,D]`` unit vectors; ``crop=False`` resizes square inputs (region crops)
        to the input size without the evaluation transform's centre crop."""
        parameter = next(self.model.parameters())
        resize_side = round(self.image_size * DINO_RESIZE_RATIO) if crop else self.image_size

        def encode(chunk):
            pixels = to_model_input(chunk, self.image_size, resize_side, self.mean, self.std)
            return self.model(pixel_values=pixels.to(parameter.device, parameter.dtype)).last_hidden_state[:, 0]

        with torch.inference_mode():
            return _batched(images, batch_size, encode)


def _checked_folder(name: str, what: str, kind: str, model_type: str, needs: str) -> str:
    """The local folder of ``name``, refused (naming the folder and what is needed) when its config declares
    another transformers ``model_type``."""
    path = resolve_model_folder(name, what, kind)
    found = _model_type(path)
    if found != model_type:
        raise ModelFileError(f"{path} holds a '{found}' model; {needs}")
    return path


def load_clip(name: str, device="auto") -> ClipEncoder:
    """A CLIP model with a text tower from a local transformers folder (see the module doc)."""
    path = _checked_folder(name, "CLIP model", "clip", "clip", "CLIP-T and CLIP-I need a full CLIP model (model_type "
                           "'clip', image and text towers), e.g. openai/clip-vit-large-patch14.")
    target = _device(device)

    def build() -> ClipEncoder:
        from transformers import CLIPModel, CLIPTokenizer

        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True).to(target).eval()
            tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except OSError as exc:
            raise ModelFileError(f"could not load CLIP from {path}: {exc}") from exc
        mean, std = _preprocessor(path, CLIP_MEAN, CLIP_STD)
        return ClipEncoder(model, tokenizer, os.path.basename(path), int(model.config.vision_config.image_size),
                           mean, std)

    return _cached(("clip", path, str(target)), build)


def load_dino(name: str, device="auto") -> DinoEncoder:
    """A DINO ViT (transformers ``ViTModel``, e.g. facebook/dino-vits16) from a local folder."""
    path = _checked_folder(name, "DINO model", "dino", "vit", "the DINO metric needs a ViT (model_type 'vit'), "
                           "e.g. facebook/dino-vits16.")
    target = _device(device)

    def build() -> DinoEncoder:
        from transformers import ViTModel

        try:
            model = ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True).to(target).eval()
        except OSError as exc:
            raise ModelFileError(f"could not load DINO from {path}: {exc}") from exc
        mean, std = _preprocessor(path, IMAGENET_MEAN, IMAGENET_STD)
        return DinoEncoder(model, os.path.basename(path), int(model.config.image_size), mean, std)

    return _cached(("dino", path, str(target)), build)


def check_prompts(prompts, count: int) -> list[str]:
    """A string or ``count`` strings (one per image) -> ``count`` strings."""
    if isinstance(prompts, str):
        return [prompts] * count
    prompts = [str(p) for p in prompts]
    if len(prompts) == 1:
        return prompts * count
    if len(prompts) != count:
        raise InvalidInputError(f"got {len(prompts)} prompts for {count} images; give one prompt or one per image.")
    return prompts
