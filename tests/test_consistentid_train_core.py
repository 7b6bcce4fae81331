"""ConsistentID trainer pieces that need no host: the facial attention-localization loss on synthetic maps, the
token selector, the map recorder, and the trainable weights' official key layout."""
from __future__ import annotations

import math

import pytest
import torch

from faceid_support import random_faceid_checkpoint


def _masks(batch: int = 2, slots: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Disjoint rectangular region masks [B, K, size, size]."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch, slots, size, size)
    for b in range(batch):
        for k in range(slots):
            top = int(torch.randint(0, size - 3, (1,), generator=generator))
            masks[b, k, top:top + 3, 2 * k:2 * k + 2] = 1.0
    return masks


def test_balanced_l1_is_minus_one_on_the_mask_zero_when_uniform_plus_one_outside():
    from likeness.techniques.consistentid.localization import balanced_l1

    masks = _masks(1, 2).flatten(2)                                     # [1, K, N]
    on_mask = masks.transpose(1, 2).unsqueeze(1)                         # [1, 1, N, K]
    uniform = torch.full_like(on_mask, 0.3)
    outside = 1.0 - on_mask
    assert torch.allclose(balanced_l1(on_mask, masks), torch.full((1, 1, 2), -1.0), atol=1e-4)
    assert torch.allclose(balanced_l1(uniform, masks), torch.zeros(1, 1, 2), atol=1e-4)
    assert torch.allclose(balanced_l1(outside, masks), torch.ones(1, 1, 2), atol=1e-4)
    # "balanced": a map on the region scores the same whatever the region's size
    small = torch.zeros(1, 1, 64)
    small[..., :2] = 1
    big = torch.zeros(1, 1, 64)
    big[..., :40] = 1
    for mask in (small, big):
        assert float(balanced_l1(mask.transpose(1, 2).unsqueeze(1) * 0.01, mask)) == pytest.approx(-1.0, abs=2e-3)


def test_localization_loss_is_differentiable_gradcheck():
    from likeness.techniques.consistentid.localization import layer_localization_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 3, dtype=torch.float64, requires_grad=True)
    masks = _masks(2, 3, size=8).double()
    valid = torch.tensor([[True, True, False], [True, False, False]])

    def f(x):
        return layer_localization_loss(torch.softmax(x, dim=2), masks, valid, (4, 4))

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-5)
    loss = f(logits)
    loss.backward()
    assert logits.grad[..., 2].abs().max() == 0            # an invalid slot gets no gradient
    assert logits.grad[1, ..., 1].abs().max() == 0
    assert logits.grad[0, ..., 0].abs().max() > 0


def test_localization_loss_falls_when_the_maps_align():
    """Optimise free attention logits (softmax over 77 text tokens) against the region masks: the loss
    falls to about -1 (each token's map on its region), and is highest for misaligned maps."""
    from likeness.techniques.consistentid.localization import facial_localization_loss, token_selector

    torch.manual_seed(0)
    masks = _masks(2, 3, size=16)
    positions = [[5, 9, 12], [7, 20, 30]]
    selector, valid = token_selector(positions, [77, 77], 77)
    grids = [(8, 8), (4, 4)]
    logits = [torch.zeros(2, 2, h * w, 77, requires_grad=True) for h, w in grids]
    optimizer = torch.optim.Adam(logits, lr=0.5)

    def loss():
        records = [(torch.softmax(x, dim=-1) @ selector.unsqueeze(1), g) for x, g in zip(logits, grids, strict=True)]
        return facial_localization_loss(records, masks, valid)

    history = []
    for _ in range(60):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        history.append(float(value.detach()))
    assert abs(history[0]) < 1e-3               # uniform attention: no preference
    assert history[-1] < -0.6 and history[-1] < history[10] < history[0]
    with torch.no_grad():
        aligned = float(loss())
        for x in logits:
            x.neg_()
        assert float(loss()) > aligned


def test_token_selector_sums_repeated_copies_and_marks_valid_slots():
    from likeness.techniques.consistentid.localization import token_selector

    selector, valid = token_selector([[3, 80], [5]], [154, 77], 154)
    assert selector.shape == (2, 154, 2)
    assert valid.tolist() == [[True, True], [True, False]]
    assert selector[0, :, 0].nonzero().flatten().tolist() == [3]
    assert selector[0, :, 1].nonzero().flatten().tolist() == [80]
    assert selector[1, :, 0].nonzero().flatten().tolist() == [5, 82]    # both copies of a repeated 77-token context
    with pytest.raises(ValueError):
        token_selector([[77]], [77], 77)


