"""Real-host test support: tiny ComfyUI models, the pack loaded as a custom node, in-process execution.

A pytest plugin (``pytest_plugins`` in ``tests/conftest.py``); when ``COMFYUI_PATH`` is set, conftest
calls :func:`prepare_comfy` first, before anything imports ``comfy``. Nothing here imports ComfyUI at
module level. Host tests are marked ``@pytest.mark.host``.

Fixtures
    host_env        (session) the temporary ComfyUI base directory (models/, input/, output/, temp/)
    comfy_ready     (session) ComfyUI's core nodes + comfy_extras loaded (no external custom nodes)
    pack_loaded     (session) this pack loaded through ``nodes.load_custom_node``; its NODE_CLASS_MAPPINGS
    host_test_nodes (session) the test-only nodes of ``tests/host_nodes`` (tiny MODEL/CLIP/VAE loaders)
    execute_prompt  a function ``prompt -> ui outputs`` running ComfyUI's real executor in-process
    tiny_sd15, tiny_sdxl               fresh ModelPatcher clones of session-cached tiny UNets
    tiny_flux       a fresh clone of a session-cached tiny FLUX.1 DiT (ComfyUI's Flux class, 4 double + 8 single blocks)
    tiny_clip       a fresh clone of a tiny comfy.sd.CLIP (real SD1 tokenizer, width 64)
    tiny_vae, tiny_clip_vision   shared comfy.sd.VAE / comfy.clip_vision.ClipVisionModel (do not mutate)

Builders (for variants): :func:`build_tiny_sd15` (e.g. ``in_channels=9`` for an inpainting-shaped
model), :func:`build_tiny_sdxl`, :func:`build_tiny_flux` (+ :func:`flux_conditioning`, :func:`build_tiny_flux_clip`, :func:`build_tiny_flux_vae`), :func:`build_tiny_clip`, :func:`build_tiny_sdxl_clip` (SDXL's two text
encoders), :func:`build_tiny_vae`, :func:`build_tiny_clip_vision`, :func:`conditioning`, :func:`sdxl_conditioning`,
:func:`write_tiny_sd15_checkpoint` (a single-file checkpoint the stock CheckpointLoaderSimple loads),
:func:`example_prompt` (an example workflow as the API prompt the runner makes of it).

Every model is initialised explicitly and seeded (ComfyUI's default ops leave weights uninitialised):
norm weights 1, biases 0, everything else N(0, 0.02).
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_NODES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_nodes")
EXAMPLES_DIR = os.path.join(ROOT, "example_workflows")

COMFY_PATH: str | None = None
BASE_DIR: str | None = None

# Defaults of the tiny models: channels are multiples of 32 (GroupNorm(32)); context 64.
TINY_CONTEXT_DIM = 64
TINY_MODEL_CHANNELS = 32
TINY_SDXL_POOLED_DIM = 1280  # fixed by model_base.SDXL.encode_adm (adm_in_channels 2816 = 1280 + 6*256)
SDXL_SIZE_CONDS_DIM = 6 * 256  # encode_adm's six size embeddings; adm_in_channels = pooled width + this
TINY_SDXL_CLIP_ADM = TINY_CONTEXT_DIM // 2 + SDXL_SIZE_CONDS_DIM   # y of build_tiny_sdxl_clip's pooled output


# --------------------------------------------------------------------------------------------------
# Process set-up


def prepare_comfy(path: str) -> str:
    """Put ComfyUI on ``sys.path`` and configure it for tests; return the temp base directory.

    Sets ``--cpu --use-pytorch-cross-attention`` before ``comfy.model_management`` is imported (the
    device and attention backend are fixed at its import), points ComfyUI's base directory at a temp
    folder (``--base-directory`` semantics, so no test writes into the ComfyUI checkout), and turns off
    tqdm bars. Idempotent.
    """
    global COMFY_PATH, BASE_DIR
    if BASE_DIR is not None:
        return BASE_DIR
    path = os.path.abspath(path)
    if path not in sys.path:
        sys.path.insert(0, path)
    if "comfy.model_management" in sys.modules or "folder_paths" in sys.modules:
        raise RuntimeError("prepare_comfy must run before comfy.model_management / folder_paths are imported")
    from comfy.cli_args import args

    args.cpu = True
    args.use_pytorch_cross_attention = True
    args.disable_auto_launch = True
    base = tempfile.mkdtemp(prefix="likeness-host-")
    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    atexit.register(shutil.rmtree, base, True)
    args.base_directory = base
    import comfy.utils  # noqa: E402  (after the args: imports comfy.model_management)
    import folder_paths  # noqa: E402
    import utils.extra_config  # noqa: E402,F401  (as main.py: before `nodes` puts ComfyUI/comfy on sys.path)

    assert folder_paths.models_dir == os.path.join(base, "models")
    comfy.utils.set_progress_bar_enabled(False)
    atexit.register(_release_models)
    COMFY_PATH, BASE_DIR = path, base
    return base


def _release_models() -> None:
    """Drop cached models while modules still exist (ModelPatcher.__del__ fails at interpreter teardown)."""
    import gc

    for cached in (_cached_sd15, _cached_sdxl, _cached_clip, _cached_sdxl_clip, build_tiny_vae,
                   build_tiny_clip_vision):
        cached.cache_clear()
    try:
        import comfy.model_management
        comfy.model_management.unload_all_models()
    except Exception:
        pass
    gc.collect()


def _headless():
    """ComfyUI without its server (``host/headless.py``): node loading, as the runner does it."""
    from likeness.host import headless
    return headless


@dataclass
class HostEnv:
    comfy_path: str
    base: str
    models: str
    input: str
    output: str
    temp: str


@pytest.fixture(scope="session")
def host_env() -> HostEnv:
    """The temp ComfyUI base directory of this test session (ComfyUI's folder_paths point here)."""
    import folder_paths

    assert BASE_DIR is not None, "prepare_comfy() was not called"
    return HostEnv(COMFY_PATH, BASE_DIR, folder_paths.models_dir, folder_paths.get_input_directory(),
                   folder_paths.get_output_directory(), folder_paths.get_temp_directory())


@pytest.fixture(scope="session")
def comfy_ready(host_env):
    """Core nodes + comfy_extras (no external custom nodes, no API nodes), loaded once per session."""
    import nodes

    _headless().load_core_nodes(custom_nodes=False)
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def pack_loaded(comfy_ready):
    """This pack loaded as a ComfyUI custom node (``nodes.load_custom_node``); returns its module name."""
    import nodes

    report = _headless().load_host_nodes(ROOT, custom_nodes=False)
    assert not report.pack_failed, "the pack failed to import into ComfyUI (see the log above)"
    # load_custom_node registers a package folder under its path (dots escaped) as the module name
    module = sys.modules.get(os.path.abspath(ROOT).replace(".", "_x_"))
    assert module is not None, f"the pack was loaded from elsewhere: {report.pack_module}"
    from likeness import NODE_CLASS_MAPPINGS as expected
    missing = [name for name in expected if name not in nodes.NODE_CLASS_MAPPINGS]
    assert not missing, f"pack nodes not registered in ComfyUI: {missing}"
    return module


@pytest.fixture(scope="session")
def host_test_nodes(comfy_ready):
    """Test-only nodes (``tests/host_nodes``): LikenessTestTinySD15Loader etc."""
    import nodes

    report = _headless().load_host_nodes(ROOT, extra_nodes=[HOST_NODES_DIR], custom_nodes=False)
    assert not report.failed, f"test nodes failed to import: {report.failed}"
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("LikenessTest")}


