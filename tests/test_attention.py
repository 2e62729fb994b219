"""unfuse_multihead_attention: the same outputs as nn.MultiheadAttention, with projections whose forward runs;
networks built from configs get it, fused files load into them, and post-merge GPTQ solves every projection."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.merge import get_merge_method
from hdrq_lightning.models.attention import UnfusedMultiheadAttention, unfuse_multihead_attention
from hdrq_lightning.models.build import build_model
from hdrq_lightning.pmq import PostMergeQuantizer, get_pmq_method
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


class _Encoder(nn.Module):
    """A chain of two nn.TransformerEncoderLayer units (an open_clip/torchvision-style attention network)."""

    reconstruction_chain = True

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
                                    for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def reconstruction_units(self):
        return [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]


def _encoder(seed: int = 0) -> _Encoder:
    torch.manual_seed(seed)
    return _Encoder()


def test_networks_built_from_configs_are_unfused_and_load_fused_files():
    fused = _encoder().eval()
    built = build_model({"_target_": "test_attention._encoder"}).eval()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in built.modules())
    assert isinstance(built.layers[0].self_attn, UnfusedMultiheadAttention)
    built.load_state_dict(fused.state_dict())  # in_proj_weight / in_proj_bias keys: split on load
    x = torch.randn(3, 5, 16)
    assert torch.allclose(built(x), fused(x), atol=1e-5)
    assert torch.equal(built.layers[1].self_attn.k_proj.weight, fused.layers[1].self_attn.in_proj_weight[16:32])


def test_quantizing_a_fused_attention_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="unfuse_multihead_attention"):
        quantize_model(_encoder(), QuantConfig(w_bits=4, a_bits=None, first_last_8bit=False))


def test_post_merge_gptq_solves_every_attention_projection():
    """GPTQ after merging two attention experts: q/k/v/out projections and the MLP of both units are solved on
    their grid, and the deployed model stays close to the merge."""
    experts = [unfuse_multihead_attention(_encoder(seed).eval()) for seed in (1, 2)]
    merged = copy.deepcopy(experts[0])
    merged.load_state_dict(get_merge_method("mean").merge([e.state_dict() for e in experts]))
    deployed = quantize_model(merged, QuantConfig(w_bits=4, a_bits=None, first_last_8bit=False), init_ranges=False)
    calibration = [torch.randn(32, 5, 16), torch.randn(32, 5, 16)]
    rows = PostMergeQuantizer(deployed, merged, experts, calibration, get_pmq_method("gptq")).run()
    names = {row.record()["layer"] for row in rows}
    assert names == {f"layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                   "self_attn.v_proj", "self_attn.out_proj",
                                                                   "linear1", "linear2")}
    for name, module in deployed.named_modules():
        if hasattr(module, "weight_quantizer"):
            quantizer = module.weight_quantizer
            codes = quantizer.integer(module.weight)
            assert codes.min() >= quantizer.qmin and codes.max() <= quantizer.qmax, name
            assert torch.allclose(quantizer(module.weight), (codes - quantizer.zero_point) * quantizer.effective_scale(),
                                  atol=1e-6), name
    x = torch.randn(8, 5, 16)
    with torch.no_grad():
        error = (deployed.eval()(x) - merged(x)).norm() / merged(x).norm()
    assert error < 0.2, float(error)
