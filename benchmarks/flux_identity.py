"""Benchmark: PuLID-FLUX's cost on a FLUX.1 DiT in real ComfyUI sampling, ours against lldacing's port (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/flux_identity.py [--double 2 --single 4] [--rounds 5] [--tiny]

The model and the harness are ``flux_bench.py``'s (FLUX.1-dev width, a stated fraction of the blocks: 2 of the 19
double + 4 of the 38 single blocks by default, so that PuLID's schedule, every 2nd double and every 4th single
block, hits 1 of 2 double and 1 of 4 single blocks, close to the full model's 10/19 and 10/38; 512 px, 512 T5
tokens; bf16). Rows, side by side in one timing process:

- ``unpatched``: the model as loaded;
- ``ours``: the pack's PuLID-FLUX (``techniques/pulid_flux``, ``apply_pulid_flux`` with the Apply node's defaults:
  weight 1, start 0, end 1, no mask, zero-ID uncond): the released file's layout and dtype (bf16; random values)
  through the pack's loader, its ID cross-attentions as a ``ResidualInjector`` on the engine's DiT sites (sampling
  folds the ID into each cross-attention's projections once: ``techniques/pulid_flux/folded.py``), a random ID
  embedding [1, 32, 2048]; targets: <= 1.05 x unpatched, <= 1.0 x lldacing;
- ``lldacing``: ``github:lldacing/ComfyUI_PuLID_Flux_ll`` (the most used ComfyUI port), extracted from the fetched
  mirror (``--lldacing-mirror``, a bare git repository) to a temporary folder at run time and imported there, run
  through its own ``PulidFluxModelLoader`` (the same random file as ours) and ``ApplyPulidFlux`` node functions
  with their defaults (weight 1, start 0, end 1, no options: align mode 1) on the same model: its
  ``PulidFluxModel`` (IDFormer + 20 ``PerceiverAttentionCA``) computes the ID embedding from
  stand-ins for what needs model files: the face analyser (one face, random 512-d embedding), EVA-CLIP (random
  768-d feature + 5 hidden states [1, 577, 1024]) and facexlib's detection/parsing models (random parsing logits;
  facexlib is stubbed as a module, its functions are not on the patch path). Its sampling path is its own: the
  OUTER_SAMPLE wrapper rebinds ``forward_orig`` and its ``patches_replace["dit"]`` entries run the CAs. The port
  hard-codes FLUX.1's 19 double blocks (the last one records the text length its single-block entries need), so on
  a shorter model the benchmark gives that role to the model's last double block (without a CA there).
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import flux_bench  # noqa: E402
from flux_bench import Row, RowUnavailable  # noqa: E402

LLDACING_MIRROR = os.environ.get("LIKENESS_LLDACING_MIRROR", "/work/.mirror/lldacing+ComfyUI_PuLID_Flux_ll/repo")
LLDACING_PACKAGE = "lldacing_pulid_flux"
EMBED_TOKENS, EMBED_DIM = 32, 2048      # the IDFormer's output: 32 tokens of 2048


# ------------------------------------------------------------------------------------------ ours

def random_release_file(setting) -> str:
    """A safetensors file in the released ``pulid_flux_v0.9.1`` layout and dtype (bf16; the layout file in
    tests/data/checkpoint_layouts) with random values (N(0, 0.02), norms 1/0), written once; ``--tiny`` gives the
    cross-attentions the tiny model's width. Both implementations load it through their own loader."""
    import json

    import torch
    from safetensors.torch import save_file

    width = setting.shape.hidden
    path = os.path.join(setting.files_dir, f"pulid_flux_v0.9.1-random-{width}.safetensors")
    if os.path.isfile(path):
        return path
    with open(os.path.join(os.path.dirname(HERE), "tests", "data", "checkpoint_layouts", "pulid_flux_v0.9.1.json"),
              encoding="utf-8") as f:
        layout = json.load(f)["groups"][""]
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for key, spec in layout.items():
        shape = [width if n == 3072 else n for n in spec["shape"]]
        dtype = getattr(torch, spec["dtype"])
        if "norm" in key:
            tensors[key] = torch.full(shape, 1.0 if key.endswith("weight") else 0.0, dtype=dtype)
        else:
            tensors[key] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    os.makedirs(setting.files_dir, exist_ok=True)
    save_file(tensors, path + ".part")
    os.replace(path + ".part", path)
    return path