@pytest.fixture
def isolated_runner_state(monkeypatch):
    """The command line (``run``, ``train``) sets ComfyUI's output/temp folders and the log handlers and levels of its
    process: restore them."""
    import logging

    import folder_paths

    for name in ("output_directory", "temp_directory"):
        monkeypatch.setattr(folder_paths, name, getattr(folder_paths, name))
    root, pack = logging.getLogger(), logging.getLogger("likeness")
    saved = root.level, list(root.handlers), pack.level
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    pack.setLevel(saved[2])


@pytest.fixture
def execute_prompt(pack_loaded):
    """``run(prompt: dict, on_event=None) -> outputs``: ComfyUI's validate + PromptExecutor, in-process.

    Raises ``PromptValidationError`` (``.node_errors``) or ``PromptExecutionError`` (``.details`` with
    the traceback), with the runner's messages. Outputs are the ui dicts per node id (as in ``/history``).
    """
    from likeness.cli import runner

    def run(prompt: dict, on_event=None) -> dict:
        return runner.execute_prompt(prompt, on_event=on_event)

    return run


def saved_image(env: HostEnv, outputs: dict, prompt: dict, prefix: str | None = None):
    """The one image the prompt's only SaveImage wrote (uint8 ``[H, W, 3]``), read from ``env``'s output folder;
    ``prefix``: the file name prefix that node must have."""
    import numpy as np
    from PIL import Image

    (save,) = [nid for nid, node in prompt.items() if node["class_type"] == "SaveImage"]
    if prefix is not None:
        assert prompt[save]["inputs"]["filename_prefix"] == prefix
    (item,) = outputs[save]["images"]
    return np.asarray(Image.open(os.path.join(env.output, item["subfolder"], item["filename"])))


