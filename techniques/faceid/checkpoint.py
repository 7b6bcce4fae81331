"""One loader for every IP-Adapter-FaceID-family checkpoint: FaceID, FaceID-Portrait, FaceID-Plus, FaceID-PlusV2,
Face-MakeUp (``model.bin``), ConsistentID (``ConsistentID-v1.bin``) and InstantID (``ip-adapter.bin``), for SD1.5
and SDXL.

Files: a torch pickle ``{group: state_dict}`` (read with ``weights_only=True``) or a ``.safetensors`` file with
flat ``"{group}.{key}"`` names. Groups (aliases accepted for each role):

======================  ===================================  ==========================================
role                    group names                          contents
======================  ===================================  ==========================================
projector               ``image_proj`` / ``image_proj_model``  MLPProjModel, ProjPlusModel or IDResampler
processors              ``ip_adapter`` / ``adapter_modules``   32 / 140 processors: LoRA r128 + to_k_ip/to_v_ip
FacialEncoder (CID)     ``FacialEncoder``                     ConsistentID region encoder + fuse module
controlnet (Face-MU)    ``controlnet``                        diffusers ControlNet (pose, fed ID tokens)
======================  ===================================  ==========================================

The variant and the base model are read from the keys: 32 processors with a 768-d context are SD1.5, 140 with a
2048-d context SDXL (:attr:`FaceIDCheckpoint.base`); a projector with learned ``latents`` over a 512-d input is
InstantID's Resampler. FaceID-Plus and FaceID-PlusV2 have the same keys; they differ only in
inference (PlusV2 adds the shortcut ``x + s_scale * resampler``). Pass ``shortcut`` explicitly, or the file name
decides (``...plusv2...`` -> shortcut on), see :func:`resolve_shortcut`.

Every key is consumed: a missing, unexpected or mis-shaped key raises :class:`CheckpointLayoutError` naming it.
Tensors are cast one by one to the compute dtype (the official files mix fp16, bf16 and fp32).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from ...errors import CheckpointLayoutError, ModelFileError
from .controlnet_layout import ControlNetShape, validate_controlnet_state_dict
from .lora import BASE_TEXT_CONTEXT, base_model_name
from .processors import AdapterWeights, parse_adapter, raise_problems
from .projection import ProjectorConfig, projector_config_from_state_dict

logger = logging.getLogger("likeness")

PROJECTOR_GROUPS = ("image_proj", "image_proj_model")
PROCESSOR_GROUPS = ("ip_adapter", "adapter_modules")
FACIAL_ENCODER_GROUP = "FacialEncoder"
CONTROLNET_GROUP = "controlnet"
KNOWN_GROUPS = PROJECTOR_GROUPS + PROCESSOR_GROUPS + (FACIAL_ENCODER_GROUP, CONTROLNET_GROUP)


class Variant(str, Enum):
    FACEID = "faceid"
    FACEID_PORTRAIT = "faceid_portrait"
    FACEID_PLUS = "faceid_plus"
    FACEID_PLUSV2 = "faceid_plusv2"
    FACE_MAKEUP = "face_makeup"
    CONSISTENTID = "consistentid"
    INSTANTID = "instantid"


VARIANT_NAMES = {
    Variant.FACEID: "IP-Adapter FaceID",
    Variant.FACEID_PORTRAIT: "IP-Adapter FaceID-Portrait",
    Variant.FACEID_PLUS: "IP-Adapter FaceID-Plus",
    Variant.FACEID_PLUSV2: "IP-Adapter FaceID-PlusV2",
    Variant.FACE_MAKEUP: "Face-MakeUp",
    Variant.CONSISTENTID: "ConsistentID",
    Variant.INSTANTID: "InstantID",
}
ARCFACE_DIM = 512   # InstantID's Resampler reads one 512-d ArcFace vector; IP-Adapter-Plus ones read CLIP (1280+)


@dataclass
class FaceIDCheckpoint:
    """A loaded FaceID-family file: modules in eval mode, adapter weights, technique extras."""
    variant: Variant
    projector: nn.Module
    projector_config: ProjectorConfig
    adapter: AdapterWeights
    shortcut: bool
    source: str
    facial_encoder: nn.Module | None = None             # ConsistentID
    controlnet: dict[str, torch.Tensor] | None = None   # Face-MakeUp: diffusers ControlNet state dict (validated)
    controlnet_shape: ControlNetShape | None = None
    group_names: dict[str, str] = field(default_factory=dict)      # role -> group name found in the file
    stored_dtypes: dict[str, list[str]] = field(default_factory=dict)  # group -> dtypes in the file
    base: str = ""                                      # "SD1.5", "SDXL" or a description of another UNet

    @property
    def name(self) -> str:
        return VARIANT_NAMES[self.variant]

    @property
    def raw_arcface(self) -> bool:
        """InstantID was trained on the raw antelopev2 embedding; the FaceID family on the normalised one."""
        return self.variant == Variant.INSTANTID

    @property
    def num_tokens(self) -> int:
        return self.projector_config.num_tokens

    @property
    def needs_clip_vision(self) -> bool:
        return self.projector_config.kind == "plus"


# --------------------------------------------------------------------------------------------------------------
# Reading files

def read_checkpoint_file(path: str) -> dict:
    """The raw top level of a ``.bin``/``.pt``/``.pth``/``.ckpt`` pickle or a ``.safetensors`` file."""
    if not os.path.isfile(path):
        raise ModelFileError(f"model file not found: {path}")
    if path.lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"cannot read {os.path.basename(path)} as safetensors (truncated or corrupt?): "
                                 f"{exc}. Download the file again.") from exc
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc).lower():   # legacy (non-zip) pickles cannot be memory-mapped: plain load
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise ModelFileError(
            f"cannot read {os.path.basename(path)} as a torch checkpoint with weights_only=True (truncated, corrupt "
            f"or containing arbitrary Python objects): {type(exc).__name__}: {str(exc)[:300]}. Download the file "
            "again; only plain tensor state dicts are accepted.") from exc


def group_state_dict(raw: Mapping, source: str = "state dict") -> dict[str, dict[str, torch.Tensor]]:
    """``{group: {key: tensor}}`` from a nested pickle or a flat ``"{group}.{key}"`` mapping.

    Raises ModelFileError with "not a FaceID-family file" when no known group is present.
    """
    if not isinstance(raw, Mapping):
        raise ModelFileError(f"{source} is not a FaceID-family file: its top level is a {type(raw).__name__}, "
                             "not a dictionary of weight groups.")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    stray: list[str] = []
    for key, value in raw.items():
        if isinstance(value, Mapping):
            groups.setdefault(str(key), {}).update(value)
        elif isinstance(value, torch.Tensor) and "." in str(key) and str(key).split(".", 1)[0] in KNOWN_GROUPS:
            group, sub = str(key).split(".", 1)
            groups.setdefault(group, {})[sub] = value
        else:
            stray.append(str(key))
    if not any(g in KNOWN_GROUPS for g in groups):
        sample = ", ".join(list(map(str, raw.keys()))[:5])
        raise ModelFileError(
            f"{source} is not a FaceID-family file (IP-Adapter FaceID / Plus / PlusV2, Face-MakeUp, ConsistentID): "
            f"none of the groups {', '.join(KNOWN_GROUPS)} is present; it starts with keys [{sample}]. It looks "
            "like a different kind of model (a face parser, a Stable Diffusion checkpoint, a LoRA?); pick the "
            "adapter file instead.")
    problems = [f"unexpected top-level entry '{k}'" for k in stray]
    problems += [f"unexpected group '{g}' ({len(v)} keys)" for g, v in groups.items() if g not in KNOWN_GROUPS]
    for key, sub in groups.items():
        problems += [f"'{key}.{k}' is not a tensor" for k, t in sub.items() if not isinstance(t, torch.Tensor)]
    raise_problems(problems, source)
    return groups


# --------------------------------------------------------------------------------------------------------------
# Variant detection

def _role(groups: Mapping[str, dict], names: tuple[str, ...], source: str) -> str | None:
    present = [n for n in names if n in groups]
    if len(present) > 1:
        raise CheckpointLayoutError(f"{source} has both '{present[0]}' and '{present[1]}'; they are two names for "
                                    "the same group, so the file is ambiguous.")
    return present[0] if present else None


def _is_instantid(projector: Mapping[str, torch.Tensor]) -> bool:
    """A Resampler with learned latents whose input is one ArcFace vector (IP-Adapter-Plus reads CLIP features)."""
    proj_in = projector.get("proj_in.weight")
    return "latents" in projector and proj_in is not None and proj_in.dim() == 2 and proj_in.shape[1] == ARCFACE_DIM


def _is_plain_ip_adapter(projector: Mapping[str, torch.Tensor], processors: Mapping[str, torch.Tensor]) -> bool:
    """ImageProjModel (``proj.weight``) or Resampler (``latents``) projector, processors without LoRA."""
    image_prompt_projector = "proj.weight" in projector or "latents" in projector or "proj_in.weight" in projector
    lora_free = not any("_lora." in k for k in processors)
    return image_prompt_projector or (lora_free and "proj.0.weight" not in projector)


def detect_variant(groups: Mapping[str, Mapping[str, torch.Tensor]], filename_hint: str | None = None,
                   shortcut: bool | None = None, source: str = "state dict") -> Variant:
    """The FaceID-family variant of grouped weights (raises ModelFileError / CheckpointLayoutError otherwise)."""
    proj_group = _role(groups, PROJECTOR_GROUPS, source)
    proc_group = _role(groups, PROCESSOR_GROUPS, source)
    if proj_group is None or proc_group is None:
        missing = "projector ('image_proj')" if proj_group is None else "attention processors ('ip_adapter')"
        raise CheckpointLayoutError(f"{source} has no {missing} group, which every FaceID-family file has "
                                    f"(found groups: {', '.join(groups) or 'none'}).")
    projector, processors = groups[proj_group], groups[proc_group]
    if _is_instantid(projector):
        return Variant.INSTANTID
    if _is_plain_ip_adapter(projector, processors):
        raise ModelFileError(
            f"{source} is a plain IP-Adapter (image-prompt) file, not a FaceID-family one: its projector has no "
            "ArcFace MLP (proj.0/proj.2) and its attention processors carry no LoRA. Load it with an IP-Adapter "
            "pack; this loader takes ip-adapter-faceid*.bin, Face-MakeUp model.bin, ConsistentID-v1.bin and "
            "InstantID's ip-adapter.bin.")
    plus = any(k.startswith("perceiver_resampler.") for k in projector)
    has_lora = any("_lora." in k for k in processors)
    extras = [g for g in (FACIAL_ENCODER_GROUP, CONTROLNET_GROUP) if g in groups]
    if len(extras) > 1:
        raise CheckpointLayoutError(f"{source} has both a FacialEncoder and a controlnet group; no released model "
                                    "has both.")
    if extras and not plus:
        raise CheckpointLayoutError(f"{source} has a '{extras[0]}' group but an MLP-only projector; ConsistentID "
                                    "and Face-MakeUp both use the FaceID-Plus projector (perceiver_resampler).")
    if extras and not has_lora:
        raise CheckpointLayoutError(f"{source} has a '{extras[0]}' group but no LoRA in '{proc_group}'.")
    if extras == [FACIAL_ENCODER_GROUP]:
        return Variant.CONSISTENTID
    if extras == [CONTROLNET_GROUP]:
        return Variant.FACE_MAKEUP
    if not plus:
        return Variant.FACEID if has_lora else Variant.FACEID_PORTRAIT
    return Variant.FACEID_PLUSV2 if resolve_shortcut(Variant.FACEID_PLUS, filename_hint, shortcut) \
        else Variant.FACEID_PLUS


def resolve_shortcut(variant: Variant, filename_hint: str | None = None, shortcut: bool | None = None) -> bool:
    """Whether the projector adds its MLP tokens back (``x + s_scale * resampler``).

    Explicit ``shortcut`` wins. Otherwise: Face-MakeUp and PlusV2 on (both were trained with it), ConsistentID and
    the MLP-only FaceID off; for a Plus-layout file the name decides: "v2" after "plus" (``plusv2``, ``plus_v2``,
    ``plus-v2``) means PlusV2. A renamed PlusV2 file therefore needs ``shortcut=True``.
    """
    if shortcut is not None:
        return bool(shortcut)
    if variant in (Variant.FACE_MAKEUP, Variant.FACEID_PLUSV2):
        return True
    if variant != Variant.FACEID_PLUS:
        return False
    name = os.path.basename(filename_hint or "").lower().replace("-", "").replace("_", "").replace(" ", "")
    return "plusv2" in name


# --------------------------------------------------------------------------------------------------------------
# Loading

def cast_state_dict(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast every floating tensor (whatever it is stored as) to ``dtype``; integer buffers are kept."""
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in sd.items()}


