"""The identity LoRA: rank-r adapters on the UNet's attention projections only, in ComfyUI's format.

Targets: every ``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` Linear of the diffusion
model (found by walking the module tree, so SD1.5 and SDXL layouts both work). During training the
adapters run on the activation side, ``y = W x + (alpha / r) * up(down(x))``: no full-size weight is
materialised per step (ComfyUI's own trainer rebuilds ``W + up @ down`` for every layer, every step).

Export uses ComfyUI's native keys, which the stock LoraLoader maps through ``comfy/lora.py``:
``diffusion_model.<path>.lora_up.weight`` [out, r], ``.lora_down.weight`` [r, in], ``.alpha`` (scalar);
the loader applies ``W + alpha / r * up @ down``, the same function the adapters compute.

Nothing here imports ComfyUI; the model is any ``torch.nn.Module`` tree.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator

import torch
import torch.nn.functional as F

from ...attention_patches.sites import family_name, find_unet_sites, unet_family
from ...errors import CheckpointLayoutError, IncompatibleEmbedsError, InvalidInputError

ATTENTION_TARGET = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
NATIVE_PREFIX = "diffusion_model."


def attention_targets(diffusion_model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every attention projection Linear of the UNet, by module path (relative to the UNet)."""
    found = {name: m for name, m in diffusion_model.named_modules()
             if ATTENTION_TARGET.search(name) and isinstance(m, torch.nn.Linear)}
    if not found:
        raise InvalidInputError("This model has no attention layers named attn1/attn2 (to_q/to_k/to_v/to_out); "
                                "the FaceA-Net identity LoRA needs a Stable Diffusion UNet.")
    return found


