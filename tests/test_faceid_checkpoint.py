"""The one FaceID-family loader: the four official layouts load key for key, variants are detected, tensors are
cast one by one, and bad files get clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from faceid_support import (
    BISENET,
    CONSISTENTID,
    FACE_MAKEUP,
    FACEID,
    FACEID_PLUSV2,
    expected_value,
    flatten,
    read_layout,
    state_dict_from_layout,
)
from likeness.errors import CheckpointLayoutError, ModelFileError
from likeness.techniques.consistentid.loader import load_consistentid, load_consistentid_state_dict
from likeness.techniques.faceid.checkpoint import (
    Variant,
    load_faceid_checkpoint,
    load_faceid_state_dict,
    resolve_shortcut,
)
from likeness.techniques.faceid.projection import MLPProjModel, ProjPlusModel


@pytest.fixture(scope="module")
def faceid_sd():
    return state_dict_from_layout(FACEID, materialize=True)


@pytest.fixture(scope="module")
def plusv2_sd():
    return state_dict_from_layout(FACEID_PLUSV2)


@pytest.fixture(scope="module")
def consistentid_sd():
    return state_dict_from_layout(CONSISTENTID)


def assert_everything_consumed(checkpoint, layout_name: str, source_groups: dict):
    """Every layout key ended up in a module parameter or in the adapter, with its value (after the cast)."""
    layout = read_layout(layout_name)["groups"]
    proj_group = checkpoint.group_names["projector"]
    proc_group = checkpoint.group_names["processors"]
    layout_proj_group = "image_proj" if "image_proj" in layout else "image_proj_model"
    layout_proj = layout[layout_proj_group]
    proj_state = checkpoint.projector.state_dict()
    assert set(proj_state) == set(layout_proj)
    for key, tensor in proj_state.items():
        assert tensor.dtype == torch.float32
        assert list(tensor.shape) == layout_proj[key]["shape"]
    for key in ("proj.0.weight", "norm.bias"):
        stored = source_groups[proj_group][key].dtype
        assert torch.all(proj_state[key] == expected_value(layout_proj_group, key, stored))

    layout_proc = layout.get("ip_adapter") or layout["adapter_modules"]
    seen = set()
    for proc in checkpoint.adapter.processors:
        for target, (down, up) in proc.lora.items():
            seen |= {f"{proc.index}.{target}_lora.down.weight", f"{proc.index}.{target}_lora.up.weight"}
            assert down.dtype == up.dtype == torch.float32
        for name in ("to_k_ip", "to_v_ip"):
            if getattr(proc, name) is not None:
                seen.add(f"{proc.index}.{name}.weight")
    assert seen == set(layout_proc)
    probe = checkpoint.adapter.processors[31]
    stored = source_groups[proc_group]["31.to_v_ip.weight"].dtype
    assert torch.all(probe.to_v_ip == expected_value(proc_group, "31.to_v_ip.weight", stored))
    assert checkpoint.adapter.rank == 128 and checkpoint.adapter.context_dim == 768
    assert len(checkpoint.adapter.processors) == 32


def test_faceid_layout_loads_every_key(faceid_sd):
    checkpoint = load_faceid_state_dict(faceid_sd, source="ip-adapter-faceid_sd15.bin")
    assert checkpoint.variant == Variant.FACEID
    assert isinstance(checkpoint.projector, MLPProjModel) and not checkpoint.shortcut
    assert checkpoint.stored_dtypes == {"image_proj": ["float16"], "ip_adapter": ["float16"]}
    assert_everything_consumed(checkpoint, FACEID, faceid_sd)


def test_plusv2_layout_variant_from_name_or_flag(plusv2_sd):
    v2 = load_faceid_state_dict(plusv2_sd, source="ip-adapter-faceid-plusv2_sd15.bin")
    assert v2.variant == Variant.FACEID_PLUSV2 and v2.shortcut
    assert isinstance(v2.projector, ProjPlusModel)
    assert_everything_consumed(v2, FACEID_PLUSV2, plusv2_sd)
    # Plus v1 has the same keys: the name (or the flag) decides.
    assert load_faceid_state_dict(plusv2_sd, source="ip-adapter-faceid-plus_sd15.bin").variant == Variant.FACEID_PLUS
    renamed = load_faceid_state_dict(plusv2_sd, source="my_adapter.bin", shortcut=True)
    assert renamed.variant == Variant.FACEID_PLUSV2 and renamed.shortcut
    assert resolve_shortcut(Variant.FACEID_PLUS, "faceid-plus-v2.safetensors") is True
    assert resolve_shortcut(Variant.FACEID_PLUS, "faceid-plus.safetensors") is False
    assert resolve_shortcut(Variant.CONSISTENTID, "whatever_plusv2.bin") is False


@pytest.mark.parametrize("first_group", ["image_proj", "image_proj_model"])
def test_consistentid_layout_loads_under_either_projector_name(consistentid_sd, first_group):
    groups = dict(consistentid_sd)
    if first_group != "image_proj":
        groups = {first_group: groups["image_proj"], **{k: v for k, v in groups.items() if k != "image_proj"}}
    checkpoint = load_consistentid_state_dict(groups, source="ConsistentID-v1.bin")
    assert checkpoint.variant == Variant.CONSISTENTID and not checkpoint.shortcut
    assert checkpoint.group_names["projector"] == first_group
    # bf16 projector and fp32 rest, all fp32 after the per-tensor cast
    assert checkpoint.stored_dtypes[first_group] == ["bfloat16"]
    assert checkpoint.stored_dtypes["FacialEncoder"] == ["float32"]
    assert_everything_consumed(checkpoint, CONSISTENTID, groups)
    encoder_state = checkpoint.facial_encoder.state_dict()
    layout = read_layout(CONSISTENTID)["groups"]["FacialEncoder"]
    assert set(encoder_state) == set(layout)
    assert all(list(t.shape) == layout[k]["shape"] for k, t in encoder_state.items())
    assert torch.all(encoder_state["visual_projection.latents"] ==
                     expected_value("FacialEncoder", "visual_projection.latents", torch.float32))


def test_face_makeup_layout_in_memory():
    groups = state_dict_from_layout(FACE_MAKEUP, empty_groups=("controlnet",))
    checkpoint = load_faceid_state_dict(groups, source="model.bin")
    assert checkpoint.variant == Variant.FACE_MAKEUP and checkpoint.shortcut
    assert_everything_consumed(checkpoint, FACE_MAKEUP, groups)
    assert set(checkpoint.controlnet) == set(read_layout(FACE_MAKEUP)["groups"]["controlnet"])
    shape = checkpoint.controlnet_shape
    assert shape.block_out_channels == (320, 640, 1280, 1280) and shape.cross_attention_dim == 768
    assert shape.embedding_channels == (16, 32, 96, 256)
    # a broken ControlNet key is named
    broken = dict(groups, controlnet=dict(groups["controlnet"]))
    del broken["controlnet"]["controlnet_down_blocks.11.bias"]
    with pytest.raises(CheckpointLayoutError, match="controlnet.controlnet_down_blocks.11.bias"):
        load_faceid_state_dict(broken, source="model.bin")


def test_file_round_trips_bin_and_safetensors(tmp_path, faceid_sd, plusv2_sd):
    plusv2_sd = {g: {k: t.contiguous() for k, t in sd.items()} for g, sd in plusv2_sd.items()}
    torch.save(faceid_sd, tmp_path / "ip-adapter-faceid_sd15.bin")
    save_file(flatten(faceid_sd), tmp_path / "ip-adapter-faceid_sd15.safetensors")
    for name in ("ip-adapter-faceid_sd15.bin", "ip-adapter-faceid_sd15.safetensors"):
        checkpoint = load_faceid_checkpoint(str(tmp_path / name))
        assert checkpoint.variant == Variant.FACEID
        assert_everything_consumed(checkpoint, FACEID, faceid_sd)
    save_file(flatten(plusv2_sd), tmp_path / "ip-adapter-faceid-plusv2_sd15.safetensors")
    checkpoint = load_faceid_checkpoint(str(tmp_path / "ip-adapter-faceid-plusv2_sd15.safetensors"))
    assert checkpoint.variant == Variant.FACEID_PLUSV2
    assert_everything_consumed(checkpoint, FACEID_PLUSV2, plusv2_sd)


@pytest.mark.slow
def test_consistentid_file_round_trip(tmp_path, consistentid_sd):
    """The released pickle (669 MB here, written once) and the SDXL-style safetensors naming."""
    consistentid_sd = {g: {k: t.contiguous() for k, t in sd.items()} for g, sd in consistentid_sd.items()}
    torch.save(consistentid_sd, tmp_path / "ConsistentID-v1.bin")
    assert load_consistentid(str(tmp_path / "ConsistentID-v1.bin")).variant == Variant.CONSISTENTID
    (tmp_path / "ConsistentID-v1.bin").unlink()
    renamed = {"image_proj_model": consistentid_sd["image_proj"], "adapter_modules": consistentid_sd["adapter_modules"],
               "FacialEncoder": consistentid_sd["FacialEncoder"]}
    save_file(flatten(renamed), tmp_path / "ConsistentID.safetensors")
    checkpoint = load_consistentid(str(tmp_path / "ConsistentID.safetensors"))
    assert checkpoint.group_names["projector"] == "image_proj_model"


def test_per_tensor_casting_to_compute_dtype(plusv2_sd):
    mixed = copy.copy(plusv2_sd)
    mixed["image_proj"] = {k: (t.to(torch.bfloat16) if i % 2 else t.float()) for i, (k, t) in
                           enumerate(plusv2_sd["image_proj"].items())}
    checkpoint = load_faceid_state_dict(mixed, source="mixed-plusv2.bin")
    assert checkpoint.stored_dtypes["image_proj"] == ["bfloat16", "float32"]
    assert {t.dtype for t in checkpoint.projector.state_dict().values()} == {torch.float32}
    tokens = checkpoint.projector(torch.randn(1, 512), torch.randn(1, 257, 1280))
    assert tokens.dtype == torch.float32 and tokens.shape == (1, 4, 768)
    half = load_faceid_state_dict(plusv2_sd, source="plusv2.bin", dtype=torch.float16)
    assert {t.dtype for t in half.projector.state_dict().values()} == {torch.float16}


# --------------------------------------------------------------------------------------------------------------
# Errors

def test_missing_renamed_misshaped_keys_are_named(faceid_sd):
    dropped = {"image_proj": dict(faceid_sd["image_proj"]), "ip_adapter": dict(faceid_sd["ip_adapter"])}
    del dropped["ip_adapter"]["5.to_k_lora.up.weight"]
    with pytest.raises(CheckpointLayoutError, match=r"missing key 'ip_adapter\.5\.to_k_lora\.up\.weight'"):
        load_faceid_state_dict(dropped)

    renamed = {"image_proj": dict(faceid_sd["image_proj"]), "ip_adapter": dict(faceid_sd["ip_adapter"])}
    renamed["ip_adapter"]["3.to_k_ipx.weight"] = renamed["ip_adapter"].pop("3.to_k_ip.weight")
    with pytest.raises(CheckpointLayoutError) as info:
        load_faceid_state_dict(renamed)
    assert "unexpected key 'ip_adapter.3.to_k_ipx.weight'" in str(info.value)
    assert "missing key 'ip_adapter.3.to_k_ip.weight'" in str(info.value)

    reshaped = {"image_proj": dict(faceid_sd["image_proj"]), "ip_adapter": dict(faceid_sd["ip_adapter"])}
    reshaped["ip_adapter"]["7.to_v_ip.weight"] = torch.zeros(640, 1024)
    with pytest.raises(CheckpointLayoutError, match=r"mis-shaped key 'ip_adapter\.7\.to_v_ip\.weight'"):
        load_faceid_state_dict(reshaped)


def test_missing_projector_key_is_named(plusv2_sd):
    broken = {"image_proj": dict(plusv2_sd["image_proj"]), "ip_adapter": plusv2_sd["ip_adapter"]}
    del broken["image_proj"]["perceiver_resampler.layers.2.1.3.weight"]
    with pytest.raises(CheckpointLayoutError, match=r"image_proj\.perceiver_resampler\.layers\.2\.1\.3\.weight"):
        load_faceid_state_dict(broken)
    extra = {"image_proj": dict(plusv2_sd["image_proj"], **{"perceiver_resampler.pos_emb": torch.zeros(3)}),
             "ip_adapter": plusv2_sd["ip_adapter"]}
    with pytest.raises(CheckpointLayoutError, match=r"unexpected key 'image_proj\.perceiver_resampler\.pos_emb'"):
        load_faceid_state_dict(extra)


def test_facial_encoder_key_is_named(consistentid_sd):
    broken = dict(consistentid_sd, FacialEncoder=dict(consistentid_sd["FacialEncoder"]))
    broken["FacialEncoder"]["fuse_module.mlp2.fc1.weight"] = torch.zeros(768, 769)
    with pytest.raises(CheckpointLayoutError, match=r"mis-shaped key 'FacialEncoder\.fuse_module\.mlp2\.fc1\.weight'"):
        load_consistentid_state_dict(broken)


def plain_ip_adapter_groups() -> dict:
    """IP-Adapter sd15 (image prompt): ImageProjModel + to_k_ip/to_v_ip on odd processors only."""
    channels = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
    adapter = {}
    for k, c in enumerate(channels):
        adapter[f"{2 * k + 1}.to_k_ip.weight"] = torch.zeros(c, 768)
        adapter[f"{2 * k + 1}.to_v_ip.weight"] = torch.zeros(c, 768)
    projector = {"proj.weight": torch.zeros(3072, 1024), "proj.bias": torch.zeros(3072),
                 "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)}
    return {"image_proj": projector, "ip_adapter": adapter}


def test_plain_ip_adapter_file_is_refused(tmp_path):
    torch.save(plain_ip_adapter_groups(), tmp_path / "ip-adapter_sd15.bin")
    with pytest.raises(ModelFileError, match="plain IP-Adapter"):
        load_faceid_checkpoint(str(tmp_path / "ip-adapter_sd15.bin"))


def test_truncated_files_are_refused(tmp_path, faceid_sd):
    small = {"image_proj": faceid_sd["image_proj"]}  # read errors come before any layout check
    torch.save(small, tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_faceid_checkpoint(str(tmp_path / "cut.bin"))
    save_file(flatten(small), tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match="truncated"):
        load_faceid_checkpoint(str(tmp_path / "cut.safetensors"))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ModelFileError):
        load_faceid_checkpoint(str(tmp_path / "empty.bin"))
    with pytest.raises(ModelFileError, match="not found"):
        load_faceid_checkpoint(str(tmp_path / "absent.bin"))


def test_wrong_architecture_files_are_refused(tmp_path):
    bisenet = {k: torch.zeros(s["shape"], dtype=torch.float32 if s["dtype"] != "int64" else torch.int64)
               for k, s in read_layout(BISENET)["groups"][""].items()}
    torch.save(bisenet, tmp_path / "face_parsing.pth")
    with pytest.raises(ModelFileError, match="not a FaceID-family file"):
        load_faceid_checkpoint(str(tmp_path / "face_parsing.pth"))
    sd_checkpoint = {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}}
    with pytest.raises(ModelFileError, match="not a FaceID-family file"):
        load_faceid_state_dict(sd_checkpoint)
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, tmp_path / "sd15.safetensors")
    with pytest.raises(ModelFileError, match="not a FaceID-family file"):
        load_faceid_checkpoint(str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ModelFileError, match="not a FaceID-family file"):
        load_faceid_state_dict([1, 2, 3])


def test_mixed_or_ambiguous_groups_are_refused(faceid_sd, consistentid_sd):
    with pytest.raises(CheckpointLayoutError, match="unexpected group 'lora_weights'"):
        load_faceid_state_dict(dict(faceid_sd, lora_weights={"x": torch.zeros(1)}))
    with pytest.raises(CheckpointLayoutError, match="two names for the same group"):
        load_faceid_state_dict(dict(faceid_sd, image_proj_model=faceid_sd["image_proj"]))
    with pytest.raises(CheckpointLayoutError, match="MLP-only projector"):
        load_faceid_state_dict(dict(faceid_sd, FacialEncoder=consistentid_sd["FacialEncoder"]))
    with pytest.raises(ModelFileError, match="not ConsistentID"):
        load_consistentid_state_dict(faceid_sd, source="ip-adapter-faceid_sd15.bin")
