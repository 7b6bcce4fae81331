"""Face Fusion nodes: adapter loader / new adapter, Fusion Identity (multi-identity list), Apply Face Fusion."""
from __future__ import annotations

from ..errors import InvalidInputError
from ..model_hints import ModelFolder
from ..validation import check_images, check_masks
from ._common import category, file_choices, float_input, int_input, percent_range_inputs, resolved_path
from ._feedback import shows_warnings

CATEGORY = category("Face Fusion")
NO_ADAPTER = "(no adapter in models/likeness/fusion)"
ADAPTERS = ModelFolder("Face Fusion adapter", "likeness", ("fusion",), other_way=(
    "Train one with the Train Face Fusion node (it saves there), or start from 'Fusion Adapter New'."))
CAPTURE_CHOICES = {
    "per step (paper)": "per_step",
    "cached: clean reference": "cached_clean",
    "cached: noised reference": "cached_sigma",
}
SITE_CHOICES = ["all", "input", "middle", "output", "double", "single", "custom"]


class FusionAdapterLoader:
    NODE_ID = "LikenessFusionAdapterLoader"
    DISPLAY_NAME = "Fusion Adapter Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a Face Fusion adapter (SD1.5/SDXL: the per-layer Linear_kf / Linear_vf weights; Flux: the "
                   "per-block key/value projections; .safetensors) from models/likeness/fusion/. Train one with the "
                   "Fusion trainer node; there are no official weights. Apply Face Fusion says so when an adapter "
                   "was made for another model.")
    RETURN_TYPES = ("FUSION_ADAPTER",)
    RETURN_NAMES = ("fusion_adapter",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from ..techniques.face_fusion import list_fusion_adapters

        names = file_choices(list_fusion_adapters, NO_ADAPTER)
        return {"required": {
            "adapter_name": (names, {"tooltip": "Adapter file in models/likeness/fusion/ (made by the Fusion trainer)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, adapter_name):
        from ..techniques.face_fusion import list_fusion_adapters

        return ADAPTERS.choice_problem(adapter_name, file_choices(list_fusion_adapters, NO_ADAPTER), NO_ADAPTER)

    def load(self, adapter_name):
        from ..errors import ModelFileError
        from ..techniques.face_fusion import fusion_adapter_path, load_fusion_adapter

        if adapter_name == NO_ADAPTER:
            raise ModelFileError(ADAPTERS.missing_message())
        path = resolved_path(fusion_adapter_path, adapter_name)
        return (load_fusion_adapter(path),)


class FusionAdapterNew:
    NODE_ID = "LikenessFusionAdapterNew"
    DISPLAY_NAME = "Fusion Adapter New"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Creates an untrained Face Fusion adapter for this model. SD1.5/SDXL: every cross-attention layer "
                   "gets Linear_kf / Linear_vf copied from the same block's self-attention to_k / to_v, so it starts as "
                   "'reference attention'. Flux: every block gets a low-rank projection of the reference's keys and "
                   "values that starts as the identity (plain reference tokens in the joint attention). Feed it to the "
                   "Fusion trainer (or try it untrained).")
    RETURN_TYPES = ("FUSION_ADAPTER",)
    RETURN_NAMES = ("fusion_adapter",)
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD1.5 / SDXL / Flux model the adapter is made for (its layers set "
                                "the shapes)."}),
        }, "optional": {
            "rank": int_input(16, 1, 256, "Flux only: rank of each block's key/value projection (more = more "
                              "trainable weights)."),
        }}

    def create(self, model, rank=16):
        from ..techniques.face_fusion import new_fusion_adapter

        return (new_fusion_adapter(model, rank=rank),)   # rank: Flux only (a UNet adapter is full C x C)


class FusionIdentity:
    NODE_ID = "LikenessFusionIdentity"
    DISPLAY_NAME = "Fusion Identity"
    CATEGORY = CATEGORY
    DESCRIPTION = ("One person for multi-identity Face Fusion: reference face image(s) plus a MASK of where that "
                   "person's face goes. Chain several into an identities list; Apply Face Fusion keeps each "
                   "person's face keys away from the other people's regions (paper Eq. 7).")
    RETURN_TYPES = ("FUSION_IDENTITIES",)
    RETURN_NAMES = ("identities",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reference": ("IMAGE", {"tooltip": "Face crop(s) of this person; a batch = several references (Eq. 6)."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Where this person's face is in the generated image (white = here). Without "
                                         "a mask the person is blocked only inside the other people's masks."}),
            "identities": ("FUSION_IDENTITIES", {"tooltip": "The list from a previous Fusion Identity node to extend."}),
        }}

    def add(self, reference, mask=None, identities=None):
        from ..techniques.face_fusion.apply import chain_identity

        check_images(reference=reference)
        check_masks(mask=mask)

        return (chain_identity(identities, reference, mask),)


