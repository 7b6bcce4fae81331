"""The engine inside real ComfyUI: sites of the real SD1.5/SDXL configs, every site firing during
sampling, exact no-ops, chunk order in real batches, stacking, clone safety."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host

# comfy/model_detection.py (v0.3.64) unet configs of the real models (dtype left out)
SD15_CONFIG = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
               'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
               'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0], 'channel_mult': [1, 2, 4, 4],
               'transformer_depth_middle': 1, 'use_linear_in_transformer': False, 'context_dim': 768, 'num_heads': 8,
               'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
               'use_temporal_attention': False, 'use_temporal_resblock': False}
SDXL_CONFIG = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
               'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
               'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
               'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
               'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
               'use_temporal_attention': False, 'use_temporal_resblock': False}

# seed_architectures.md §0.1: diffusers processor order k of the SD1.5 ComfyUI blocks
SD15_ORDER = {("input", 1): 0, ("input", 2): 1, ("input", 4): 2, ("input", 5): 3, ("input", 7): 4, ("input", 8): 5,
              ("output", 3): 6, ("output", 4): 7, ("output", 5): 8, ("output", 6): 9, ("output", 7): 10,
              ("output", 8): 11, ("output", 9): 12, ("output", 10): 13, ("output", 11): 14, ("middle", 0): 15}


def _meta_model(config_cls_name, config):
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, config_cls_name)(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    return model_config.get_model({}, device=torch.device("meta"))


def test_sites_of_the_real_sd15_config(comfy_ready):
    from likeness.attention_patches import find_sites

    sites = find_sites(_meta_model("SD15", SD15_CONFIG))
    assert len(sites) == 16
    assert {s.block: s.order for s in sites} == SD15_ORDER
    assert [s.processor_index for s in sorted(sites, key=lambda s: s.order)] == list(range(1, 32, 2))
    assert [s.transformer_index for s in sites] == list(range(16))
    assert {s.key for s in sites if s.group == "middle"} == {("middle", 0, 0)}
    assert {(s.block, s.channels, s.heads, s.dim_head) for s in sites if s.block in (("input", 1), ("output", 11))} == \
        {(("input", 1), 320, 8, 40), (("output", 11), 320, 8, 40)}
    assert {s.context_dim for s in sites} == {768}
    assert [s.level for s in sites if s.group == "input"] == [0, 0, 1, 1, 2, 2]


def test_sites_of_the_real_sdxl_config_on_meta(comfy_ready):
    from likeness.attention_patches import find_sites

    sites = find_sites(_meta_model("SDXL", SDXL_CONFIG))
    assert len(sites) == 70
    counts = {}
    for s in sites:
        counts[s.block] = counts.get(s.block, 0) + 1
    assert counts == {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10,
                      ("output", 0): 10, ("output", 1): 10, ("output", 2): 10, ("output", 3): 2, ("output", 4): 2,
                      ("output", 5): 2}
    assert {s.dim_head for s in sites} == {64} and {s.context_dim for s in sites} == {2048}
    assert len({s.key for s in sites}) == 70
    by_order = sorted(sites, key=lambda s: s.order)
    # diffusers order: down blocks (24), up blocks (36), then the mid block (10)
    assert [s.group for s in by_order] == ["input"] * 24 + ["output"] * 36 + ["middle"] * 10
    assert by_order[-1].processor_index == 139
    assert [s.block_index for s in sites if s.block == ("middle", 0)] == list(range(10))


def _sample(model, steps=2, cfg=5.0, positive=None, negative=None, latent=None, seed=0):
    from host_support import sample_tiny

    return sample_tiny(model, steps, cfg, positive, negative, latent, seed)


class RecordingProvider:
    """Identity tokens per chunk kind, projected to each site's width; records what it served."""

    def __init__(self, sites, n_tokens=4, seed=0, uncond=True):
        g = torch.Generator().manual_seed(seed)
        self.tokens = {kind: {s.index: (torch.randn(1, n_tokens, s.channels, generator=g),
                                        torch.randn(1, n_tokens, s.channels, generator=g)) for s in sites}
                       for kind in (0, 1)}
        self.uncond = uncond
        self.served = []

    def __call__(self, site, kind):
        self.served.append((site.index, kind))
        if kind == 1 and not self.uncond:
            return None
        return self.tokens[kind][site.index]


