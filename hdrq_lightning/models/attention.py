"""``nn.MultiheadAttention`` with its projections as four ``nn.Linear`` modules that its forward really calls.

``nn.MultiheadAttention`` keeps q/k/v in one ``in_proj_weight`` (or three ``*_proj_weight`` parameters when
``kdim``/``vdim`` differ) and hands ``out_proj.weight`` to a functional kernel, so ``out_proj``'s forward (and any
hook on it) never runs and no layer-wise quantizer sees its input; ``out_proj`` is also a
``NonDynamicallyQuantizableLinear``, which the exact-type module registry does not swap. open_clip and torchvision
ViTs use it (timm's fused ``qkv`` is a plain Linear and needs nothing). ``unfuse_multihead_attention(model)``
replaces every instance with ``UnfusedMultiheadAttention``: same parameters split into ``q_proj``, ``k_proj``,
``v_proj``, ``out_proj``, same forward signature and outputs (tested to 1e-6 against the original).
``models/build.py`` applies it to every network it builds, so that every stage (training, quantization, merging,
post-merge quantization, evaluation) sees the same parameter names; a state dict in the fused layout
(``in_proj_weight``, ``in_proj_bias``, or ``q/k/v_proj_weight``: an open_clip or torchvision file) still loads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdrq_lightning.errors import ConfigError


class UnfusedMultiheadAttention(nn.Module):
    """Multi-head attention computed from four Linear modules (see the module docstring)."""

    # what nn.TransformerEncoderLayer / nn.TransformerEncoder read to choose their fused fast path (which would hand
    # in_proj_weight to a kernel): absent fused weights send them down the regular path, which calls this forward
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ConfigError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported by "
                              "unfuse_multihead_attention; build the model without them.")
        e, kdim, vdim = mha.embed_dim, mha.kdim, mha.vdim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        bias = mha.in_proj_bias is not None
        self.q_proj, self.k_proj = nn.Linear(e, e, bias=bias), nn.Linear(kdim, e, bias=bias)
        self.v_proj, self.out_proj = nn.Linear(vdim, e, bias=bias), nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            if mha.in_proj_weight is not None:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            for linear, weight in zip((self.q_proj, self.k_proj, self.v_proj), weights):
                linear.weight.copy_(weight)
            if bias:
                for linear, b in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.chunk(3)):
                    linear.bias.copy_(b)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.train(mha.training)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
        """Accept ``nn.MultiheadAttention``'s fused keys: split them into the q/k/v projections' keys."""
        fused_weight = state_dict.pop(prefix + "in_proj_weight", None)
        fused_bias = state_dict.pop(prefix + "in_proj_bias", None)
        if fused_weight is not None:
            for name, weight in zip(("q", "k", "v"), fused_weight.chunk(3)):
                state_dict[f"{prefix}{name}_proj.weight"] = weight
        for name in ("q", "k", "v"):
            separate = state_dict.pop(f"{prefix}{name}_proj_weight", None)
            if separate is not None:
                state_dict[f"{prefix}{name}_proj.weight"] = separate
        if fused_bias is not None:
            for name, bias in zip(("q", "k", "v"), fused_bias.chunk(3)):
                state_dict[f"{prefix}{name}_proj.bias"] = bias
        super()._load_from_state_dict(state_dict, prefix, *args)

    @staticmethod
    def _additive(mask: Tensor | None, like: Tensor) -> Tensor | None:
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
        return mask.to(like.dtype)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (x.unsqueeze(0 if self.batch_first else 1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        target, batch, _ = query.shape
        source = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(target, batch * heads, head_dim).transpose(0, 1)
        k = self.k_proj(key).reshape(source, batch * heads, head_dim).transpose(0, 1)
        v = self.v_proj(value).reshape(source, batch * heads, head_dim).transpose(0, 1)
        scores = (q * head_dim**-0.5) @ k.transpose(1, 2)  # [batch * heads, target, source]
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(target, source, dtype=torch.bool, device=q.device).triu(1)
        mask = self._additive(attn_mask, scores)
        if mask is not None:
            scores = scores + (mask.unsqueeze(0) if mask.dim() == 2 else mask)
        padding = self._additive(key_padding_mask, scores)
        if padding is not None:
            scores = (scores.view(batch, heads, target, source) + padding.view(batch, 1, 1, source)).view(
                batch * heads, target, source)
        weights = torch.softmax(scores, dim=-1)
        attended = F.dropout(weights, p=self.dropout, training=self.training) @ v
        out = self.out_proj(attended.transpose(0, 1).reshape(target, batch, self.embed_dim))
        if self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        if not need_weights:
            return out, None
        weights = weights.view(batch, heads, target, source)
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights


def unfuse_multihead_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` of ``model`` in place by an equivalent
    ``UnfusedMultiheadAttention``; returns ``model``. Modules that call it through ``self.attn(...)`` keep working;
    code that reads ``in_proj_weight`` directly (e.g. ``nn.TransformerEncoderLayer``'s fast path checks) sees the
    new module and takes the regular path."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            model.set_submodule(name, UnfusedMultiheadAttention(module))
    return model
