"""The multilingual text encoder of M3Face's Muse: M-CLIP (an XLM-R transformer plus a linear projection).

The official ``utils/mclip.py`` wraps an M-CLIP model so that aMUSEd's pipelines can call it like CLIP's
``CLIPTextModelWithProjection``: ``text_encoder(input_ids, return_dict=True, output_hidden_states=True)`` must
return ``text_embeds`` (the pooled vector the UVit gets as ``pooled_text_emb``) and ``hidden_states`` (the
pipeline takes the penultimate layer as ``encoder_hidden_states``). M-CLIP pools by the attention-masked mean of
the last hidden state and projects it with ``LinearTransformation``; its checkpoints name the XLM-R weights
``transformer.*`` and the configs carry ``transformerDimensions`` and ``numDims``. The pipelines pass no attention
mask, so it is rebuilt from the padding token: padding neither attends nor counts in the mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, XLMRobertaConfig, XLMRobertaModel

MCLIP_MODEL_TYPE = "M-CLIP"
MCLIP_ARCHITECTURES = ("MultilingualCLIP", "MCLIPTextEncoder")


class MCLIPConfig(XLMRobertaConfig):
    """XLM-R settings plus the projection: ``transformerDimensions`` (XLM-R width) -> ``numDims``."""

    model_type = MCLIP_MODEL_TYPE

    def __init__(self, transformerDimensions: int = 1024, numDims: int = 768, **kwargs):  # noqa: N803 (M-CLIP keys)
        self.transformerDimensions = transformerDimensions
        self.numDims = numDims
        super().__init__(**kwargs)


@dataclass
class MCLIPOutput:
    """The fields aMUSEd's pipelines read from a CLIP text encoder's output."""

    text_embeds: torch.Tensor                 # [B, numDims]
    last_hidden_state: torch.Tensor           # [B, T, hidden]
    hidden_states: tuple[torch.Tensor, ...]   # embeddings + every layer, each [B, T, hidden]


class MCLIPTextEncoder(PreTrainedModel):
    """M-CLIP with a CLIP-text-encoder call signature (see the module docstring)."""

    config_class = MCLIPConfig
    base_model_prefix = "mclip"

    def __init__(self, config: MCLIPConfig):
        super().__init__(config)
        self.transformer = XLMRobertaModel(config, add_pooling_layer=False)
        self.LinearTransformation = torch.nn.Linear(config.transformerDimensions, config.numDims)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, torch.nn.Linear) and module is self.LinearTransformation:
            module.weight.data.normal_(0.0, self.config.initializer_range)
            module.bias.data.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, return_dict: bool = True,
                output_hidden_states: bool = True) -> MCLIPOutput:
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                               return_dict=True)
        weights = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return MCLIPOutput(self.LinearTransformation(pooled), out.last_hidden_state, tuple(out.hidden_states))
