"""Derive the SDXL layout JSONs of this folder from the official classes, built on the ``meta`` device.

    python tests/data/checkpoint_layouts/derive_sdxl_layouts.py --ip-adapter DIR --instantid DIR

``DIR`` are checkouts of tencent-ailab/IP-Adapter and InstantID/InstantID (the folders holding their
``ip_adapter`` packages). Nothing is copied from them: their classes are imported, instantiated without
memory and their ``state_dict()`` key names, shapes and the file's dtype are written out, as for the SD1.5
layouts (README.md here). The UNet is diffusers' ``UNet2DConditionModel`` with the SDXL base config, the
IdentityNet is ``ControlNetModel.from_unet`` of it (InstantID's ``ControlNetModel/config.json`` is that
config). Development tool only; the tests read the JSON files.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "layers_per_block": 2,
}
IP_ADAPTER_COMMIT = "62e4af9d0c1ac7d5f8dd386a0ccf2211346af1a2"
INSTANTID_COMMIT = "2145b67"


def _import_official(package_dir: str) -> None:
    """The repo's ``ip_adapter`` package under ``alias`` without running its ``__init__`` (which imports
    pipelines that newer diffusers versions renamed)."""
    import diffusers.pipelines.controlnet as pipeline_controlnet
    from diffusers.models.controlnets import MultiControlNetModel

    pipeline_controlnet.MultiControlNetModel = MultiControlNetModel   # moved in diffusers >= 0.29
    package = types.ModuleType("ip_adapter")
    package.__path__ = [os.path.join(package_dir, "ip_adapter")]
    for name in [m for m in sys.modules if m == "ip_adapter" or m.startswith("ip_adapter.")]:
        del sys.modules[name]
    sys.modules["ip_adapter"] = package


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET)


def _processors(unet, make_cross, make_self) -> tuple[torch.nn.ModuleList, dict[str, str]]:
    """The official ``set_ip_adapter`` loop: hidden size per processor name, then ModuleList of the processors."""
    procs = {}
    for name in unet.attn_processors:   # (called inside a meta-device context: no weight memory)
        channels = unet.config.block_out_channels
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        cross = not name.endswith("attn1.processor")
        procs[name] = make_cross(hidden, unet.config.cross_attention_dim) if cross else make_self(hidden)
    return torch.nn.ModuleList(procs.values()), {str(i): name for i, name in enumerate(procs)}


def _group(module: torch.nn.Module, dtype: str) -> dict:
    return {k: {"shape": list(t.shape), "dtype": dtype} for k, t in module.state_dict().items()}


SIZES = {"float16": 2, "float32": 4, "bfloat16": 2}


def _finish(layout: dict, name: str) -> None:
    stats = {g: {"tensors": len(keys), "numel": sum(_numel(s["shape"]) for s in keys.values()),
                 "bytes": sum(_numel(s["shape"]) * SIZES[s["dtype"]] for s in keys.values())}
             for g, keys in layout["groups"].items()}
    layout["param_count"] = sum(s["numel"] for s in stats.values())
    layout["group_stats"] = stats
    layout["bytes_estimate"] = sum(s["bytes"] for s in stats.values())
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as handle:
        json.dump(layout, handle, indent=1)
    logging.info("%s: %d parameters, %d bytes", name, layout["param_count"], layout["bytes_estimate"])


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def faceid_layouts() -> None:
    """FaceID-SDXL, FaceID-PlusV2-SDXL (LoRA processors) and FaceID-Portrait-SDXL (IP processors only)."""
    import ip_adapter.attention_processor as plain
    import ip_adapter.attention_processor_faceid as lora
    from ip_adapter.ip_adapter_faceid import MLPProjModel, ProjPlusModel

    unet = _sdxl_unet()
    with torch.device("meta"):
        lora_procs, index_map = _processors(
            unet, lambda h, c: lora.LoRAIPAttnProcessor(hidden_size=h, cross_attention_dim=c, rank=128, num_tokens=4),
            lambda h: lora.LoRAAttnProcessor(hidden_size=h, cross_attention_dim=None, rank=128))
    src = f"tencent-ailab/IP-Adapter@{IP_ADAPTER_COMMIT} ip_adapter/ip_adapter_faceid.py"
    common = ("Container: torch.save pickle of {'image_proj', 'ip_adapter'} (or .safetensors with flat "
              "'image_proj.<key>' / 'ip_adapter.<key>'). ip_adapter: the 140 attention processors of the SDXL UNet "
              "(70 transformer blocks) as ModuleList(unet.attn_processors.values()), diffusers order (down, up, mid); "
              "odd indices are attn2 with to_k_ip/to_v_ip [C, 2048].")
    with torch.device("meta"):
        mlp, plus = MLPProjModel(2048, 512, 4), ProjPlusModel(2048, 512, 1280, 4)
        portrait = MLPProjModel(2048, 512, 16)
    dtype_note = {"image_proj": "assumed float16 like the SD1.5 files of the same repo (model card: fp16); the "
                                "sum of bytes is the check against the listed file size",
                  "ip_adapter": "as image_proj"}
    for name, projector, released, cls in (
            ("ip_adapter_faceid_sdxl.json", mlp, "ip-adapter-faceid_sdxl.bin", "MLPProjModel(2048, 512, 4)"),
            ("ip_adapter_faceid_plusv2_sdxl.json", plus, "ip-adapter-faceid-plusv2_sdxl.bin",
             "ProjPlusModel(2048, 512, 1280, 4): perceiver 32 heads x 64")):
        _finish({"source": f"{src}:{cls.split('(')[0]} + IPAdapterFaceIDXL/IPAdapterFaceIDPlusXL.set_ip_adapter "
                           "(attention_processor_faceid.py LoRAAttnProcessor2_0/LoRAIPAttnProcessor2_0, rank 128)",
                 "format_notes": f"{common} image_proj: {cls}. Every processor has rank-128 LoRA on to_q/k/v/out; "
                                 "attn2's to_k/to_v LoRA take the 2048-d text context.",
                 "released_as": f"h94/IP-Adapter-FaceID: {released}", "dtype_basis": dtype_note,
                 "groups": {"image_proj": _group(projector, "float16"), "ip_adapter": _group(lora_procs, "float16")},
                 "processor_index_map": {"ip_adapter": index_map}}, name)
    with torch.device("meta"):
        ip_procs, index_map = _processors(
            unet, lambda h, c: plain.IPAttnProcessor(hidden_size=h, cross_attention_dim=c, num_tokens=16),
            lambda h: plain.AttnProcessor())
    _finish({"source": f"tencent-ailab/IP-Adapter@{IP_ADAPTER_COMMIT} ip_adapter/ip_adapter_faceid_separate.py:"
                       "MLPProjModel(2048, 512, 16) + IPAdapterFaceID.set_ip_adapter (IPAttnProcessor2_0, no LoRA)",
             "format_notes": f"{common} image_proj: MLPProjModel(2048, 512, num_tokens=16); no LoRA (attn1 "
                             "processors have no weights).",
             "released_as": "h94/IP-Adapter-FaceID: ip-adapter-faceid-portrait_sdxl.bin", "dtype_basis": dtype_note,
             "groups": {"image_proj": _group(portrait, "float16"), "ip_adapter": _group(ip_procs, "float16")},
             "processor_index_map": {"ip_adapter": index_map}}, "ip_adapter_faceid_portrait_sdxl.json")


def instantid_layouts() -> None:
    """InstantID's ip-adapter.bin (Resampler + IP processors) and the IdentityNet ControlNet."""
    from diffusers import ControlNetModel
    from ip_adapter.attention_processor import AttnProcessor, IPAttnProcessor
    from ip_adapter.resampler import Resampler

    unet = _sdxl_unet()
    with torch.device("meta"):
        resampler = Resampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512,
                              output_dim=2048, ff_mult=4)
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        procs, index_map = _processors(
            unet, lambda h, c: IPAttnProcessor(hidden_size=h, cross_attention_dim=c, scale=0.5, num_tokens=16),
            lambda h: AttnProcessor())
    src = f"InstantID/InstantID@{INSTANTID_COMMIT} pipeline_stable_diffusion_xl_instantid.py"
    _finish({"source": f"{src}:set_image_proj_model (ip_adapter/resampler.py:Resampler) + set_ip_adapter "
                       "(ip_adapter/attention_processor.py:IPAttnProcessor2_0)",
             "format_notes": "Container: torch.save pickle of {'image_proj', 'ip_adapter'}, both loaded strictly. "
                             "image_proj: Resampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, "
                             "embedding_dim=512, output_dim=2048, ff_mult=4) on the raw antelopev2 ArcFace vector "
                             "reshaped [1, 1, 512]; ip_adapter: 140 processors, odd (attn2) ones with to_k_ip/to_v_ip "
                             "[C, 2048]; no LoRA.",
             "released_as": "InstantX/InstantID: ip-adapter.bin",
             "dtype_basis": {"image_proj": "inferred float32: 4 bytes x param_count = 1.69 GB, the listed size",
                             "ip_adapter": "as image_proj"},
             "groups": {"image_proj": _group(resampler, "float32"), "ip_adapter": _group(procs, "float32")},
             "processor_index_map": {"ip_adapter": index_map}}, "instantid_ip_adapter_sdxl.json")
    _finish({"source": f"{src}: the IdentityNet, diffusers ControlNetModel (ControlNetModel.from_unet of the SDXL "
                       "base UNet gives the same config)",
             "format_notes": "ControlNetModel/diffusion_pytorch_model.safetensors: flat diffusers keys. The pipeline "
                             "feeds it encoder_hidden_states = the 16 Resampler ID tokens (not the text), "
                             "controlnet_cond = the 5-keypoint map, and the SDXL text_embeds/time_ids.",
             "released_as": "InstantX/InstantID: ControlNetModel/diffusion_pytorch_model.safetensors",
             "dtype_basis": {"": "assumed float16 (the README loads it with torch_dtype=float16); not confirmed"},
             "configs": {"controlnet": {k: v for k, v in dict(controlnet.config).items() if not k.startswith("_")}},
             "groups": {"": _group(controlnet, "float16")}}, "instantid_controlnet_sdxl.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ip-adapter", required=True)
    parser.add_argument("--instantid", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _import_official(args.ip_adapter)
    faceid_layouts()
    _import_official(args.instantid)
    instantid_layouts()


if __name__ == "__main__":
    main()
