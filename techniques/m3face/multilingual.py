"""AltDiffusion's multilingual text encoder (XLM-R + projection) as a prompt encoder for M3Face's mlin branches.

M3Face's multilingual FaceControlNets were trained on a BAAI AltDiffusion base (most likely AltDiffusion-m18),
whose text encoder is diffusers' ``RobertaSeriesModelWithTransformation``: an XLM-RoBERTa encoder followed by a
linear projection. Without ``has_pre_transformation`` the last hidden state goes through ``transformation``; with
it, the penultimate hidden state goes through ``pre_LN`` and ``transformation_pre`` (the ``transformation`` weights
then exist but are unused). The per-token projection (``projection_state``, 77 tokens) is the UNet's
cross-attention context, which is what ``AltDiffusionPipeline.encode_prompt`` passes on.

ComfyUI has no XLM-R text encoder, so this module rebuilds the class on transformers' ``XLMRobertaModel`` (a
ComfyUI requirement, unlike diffusers' deprecated AltDiffusion code) with the same parameter names: a checkpoint in
the official key layout loads key for key. The only keys dropped are those the diffusers class ignores itself (the
unused pooler, ``logit_scale``) and the ``position_ids`` buffer older checkpoints store.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...deps import require
from ...errors import CheckpointLayoutError, InvalidInputError

logger = logging.getLogger("likeness")

# Keys of RobertaSeriesConfig that are not XLM-R settings (read by this module instead).
PROJECTION_CONFIG_KEYS = ("project_dim", "pooler_fn", "learn_encoder", "use_attention_mask", "has_pre_transformation")
# Config entries that describe the file, not the architecture.
FILE_CONFIG_KEYS = ("architectures", "_name_or_path", "model_type", "torch_dtype", "dtype", "transformers_version")
# Checkpoint keys RobertaSeriesModelWithTransformation ignores when it loads (its _keys_to_ignore_on_load_*).
IGNORED_KEY_PREFIXES = ("roberta.pooler.", "logit_scale", "roberta.embeddings.position_ids")
# AltDiffusion's prompt length (its tokenizer's model_max_length; CLIP's 77 tokens).
DEFAULT_MAX_LENGTH = 77


@dataclass(frozen=True)
class ProjectionSettings:
    """The projection part of a RobertaSeriesConfig, with diffusers' defaults for absent keys."""
    project_dim: int
    has_pre_transformation: bool
    use_attention_mask: bool

    @classmethod
    def from_config(cls, config: Mapping) -> ProjectionSettings:
        return cls(project_dim=int(config.get("project_dim", 512)),
                   has_pre_transformation=bool(config.get("has_pre_transformation", False)),
                   use_attention_mask=bool(config.get("use_attention_mask", True)))


def xlm_roberta_config(config: Mapping):
    """transformers' ``XLMRobertaConfig`` for the encoder part of a RobertaSeriesConfig dict."""
    transformers = require("transformers", "M3Face's multilingual text encoder")
    skip = set(PROJECTION_CONFIG_KEYS) | set(FILE_CONFIG_KEYS)
    values = {k: v for k, v in config.items() if k not in skip}
    for key, default in (("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2)):
        values.setdefault(key, default)  # RobertaSeriesConfig's defaults
    return transformers.XLMRobertaConfig(**values)


class MultilingualTextEncoder(nn.Module):
    """XLM-R + projection with the parameter names of ``RobertaSeriesModelWithTransformation``.

    ``forward(input_ids, attention_mask)`` returns that class's ``projection_state`` ``[B, T, project_dim]``.
    """

    def __init__(self, config: Mapping):
        super().__init__()
        transformers = require("transformers", "M3Face's multilingual text encoder")
        self.settings = ProjectionSettings.from_config(config)
        encoder_config = xlm_roberta_config(config)
        self.roberta = transformers.XLMRobertaModel(encoder_config, add_pooling_layer=False)
        hidden = encoder_config.hidden_size
        self.transformation = nn.Linear(hidden, self.settings.project_dim)
        if self.settings.has_pre_transformation:
            self.transformation_pre = nn.Linear(hidden, self.settings.project_dim)
            self.pre_LN = nn.LayerNorm(hidden, eps=encoder_config.layer_norm_eps)

    @property
    def context_dim(self) -> int:
        return self.settings.project_dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        pre = self.settings.has_pre_transformation
        outputs = self.roberta(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=pre,
                               return_dict=True)
        if pre:
            return self.transformation_pre(self.pre_LN(outputs.hidden_states[-2]))
        return self.transformation(outputs.last_hidden_state)


def load_official_state_dict(encoder: MultilingualTextEncoder, state_dict: Mapping[str, torch.Tensor],
                             source: str) -> None:
    """Load a state dict in RobertaSeriesModelWithTransformation's key layout; every other key must match.

    Raises CheckpointLayoutError naming ``source`` and the first missing / unexpected keys otherwise.
    """
    kept = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_KEY_PREFIXES)}
    missing, unexpected = encoder.load_state_dict(kept, strict=False)
    if missing or unexpected:
        raise CheckpointLayoutError(
            f"{source} is not an AltDiffusion text encoder (RobertaSeriesModelWithTransformation) of the configured "
            f"shape: {len(missing)} missing keys {sorted(missing)[:3]}, {len(unexpected)} unexpected keys "
            f"{sorted(unexpected)[:3]}.")


@dataclass
class PromptTokenizer:
    """An XLM-R tokenizer (transformers) and the fixed prompt length AltDiffusion pads to."""
    tokenizer: object
    max_length: int = DEFAULT_MAX_LENGTH

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``[B, max_length]`` (padded and truncated like the pipeline)."""
        batch = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]


def prompt_length(tokenizer, requested: int = 0) -> int:
    """``requested`` when positive, else the tokenizer's ``model_max_length`` when it is a real limit, else 77."""
    if requested > 0:
        return int(requested)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max <= 512:
        return model_max
    return DEFAULT_MAX_LENGTH


def use_mask(encoder: MultilingualTextEncoder, mode: str) -> bool:
    """Whether to pass the attention mask: ``auto`` follows the config's ``use_attention_mask`` (as the pipeline
    does), ``on`` / ``off`` force it (the DEV ControlNet trainer encoded prompts without the mask)."""
    if mode == "auto":
        return encoder.settings.use_attention_mask
    if mode in ("on", "off"):
        return mode == "on"
    raise InvalidInputError(f"attention_mask must be auto, on or off, not {mode!r}")


def encode_prompts(encoder: MultilingualTextEncoder, tokenizer: PromptTokenizer, texts: Sequence[str],
                   mask_mode: str = "auto", device: torch.device | None = None) -> torch.Tensor:
    """Per-token prompt embeddings ``[B, max_length, project_dim]`` (float32, on CPU) for ``texts``."""
    if not texts:
        raise InvalidInputError("no prompt to encode")
    input_ids, attention_mask = tokenizer(texts)
    param = next(encoder.parameters())
    device = device or param.device
    mask = attention_mask.to(device) if use_mask(encoder, mask_mode) else None
    with torch.no_grad():
        context = encoder(input_ids.to(device), attention_mask=mask)
    return context.float().cpu()
