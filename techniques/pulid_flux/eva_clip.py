"""EVA02-CLIP-L-14-336's visual tower for PuLID-FLUX: the pack's own torch module, loaded from a local file.

The tower is written here (plain torch, ``F.scaled_dot_product_attention``) with the parameter names of EVA-CLIP's
``EVAVisionTransformer`` (the file's ``visual.*`` tensors without the prefix), so BAAI's
``EVA02_CLIP_L_336_psz14_s6B.pt`` or a ``.safetensors`` copy of it loads strictly, with no renaming. EVA02 as
EVA-CLIP builds it for this model: a 14 px patch embedding, a CLS token and absolute position embeddings, 24 pre-norm
blocks whose attention has q/v biases (no k bias), a 2-D rotary embedding on the patch tokens (not on CLS) and a
LayerNorm on the attention output before its projection, a SwiGLU MLP with a LayerNorm on its hidden layer; then the
final LayerNorm on CLS and the 768-d projection head.

PuLID reads, as the official ``eva_clip`` code returns them with ``return_hidden=True``: the projected CLS embedding
and the token states entering blocks 4, 8, 12, 16 and 20 (``[B, 577, 1024]`` each, CLS included). Input: 336 px RGB
normalised with the OpenAI CLIP mean/std (the visual tower has no ``image_mean`` of its own, so the official code
falls back to them).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointLayoutError, InvalidInputError, ModelFileError

logger = logging.getLogger("likeness")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HIDDEN_BLOCKS = (4, 8, 12, 16, 20)   # eva_vit_model.forward_features: states entering these blocks
# EVA-CLIP keeps the rotary tables as buffers in its files; its loader deletes them (RoPE=1) and recomputes them
ROPE_BUFFERS = ("freqs_cos", "freqs_sin")


@dataclass(frozen=True)
class EvaVisionConfig:
    """The tower's size. Defaults: EVA02-CLIP-L-14-336.json's ``vision_cfg`` (``embed_dim`` 768)."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 2.6667
    output_dim: int = 768
    rope_grid: int = 16   # pt_hw_seq_len: the 224 px grid the rotary frequencies were trained on
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


EVA02_L_336 = EvaVisionConfig()


class RotaryEmbedding2d(nn.Module):
    """EVA02's 2-D rotary embedding ("VisionRotaryEmbeddingFast", intp_freq): half of each head's channels turn
    with the patch row, half with the column, positions scaled onto the ``rope_grid`` the model was trained on;
    channels rotate in adjacent pairs."""

    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.config = config
        self.register_buffer("freqs_cos", torch.empty(0), persistent=False)
        self.register_buffer("freqs_sin", torch.empty(0), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the tables (also after building on the meta device), as EVA-CLIP computes them."""
        c = self.config
        half = c.head_dim // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2)[:half // 2].float() / half))
        positions = torch.arange(c.grid) / c.grid * c.rope_grid
        angles = torch.einsum("i,f->if", positions, inv_freq).repeat_interleave(2, dim=-1)   # [grid, half]
        rows = angles[:, None, :].expand(c.grid, c.grid, half)
        cols = angles[None, :, :].expand(c.grid, c.grid, half)
        table = torch.cat((rows, cols), dim=-1).reshape(c.grid * c.grid, 2 * half)
        device = self.freqs_cos.device if self.freqs_cos.device.type != "meta" else None
        self.freqs_cos = table.cos().to(device)
        self.freqs_sin = table.sin().to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return x * self.freqs_cos + rotated * self.freqs_sin


class EvaAttention(nn.Module):
    def __init__(self, config: EvaVisionConfig, rope: RotaryEmbedding2d):
        super().__init__()
        width = config.width
        self.heads = config.heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=config.eps)
        self.proj = nn.Linear(width, width)
        self.rope = rope   # one module shared by every block, as in EVA-CLIP

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)   # [B, H, N, D]

    def _rotate_patches(self, x: torch.Tensor) -> torch.Tensor:
        # CLS (token 0) has no position: only the patch tokens turn
        return torch.cat((x[:, :, :1], self.rope(x[:, :, 1:])), dim=2).type_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._rotate_patches(self._heads(F.linear(x, self.q_proj.weight, self.q_bias)))
        k = self._rotate_patches(self._heads(self.k_proj(x)))
        v = self._heads(F.linear(x, self.v_proj.weight, self.v_bias))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        hidden = int(config.width * config.mlp_ratio)
        self.w1 = nn.Linear(config.width, hidden)
        self.w2 = nn.Linear(config.width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=config.eps)
        self.w3 = nn.Linear(hidden, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    def __init__(self, config: EvaVisionConfig, rope: RotaryEmbedding2d):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.attn = EvaAttention(config, rope)
        self.norm2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class EvaVisionTower(nn.Module):
    """EVA02-CLIP's visual tower; ``forward`` -> (projected CLS ``[B, output_dim]``, states entering
    ``hidden_blocks``)."""

    def __init__(self, config: EvaVisionConfig = EVA02_L_336):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid * config.grid + 1, config.width))
        self.rope = RotaryEmbedding2d(config)
        self.blocks = nn.ModuleList(EvaBlock(config, self.rope) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=config.eps)
        self.head = nn.Linear(config.width, config.output_dim)

    def forward(self, pixels: torch.Tensor, hidden_blocks: tuple[int, ...] = HIDDEN_BLOCKS
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        size = self.config.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise InvalidInputError(f"EVA-CLIP takes {size}x{size} pixels, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        hidden = []
        for index, block in enumerate(self.blocks):
            if index in hidden_blocks:
                hidden.append(x)
            x = block(x)
        return self.head(self.norm(x[:, 0])), hidden


@dataclass
class EvaClipVision:
    """EVA_CLIP_VISION: the visual tower in eval mode and how to feed it."""

    model: EvaVisionTower
    name: str
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    hidden_blocks: tuple[int, ...] = field(default=HIDDEN_BLOCKS)

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def to(self, device=None, dtype=None) -> "EvaClipVision":
        self.model.to(device=device, dtype=dtype)
        return self

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``pixels`` ``[B, 3, S, S]`` already normalised -> (projected CLS ``[B, D]``, hidden states)."""
        return self.model(pixels, self.hidden_blocks)