def _decoupled(model, weight=1.0, **kw):
    """A decoupled injector on ``model``; returns ``(engine stats of model, provider)``."""
    from likeness.attention_patches import DecoupledInjector, add_injector, attach_stats, find_sites

    provider = RecordingProvider(find_sites(model))
    add_injector(model, DecoupledInjector("test_decoupled", provider, weight=weight, **kw))
    return attach_stats(model), provider


def test_every_site_fires_once_per_step_and_model_call(tiny_sd15):
    from likeness.attention_patches import find_patch

    model = tiny_sd15.clone()
    stats, provider = _decoupled(model)
    steps = 3
    _sample(model, steps=steps, cfg=5.0)               # cond + uncond batched: 1 UNet call per step
    assert len(find_patch(model).sites) == 16
    assert sum(stats.site_calls.values()) == 16 * steps * 1
    assert set(stats.site_calls) == set(range(16)) and set(stats.site_calls.values()) == {steps}


def test_every_site_fires_sdxl(tiny_sdxl):
    from host_support import sdxl_conditioning
    from likeness.attention_patches import find_patch

    model = tiny_sdxl.clone()
    stats, _ = _decoupled(model)
    _sample(model, steps=2, cfg=1.0, positive=sdxl_conditioning(seed=1), negative=sdxl_conditioning(seed=2))
    n = len(find_patch(model).sites)
    assert n == 22                                    # tiny SDXL: depth 2 instead of 10
    assert sum(stats.site_calls.values()) == n * 2 * 1   # CFG 1: positive only


@pytest.mark.parametrize("kind", ["weight0", "out_of_range"])
def test_no_op_is_identical_to_the_unpatched_model(tiny_sd15, kind):
    from likeness.attention_patches import SigmaRange

    reference = _sample(tiny_sd15.clone(), steps=3)
    model = tiny_sd15.clone()
    if kind == "weight0":
        _, provider = _decoupled(model, weight=0.0)
    else:  # a range between two of the 3 steps' sigmas (14.6, ~1.5, ~0.03): no step falls inside
        ms = model.get_model_object("model_sampling")
        assert ms.percent_to_sigma(0.3) > 2.0 and ms.percent_to_sigma(0.05) < 14.0
        _, provider = _decoupled(model, weight=1.0, sigma_range=SigmaRange(0.05, 0.3))
    out = _sample(model, steps=3)
    assert (out - reference).abs().max().item() <= 1e-6
    assert provider.served == []
    active = tiny_sd15.clone()
    _decoupled(active, weight=1.0)
    assert (_sample(active, steps=3) - reference).abs().max().item() > 1e-4


def test_two_positives_one_negative_each_chunk_its_own_identity(tiny_sd15):
    from host_support import conditioning
    from likeness.attention_patches import DecoupledInjector, add_injector, find_sites

    seen = []

    class Recording(DecoupledInjector):
        def identity_kv(self, call, kind):
            seen.append((tuple(call.layout.cond_or_uncond), kind, tuple(call.layout.rows_of_kind(kind))))
            return super().identity_kv(call, kind)

    model = tiny_sd15.clone()
    provider = RecordingProvider(find_sites(model))
    add_injector(model, Recording("rec", provider))
    left, right = torch.zeros(1, 16, 16), torch.zeros(1, 16, 16)
    left[:, :, :8] = 1
    right[:, :, 8:] = 1
    positive = conditioning(seed=1, mask=left, mask_strength=1.0) + conditioning(seed=3, mask=right, mask_strength=1.0)
    _sample(model, steps=1, cfg=5.0, positive=positive, negative=conditioning(seed=2), latent=torch.zeros(2, 4, 16, 16))
    layouts = {s[0] for s in seen}
    assert layouts == {(1, 0, 0)}                     # negative first, then the two positives (batched)
    assert {(s[1], s[2]) for s in seen} == {(0, (2, 3, 4, 5)), (1, (0, 1))}   # chunk size 2 = latent batch


