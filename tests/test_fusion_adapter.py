"""Face Fusion adapter: key scheme, file round trip, validation, init from attn1 (plain torch)."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from likeness.errors import CheckpointLayoutError, ModelFileError
from likeness.techniques.face_fusion import FusionAdapter, load_fusion_adapter, save_fusion_adapter


class Attn(nn.Module):
    def __init__(self, c, ctx, heads=2):
        super().__init__()
        self.heads, self.dim_head = heads, c // heads
        self.to_q = nn.Linear(c, c, bias=False)
        self.to_k = nn.Linear(ctx, c, bias=False)
        self.to_v = nn.Linear(ctx, c, bias=False)


class Block(nn.Module):
    def __init__(self, c, ctx=8):
        super().__init__()
        self.attn1 = Attn(c, c)
        self.attn2 = Attn(c, ctx)


class Transformer(nn.Module):
    def __init__(self, c, depth=1):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([Block(c) for _ in range(depth)])


class Downsample(nn.Identity):
    pass


class TinyUNet(nn.Module):
    """The block structure find_sites walks: input (2 sites), middle (1), output (2)."""

    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Identity()), nn.Sequential(Transformer(16)),
                                           nn.Sequential(Downsample()), nn.Sequential(Transformer(32))])
        self.middle_block = nn.Sequential(Transformer(32, depth=2))
        self.output_blocks = nn.ModuleList([nn.Sequential(Transformer(32)), nn.Sequential(Transformer(16))])


def test_sites_and_processor_order_are_derived():
    from likeness.attention_patches import find_sites

    sites = find_sites(TinyUNet())
    assert [s.key for s in sites] == [("input", 1, 0), ("input", 3, 0), ("middle", 0, 0), ("middle", 0, 1),
                                      ("output", 0, 0), ("output", 1, 0)]
    # diffusers order: down, up, mid
    assert [s.order for s in sites] == [0, 1, 4, 5, 2, 3]
    assert [s.level for s in sites] == [0, 1, 1, 1, 1, 1]
    assert [s.channels for s in sites] == [16, 32, 32, 32, 32, 16]


def test_new_adapter_copies_attn1_key_value_weights():
    unet = TinyUNet()
    adapter = FusionAdapter.from_model(unet)
    block = unet.input_blocks[1][0].transformer_blocks[0]
    proj = adapter.sites["1"]                               # first site: processor index 2*0+1
    assert torch.equal(proj.to_k_f.weight, block.attn1.to_k.weight)
    assert torch.equal(proj.to_v_f.weight, block.attn1.to_v.weight)
    mid1 = unet.middle_block[0].transformer_blocks[1]
    assert torch.equal(adapter.sites["11"].to_k_f.weight, mid1.attn1.to_k.weight)   # order 5 -> 11
    assert sorted(int(k) for k in adapter.sites) == [1, 3, 5, 7, 9, 11]


def test_file_round_trip_with_key_scheme_and_metadata(tmp_path):
    adapter = FusionAdapter.from_model(TinyUNet())
    path = save_fusion_adapter(adapter, str(tmp_path / "me.safetensors"), {"steps": 10})
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == {f"fusion.{i}.to_{kv}_f.weight" for i in (1, 3, 5, 7, 9, 11) for kv in "kv"}
    assert meta["format"] == "likeness.face_fusion" and meta["steps"] == "10" and meta["sites"] == "6"
    loaded = load_fusion_adapter(path)
    for k, v in adapter.file_state_dict().items():
        assert torch.equal(loaded.file_state_dict()[k], v)
    assert not os.path.exists(path + ".tmp")


def test_bad_files_are_rejected_with_clear_errors(tmp_path):
    from safetensors.torch import save_file

    good = FusionAdapter.from_model(TinyUNet()).file_state_dict()
    cases = {
        "missing_v": {k: v for k, v in good.items() if "to_v_f" not in k or not k.startswith("fusion.1.")},
        "foreign": {"1.to_k_ip.weight": torch.zeros(4, 4)},
        "non_square": {"fusion.1.to_k_f.weight": torch.zeros(4, 8), "fusion.1.to_v_f.weight": torch.zeros(4, 8)},
        "even": {"fusion.2.to_k_f.weight": torch.zeros(4, 4), "fusion.2.to_v_f.weight": torch.zeros(4, 4)},
    }
    for name, tensors in cases.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(tensors, path)
        with pytest.raises(CheckpointLayoutError):
            load_fusion_adapter(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\x10\x00\x00")
    with pytest.raises(ModelFileError):
        load_fusion_adapter(str(truncated))
    with pytest.raises(ModelFileError):
        load_fusion_adapter(str(tmp_path / "absent.safetensors"))


def test_adapter_must_match_the_model():
    from likeness.attention_patches import find_sites

    adapter = FusionAdapter.from_model(TinyUNet())
    sites = find_sites(TinyUNet())
    adapter.check_sites(sites)
    with pytest.raises(CheckpointLayoutError, match="sites"):
        adapter.check_sites(sites[:3])


def test_projection_uses_cached_device_weights_but_live_ones_under_grad():
    unet = TinyUNet()
    adapter = FusionAdapter.from_model(unet)
    from likeness.attention_patches import find_sites

    site = find_sites(unet)[0]
    h = torch.randn(2, 5, 16)
    with torch.no_grad():
        k, v = adapter.project(site, h)
    assert torch.allclose(k, h @ adapter.sites["1"].to_k_f.weight.T, atol=1e-6)
    k, v = adapter.project(site, h)
    (k.sum() + v.sum()).backward()
    assert adapter.sites["1"].to_k_f.weight.grad is not None
    with torch.no_grad():                                    # a changed weight is picked up (version key)
        adapter.sites["1"].to_k_f.weight.mul_(2)
        k2, _ = adapter.project(site, h)
    assert torch.allclose(k2, 2 * k.detach(), atol=1e-5)