def build_eva_vision(config: EvaVisionConfig | None = None) -> EvaVisionTower:
    """The tower with ``config`` (default: EVA02-CLIP-L-14-336), randomly initialised, in eval mode."""
    return EvaVisionTower(config or EVA02_L_336).eval()


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an EVA-CLIP ``.pt`` (plain state dict, read with ``weights_only``) or ``.safetensors`` file."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"EVA-CLIP file not found: {path}. Put EVA02_CLIP_L_336_psz14_s6B.pt into "
                             "models/clip_vision (or models/pulid).")
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:   # safetensors / torch raise several types for truncated or foreign files
        raise ModelFileError(f"cannot read {name} (truncated, corrupt, or not a plain tensor file): "
                             f"{type(exc).__name__}: {str(exc)[:200]}. Download EVA02_CLIP_L_336_psz14_s6B.pt "
                             "again.") from exc
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelFileError(f"{name} holds a {type(state).__name__}, not a state dict of EVA-CLIP weights.")
    return state


def visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The visual tower's tensors under the tower's own names: ``visual.*`` of a whole CLIP (the text tower is
    skipped) or an already-stripped tower, without the rotary tables EVA-CLIP's loader drops as well."""
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in ROPE_BUFFERS}


def _layout_problems(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    problems = [f"'{k}' missing" for k in expected if k not in state]
    problems += [f"unexpected key '{k}'" for k in state if k not in expected]
    problems += [f"'{k}' has shape {list(state[k].shape)}, expected {list(t.shape)}"
                 for k, t in expected.items() if k in state and state[k].shape != t.shape]
    return problems


def eva_vision_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict",
                               config: EvaVisionConfig | None = None) -> EvaClipVision:
    """Build the tower and load ``state`` (EVA-CLIP's names, with or without ``visual.``) strictly."""
    if not any(k.startswith(("visual.", "blocks.", "patch_embed.")) for k in state):
        sample = ", ".join(list(state)[:4])
        raise CheckpointLayoutError(f"{source} is not an EVA-CLIP visual tower (keys start with {sample}); pick "
                                    "EVA02_CLIP_L_336_psz14_s6B.pt.")
    visual = visual_state(state)
    with torch.device("meta"):   # every parameter comes from the file: skip the random initialisation
        model = EvaVisionTower(config or EVA02_L_336)
    problems = _layout_problems(visual, model.state_dict())
    if problems:
        listed = "\n  - ".join(problems[:12])
        raise CheckpointLayoutError(f"{source} does not match EVA02-CLIP-L-14-336's visual tower ({len(problems)} "
                                    f"problem(s)); is it another CLIP?\n  - {listed}")
    model.to_empty(device="cpu")
    model.rope.reset_tables()
    model.load_state_dict(visual, strict=True)   # copies cast the file's fp16 into the fp32 parameters
    return EvaClipVision(model.eval().requires_grad_(False), source)


def load_eva_clip(path: str, config: EvaVisionConfig | None = None) -> EvaClipVision:
    """Load the visual tower from a local file (no download)."""
    return eva_vision_from_state_dict(read_weights(path), os.path.basename(path), config)