def test_stacking_and_clone_safety(tiny_sd15):
    from likeness.attention_patches import find_patch

    base = tiny_sd15.clone()
    a = base.clone()
    _decoupled(a, weight=1.0)
    patch_a = find_patch(a)
    b = a.clone()
    patch_b = find_patch(b)
    assert patch_b is not patch_a and patch_b.injectors == patch_a.injectors
    from likeness.attention_patches import DecoupledInjector, add_injector, find_sites

    second = RecordingProvider(find_sites(b), seed=5)
    add_injector(b, DecoupledInjector("second", second, weight=1.0))
    assert len(find_patch(b).injectors) == 2 and len(patch_a.injectors) == 1
    assert find_patch(base) is None
    out_a, out_b = _sample(a), _sample(b)
    assert second.served and (out_a - out_b).abs().max().item() > 1e-5
    # the wrapper is registered once per model
    assert len(b.get_wrappers("apply_model", "likeness_identity_attention")) == 1


# ---------------------------------------------------------------------------------- ComfyUI's model-patch protocol
def _identity_model(tiny_sd15, capture_mode="cached_clean"):
    """The tiny SD1.5 with the FaceID-family ID branch (IdentityKV + region mask) and Face Fusion (adapter,
    references with a mask, reference text) stacked, as the technique apply functions build them."""
    from faceid_support import random_faceid_checkpoint
    from likeness.techniques.face_fusion import FusionAdapter, FusionIdentityLatents, apply_face_fusion
    from likeness.techniques.faceid.apply import IDTokens, apply_faceid_adapter
    from likeness.techniques.faceid.checkpoint import load_faceid_state_dict
    from likeness.techniques.faceid.lora import transformer_blocks

    g = torch.Generator().manual_seed(11)
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1.0
    channels = [r.channels for r in transformer_blocks(tiny_sd15)]
    checkpoint = load_faceid_state_dict(random_faceid_checkpoint(channels, 64, clip_dim=64, rank=4), source="tiny.bin")
    tokens = IDTokens(torch.randn(1, 4, 64, generator=g), torch.randn(1, 4, 64, generator=g))
    model = apply_faceid_adapter(tiny_sd15, checkpoint, tokens, weight=1.0, lora_strength=0.0, mask=mask)
    identity = FusionIdentityLatents(torch.randn(1, 4, 16, 16, generator=g), mask)
    return apply_face_fusion(model, FusionAdapter.from_model(tiny_sd15), [identity], capture_mode=capture_mode,
                             reference_context=torch.randn(1, 77, 64, generator=g))


