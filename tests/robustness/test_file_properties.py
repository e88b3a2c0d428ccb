"""Property tests for every file format: round trips, and damaged bytes give a clean error.

Damage is aimed at the structure of each format (headers, pickles, zip directories), where a
flip is interesting; a flip inside tensor data may simply load, which is fine. Loading must
either succeed or raise a :class:`~clipguard.errors.ClipguardError`: never another exception.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipguard.errors import ClipguardError
from clipguard.model import build_clip_from_config, load_model, save_model
from clipguard.prompts import PromptSet, load_prompt_file, save_prompt_file
from clipguard.triggers import MaskPatternTrigger, TriggerFile, load_trigger_file, save_trigger_file

#: a CLIP of a few thousand weights: loads in milliseconds, so damaged copies are cheap to try
MICRO_CONFIG = {
    "embed_dim": 8,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1},
}
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: s.strip() == s and s
)
classname_lists = st.lists(names, min_size=1, max_size=5, unique=True)


def _bytes_of(writer: Callable[[Path], None], name: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        writer(path)
        return path.read_bytes()


def _micro_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_clip_from_config(MICRO_CONFIG)


def _prompt_bytes() -> bytes:
    prompts = PromptSet(torch.rand(3, 2, 64), ["a", "b", "c"], "e" * 64, "custom", "cbpt", "1")
    return _bytes_of(lambda p: save_prompt_file(p, prompts), "p.safetensors")


def _trigger_bytes() -> bytes:
    trigger = MaskPatternTrigger(mask=torch.rand(1, 8, 8), pattern=torch.rand(3, 8, 8))
    trigger_file = TriggerFile(trigger, "e" * 64, ["a", "b"], {"steps": 3}, "cbpt")
    return _bytes_of(lambda p: save_trigger_file(p, trigger_file), "t.safetensors")


def _model_safetensors_bytes() -> bytes:
    return _bytes_of(lambda p: save_model(p, _micro_model(), MICRO_CONFIG), "m.safetensors")


def _model_zip_bytes() -> bytes:
    return _bytes_of(lambda p: torch.save(_micro_model().state_dict(), p), "m.pt")


def _model_legacy_bytes() -> bytes:
    state = _micro_model().state_dict()
    return _bytes_of(lambda p: torch.save(state, p, _use_new_zipfile_serialization=False), "m.pt")


FORMATS: dict[str, tuple[Callable[[], bytes], str, Callable[[Path], object]]] = {
    "prompt-file": (_prompt_bytes, "p.safetensors", load_prompt_file),
    "trigger-file": (_trigger_bytes, "t.safetensors", load_trigger_file),
    "model-safetensors": (_model_safetensors_bytes, "m.safetensors", load_model),
    "model-torch-zip": (_model_zip_bytes, "m.pt", load_model),
    "model-torch-legacy": (_model_legacy_bytes, "m.pt", load_model),
}
_CACHE: dict[str, bytes] = {}


def _valid(kind: str) -> bytes:
    if kind not in _CACHE:
        _CACHE[kind] = FORMATS[kind][0]()
    return _CACHE[kind]


def _structural_position(data: bytes, draw_index: int, at_end: bool) -> int:
    """A byte position in the first or last 4 KiB (headers, pickles, zip directories)."""
    window = min(len(data), 4096)
    offset = draw_index % window
    return len(data) - 1 - offset if at_end else offset


def _load_expecting_clean_outcome(kind: str, data: bytes) -> None:
    _, name, loader = FORMATS[kind]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            loader(path)
        except ClipguardError as error:
            message = str(error)
            assert message and "\n" not in message, message


# --------------------------------------------------------------------------- round trips


@PROPERTY_SETTINGS
@given(
    classnames=classname_lists,
    n_context=st.integers(1, 4),
    width=st.integers(1, 16),
    settings_value=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5)),
    seed=st.integers(0, 2**16),
)
def test_prompt_file_round_trip(
    classnames: list[str], n_context: int, width: int, settings_value: dict, seed: int
) -> None:
    context = torch.randn(
        len(classnames), n_context, width, generator=torch.Generator().manual_seed(seed)
    )
    prompts = PromptSet(context, classnames, "ab" * 32, "ViT-B-32", "cbpt", "0.1", settings_value)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.safetensors"
        save_prompt_file(path, prompts)
        loaded = load_prompt_file(path)
    assert torch.equal(loaded.context, context)
    assert loaded.classnames == classnames
    assert (loaded.model_sha256, loaded.architecture, loaded.plugin, loaded.plugin_version) == (
        "ab" * 32,
        "ViT-B-32",
        "cbpt",
        "0.1",
    )
    assert loaded.settings == settings_value


@PROPERTY_SETTINGS
@given(
    classnames=st.lists(names, max_size=5, unique=True),
    size=st.integers(1, 12),
    producer=st.text(max_size=10),
    seed=st.integers(0, 2**16),
)
def test_trigger_file_round_trip(
    classnames: list[str], size: int, producer: str, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    trigger = MaskPatternTrigger(
        mask=torch.rand(1, size, size, generator=generator),
        pattern=torch.rand(3, size, size, generator=generator),
    )
    original = TriggerFile(trigger, "cd" * 32, classnames, {"seed": seed}, producer)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trigger.safetensors"
        save_trigger_file(path, original)
        loaded = load_trigger_file(path)
    assert torch.equal(loaded.trigger.mask, trigger.mask)
    assert torch.equal(loaded.trigger.pattern, trigger.pattern)
    assert (loaded.model_sha256, loaded.classnames, loaded.producer) == (
        "cd" * 32,
        classnames,
        producer,
    )
    assert loaded.settings == {"seed": seed}


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), suffix=st.sampled_from([".safetensors", ".pt", ".bin"]))
def test_model_file_round_trip(seed: int, suffix: str) -> None:
    torch.manual_seed(seed)
    model = build_clip_from_config(MICRO_CONFIG)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"model{suffix}"
        if suffix == ".safetensors":
            save_model(path, model, MICRO_CONFIG)
        else:
            torch.save(model.state_dict(), path)
        bundle = load_model(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[name], tensor), name


# --------------------------------------------------------------------------- damage


@pytest.mark.parametrize("kind", list(FORMATS))
def test_undamaged_file_loads(kind: str) -> None:
    _load_expecting_clean_outcome(kind, _valid(kind))


@pytest.mark.parametrize("kind", list(FORMATS))
@PROPERTY_SETTINGS
@given(
    flips=st.lists(
        st.tuples(st.integers(0, 2**20), st.booleans(), st.integers(1, 255)), min_size=1, max_size=4
    )
)
def test_byte_flips_give_a_clean_error_or_a_model(
    kind: str, flips: list[tuple[int, bool, int]]
) -> None:
    data = bytearray(_valid(kind))
    for index, at_end, xor in flips:
        data[_structural_position(data, index, at_end)] ^= xor
    _load_expecting_clean_outcome(kind, bytes(data))


@pytest.mark.parametrize("kind", list(FORMATS))
@PROPERTY_SETTINGS
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncation_gives_a_clean_error(kind: str, fraction: float) -> None:
    data = _valid(kind)
    _load_expecting_clean_outcome(kind, data[: int(len(data) * fraction)])


@pytest.mark.parametrize("kind", list(FORMATS))
@PROPERTY_SETTINGS
@given(junk=st.binary(min_size=0, max_size=256))
def test_arbitrary_bytes_give_a_clean_error(kind: str, junk: bytes) -> None:
    _load_expecting_clean_outcome(kind, junk)