class ApplyFaceFusion:
    NODE_ID = "LikenessApplyFaceFusion"
    DISPLAY_NAME = "Apply Face Fusion"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Face Fusion: the reference face goes through the same UNet (or Flux DiT), and at every "
                   "cross-attention layer (Flux: every block's joint attention) its features become extra keys/values "
                   "next to the prompt's, in one softmax. A reference batch is "
                   "multi-reference (Eq. 6); an identities list with masks puts several people in one image (Eq. 7). "
                   "Stacks with the pack's other identity techniques.")
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch (a patched clone is returned)."}),
            "fusion_adapter": ("FUSION_ADAPTER", {"tooltip": "From Fusion Adapter Loader (trained) or Fusion Adapter New."}),
            "vae": ("VAE", {"tooltip": "Encodes the reference image(s) to latents."}),
            "weight": float_input(1.0, 0.0, 5.0, 0.01, "How much attention the face keys get (multiplies their "
                                  "attention mass). 1 = the paper, 0 = off."),
            **percent_range_inputs(),
            "capture": (list(CAPTURE_CHOICES), {"default": "per step (paper)", "tooltip": "per step: the reference "
                        "is noised to each step's level and run through the UNet every step (the paper; about +50% "
                        "time). cached: one reference pass per model (clean, or noised at 'capture_at'); much faster."}),
        }, "optional": {
            "reference": ("IMAGE", {"tooltip": "Face crop(s) of one person (e.g. from the Align node); a batch = "
                                                "several references of the same person (Eq. 6)."}),
            "mask": ("MASK", {"tooltip": "With 'reference': the face keys are used only inside this region."}),
            "identities": ("FUSION_IDENTITIES", {"tooltip": "Several people, from chained Fusion Identity nodes "
                                                            "(applied after 'reference' if both are given)."}),
            "reference_size": int_input(512, 64, 1024, "Reference images are center-cropped square and resized to "
                                        "this before encoding. 256 is about 4x cheaper at the largest layers.", step=64),
            "capture_at": float_input(0.5, 0.0, 1.0, 0.01, "cached: noised reference only: the point of the "
                                      "schedule (0 = first step, 1 = last) the reference is noised to."),
            "uncond": (["none", "zeros", "same"], {"default": "none", "tooltip": "What the negative (CFG) pass "
                       "sees: none = text only (CFG pushes towards the face); zeros = blank face keys; same = the face."}),
            "layers": (SITE_CHOICES, {"default": "all", "tooltip": "Which layers get the face: all, or emphasise "
                       "input/middle/output (SD1.5/SDXL) or double/single blocks (Flux); the others get "
                       "'other_layers'; or custom."}),
            "other_layers": float_input(0.25, 0.0, 1.0, 0.05, "Weight factor of the layers not emphasised by 'layers'."),
            "custom_layers": ("STRING", {"default": "", "tooltip": "layers=custom: weights in layer order "
                              "'1, 1, 0.5, ...' or 'index:weight' pairs '0:1, 15:0.5'."}),
            "reference_prompt": ("CONDITIONING", {"tooltip": "Text the reference pass sees (e.g. 'a photo of a face'). "
                                                              "Default: none (zeros), as the adapter was trained."}),
            "noise_seed": int_input(0, 0, 2**31 - 1, "Seed of the fixed noise used to noise the reference."),
            "reference_budget": int_input(2, 0, 64, "Per person, at most this many references' worth of face keys "
                                          "per layer: with more references each one's keys are averaged over small "
                                          "blocks (with matching attention weight), so 8 references cost about "
                                          "what 2 do. Up to this many references are exact. 0 = no limit."),
            "reference_downsample": int_input(2, 1, 4, "SD1.5/SDXL (not used on Flux): the reference pass's "
                                              "highest-resolution self-attention uses "
                                              "keys averaged over NxN blocks (ToDo): 2 makes the reference pass "
                                              "~15% faster with every reference token kept; 1 = exact. Match the "
                                              "adapter's training (the trainer uses 2)."),
        }}

    @shows_warnings
    def apply(self, model, fusion_adapter, vae, weight, start_at, end_at, capture, reference=None, mask=None,
              identities=None, reference_size=512, capture_at=0.5, uncond="none", layers="all", other_layers=0.25,
              custom_layers="", reference_prompt=None, noise_seed=0, reference_budget=2, reference_downsample=2):
        from ..attention_patches import SiteWeights
        from ..techniques.face_fusion.apply import apply_face_fusion_images, chain_identity

        check_images(reference=reference)
        check_masks(mask=mask)
        if start_at > end_at:
            raise InvalidInputError(f"start_at ({start_at}) must not be after end_at ({end_at})")
        people = ()
        if reference is not None:
            people = chain_identity(None, reference, mask)
        elif mask is not None:
            raise InvalidInputError("'mask' belongs to 'reference'; for several people use Fusion Identity nodes")
        if identities is not None:
            for person in identities:  # validates each entry
                people = chain_identity(people, person.images, person.mask)
        if not people:
            raise InvalidInputError("Connect a 'reference' IMAGE or an 'identities' list (Fusion Identity nodes).")
        sites = SiteWeights.parse(layers, custom_layers, other_layers)
        patched = apply_face_fusion_images(
            model, fusion_adapter, vae, people, reference_size=reference_size, reference_conditioning=reference_prompt,
            weight=weight, start_at=start_at, end_at=end_at, capture_mode=CAPTURE_CHOICES[capture],
            capture_percent=capture_at, uncond=uncond, site_weights=sites, noise_seed=noise_seed,
            reference_budget=reference_budget, reference_downsample=reference_downsample)
        return (patched,)


NODE_CLASSES = [FusionAdapterLoader, FusionAdapterNew, FusionIdentity, ApplyFaceFusion]
