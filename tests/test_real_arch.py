"""Real CLIP architectures load in both key layouts, with memory checked before the load.

open_clip's layout is its ``CLIP.state_dict()`` (float32; here with the open_clip config
embedded, or plain with ``--arch``). OpenAI's layout, what the original ``clip`` package's
``state_dict()`` holds, has the same names (open_clip's
``build_model_from_openai_state_dict`` loads it strictly) but: convolution, linear and
attention weights and the projections in float16 (``convert_weights_to_fp16``), the rest
float32; the scalar entries ``input_resolution``, ``context_length`` and ``vocab_size`` in
archives saved from the TorchScript model; no architecture name, so it is inferred
(QuickGELU, as OpenAI trained). ModifiedResNet (RN50) adds BatchNorm statistics and
``num_batches_tracked`` counters in both layouts.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import convert_weights_to_fp16

from clipguard.errors import ModelLoadError
from clipguard.model import load_model, save_model

#: open_clip names; ViT-B-16 (the ViT-B-32 layout at another patch size) and ViT-L-14 (428 M
#: parameters) take minutes on two cores, so they are slow
ARCHITECTURES = [
    pytest.param("ViT-B-32", id="ViT-B-32"),
    pytest.param("ViT-B-16", id="ViT-B-16", marks=pytest.mark.slow),
    pytest.param("RN50", id="RN50"),
    pytest.param("ViT-L-14", id="ViT-L-14", marks=pytest.mark.slow),
]


def _openai_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights as OpenAI's ``clip`` package stores them (``model`` is left in
    float16 where that package converts it)."""
    convert_weights_to_fp16(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    size = model.visual.image_size
    state["input_resolution"] = torch.tensor(size if isinstance(size, int) else size[0])
    state["context_length"] = torch.tensor(model.context_length)
    state["vocab_size"] = torch.tensor(model.vocab_size)
    return state


def _same_weights(loaded: torch.nn.Module, original: dict[str, torch.Tensor], tol: float) -> None:
    state = loaded.state_dict()
    for name, tensor in original.items():
        if name in ("input_resolution", "context_length", "vocab_size"):
            continue
        assert state[name].dtype == (torch.float32 if tensor.is_floating_point() else tensor.dtype)
        assert torch.allclose(state[name].float(), tensor.float(), atol=tol, rtol=tol), name


def _runs(bundle) -> None:
    with torch.no_grad():
        features = bundle.encode_image(torch.rand(1, 3, bundle.image_size, bundle.image_size))
        text = bundle.encode_text(["a photo of a cat"])
    assert torch.isfinite(features).all() and torch.isfinite(text).all()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_an_architecture_loads_in_both_key_layouts(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    model_cfg = open_clip.get_model_config(name)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    # open_clip layout, config embedded (what clipguard writes) and plain with --arch
    embedded = tmp_path / "open_clip.safetensors"
    save_model(embedded, model, model_cfg)
    bundle = load_model(embedded)
    _same_weights(bundle.model, weights, 0.0)
    assert bundle.image_size == 224
    _runs(bundle)
    del bundle
    plain = tmp_path / "open_clip.pt"
    torch.save(weights, plain)
    bundle = load_model(plain, arch=name)
    _same_weights(bundle.model, weights, 0.0)
    del bundle
    plain.unlink()

    # OpenAI layout: float16 weights and scalar entries, the architecture inferred
    openai = tmp_path / "openai.pt"
    layout = _openai_layout(model)
    assert any(t.dtype == torch.float16 for t in layout.values())
    torch.save(layout, openai)
    del model
    bundle = load_model(openai)
    assert bundle.arch == "inferred-openai"
    assert bundle.model_cfg["quick_gelu"] is True
    for key in ("layers", "width", "image_size"):
        inferred, named = bundle.model_cfg["vision_cfg"][key], model_cfg["vision_cfg"][key]
        assert (list(inferred) if isinstance(inferred, tuple) else inferred) == named, key
    assert bundle.model_cfg["embed_dim"] == model_cfg["embed_dim"]
    _same_weights(bundle.model, layout, 1e-3)
    _runs(bundle)


def test_a_model_that_cannot_fit_in_memory_is_refused_before_it_is_built(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipguard.model as model_module

    size = tiny_model_path.stat().st_size
    # enough to read the file; then (what the read took gone) not enough for the model
    left = iter([2 * size, size])
    monkeypatch.setattr(model_module, "available_memory", lambda: next(left))
    built = []
    monkeypatch.setattr(model_module, "_materialise", lambda *a: built.append(a))
    with pytest.raises(ModelLoadError, match="for the float32 model and its weights"):
        load_model(tiny_model_path)
    assert not built
    monkeypatch.setattr(model_module, "available_memory", lambda: size)
    with pytest.raises(ModelLoadError, match="to read and parse the file"):
        load_model(tiny_model_path)


def test_not_enough_memory_is_one_line_and_exit_2(
    tiny_model_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipguard.model as model_module
    from tests.core.cli_helpers import assert_one_line_error, run_cli

    monkeypatch.setattr(model_module, "available_memory", lambda: 1024)
    result = run_cli("scan", tiny_model_path, "--data", tiny_data, "--estimate")
    assert_one_line_error(result, "not enough memory")


def test_available_memory_is_known_here() -> None:
    from clipguard.model import available_memory

    available = available_memory()
    assert available is None or available > 0