def test_token_attention_matches_a_plain_softmax():
    from likeness.techniques.consistentid.localization import token_attention, token_selector

    torch.manual_seed(1)
    q, k = torch.randn(2, 16, 32), torch.randn(2, 77, 32)
    selector, _ = token_selector([[4, 6], [10, 11]], [77, 77], 77)
    got = token_attention(q, k, 4, selector)
    q4, k4 = q.view(2, 16, 4, 8).transpose(1, 2), k.view(2, 77, 4, 8).transpose(1, 2)
    probs = torch.softmax(q4 @ k4.transpose(-1, -2) / math.sqrt(8), dim=-1)
    assert got.shape == (2, 4, 16, 2)
    assert torch.allclose(got[0, ..., 1], probs[0, ..., 6], atol=1e-6)
    assert torch.allclose(got[1, ..., 0], probs[1, ..., 10], atol=1e-6)


def test_recorder_observes_without_changing_the_output():
    from likeness.attention_patches import AttentionCall, AttentionSite, ChunkLayout
    from likeness.techniques.consistentid.localization import AttentionMapRecorder, localization_sites, token_selector

    def site(index, level):
        return AttentionSite(index, ("input", index), 0, index, 32, 4, 8, 32, index, level)

    sites = [site(0, 0), site(1, 1), site(2, 2)]
    chosen = localization_sites(sites)
    assert [s.index for s in chosen] == [1, 2]
    recorder = AttentionMapRecorder(chosen)
    selector, _ = token_selector([[3]], [77], 77)
    q, k = torch.randn(1, 16, 32, requires_grad=True), torch.randn(1, 77, 32)
    recorder.begin(selector)
    for s in sites:
        call = AttentionCall(q, k, k, s, ChunkLayout((0,), 1), 1.0, 4, (4, 4), {})
        assert recorder.contributions(call, 1.0) == []
    records = recorder.end()
    assert len(records) == 2 and records[0][0].shape == (1, 4, 16, 1) and records[0][1] == (4, 4)
    records[0][0].sum().backward()
    assert q.grad is not None and q.grad.abs().max() > 0
    assert recorder.end() == []                  # nothing left over for the next step


# --------------------------------------------------------------------------- trainable weights

SD15_TINY_CHANNELS = [32, 32, 64, 64, 128, 128, 128, 128, 128, 64, 64, 64, 32, 32, 32, 128]


def _tiny_weights():
    from likeness.techniques.consistentid.training import ConsistentIDWeights

    groups = random_faceid_checkpoint(SD15_TINY_CHANNELS, 64, clip_dim=64, rank=4, facial_encoder=True)
    return groups, ConsistentIDWeights.from_groups(groups, "tiny")


def test_weights_copy_names_and_official_layout_round_trip(tmp_path):
    from likeness.techniques.consistentid.loader import load_consistentid
    from likeness.techniques.consistentid.training import save_trained

    groups, weights = _tiny_weights()
    original = groups["adapter_modules"]["1.to_k_ip.weight"].clone()
    only_encoders = weights.trainable(False)
    everything = weights.trainable(True)
    assert all(n.startswith(("image_proj.", "FacialEncoder.")) for n in only_encoders)
    assert len(everything) == len(only_encoders) + len(groups["adapter_modules"])
    assert all(not t.is_inference() for t in everything.values())
    # the trainable tensors ARE what inference uses (no hidden copies)
    assert everything["adapter_modules.1.to_k_ip.weight"] is weights.adapter.processors[1].to_k_ip
    assert everything["adapter_modules.0.to_q_lora.up.weight"] is weights.adapter.processors[0].lora["to_q"][1]
    with torch.no_grad():
        for t in everything.values():
            t.add_(0.125)
    weights.metadata["trained_steps"] = "3"
    path = save_trained(weights, str(tmp_path / "mine.safetensors"))
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["trained_steps"] == "3"
    assert {k.split(".", 1)[0] for k in keys} == {"image_proj_model", "adapter_modules", "FacialEncoder"}
    loaded = load_consistentid(path)
    for name, tensor in everything.items():
        group, key = name.split(".", 1)
        source = {"image_proj": dict(loaded.projector.state_dict()),
                  "FacialEncoder": dict(loaded.facial_encoder.state_dict())}.get(group)
        if source is None:
            from likeness.techniques.consistentid.training import adapter_group
            source = adapter_group(loaded.adapter)
        assert torch.equal(source[key], tensor), name
    # the source groups were never modified
    assert torch.equal(groups["adapter_modules"]["1.to_k_ip.weight"], original)


def test_settings_are_checked():
    from likeness.errors import InvalidInputError
    from likeness.techniques.consistentid.training import ConsistentIDTrainSettings

    ConsistentIDTrainSettings().check()
    for bad in (dict(resolution=100), dict(lr=0.0), dict(condition_dropout=1.5), dict(localization_weight=-1),
                dict(steps=0)):
        with pytest.raises(InvalidInputError):
            ConsistentIDTrainSettings(**bad).check()
