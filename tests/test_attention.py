"""unfuse_multihead_attention: the same outputs as nn.MultiheadAttention, with projections whose forward runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hdrq_lightning.pmq.attention import UnfusedMultiheadAttention, unfuse_multihead_attention
from hdrq_lightning.quant.modules import QuantConfig, QuantLinear, quantize_model


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_outputs_equal_the_fused_module(batch_first, cross):
    torch.manual_seed(0)
    kdim = vdim = 12 if cross else None
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=vdim).eval()
    unfused = UnfusedMultiheadAttention(mha).eval()
    shape = (lambda n, length, e: (n, length, e)) if batch_first else (lambda n, length, e: (length, n, e))
    query = torch.randn(*shape(3, 5, 16))
    key = torch.randn(*shape(3, 7, 12 if cross else 16))
    value = torch.randn(*shape(3, 7, 12 if cross else 16))
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, -2:] = True
    attn_mask = torch.randn(5, 7)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": attn_mask, "average_attn_weights": False},
                   {"attn_mask": torch.rand(5, 7) > 0.8, "key_padding_mask": padding}):
        expected = mha(query, key, value, **kwargs)
        got = unfused(query, key, value, **kwargs)
        assert torch.allclose(got[0], expected[0], atol=1e-6), kwargs
        assert torch.allclose(got[1], expected[1], atol=1e-6), kwargs


def test_unbatched_and_causal():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2).eval()
    unfused = UnfusedMultiheadAttention(mha)
    x = torch.randn(6, 8)
    assert torch.allclose(unfused(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    batched = torch.randn(6, 2, 8)
    assert torch.allclose(unfused(batched, batched, batched, is_causal=True)[0],
                          mha(batched, batched, batched, attn_mask=causal)[0], atol=1e-6)


def test_encoder_layer_after_unfusing_runs_its_projections_and_quantizes():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0).eval()
    x = torch.randn(5, 3, 16)
    expected = layer(x)
    unfuse_multihead_attention(layer)
    called = []
    layer.self_attn.out_proj.register_forward_hook(lambda *_: called.append(True))
    assert torch.allclose(layer(x), expected, atol=1e-5) and called
    quantized = quantize_model(layer, QuantConfig(w_bits=8, a_bits=None, first_last_8bit=False))
    assert isinstance(quantized.self_attn.out_proj, QuantLinear) and isinstance(quantized.self_attn.q_proj, QuantLinear)
    assert torch.allclose(quantized(x), expected, atol=5e-2)
