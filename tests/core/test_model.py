"""Loading CLIP checkpoints: every accepted layout round-trips to the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipguard.io import sha256_file
from clipguard.model import (
    ModelBundle,
    build_clip_from_config,
    build_clip_from_name,
    infer_openai_config,
    load_model,
    save_model,
)
from tests.conftest import TINY_CONFIG

#: the tiny model with QuickGELU, so that an OpenAI-style inference rebuilds it exactly
TINY_OPENAI_CONFIG = {**TINY_CONFIG, "quick_gelu": True}


@pytest.fixture(scope="module")
def tiny_openai_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_clip_from_config(TINY_OPENAI_CONFIG).eval()


def _pixels(size: int, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _assert_same_image_features(bundle: ModelBundle, model: torch.nn.Module) -> None:
    pixels = _pixels(bundle.image_size)
    with torch.no_grad():
        expected = model.eval().encode_image(bundle.normalize(pixels))
        got = bundle.encode_image(pixels, normalize=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _assert_same_weights(bundle: ModelBundle, model: torch.nn.Module) -> None:
    loaded = bundle.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


# --------------------------------------------------------------------------- tiny models


def test_safetensors_with_embedded_config_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_clip_from_config(TINY_CONFIG)
    path = tmp_path / "tiny.safetensors"
    digest = save_model(path, model, TINY_CONFIG)
    bundle = load_model(path)
    assert bundle.arch == "custom"
    assert bundle.sha256 == digest == sha256_file(path)
    _assert_same_weights(bundle, model)
    _assert_same_image_features(bundle, model)


def test_bundle_records_provenance(tiny_model_path: Path) -> None:
    bundle = load_model(tiny_model_path)
    described = bundle.describe()
    assert described["path"] == str(tiny_model_path)
    assert described["sha256"] == sha256_file(tiny_model_path)
    assert described["image_size"] == 32
    assert described["parameters"] == sum(p.numel() for p in bundle.model.parameters())
    assert len(described["mean"]) == len(described["std"]) == 3


def test_loaded_model_is_frozen_and_in_eval_mode(tiny_model_path: Path) -> None:
    bundle = load_model(tiny_model_path)
    assert not bundle.model.training
    assert not any(module.training for module in bundle.model.modules())
    assert not any(p.requires_grad for p in bundle.model.parameters())


def test_encode_text_uses_the_models_context_length(tiny_model_path: Path) -> None:
    bundle = load_model(tiny_model_path)
    tokens = bundle.tokenize(["a photo of a red square."])
    assert tokens.shape == (1, TINY_CONFIG["text_cfg"]["context_length"])
    features = bundle.encode_text(["a photo of a red square.", "a blue circle"])
    assert features.shape == (2, TINY_CONFIG["embed_dim"])
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))


def test_embedded_preprocess_config_sets_normalisation(tmp_path: Path) -> None:
    config = {**TINY_CONFIG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25] * 3}}
    path = tmp_path / "tiny.safetensors"
    save_model(path, build_clip_from_config(TINY_CONFIG), config)
    bundle = load_model(path)
    assert bundle.mean == (0.5, 0.5, 0.5)
    assert bundle.std == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_state_dict_is_inferred_as_openai_style(
    suffix: str, tmp_path: Path, tiny_openai_model: torch.nn.Module
) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save(tiny_openai_model.state_dict(), path)
    bundle = load_model(path)
    assert bundle.arch == "inferred-openai"
    assert bundle.sha256 == sha256_file(path)
    _assert_same_weights(bundle, tiny_openai_model)
    _assert_same_image_features(bundle, tiny_openai_model)


def test_state_dict_wrapper_with_module_prefix_is_unwrapped(
    tmp_path: Path, tiny_openai_model: torch.nn.Module
) -> None:
    wrapped = {f"module.{k}": v for k, v in tiny_openai_model.state_dict().items()}
    path = tmp_path / "cleanclip.pt"
    torch.save({"epoch": 10, "state_dict": wrapped}, path)
    bundle = load_model(path)
    _assert_same_weights(bundle, tiny_openai_model)
    _assert_same_image_features(bundle, tiny_openai_model)


def test_legacy_non_zip_torch_save_loads(
    tmp_path: Path, tiny_openai_model: torch.nn.Module
) -> None:
    path = tmp_path / "legacy.pth"
    torch.save(tiny_openai_model.state_dict(), path, _use_new_zipfile_serialization=False)
    _assert_same_weights(load_model(path), tiny_openai_model)


def test_openai_scalar_entries_are_ignored(
    tmp_path: Path, tiny_openai_model: torch.nn.Module
) -> None:
    state = dict(tiny_openai_model.state_dict())
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16))
    path = tmp_path / "openai.pt"
    torch.save(state, path)
    _assert_same_weights(load_model(path), tiny_openai_model)


def test_half_precision_weights_are_loaded_as_float32(
    tmp_path: Path, tiny_openai_model: torch.nn.Module
) -> None:
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in tiny_openai_model.state_dict().items()}, path)
    bundle = load_model(path)
    assert all(p.dtype == torch.float32 for p in bundle.model.parameters())


def test_infer_openai_config_reads_the_tiny_vit_shapes(tiny_openai_model: torch.nn.Module) -> None:
    config = infer_openai_config(tiny_openai_model.state_dict())
    assert config["embed_dim"] == TINY_CONFIG["embed_dim"]
    vision = config["vision_cfg"]
    assert (vision["layers"], vision["width"], vision["patch_size"], vision["image_size"]) == (
        1,
        64,
        8,
        32,
    )
    assert config["text_cfg"]["context_length"] == 16


def test_arch_overrides_the_embedded_config(tmp_path: Path) -> None:
    """--arch is honoured even for a file with a config; a mismatch is a clear error."""
    from clipguard.errors import ModelLoadError

    path = tmp_path / "tiny.safetensors"
    save_model(path, build_clip_from_config(TINY_CONFIG), TINY_CONFIG)
    with pytest.raises(ModelLoadError, match="do not fit architecture ViT-B-32"):
        load_model(path, arch="ViT-B-32")


def test_fast_materialisation_rebuilds_the_causal_text_mask(tiny_model_path: Path) -> None:
    """Weights are loaded into an uninitialised model; the one buffer not in the file matches."""
    reference = build_clip_from_config(TINY_CONFIG)
    bundle = load_model(tiny_model_path)
    assert torch.equal(bundle.model.attn_mask, reference.attn_mask)


# --------------------------------------------------------------------------- real architectures


def _assert_eval_mode_is_deterministic(bundle: ModelBundle) -> None:
    """Eval mode throughout (BatchNorm uses running statistics and leaves them untouched)."""
    assert bundle.model.training is False
    assert not any(module.training for module in bundle.model.modules())
    batchnorms = [m for m in bundle.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    statistics = [m.running_mean.clone() for m in batchnorms]
    pixels = _pixels(bundle.image_size)
    torch.testing.assert_close(
        bundle.encode_image(pixels), bundle.encode_image(pixels), rtol=0, atol=0
    )
    for module, before in zip(batchnorms, statistics, strict=True):
        assert torch.equal(module.running_mean, before)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_real_architecture_round_trips_with_and_without_arch(arch: str, tmp_path: Path) -> None:
    """Built with pretrained=None, saved, loaded back three ways (RN50: BatchNorm in eval)."""
    torch.manual_seed(0)
    model, config = build_clip_from_name(arch)
    model.eval()
    safetensors_path = tmp_path / f"{arch}.safetensors"
    save_model(safetensors_path, model, config)
    state_path = tmp_path / f"{arch}.pt"
    torch.save(model.state_dict(), state_path)

    embedded = load_model(safetensors_path)
    _assert_same_image_features(embedded, model)
    del embedded
    named = load_model(state_path, arch=arch)
    assert named.arch == arch
    assert named.image_size == 224
    _assert_same_image_features(named, model)
    _assert_eval_mode_is_deterministic(named)
    del named
    # Without --arch, the OpenAI layout is inferred: same shapes and weights (OpenAI models use
    # QuickGELU, which open_clip assumes too, so features differ from this GELU model).
    inferred = load_model(state_path)
    assert inferred.arch == "inferred-openai"
    _assert_same_weights(inferred, model)