def _held_tensors(obj, skip, seen=None):
    """Every tensor reachable from ``obj`` (attributes, containers, module parameters and buffers), except
    inside the objects in ``skip``."""
    import types

    seen = set() if seen is None else seen
    if id(obj) in seen or any(obj is s for s in skip) or isinstance(obj, (type, types.ModuleType, str, bytes)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif isinstance(obj, types.FunctionType):
        children = [c.cell_contents for c in obj.__closure__ or ()]
    elif isinstance(obj, types.MethodType):
        children = [obj.__self__, obj.__func__]
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    for child in children:
        yield from _held_tensors(child, skip, seen)


def test_model_patches_to_moves_every_injector_tensor_and_models_lists_held_patchers(tiny_sd15):
    """ComfyUI's ModelPatcher.model_patches_to / model_patches_models reach every injector through the patch
    object: after a move to meta no tensor an injector or a cached capture holds is left elsewhere, and the
    ModelPatcher an injector holds is loaded with the model."""
    import comfy.model_management
    import comfy.model_patcher

    from likeness.attention_patches import DecoupledInjector, add_injector, find_patch

    model = _identity_model(tiny_sd15)

    class HeldModelProvider:   # a provider running a separately loaded model (here a tiny Linear)
        def __init__(self):
            self.patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(4, 4), torch.device("cpu"),
                                                            torch.device("cpu"))
            self.tokens = torch.zeros(1, 1, 4)

        def __call__(self, site, kind):
            return None

        def to(self, device):
            self.tokens = self.tokens.to(device)
            return self

        def models(self):
            return [self.patcher]

    held = HeldModelProvider()
    add_injector(model, DecoupledInjector("held", held))
    patch = find_patch(model)
    assert [i.name for i in patch.injectors][1:] == ["face_fusion", "held"] and len(patch.injectors) == 3
    try:
        _sample(model, steps=1)                      # loads the held patcher too, and caches the reference K/V
        assert any(m.model is held.patcher for m in comfy.model_management.current_loaded_models)
    finally:
        comfy.model_management.unload_all_models()
    assert patch.models() == [held.patcher]
    assert {id(m) for m in model.model_patches_models()} == {id(held.patcher)}   # asked once per site entry
    (states,) = patch.captures.values()
    assert len(states.derived) == 16

    skip = [held.patcher, model.get_model_object("model_sampling")]
    before = list(_held_tensors([patch.injectors, patch.captures], skip))
    assert len(before) > 16 * 2 * 2 + 32             # ID K/V per site and kind, adapter weights, cached K/V, ...
    model.model_patches_to(torch.device("meta"))
    after = list(_held_tensors([patch.injectors, patch.captures], skip))
    assert len(after) >= len(before) - 32            # the adapter's dtype cache (16 sites x K, V) is dropped
    assert [t.shape for t in after if not t.is_meta] == []
    assert held.tokens.is_meta and patch.device == torch.device("meta")
    model.model_patches_to(torch.float16)           # the model dtype ComfyUI also passes: precision kept
    assert {t.dtype for t in after} == {t.dtype for t in _held_tensors([patch.injectors, patch.captures], skip)}
    patch.injectors, patch.captures = [], {}        # meta tensors cannot come back: the clone's __del__ offloads


class DeviceMoves(torch.overrides.TorchFunctionMode):
    """Records every ``Tensor.to(<device>)`` / ``.cpu()`` / ``.cuda()`` called from the pack's own code (not its
    tests, not torch or ComfyUI) while active; ``.to(dtype)`` is not a device move."""

    def __init__(self):
        super().__init__()
        import os

        import likeness

        self.pack = os.path.dirname(os.path.abspath(likeness.__file__)) + os.sep
        self.tests = os.path.join(self.pack, "tests") + os.sep
        self.torch = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import sys

        kwargs = kwargs or {}
        if func in (torch.Tensor.cpu, torch.Tensor.cuda) or (func is torch.Tensor.to and (
                kwargs.get("device") is not None or any(isinstance(a, (torch.device, str, int, torch.Tensor))
                                                        for a in args[1:]))):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(self.torch):
                frame = frame.f_back
            name = frame.f_code.co_filename if frame is not None else ""
            if name.startswith(self.pack) and not name.startswith(self.tests):
                self.calls.append(f"{name[len(self.pack):]}:{frame.f_lineno}")
        return func(*args, **kwargs)


def test_no_device_copy_per_call_in_the_attention_path(tiny_sd15):
    """Every UNet call of a sampling run (reference capture, attention at every site, the injectors and their
    providers) runs without one tensor device move from the pack's code: the injectors' tensors are where the
    model is because the patch followed it (ComfyUI calls its to() when loading)."""
    from likeness.attention_patches import find_patch

    model = _identity_model(tiny_sd15, capture_mode="per_step")
    patch = find_patch(model)
    moves = DeviceMoves()
    with moves:                                      # the detector sees a device move in the pack's code
        patch.injectors[1].adapter.file_state_dict()
    assert moves.calls and all("adapter.py" in c for c in moves.calls)
    moves.calls.clear()
    run_pass = patch.run_pass
    calls = []

    def observed(*args, **kwargs):                   # one UNet call with the engine (capture + every site)
        calls.append(1)
        with moves:
            return run_pass(*args, **kwargs)

    patch.run_pass = observed
    _sample(model, steps=2, cfg=5.0)
    assert len(calls) == 2 and moves.calls == []