def _slot(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys may not contain dots


class LoRAAdapter(torch.nn.Module):
    """``(alpha / rank) * up(down(x))``; ``up`` starts at zero so a new adapter changes nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)), as torch.nn.Linear initialises
        down = (torch.rand(rank, in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        self.down = torch.nn.Parameter(down.to(device=device, dtype=dtype))
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.rank = rank
        self.alpha = float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.up @ self.down) * self.scale


class IdentityLoRA(torch.nn.Module):
    """All adapters of one identity, keyed by UNet module path."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int = 48, alpha: float | None = None,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if rank < 1:
            raise InvalidInputError(f"LoRA rank must be at least 1, got {rank}.")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.names = sorted(shapes)
        generator = torch.Generator().manual_seed(int(seed))
        self.adapters = torch.nn.ModuleDict({
            _slot(n): LoRAAdapter(shapes[n][0], shapes[n][1], self.rank, self.alpha, generator, dtype, device)
            for n in self.names})

    @classmethod
    def for_model(cls, diffusion_model: torch.nn.Module, rank: int = 48, alpha: float | None = None,
                  seed: int = 0, dtype: torch.dtype = torch.float32) -> "IdentityLoRA":
        targets = attention_targets(diffusion_model)
        shapes = {n: (m.in_features, m.out_features) for n, m in targets.items()}
        device = next(iter(targets.values())).weight.device
        return cls(shapes, rank=rank, alpha=alpha, seed=seed, dtype=dtype, device=device)

    def adapter(self, name: str) -> LoRAAdapter:
        return self.adapters[_slot(name)]

    def items(self) -> Iterator[tuple[str, LoRAAdapter]]:
        for n in self.names:
            yield n, self.adapters[_slot(n)]

    # ---- ComfyUI native format -------------------------------------------------------------------
    def native_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Plain CPU tensors under ComfyUI's LoRA keys (what SaveLoRA writes and LoraLoader reads)."""
        out = {}
        for n, a in self.items():
            key = NATIVE_PREFIX + n
            out[f"{key}.lora_up.weight"] = a.up.detach().to("cpu", dtype).clone()
            out[f"{key}.lora_down.weight"] = a.down.detach().to("cpu", dtype).clone()
            out[f"{key}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
        return out

    @torch.no_grad()
    def load_native(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy weights from a native-format state dict (e.g. to continue training an identity)."""
        missing = []
        for n, a in self.items():
            key = NATIVE_PREFIX + n
            up, down = state.get(f"{key}.lora_up.weight"), state.get(f"{key}.lora_down.weight")
            if up is None or down is None:
                missing.append(key)
                continue
            if tuple(up.shape) != tuple(a.up.shape) or tuple(down.shape) != tuple(a.down.shape):
                raise CheckpointLayoutError(
                    f"LoRA tensor {key} has shapes {tuple(up.shape)}/{tuple(down.shape)}, expected "
                    f"{tuple(a.up.shape)}/{tuple(a.down.shape)}: it was trained with another rank or model.")
            alpha = state.get(f"{key}.alpha")
            file_alpha = float(alpha) if alpha is not None else float(up.shape[1])
            # fold a different alpha into up so that the effective delta is unchanged
            a.up.copy_(up.to(a.up) * (file_alpha / self.alpha))
            a.down.copy_(down.to(a.down))
        if strict and missing:
            raise CheckpointLayoutError(f"The LoRA lacks {len(missing)} attention layers of this model "
                                        f"(first: {missing[0]}); it was made for another model.")

    # ---- attaching to a live model ---------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self, diffusion_model: torch.nn.Module, strength: float = 1.0):
        """Run ``diffusion_model`` with the adapters added to its attention projections.

        The module instances get a temporary ``forward``; the original is restored on exit, also
        after an exception or a cancel, so a model shared with ComfyUI's cache is left as it was.
        """
        targets = attention_targets(diffusion_model)
        absent = [n for n in self.names if n not in targets]
        if absent:
            raise CheckpointLayoutError(f"The LoRA targets {len(absent)} layers this model lacks (first: {absent[0]}).")
        patched = []
        try:
            for n, adapter in self.items():
                module = targets[n]
                had_own = "forward" in module.__dict__
                original = module.forward
                module.forward = _lora_forward(original, adapter, strength)
                patched.append((module, had_own, original))
            yield self
        finally:
            for module, had_own, original in reversed(patched):
                if had_own:
                    module.forward = original
                else:
                    del module.forward


def _lora_forward(original, adapter: LoRAAdapter, strength: float):
    def forward(x, *args, **kwargs):
        y = original(x, *args, **kwargs)
        return y + (adapter(x) * strength).to(y.dtype)
    return forward


def native_keys_are_attention_only(state: dict[str, torch.Tensor]) -> bool:
    """True when every tensor of a native-format LoRA targets an attention projection."""
    for key in state:
        base = key[len(NATIVE_PREFIX):] if key.startswith(NATIVE_PREFIX) else key
        for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        else:
            return False
        if not ATTENTION_TARGET.search(base):
            return False
    return True


@contextlib.contextmanager
def autograd_safe_weights(module: torch.nn.Module):
    """Freeze a model for adapter training and let autograd flow through it without copying weights.

    ComfyUI loads weights under ``torch.inference_mode()``; autograd refuses to save such tensors for
    backward. Each inference-mode parameter/buffer is swapped for a normal tensor that aliases the same
    memory (via DLPack, zero copy). Parameters that require grad are frozen (no weight gradients are
    computed for the base model). Everything is restored on exit.
    """
    swapped, frozen = [], []
    try:
        for sub in module.modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(sub, kind)
                for name, value in list(table.items()):
                    if value is None:
                        continue
                    if not value.is_inference():
                        if kind == "_parameters" and value.requires_grad:
                            value.requires_grad_(False)
                            frozen.append(value)
                        continue
                    alias = torch.from_dlpack(value.detach())
                    replacement = torch.nn.Parameter(alias, requires_grad=False) if kind == "_parameters" else alias
                    table[name] = replacement
                    swapped.append((table, name, value))
        yield module
    finally:
        for table, name, value in reversed(swapped):
            table[name] = value
        for value in frozen:
            value.requires_grad_(True)


def check_identity_fits(identity, model) -> None:
    """Refuse an identity trained on another model family than ``model``'s (SD1.5 vs SDXL), naming both: its
    LoRA would silently miss every layer (the stock loader skips unknown keys) and its [feat] vectors have
    another text encoder's width. Families that cannot be told (test-sized models) are not compared."""
    trained, given = identity.family, unet_family(find_unet_sites(model))
    if "unknown" in (trained, given) or trained == given:
        return
    raise IncompatibleEmbedsError(
        f"The identity '{identity.name or 'just trained'}' was trained on {family_name(trained)} but the model is "
        f"{family_name(given)}: its LoRA and [feat] vectors only fit the family they were trained on. Use a "
        f"{family_name(trained)} (inpainting) model, or train the identity again on this one.")


# ---- host-gated helpers (ComfyUI through host/) ----------------------------------------------------

def load_lora_file(lora_name: str) -> dict[str, torch.Tensor]:
    """A LoRA from ComfyUI's ``loras`` folders (``lora_name`` as the LoraLoader lists it)."""
    from safetensors.torch import load_file

    from ...host.folders import resolve

    try:
        path = resolve("loras", lora_name)
    except FileNotFoundError as exc:
        raise CheckpointLayoutError(f"The identity's LoRA '{lora_name}' is missing from the loras folder ({exc}). "
                                    "Train the identity again or copy its LoRA back.") from exc
    return load_file(path)


def identity_lora_state(identity) -> dict[str, torch.Tensor] | None:
    """The identity's LoRA tensors: in memory after training, else read from its file (None if it has none)."""
    if identity.lora is not None:
        return identity.lora
    if identity.lora_name:
        return load_lora_file(identity.lora_name)
    return None


def apply_lora_to_model(model, lora_state: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of the ModelPatcher with the LoRA applied the way the stock LoraLoader applies it."""
    from ...host.weights import add_lora_state_dict

    if not lora_state or strength == 0:
        return model
    return add_lora_state_dict(model, lora_state, strength)