def example_prompt(name: str) -> dict:
    """``example_workflows/<name>.json`` (UI format, as the frontend saves it) as an API prompt, converted
    the way ``python <pack> run`` converts it. Needs the pack's nodes registered (``pack_loaded``)."""
    with open(os.path.join(EXAMPLES_DIR, name + ".json"), encoding="utf-8") as handle:
        workflow = json.load(handle)
    assert "nodes" in workflow and "links" in workflow, f"{name} is not in the frontend's (UI) format"
    from likeness.cli.runner import to_api_prompt

    return to_api_prompt(workflow)


# --------------------------------------------------------------------------------------------------
# Weight initialisation


def shared_model(maxsize: int):
    """``functools.lru_cache`` for the tiny-model builders, building outside inference mode: the models are shared
    by the whole test process, and one first built inside the executor (test nodes run under ComfyUI's inference
    mode) must still serve a later test that records autograd (a trainer, a node called directly)."""
    def decorate(build):
        @functools.wraps(build)
        def outside_inference(*args, **kwargs):
            import torch

            with torch.inference_mode(False):
                return build(*args, **kwargs)
        return functools.lru_cache(maxsize=maxsize)(outside_inference)
    return decorate


def init_weights(module, seed: int = 0, std: float = 0.02, fan_in_gain: float | None = None):
    """Norm gains 1 (``weight``, RMSNorm's ``scale``), biases 0, every other parameter N(0, std); deterministic for a
    seed.

    ``fan_in_gain`` switches matrices/kernels to N(0, gain/sqrt(fan_in)) (He init with gain sqrt(2)):
    deep ReLU stacks without norms (TAESD) otherwise decode to a constant.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)
    norm_params = set()
    for sub in module.modules():
        if isinstance(sub, norm_types) or "norm" in type(sub).__name__.lower():
            for p in sub.parameters(recurse=False):
                norm_params.add(id(p))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if id(p) in norm_params:   # gains 1 (FLUX's RMSNorm calls its gain "scale"), shifts 0
                p.fill_(1.0 if name.endswith(("weight", "scale")) else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                scale = std
                if fan_in_gain is not None and p.dim() >= 2:
                    scale = fan_in_gain / (p[0].numel() ** 0.5)
                values = torch.randn(p.shape, generator=generator, dtype=torch.float32) * scale
                p.copy_(values.to(p.dtype))
    return module


# --------------------------------------------------------------------------------------------------
# Tiny UNets (SD1.5 / SDXL block structure, shrunken channels)


def sd15_unet_config(model_channels: int = TINY_MODEL_CHANNELS, context_dim: int = TINY_CONTEXT_DIM,
                     in_channels: int = 4) -> dict:
    """The real SD1.5 UNet layout (model_detection.py's SD15) with fewer channels: 16 attn2 sites."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": in_channels, "model_channels": model_channels,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": context_dim, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def sdxl_unet_config(model_channels: int = TINY_MODEL_CHANNELS, context_dim: int = TINY_CONTEXT_DIM,
                     in_channels: int = 4, adm_in_channels: int = 2816) -> dict:
    """The SDXL UNet layout (same blocks and attention sites) with transformer depth 10 shrunk to 2.

    ``adm_in_channels`` = pooled width + :data:`SDXL_SIZE_CONDS_DIM` (2816 with SDXL's 1280-d pooled output)."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": adm_in_channels, "in_channels": in_channels,
        "model_channels": model_channels, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 2, 2],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 2, "use_linear_in_transformer": True,
        "context_dim": context_dim, "num_head_channels": 16,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 2, 2, 2],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def _patcher(model_config_cls, unet_config: dict, seed: int):
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    config = model_config_cls(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


@shared_model(maxsize=8)
def _cached_sd15(seed, context_dim, model_channels, in_channels):
    import comfy.supported_models
    return _patcher(comfy.supported_models.SD15, sd15_unet_config(model_channels, context_dim, in_channels), seed)


@shared_model(maxsize=4)
def _cached_sdxl(seed, context_dim, model_channels, in_channels, adm_in_channels=2816):
    import comfy.supported_models
    return _patcher(comfy.supported_models.SDXL,
                    sdxl_unet_config(model_channels, context_dim, in_channels, adm_in_channels), seed)


def build_tiny_sd15(seed: int = 0, context_dim: int = TINY_CONTEXT_DIM, model_channels: int = TINY_MODEL_CHANNELS,
                    in_channels: int = 4, cached: bool = True):
    """A ``ModelPatcher`` of a tiny SD1.5-shaped UNet (``in_channels=9``: inpainting-shaped).

    ``cached=True`` returns a clone of a per-process model (weights shared, patches fresh).
    """
    if cached:
        return _cached_sd15(seed, context_dim, model_channels, in_channels).clone()
    return _cached_sd15.__wrapped__(seed, context_dim, model_channels, in_channels)


def build_tiny_sdxl(seed: int = 0, context_dim: int = TINY_CONTEXT_DIM, model_channels: int = TINY_MODEL_CHANNELS,
                    in_channels: int = 4, cached: bool = True, adm_in_channels: int = 2816):
    """A ``ModelPatcher`` of a tiny SDXL-shaped UNet (needs :func:`sdxl_conditioning`; with
    ``adm_in_channels=TINY_SDXL_CLIP_ADM`` it takes the conditioning of :func:`build_tiny_sdxl_clip`)."""
    if cached:
        return _cached_sdxl(seed, context_dim, model_channels, in_channels, adm_in_channels).clone()
    return _cached_sdxl.__wrapped__(seed, context_dim, model_channels, in_channels, adm_in_channels)


def flux_dit_config(hidden: int = 64, heads: int = 4, depth: int = 4, depth_single: int = 8,
                    context_dim: int = TINY_CONTEXT_DIM, vec_dim: int = 32, guidance_embed: bool = True) -> dict:
    """FLUX.1's DiT layout (model_detection.py's flux branch: double then single blocks, RoPE axes, QK norm,
    qkv bias, patch 2, 16 latent channels) shrunk: ``depth`` double and ``depth_single`` single blocks of
    width ``hidden``. The defaults give PuLID's schedule (every 2nd double, every 4th single block) 2 + 2 sites."""
    dim_head = hidden // heads
    axes = [dim_head - 2 * (3 * dim_head // 8), 3 * dim_head // 8, 3 * dim_head // 8]
    return {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": vec_dim,
        "context_in_dim": context_dim, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads, "depth": depth,
        "depth_single_blocks": depth_single, "axes_dim": axes, "theta": 10000, "qkv_bias": True,
        "guidance_embed": guidance_embed,
    }


@shared_model(maxsize=4)
def _cached_flux(seed, hidden, depth, depth_single, guidance_embed):
    import comfy.supported_models
    config_cls = comfy.supported_models.Flux if guidance_embed else comfy.supported_models.FluxSchnell
    return _patcher(config_cls, flux_dit_config(hidden=hidden, depth=depth, depth_single=depth_single,
                                                guidance_embed=guidance_embed), seed)


def build_tiny_flux(seed: int = 0, hidden: int = 64, depth: int = 4, depth_single: int = 8,
                    guidance_embed: bool = True, cached: bool = True):
    """A ``ModelPatcher`` of a tiny FLUX.1 DiT built from ComfyUI's own ``model_base.Flux`` (dev-style with the
    guidance embedding, or schnell-style without); takes :func:`flux_conditioning`."""
    if cached:
        return _cached_flux(seed, hidden, depth, depth_single, guidance_embed).clone()
    return _cached_flux.__wrapped__(seed, hidden, depth, depth_single, guidance_embed)


def flux_conditioning(seed: int = 0, tokens: int = 16, context_dim: int = TINY_CONTEXT_DIM, vec_dim: int = 32,
                      guidance: float = 3.5) -> list:
    """A Flux CONDITIONING ``[[t5 [1, tokens, ctx], {"pooled_output": [1, vec], "guidance": g}]]``, seeded."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, context_dim, generator=generator)
    pooled = torch.randn(1, vec_dim, generator=generator)
    return [[context, {"pooled_output": pooled, "guidance": guidance}]]


def tiny_t5_config(width: int = TINY_CONTEXT_DIM, layers: int = 2, heads: int = 4) -> dict:
    """ComfyUI's ``t5_config_xxl.json`` (gated GELU, relative position buckets, T5's vocabulary) shrunk."""
    return {"d_ff": width * 2, "d_kv": width // heads, "d_model": width, "decoder_start_token_id": 0,
            "dropout_rate": 0.0, "eos_token_id": 1, "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0,
            "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
            "num_decoder_layers": layers, "num_heads": heads, "num_layers": layers, "output_past": True,
            "pad_token_id": 0, "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 32128}


@shared_model(maxsize=2)
def _cached_flux_clip(seed, t5_width, clip_width):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5
    import torch

    class TinyFluxClipModel(comfy.text_encoders.flux.FluxClipModel):
        """FLUX's text encoders as ComfyUI wires them (T5 states as the context, CLIP-L's pooled output as ``y``),
        each tiny."""

        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            torch.nn.Module.__init__(self)
            options = dict(model_options or {})
            self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                     textmodel_json_config=tiny_text_config(clip_width),
                                                     model_options=options)
            self.t5xxl = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, special_tokens={"end": 1, "pad": 0},
                                                    textmodel_json_config=tiny_t5_config(t5_width),
                                                    model_class=comfy.text_encoders.t5.T5,
                                                    model_options={**options, "model_name": "t5xxl"})
            self.dtypes = {dtype}

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClipModel)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    init_weights(clip.cond_stage_model, seed)
    return clip


def build_tiny_flux_clip(seed: int = 0, t5_width: int = TINY_CONTEXT_DIM, clip_width: int = 32):
    """A ``comfy.sd.CLIP`` shaped like FLUX's (DualCLIPLoader type flux): the real CLIP-L and T5 tokenizers, two tiny
    encoders. ``CLIPTextEncode`` gives ``[1, 256, t5_width]`` (the tiny Flux's context) and a ``pooled_output``
    ``clip_width`` wide (the tiny Flux's ``vec_in_dim``)."""
    return _cached_flux_clip(seed, t5_width, clip_width).clone()


@pytest.fixture
def tiny_flux(comfy_ready):
    return build_tiny_flux()


@pytest.fixture
def tiny_sd15(comfy_ready):
    return build_tiny_sd15()


@pytest.fixture
def tiny_sdxl(comfy_ready):
    return build_tiny_sdxl()


def conditioning(ctx_dim: int = TINY_CONTEXT_DIM, tokens: int = 77, seed: int = 0, batch: int = 1, **extra) -> list:
    """A CONDITIONING value ``[[cross_attn [batch, tokens, ctx], {...extra}]]`` with seeded noise."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, ctx_dim, generator=generator), dict(extra)]]


def sdxl_conditioning(ctx_dim: int = TINY_CONTEXT_DIM, seed: int = 0, size: int = 256) -> list:
    """SDXL CONDITIONING: cross-attn plus the pooled output and size keys ``encode_adm`` needs."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    pooled = torch.randn(1, TINY_SDXL_POOLED_DIM, generator=generator)
    return conditioning(ctx_dim, seed=seed, pooled_output=pooled, width=size, height=size,
                        crop_w=0, crop_h=0, target_width=size, target_height=size)


# --------------------------------------------------------------------------------------------------
# Tiny CLIP text encoder (real SD1 tokenizer), VAE and CLIP vision


def tiny_text_config(hidden: int = TINY_CONTEXT_DIM, layers: int = 2, heads: int = 2) -> dict:
    return {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": hidden, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": hidden * 4, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": heads,
        "num_hidden_layers": layers, "pad_token_id": 1, "projection_dim": hidden, "vocab_size": 49408,
    }


@shared_model(maxsize=4)
def _cached_clip(seed, hidden):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import torch

    config = tiny_text_config(hidden)

    class TinySD1ClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            clip_model = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(config),
                                           return_projected_pooled=False)
            super().__init__(device=device, dtype=dtype, model_options=model_options or {}, clip_model=clip_model,
                             **kwargs)

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinySD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    init_weights(clip.cond_stage_model, seed)
    return clip


def build_tiny_clip(seed: int = 0, hidden: int = TINY_CONTEXT_DIM):
    """A ``comfy.sd.CLIP`` with the real SD1 tokenizer and a tiny CLIP text model (width ``hidden``).

    ``CLIPTextEncode`` on it gives conditioning ``[1, 77*k, hidden]`` (matches the tiny SD1.5 UNet).
    """
    return _cached_clip(seed, hidden).clone()


@shared_model(maxsize=2)
def _cached_sdxl_clip(seed, l_hidden, g_hidden, pooled_dim=None):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import torch

    # 3 layers: SDXL reads the penultimate layer (layer_idx -2), which ComfyUI requires to be inside the model
    l_config = tiny_text_config(l_hidden, layers=3)
    g_config = dict(tiny_text_config(g_hidden, layers=3), pad_token_id=0)

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        """SDXL's two text encoders as ComfyUI wires them (penultimate states, CLIP-G's projected pooled output),
        each tiny; ``cat(l, g)`` is ``l_hidden + g_hidden`` wide."""

        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            torch.nn.Module.__init__(self)
            options = model_options or {}
            # pooled_dim: CLIP-G's pooled output widened by one fixed Linear (1280: the real model's y width)
            self.pooled_projection = None if pooled_dim is None else torch.nn.Linear(
                g_hidden, pooled_dim, bias=False, dtype=dtype, device=device).requires_grad_(False)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, model_options=options,
                                                     textmodel_json_config=dict(l_config),
                                                     return_projected_pooled=False)
            self.clip_g = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     textmodel_json_config=dict(g_config),
                                                     special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                                     layer_norm_hidden_state=False, return_projected_pooled=True,
                                                     model_options={**options, "model_name": "clip_g"})
            self.dtypes = {dtype}

        def encode_token_weights(self, token_weight_pairs):
            cond, pooled = super().encode_token_weights(token_weight_pairs)
            if self.pooled_projection is None:
                return cond, pooled
            return cond, self.pooled_projection(pooled.to(self.pooled_projection.weight.dtype))

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    init_weights(clip.cond_stage_model, seed)
    return clip


