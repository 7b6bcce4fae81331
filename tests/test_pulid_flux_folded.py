"""The folded ID cross-attention (sampling path) equals the module it folds."""
from __future__ import annotations

import torch

from likeness.techniques.pulid_flux.encoders import IDCrossAttention
from likeness.techniques.pulid_flux.folded import fold, folded_residual


def _cross_attention(seed: int = 0) -> IDCrossAttention:
    torch.manual_seed(seed)
    ca = IDCrossAttention(dim=64, dim_head=16, heads=4, id_dim=32).eval()
    with torch.no_grad():
        for name, p in ca.named_parameters():   # non-trivial norms: the fold must keep norm1's affine part
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return ca


def test_folded_equals_the_module_in_fp32():
    ca = _cross_attention()
    generator = torch.Generator().manual_seed(1)
    id_tokens = torch.randn(1, 8, 32, generator=generator)
    image = torch.randn(3, 40, 64, generator=generator)
    with torch.no_grad():
        expected = ca(id_tokens.expand(3, -1, -1), image)
        folded = folded_residual(ca, fold(ca, id_tokens, torch.float32), image)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


def test_folded_in_bf16_stays_within_bf16_rounding_of_the_fp32_module():
    ca = _cross_attention(2)
    generator = torch.Generator().manual_seed(3)
    id_tokens, image = torch.randn(1, 8, 32, generator=generator), torch.randn(1, 40, 64, generator=generator)
    with torch.no_grad():
        expected = ca(id_tokens, image)
        ca16 = ca.to(torch.bfloat16)
        folded = folded_residual(ca16, fold(ca16, id_tokens, torch.bfloat16), image.bfloat16()).float()
    assert (folded - expected).norm() / expected.norm() < 2e-2


def test_a_different_id_gives_a_different_fold():
    ca = _cross_attention()
    a, b = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    assert not torch.allclose(fold(ca, a, torch.float32).keys, fold(ca, b, torch.float32).keys)
