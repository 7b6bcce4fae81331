"""Test-only ComfyUI nodes: tiny MODEL/CLIP/VAE without checkpoint files, and image statistics.

Loaded by the ``host_test_nodes`` fixture (``tests/host_support.py``) or by the runner with
``--extra-nodes tests/host_nodes``. Never shipped as part of the pack's node list.
"""
import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # also when linked into custom_nodes/
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


class LikenessTestTinySD15Loader:
    """MODEL + CLIP + VAE: the tiny SD1.5-shaped UNet, tiny CLIP text model (real tokenizer), tiny VAE."""

    DESCRIPTION = "Test only: tiny random SD1.5-shaped model, text encoder and VAE (context width 64)."
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31,
                                              "tooltip": "Seed of the random weights."})}}

    def load(self, seed):
        import host_support

        return (host_support.build_tiny_sd15(seed=seed), host_support.build_tiny_clip(seed=seed),
                host_support.build_tiny_vae(seed=seed))


class LikenessTestTinyFluxLoader:
    """MODEL + CLIP + VAE: the tiny FLUX.1-dev-shaped DiT (ComfyUI's Flux class), its T5 + CLIP-L text encoder
    and a 16-channel VAE: what UNETLoader + DualCLIPLoader (flux) + VAELoader give a Flux example."""

    DESCRIPTION = "Test only: tiny random FLUX.1-dev-shaped DiT, text encoders (T5 width 64, CLIP-L) and VAE."
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31,
                                              "tooltip": "Seed of the random weights."})}}

    def load(self, seed):
        import host_support

        return (host_support.build_tiny_flux(seed=seed), host_support.build_tiny_flux_clip(seed=seed),
                host_support.build_tiny_flux_vae(seed=seed))


class LikenessTestImageStats:
    """Output node: per-image min/max/mean/std and finiteness, reported in the ui outputs."""

    DESCRIPTION = "Test only: statistics of an IMAGE, returned in the ui outputs."
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ()
    FUNCTION = "stats"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "Images to measure."})}}

    def stats(self, image):
        import torch

        image = image.float()
        return {"ui": {"stats": [{
            "shape": list(image.shape), "finite": bool(torch.isfinite(image).all()),
            "min": float(image.min()), "max": float(image.max()),
            "mean": float(image.mean()), "std": float(image.std()),
        }]}}


class LikenessTestNaNImage:
    """An IMAGE whose given image has NaN pixels (what an overflowing fp16 VAE decode gives)."""

    DESCRIPTION = "Test only: a grey IMAGE batch with a NaN patch in image nan_index."
    CATEGORY = "Likeness/Tests"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "batch": ("INT", {"default": 1, "min": 1, "max": 8, "tooltip": "Images in the batch."}),
            "nan_index": ("INT", {"default": 0, "min": 0, "max": 7, "tooltip": "The image with NaN pixels."}),
        }}

    def make(self, batch, nan_index):
        import torch

        image = torch.full((batch, 64, 64, 3), 0.5)
        image[nan_index, 8:16, 8:16] = float("nan")
        return (image,)


NODE_CLASS_MAPPINGS = {
    "LikenessTestTinySD15Loader": LikenessTestTinySD15Loader,
    "LikenessTestTinyFluxLoader": LikenessTestTinyFluxLoader,
    "LikenessTestImageStats": LikenessTestImageStats,
    "LikenessTestNaNImage": LikenessTestNaNImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: k for k in NODE_CLASS_MAPPINGS}
