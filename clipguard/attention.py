"""A leaner backward pass for the self-attention of CLIP's image tower.

Trigger inversion and the reach probes back-propagate through the image encoder thousands of
times a scan, and on a CPU :class:`torch.nn.MultiheadAttention` spends a large share of that
in bookkeeping rather than arithmetic: it splits its packed query/key/value projection with
``select``, whose backward allocates and zero-fills a full-size gradient buffer for each of
the three parts in every layer. :class:`PackedSelfAttention` computes the same projection,
attention and output projection, but splits the projection with ``chunk`` (whose backward is
one concatenation), which makes a forward and backward pass of the lab models' image tower
about a tenth faster on a 2-core CPU (``benchmarks/encoder_speed.py``).

It changes no arithmetic: the same matrix products, the same
:func:`torch.nn.functional.scaled_dot_product_attention` call, on tensors laid out as torch
lays them out. Outputs, input gradients and weight gradients are bit-identical to
:class:`torch.nn.MultiheadAttention`'s (tests/core/test_attention.py checks random shapes and
a lab-like image tower; ``benchmarks/encoder_speed.py`` checks any model). Every call it does
not cover (no gradients recorded, attention weights requested, masks, separate key/value
inputs, dropout in training, bias_k / zero-attention variants) goes to
:class:`torch.nn.MultiheadAttention` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PackedSelfAttention(torch.nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` whose batch-first self-attention, when gradients
    are recorded, splits the packed projection without ``select`` (module docstring). Same
    parameters and state-dict keys; made by :func:`pack_self_attention`."""

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`torch.nn.MultiheadAttention.forward`; the packed path returns
        ``(output, None)`` exactly where the stock module would return no weights."""
        packed = (
            torch.is_grad_enabled()
            and query is key
            and key is value
            and query.dim() == 3
            and key_padding_mask is None
            and attn_mask is None
            and not need_weights
            and not is_causal
            and self.batch_first
            and self._qkv_same_embed_dim
            and self.bias_k is None
            and not self.add_zero_attn
            and (self.dropout == 0.0 or not self.training)
        )
        if not packed:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        # torch's own layout throughout (sequence first, heads folded into the batch), so
        # that every matrix product and the attention kernel see the tensors torch gives them
        batch, length, width = query.shape
        heads = self.num_heads
        sequence_first = query.transpose(0, 1)
        projected = F.linear(sequence_first, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (
            part.reshape(length, batch * heads, width // heads)
            .transpose(0, 1)
            .view(batch, heads, length, width // heads)
            for part in projected.chunk(3, dim=-1)
        )
        attended = F.scaled_dot_product_attention(q, k, v)
        merged = attended.permute(2, 0, 1, 3).contiguous().view(length * batch, width)
        output = F.linear(merged, self.out_proj.weight, self.out_proj.bias)
        return output.view(length, batch, width).transpose(1, 0), None


def pack_self_attention(module: torch.nn.Module) -> int:
    """Turn every plain :class:`torch.nn.MultiheadAttention` inside ``module`` into a
    :class:`PackedSelfAttention` in place (same parameters, buffers and hooks; subclasses of
    it are left alone) and return how many were turned. Idempotent."""
    turned = 0
    for submodule in module.modules():
        if type(submodule) is torch.nn.MultiheadAttention:
            submodule.__class__ = PackedSelfAttention
            turned += 1
    return turned