def build_tiny_sdxl_clip(seed: int = 0, l_hidden: int = TINY_CONTEXT_DIM // 2, g_hidden: int = TINY_CONTEXT_DIM // 2,
                         pooled_dim: int | None = None):
    """A ``comfy.sd.CLIP`` shaped like SDXL's: the real SDXL tokenizer ("g" and "l" streams), two tiny text models.

    ``CLIPTextEncode`` on it gives ``[1, 77*k, l_hidden + g_hidden]`` (the tiny SDXL UNet's context) and a
    ``pooled_output`` ``g_hidden`` wide (ComfyUI's text projection is square): use it with
    ``build_tiny_sdxl(adm_in_channels=TINY_SDXL_CLIP_ADM)``. ``pooled_dim=TINY_SDXL_POOLED_DIM`` widens the pooled
    output to the real 1280 (one fixed Linear) for the default ``build_tiny_sdxl()``.
    """
    return _cached_sdxl_clip(seed, l_hidden, g_hidden, pooled_dim).clone()


def tiny_ddconfig(z_channels: int = 4) -> dict:
    """An SD-VAE-shaped autoencoder (8x downscale, 4 latent channels; FLUX's: 16) with 32 channels per level."""
    return {"double_z": True, "z_channels": z_channels, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


@shared_model(maxsize=4)
def build_tiny_vae(seed: int = 0, latent_channels: int = 4):
    """A ``comfy.sd.VAE`` (AutoencoderKL, tiny ddconfig, random init): encode/decode like the SD VAE (FLUX's
    16-channel autoencoder with ``latent_channels=16``)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    params = {"embed_dim": latent_channels, "ddconfig": tiny_ddconfig(latent_channels)}
    module = init_weights(AutoencoderKL(**params), seed)
    vae = comfy.sd.VAE(sd=module.state_dict(), config={"params": params})
    vae.latent_channels = latent_channels
    return vae


def build_tiny_flux_vae(seed: int = 0):
    """A tiny 16-channel autoencoder standing in for FLUX's ``ae.safetensors``."""
    return build_tiny_vae(seed, latent_channels=16)


def tiny_clip_vision_config(hidden: int = 64, layers: int = 3, heads: int = 4, projection_dim: int = 32) -> dict:
    """ViT-H/14-like: 224 px, patch 14 -> 257 tokens like the real encoder, but narrow and shallow."""
    return {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": hidden,
            "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": hidden * 4, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
            "num_attention_heads": heads, "num_channels": 3, "num_hidden_layers": layers, "patch_size": 14,
            "projection_dim": projection_dim, "torch_dtype": "float32"}


@shared_model(maxsize=4)
def build_tiny_clip_vision(seed: int = 0, hidden: int = 64, projection_dim: int = 32):
    """A ``comfy.clip_vision.ClipVisionModel`` (fp32 on CPU) from a tiny ViT-H-like JSON config."""
    import comfy.clip_vision
    import comfy.model_management
    import torch

    folder = tempfile.mkdtemp(prefix="likeness-clipvision-", dir=BASE_DIR)
    path = os.path.join(folder, "config.json")
    with open(path, "w") as f:
        json.dump(tiny_clip_vision_config(hidden, projection_dim=projection_dim), f)
    # ComfyUI runs CLIP vision in text_encoder_dtype() (fp16 even on CPU); tests want fp32 numerics.
    original = comfy.model_management.text_encoder_dtype
    comfy.model_management.text_encoder_dtype = lambda *a, **k: torch.float32
    try:
        model = comfy.clip_vision.ClipVisionModel(path)
    finally:
        comfy.model_management.text_encoder_dtype = original
    init_weights(model.model, seed)
    return model


@pytest.fixture
def tiny_clip(comfy_ready):
    return build_tiny_clip()


@pytest.fixture
def tiny_vae(comfy_ready):
    return build_tiny_vae()


@pytest.fixture
def tiny_clip_vision(comfy_ready):
    return build_tiny_clip_vision()


# --------------------------------------------------------------------------------------------------
# A tiny single-file SD1.5 checkpoint for the stock CheckpointLoaderSimple


def checkpoint_unet_config() -> dict:
    """Smallest UNet ComfyUI still detects as SD1.5: detection keys on model_channels 320 and context 768."""
    config = sd15_unet_config(model_channels=320, context_dim=768)
    config.update({"num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
                   "transformer_depth_output": [1, 1], "transformer_depth_middle": 1})
    return config


def write_tiny_sd15_checkpoint(path: str, seed: int = 0) -> str:
    """Write a single-file SD1.5 checkpoint (UNet + CLIP-L + VAE) that ComfyUI detects as SD1.5.

    UNet: one 320-channel level with the SD1.5 block types. Text encoder: the real CLIP-L shape
    (ComfyUI builds it from a fixed config; fp16, ~246 MB). VAE: TAESD-shaped (ComfyUI detects it
    from its keys; 8x downscale, 4 latent channels). All weights random (seeded).
    """
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.taesd.taesd
    import torch

    model = _patcher(comfy.supported_models.SD15, checkpoint_unet_config(), seed)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float16})
    init_weights(clip.cond_stage_model, seed + 1)
    taesd = init_weights(comfy.taesd.taesd.TAESD(latent_channels=4), seed + 2, fan_in_gain=2 ** 0.5)
    vae = comfy.sd.VAE(sd=taesd.state_dict())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    comfy.sd.save_checkpoint(path, model, clip, vae)
    return path


