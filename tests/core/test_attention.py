"""PackedSelfAttention: the same results as torch's MultiheadAttention, with a cheaper backward."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipguard.attention import PackedSelfAttention, pack_self_attention
from clipguard.model import ModelBundle, build_clip_from_config, load_model
from tests.conftest import LAB_LIKE_CONFIG, TINY_CONFIG


def _pair(width: int, heads: int, bias: bool, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    stock = torch.nn.MultiheadAttention(width, heads, bias=bias, batch_first=True).eval()
    packed = copy.deepcopy(stock)
    assert pack_self_attention(packed) == 1
    return stock, packed


def _attend(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    output = module(x, x, x, need_weights=False)[0]
    (output * torch.linspace(-1, 1, output.shape[-1])).sum().backward()
    return output.detach(), x.grad, module.in_proj_weight.grad, module.out_proj.weight.grad


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 6),
    length=st.integers(1, 20),
    heads=st.sampled_from([1, 2, 4]),
    head_width=st.sampled_from([4, 8, 16, 32]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_packed_attention_matches_torch_outputs_and_gradients(
    batch: int, length: int, heads: int, head_width: int, bias: bool, seed: int
) -> None:
    """To the bit: outputs and input gradients (what a scan uses) and weight gradients (what a
    fine-tuning baseline uses)."""
    stock, packed = _pair(heads * head_width, heads, bias, seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads * head_width, generator=generator)
    for expected, got in zip(_attend(stock, x), _attend(packed, x), strict=True):
        assert torch.equal(got, expected)


def test_calls_it_does_not_cover_go_to_torch_unchanged() -> None:
    stock, packed = _pair(16, 2, True, 0)
    x, other = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mask = torch.triu(torch.full((5, 5), float("-inf")), diagonal=1)
    calls = [
        lambda m: m(x, x, x),  # attention weights requested
        lambda m: m(x, x, x, need_weights=False, attn_mask=mask),
        lambda m: m(x, other, other, need_weights=False),  # cross-attention
    ]
    for call in calls:
        for expected, got in zip(call(stock), call(packed), strict=True):
            assert (expected is None) == (got is None)
            if expected is not None:
                assert torch.equal(got, expected)
    with torch.no_grad():
        expected = stock(x, x, x, need_weights=False)[0]
        assert torch.equal(packed(x, x, x, need_weights=False)[0], expected)


def test_packing_keeps_weights_and_is_idempotent() -> None:
    model = build_clip_from_config(TINY_CONFIG)
    keys = list(model.state_dict())
    assert pack_self_attention(model.visual) == 1
    assert pack_self_attention(model.visual) == 0
    assert list(model.state_dict()) == keys
    assert isinstance(model.visual.transformer.resblocks[0].attn, PackedSelfAttention)


def test_bundles_pack_the_image_tower_only(tiny_model_path) -> None:
    bundle = load_model(tiny_model_path)
    kinds = {type(m) for m in bundle.model.visual.modules()}
    assert PackedSelfAttention in kinds and torch.nn.MultiheadAttention not in kinds
    assert {type(m) for m in bundle.model.transformer.modules()} & {PackedSelfAttention} == set()


def test_lab_like_image_tower_gives_bit_identical_features_and_input_gradients() -> None:
    """What a scan relies on: packing changes neither the features nor the gradients that
    trigger inversion follows, so verdicts and calibrated thresholds stay exactly as they were."""
    torch.manual_seed(0)
    stock = build_clip_from_config(LAB_LIKE_CONFIG).eval().requires_grad_(False)
    bundle = ModelBundle.from_model(copy.deepcopy(stock), LAB_LIKE_CONFIG)
    pixels = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def features_and_gradient(encode) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.clone().requires_grad_(True)
        features = encode(x)
        (features * torch.linspace(-1, 1, features.shape[-1])).sum().backward()
        return features.detach(), x.grad

    expected = features_and_gradient(
        lambda x: torch.nn.functional.normalize(stock.encode_image(bundle.normalize(x)), dim=-1)
    )
    got = features_and_gradient(bundle.encode_image)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
