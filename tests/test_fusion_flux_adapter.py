"""The Flux layout of the Fusion adapter family in plain torch: sites from the DiT's blocks, identity at the start,
the low-rank projection, the layout marker in the file (and old UNet files without it), refused files and models."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from likeness.errors import CheckpointLayoutError, UnsupportedModelError
from likeness.techniques.face_fusion import (
    FluxFusionAdapter,
    FusionAdapter,
    load_fusion_adapter,
    new_fusion_adapter,
    save_fusion_adapter,
)


class Block(nn.Module):
    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.hidden_size, self.num_heads = hidden, heads


class Flux(nn.Module):
    """What find_sites reads of a Flux-family DiT: double and single blocks with their width and heads."""

    def __init__(self, double=2, single=3, hidden=32):
        super().__init__()
        self.double_blocks = nn.ModuleList(Block(hidden) for _ in range(double))
        self.single_blocks = nn.ModuleList(Block(hidden) for _ in range(single))


def _sites(model):
    from likeness.attention_patches import find_sites

    return find_sites(model)


def test_sites_come_from_the_blocks_and_a_new_adapter_is_the_identity():
    adapter = new_fusion_adapter(Flux(), rank=4, seed=1)
    assert isinstance(adapter, FluxFusionAdapter)
    assert (len(adapter.double_blocks), len(adapter.single_blocks), adapter.hidden, adapter.rank) == (2, 3, 32, 4)
    assert adapter.metadata["base"] == "flux" and adapter.metadata["heads"] == "4"
    sites = _sites(Flux())
    k, v = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    for site in sites:
        k_f, v_f = adapter.project(site, (k, v))
        assert torch.equal(k_f, k) and torch.equal(v_f, v)
    again = new_fusion_adapter(Flux(), rank=4, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), again.state_dict().values(), strict=True))


def test_projection_is_the_low_rank_residual_per_block():
    adapter = new_fusion_adapter(Flux(), rank=4)
    site = _sites(Flux())[3]   # single block 1
    block = adapter.single_blocks[1]
    with torch.no_grad():
        block.to_k_f.up.weight.normal_()
        block.to_v_f.up.weight.normal_()
    k, v = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    k_f, v_f = adapter.project(site, (k, v))
    assert torch.allclose(k_f, k + k @ block.to_k_f.down.weight.T @ block.to_k_f.up.weight.T, atol=1e-5)
    assert torch.allclose(v_f, v + v @ block.to_v_f.down.weight.T @ block.to_v_f.up.weight.T, atol=1e-5)
    other = _sites(Flux())[0]
    assert torch.equal(adapter.project(other, (k, v))[0], k)   # the other blocks are still the identity
    half_k, _ = adapter.project(site, (k.half(), v.half()))
    assert half_k.dtype == torch.float16 and torch.allclose(half_k.float(), k_f, atol=2e-2)


def test_file_has_the_layout_marker_and_loads_as_its_layout(tmp_path):
    adapter = new_fusion_adapter(Flux(), rank=2)
    path = save_fusion_adapter(adapter, str(tmp_path / "flux.safetensors"))
    with safe_open(path, "pt") as handle:
        meta, keys = handle.metadata(), set(handle.keys())
    assert meta["layout"] == "dit" and meta["format"] == "likeness.face_fusion" and meta["rank"] == "2"
    assert "fusion_dit.single_blocks.2.to_v_f.up.weight" in keys and len(keys) == 5 * 4
    loaded = load_fusion_adapter(path)
    assert isinstance(loaded, FluxFusionAdapter) and loaded.rank == 2
    # a UNet adapter written before the marker existed (no "layout") still loads as a UNet adapter
    from test_fusion_adapter import TinyUNet

    unet = FusionAdapter.from_model(TinyUNet())
    old = str(tmp_path / "old_unet.safetensors")
    save_file(unet.file_state_dict(), old, {"format": "likeness.face_fusion", "format_version": "1"})
    assert type(load_fusion_adapter(old)) is FusionAdapter
    assert save_fusion_adapter(unet, str(tmp_path / "unet.safetensors")) and \
        load_fusion_adapter(str(tmp_path / "unet.safetensors")).metadata["layout"] == "unet"


def test_bad_flux_files_and_layouts_are_refused(tmp_path):
    good = new_fusion_adapter(Flux(), rank=2).file_state_dict()
    cases = {
        "missing": ({k: v for k, v in good.items() if "single_blocks.1.to_k_f.up" not in k}, {"layout": "dit"}),
        "shape": ({**good, "fusion_dit.double_blocks.1.to_v_f.up.weight": torch.zeros(32, 3)}, {"layout": "dit"}),
        "foreign": ({**good, "fusion.1.to_k_f.weight": torch.zeros(4, 4)}, {"layout": "dit"}),
        "layout": (good, {"layout": "mmdit"}),
    }
    for name, (tensors, meta) in cases.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(tensors, path, meta)
        with pytest.raises(CheckpointLayoutError):
            load_fusion_adapter(path)


def test_an_adapter_fits_only_its_model():
    flux_adapter = new_fusion_adapter(Flux(), rank=2)
    flux_adapter.check_sites(_sites(Flux()))
    with pytest.raises(CheckpointLayoutError, match="2 double \\+ 3 single blocks of width 32 but the MODEL has 2 "
                                                    "double \\+ 4 single"):
        flux_adapter.check_sites(_sites(Flux(single=4)))
    with pytest.raises(CheckpointLayoutError, match="width \\[64\\]"):
        flux_adapter.check_sites(_sites(Flux(hidden=64)))
    from test_fusion_adapter import TinyUNet

    with pytest.raises(CheckpointLayoutError, match="the MODEL is an SD1.5/SDXL UNet"):
        flux_adapter.check_sites(_sites(TinyUNet()))
    with pytest.raises(CheckpointLayoutError, match="made for an SD1.5/SDXL UNet .* the MODEL is a Flux-family DiT"):
        FusionAdapter.from_model(TinyUNet()).check_sites(_sites(Flux()))
    with pytest.raises(UnsupportedModelError, match="not a Flux-family DiT"):
        FluxFusionAdapter.from_model(TinyUNet())