CHECKPOINT_CACHE_VERSION = 1


def cached_tiny_sd15_checkpoint(seed: int = 0) -> str:
    """Path of the tiny SD1.5 checkpoint, written once per machine into the temp dir and reused.

    Writing it is slow (the CLIP-L text encoder is full size); it is deterministic for a seed, so later
    test sessions reuse it. Written atomically (``.partial`` then rename).
    """
    folder = os.path.join(tempfile.gettempdir(), "likeness-test-cache")
    path = os.path.join(folder, f"tiny_sd15_v{CHECKPOINT_CACHE_VERSION}_s{seed}.safetensors")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        write_tiny_sd15_checkpoint(partial, seed)
        os.replace(partial, path)
    return path


def clip_vision_width(clip_vision) -> int:
    """Width of a CLIP vision model's penultimate hidden states, probed the way ComfyUI runs models (inference
    mode: shared tiny models may hold inference tensors left by earlier tests)."""
    import torch

    with torch.inference_mode():
        return int(clip_vision.encode_image(torch.rand(1, 32, 32, 3))["penultimate_hidden_states"].shape[-1])


def sample_tiny(model, steps: int = 2, cfg: float = 5.0, positive=None, negative=None, latent=None, seed: int = 0,
                sdxl: bool = False):
    """Euler/normal sampling of a tiny model under inference mode, as the executor runs it (16x16 latent and
    seeded random tiny conditioning unless given)."""
    import comfy.sample
    import torch

    make = sdxl_conditioning if sdxl else conditioning
    latent = latent if latent is not None else torch.zeros(1, 4, 16, 16)
    positive = positive if positive is not None else make(seed=1)
    negative = negative if negative is not None else make(seed=2)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed)