def build_ours(base, setting):
    try:
        from likeness.techniques.pulid_flux import PulidFluxEmbeds, apply_pulid_flux, load_pulid_flux
    except ImportError as exc:
        raise RowUnavailable(f"the pack's PuLID-FLUX is not on this branch ({exc})") from exc
    import torch

    pulid = load_pulid_flux(random_release_file(setting))
    generator = torch.Generator().manual_seed(8)
    embeds = PulidFluxEmbeds(tokens=torch.randn(1, EMBED_TOKENS, EMBED_DIM, generator=generator),
                             uncond_tokens=torch.zeros(1, EMBED_TOKENS, EMBED_DIM), encoder=pulid.source)
    model = apply_pulid_flux(base, pulid, embeds, weight=1.0, start_at=0.0, end_at=1.0)
    flux_bench.count_engine_work(model, "ours", reference_passes=False)
    return model


# ------------------------------------------------------------------------------------------ lldacing's port

def extract_lldacing(mirror: str) -> str:
    """``git archive`` of the mirror's HEAD into a new temporary folder; the folder that holds the package."""
    if not os.path.isdir(mirror):
        raise RowUnavailable(f"no fetched copy of lldacing/ComfyUI_PuLID_Flux_ll at {mirror} (--lldacing-mirror)")
    root = tempfile.mkdtemp(prefix="likeness-lldacing-")
    target = os.path.join(root, LLDACING_PACKAGE)
    os.makedirs(target)
    archive = subprocess.run(["git", "-C", mirror, "archive", "--format=tar", "HEAD"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    return root


class _FaceParser:
    """facexlib's BiSeNet stand-in: 19-class logits of the image's size."""

    def __call__(self, image):
        import torch

        generator = torch.Generator().manual_seed(3)
        return (torch.randn(image.shape[0], 19, *image.shape[-2:], generator=generator),)


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _not_on_patch_path(*args, **kwargs):
    raise AssertionError("a stubbed facexlib function was called")


def install_stubs(root: str) -> None:
    """Stand-ins for the port's model-file dependencies that its patch path does not run (see the module doc)."""
    _module("facexlib", __path__=[])
    _module("facexlib.detection", init_detection_model=lambda *a, **k: None)
    _module("facexlib.parsing", init_parsing_model=lambda *a, **k: _FaceParser())
    _module("facexlib.utils", __path__=[])
    _module("facexlib.utils.misc", img2tensor=_not_on_patch_path, imwrite=_not_on_patch_path)
    # The eva_clip package's __init__ imports the EVA-CLIP factory (timm, ftfy, ...); pulidflux.py imports only its
    # constants module, which loads from the real folder below this bare package.
    _module(f"{LLDACING_PACKAGE}.eva_clip", __path__=[os.path.join(root, LLDACING_PACKAGE, "eva_clip")])


def import_lldacing(mirror: str):
    """The port's ``pulidflux`` and ``PulidFluxHook`` modules, imported from a fresh extraction."""
    if LLDACING_PACKAGE + ".pulidflux" in sys.modules:
        return sys.modules[LLDACING_PACKAGE + ".pulidflux"], sys.modules[LLDACING_PACKAGE + ".PulidFluxHook"]
    root = extract_lldacing(mirror)
    sys.path.insert(0, root)
    install_stubs(root)
    try:
        package = importlib.import_module(LLDACING_PACKAGE)
    except ImportError as exc:
        raise RowUnavailable(f"lldacing's port cannot be imported here: {exc}") from exc
    return package.pulidflux, importlib.import_module(LLDACING_PACKAGE + ".PulidFluxHook")


class _Face:
    def __init__(self, seed: int):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.bbox = np.array([160.0, 140.0, 352.0, 380.0], np.float32)
        self.kps = np.array([[210, 230], [300, 230], [256, 280], [220, 330], [292, 330]], np.float32)
        self.embedding = rng.standard_normal(512).astype(np.float32)
        self.det_score = 0.9


class _FaceAnalysis:
    """insightface ``FaceAnalysis`` stand-in: one face, random antelopev2-sized (512) embedding."""

    def __init__(self):
        self.det_model = types.SimpleNamespace(input_size=(640, 640))

    def get(self, image):
        return [_Face(4)]


class _EvaClip:
    """EVA02-CLIP-L-14-336 visual tower stand-in: random 768-d feature and 5 hidden states [1, 577, 1024]."""

    image_size = 336

    def __init__(self, mean, std):
        self.image_mean, self.image_std = mean, std

    def to(self, *args, **kwargs):
        return self

    def __call__(self, image, return_all_features=False, return_hidden=True, shuffle=False):
        import torch

        generator = torch.Generator().manual_seed(5)
        batch = image.shape[0]
        hidden = [torch.randn(batch, 577, 1024, generator=generator).to(image.dtype) for _ in range(5)]
        return torch.randn(batch, 768, generator=generator).to(image.dtype), hidden


def load_lldacing_model(pulidflux, path: str, width: int):
    """The port's ``PulidFluxModelLoader`` on ``path``; at ``--tiny`` width its three steps by hand with
    cross-attentions of that width (its class builds FLUX.1's)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import folder_paths
    import torch

    if width == 3072:
        folder_paths.add_model_folder_path("pulid", os.path.dirname(path))
        (patcher,) = pulidflux.PulidFluxModelLoader().load_model(os.path.basename(path))
        return patcher
    model = pulidflux.PulidFluxModel()
    encoders = importlib.import_module(LLDACING_PACKAGE + ".encoders_flux")
    model.pulid_ca = torch.nn.ModuleList(encoders.PerceiverAttentionCA(dim=width) for _ in model.pulid_ca)
    model.from_pretrained(path=path)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_lldacing(base, setting):
    import torch

    pulidflux, hook = import_lldacing(os.environ.get("LIKENESS_LLDACING_MIRROR", LLDACING_MIRROR))
    pulid = load_lldacing_model(pulidflux, random_release_file(setting), setting.shape.hidden)
    flux_bench.count_calls(pulid.model.pulid_ca, "lldacing")
    constants = importlib.import_module(LLDACING_PACKAGE + ".eva_clip.constants")
    image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        (model,) = pulidflux.ApplyPulidFlux().apply_pulid_flux(
            base, pulid, _EvaClip(constants.OPENAI_DATASET_MEAN, constants.OPENAI_DATASET_STD), _FaceAnalysis(),
            image, weight=1.0, start_at=0.0, end_at=1.0)
    mark_last_double_block(model, hook, setting.shape.double)
    return model


def mark_last_double_block(model, hook, double_blocks: int) -> None:
    """Give the port's "last double block" role (index 18 in its code) to this model's last double block."""
    entries = model.model_options["transformer_options"]["patches_replace"]["dit"]
    key = ("double_block", double_blocks - 1)
    entry = entries.get(key)
    if isinstance(entry, hook.LastDitDoubleBlockReplace):
        return
    if entry is not None:
        entry.__class__ = hook.LastDitDoubleBlockReplace
        return
    marker = hook.LastDitDoubleBlockReplace.__new__(hook.LastDitDoubleBlockReplace)
    marker.callback, marker.kwargs = [], []      # records the text length, runs no CA
    entries[key] = marker


ROWS = {
    "unpatched": Row("the model as loaded", flux_bench.unpatched),
    "ours": Row("the pack's PuLID-FLUX injector (engine ResidualInjector), official schedule, weight 1, random ID "
                "embedding", build_ours, targets=((1.05, "unpatched"), (1.0, "lldacing")), prepare=random_release_file),
    "lldacing": Row("lldacing/ComfyUI_PuLID_Flux_ll ApplyPulidFlux with its defaults (rebinds forward_orig)",
                    build_lldacing, prepare=random_release_file),
}


def notes(args) -> list[str]:
    commit = subprocess.run(["git", "-C", args.lldacing_mirror, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "absent"
    return [f"both PuLID rows load one random file in the released pulid_flux_v0.9.1 layout and dtype (bf16, 20 ID "
            f"cross-attentions + IDFormer) through their own loaders; ID embedding [1, {EMBED_TOKENS}, {EMBED_DIM}]",
            f"lldacing: github:lldacing/ComfyUI_PuLID_Flux_ll @ {commit}, extracted to a temporary folder and "
            "imported; stand-ins only for what needs model files off its patch path (insightface FaceAnalysis, "
            "EVA-CLIP, facexlib); its last-double-block marker (hard-coded block 18) moved to this model's last "
            "double block"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flux_bench.add_arguments(parser)
    parser.add_argument("--lldacing-mirror", default=LLDACING_MIRROR,
                        help="bare git repository of github:lldacing/ComfyUI_PuLID_Flux_ll")
    parser.add_argument("--rows", default=",".join(ROWS), help="rows to run (comma-separated)")
    args = parser.parse_args(argv)
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "comfy", "model_patcher.py")):
        parser.error("set COMFYUI_PATH or --comfyui to a ComfyUI checkout")
    os.environ["LIKENESS_LLDACING_MIRROR"] = args.lldacing_mirror   # read by the row's build
    rows = {name: ROWS[name] for name in args.rows.split(",") if name}
    if args.worker:
        return flux_bench.worker_main(rows, args)
    flux_bench.run_benchmark(__file__, "PuLID-FLUX on FLUX.1: ours vs lldacing's port vs unpatched", rows, args,
                             extra_flags=["--lldacing-mirror", args.lldacing_mirror, "--rows", args.rows],
                             notes=notes(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
