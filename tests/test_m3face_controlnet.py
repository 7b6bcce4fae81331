"""M3Face FaceControlNet loader, plain parts: the attention-head layout the file's shapes cannot tell."""
from __future__ import annotations

import dataclasses

import pytest

from likeness.errors import InvalidInputError
from likeness.techniques.faceid.controlnet_layout import ControlNetShape
from likeness.techniques.m3face.controlnet import SD1_HEADS, SD2_HEADS, head_layout

CONV = ControlNetShape(in_channels=4, conditioning_channels=3, block_out_channels=(32, 64, 128, 128),
                       blocks_with_attention=(True, True, True, False), transformer_depth=(1, 1, 1, 0),
                       mid_transformer_depth=1, layers_per_block=2, time_embed_dim=128, cross_attention_dim=64,
                       linear_projection=False, embedding_channels=(16, 32, 96, 256))
LINEAR = dataclasses.replace(CONV, linear_projection=True)


def test_an_explicit_choice_wins():
    assert head_layout("64-channel heads (SD2)", CONV, {"num_heads": 8}, None) == SD2_HEADS
    assert head_layout("8 heads (SD1.5)", LINEAR, None, {"num_head_channels": 64}) == SD1_HEADS


def test_auto_prefers_the_model_then_comfyuis_table_then_the_projection_type():
    model = {"num_heads": -1, "num_head_channels": 32}
    assert head_layout("auto", LINEAR, model, {"num_heads": 8}) == model
    assert head_layout("auto", LINEAR, None, {"num_heads": 8}) == {"num_heads": 8, "num_head_channels": -1}
    assert head_layout("auto", LINEAR, None, None) == SD2_HEADS
    assert head_layout("auto", CONV, None, None) == SD1_HEADS


def test_an_unknown_choice_is_refused():
    with pytest.raises(InvalidInputError, match="heads must be one of"):
        head_layout("16 heads", CONV, None, None)