def build_module(factory) -> nn.Module:
    """Construct a module on the meta device (no random init of weights about to be overwritten)."""
    with torch.device("meta"):
        return factory()


def load_module_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], group: str) -> nn.Module:
    """Load ``sd`` into ``module`` after a check that names every missing, unexpected or mis-shaped key.

    A module on the meta device takes the tensors themselves (``assign=True``: no copy, no init cost).
    Returns the module in eval mode without gradients.
    """
    own = module.state_dict()
    problems = [f"missing key '{group}.{k}'" for k in own if k not in sd]
    problems += [f"unexpected key '{group}.{k}'" for k in sd if k not in own]
    problems += [f"mis-shaped key '{group}.{k}': {list(sd[k].shape)}, expected {list(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
    raise_problems(problems, f"group '{group}'")
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict(dict(sd), strict=True, assign=on_meta)
    return module.eval().requires_grad_(False)


def _dtypes(sd: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})


def load_faceid_state_dict(raw: Mapping, *, source: str = "state dict", filename_hint: str | None = None,
                           shortcut: bool | None = None, dtype: torch.dtype = torch.float32) -> FaceIDCheckpoint:
    """Build a :class:`FaceIDCheckpoint` from an in-memory checkpoint (nested groups or flat ``group.key``)."""
    groups = group_state_dict(raw, source)
    variant = detect_variant(groups, filename_hint or source, shortcut, source)
    proj_group = _role(groups, PROJECTOR_GROUPS, source)
    proc_group = _role(groups, PROCESSOR_GROUPS, source)
    stored = {g: _dtypes(sd) for g, sd in groups.items()}

    projector_sd = cast_state_dict(groups[proj_group], dtype)
    config = projector_config_from_state_dict(projector_sd, proj_group)
    projector = load_module_strict(build_module(config.build), projector_sd, proj_group)
    adapter = parse_adapter(cast_state_dict(groups[proc_group], dtype), proc_group)
    base = _base_model(adapter, config, source)

    checkpoint = FaceIDCheckpoint(variant, projector, config, adapter, resolve_shortcut(variant, filename_hint or
                                  source, shortcut), source, group_names={"projector": proj_group,
                                                                          "processors": proc_group},
                                  stored_dtypes=stored, base=base)
    if variant == Variant.CONSISTENTID:
        from ..consistentid.facial_encoder import facial_encoder_config_from_state_dict
        encoder_sd = cast_state_dict(groups[FACIAL_ENCODER_GROUP], dtype)
        encoder_cfg = facial_encoder_config_from_state_dict(encoder_sd)
        checkpoint.facial_encoder = load_module_strict(build_module(encoder_cfg.build), encoder_sd,
                                                       FACIAL_ENCODER_GROUP)
        checkpoint.group_names["facial_encoder"] = FACIAL_ENCODER_GROUP
    elif variant == Variant.FACE_MAKEUP:
        # Kept as stored (ComfyUI's ControlNet loading casts to its own dtype); only validated here.
        checkpoint.controlnet = dict(groups[CONTROLNET_GROUP])
        checkpoint.controlnet_shape = validate_controlnet_state_dict(checkpoint.controlnet, CONTROLNET_GROUP)
        checkpoint.group_names["controlnet"] = CONTROLNET_GROUP
    if config.kind != "plus" and checkpoint.shortcut:
        raise CheckpointLayoutError(f"{source}: shortcut=True needs a FaceID-Plus projector; this is {checkpoint.name}.")
    logger.info("Likeness: loaded %s %s from %s (%d tokens, LoRA rank %d, stored %s)", checkpoint.name, base, source,
                config.num_tokens, adapter.rank, stored)
    return checkpoint


def _base_model(adapter: AdapterWeights, config: ProjectorConfig, source: str) -> str:
    """The base model the processors were made for (processor count and context width; the tokens must fit)."""
    if adapter.context_dim and adapter.context_dim != config.cross_attention_dim:
        raise CheckpointLayoutError(
            f"{source}: the ID tokens are {config.cross_attention_dim}-d but to_k_ip/to_v_ip take "
            f"{adapter.context_dim}-d inputs; projector and processors come from different models.")
    base = base_model_name(adapter.num_transformer_blocks)
    expected = BASE_TEXT_CONTEXT.get(base)
    if expected and adapter.context_dim and adapter.context_dim != expected:   # scaled-down models (tests)
        return f"{base}-shaped ({adapter.context_dim}-d context)"
    return base


def load_faceid_checkpoint(path: str, *, shortcut: bool | None = None,
                           dtype: torch.dtype = torch.float32) -> FaceIDCheckpoint:
    """Read and load a FaceID-family file (``.bin``/``.pt``/``.pth`` pickle or ``.safetensors``)."""
    return load_faceid_state_dict(read_checkpoint_file(path), source=os.path.basename(path), filename_hint=path,
                                  shortcut=shortcut, dtype=dtype)
