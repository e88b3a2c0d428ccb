"""A corpus of malicious checkpoints: each is refused with exit code 2 and runs no code.

Every payload would create a marker file in ``tmp_path`` if it ran; the control tests at the
end prove that by unpickling the payloads unsafely, on purpose, in a throwaway directory.
The pickles are written opcode by opcode, so GLOBAL and STACK_GLOBAL are each exercised.
"""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import uuid
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from clipguard.errors import UnsafeModelError
from clipguard.model import load_model
from tests.conftest import TINY_CLASSES, write_image_folder
from tests.core.cli_helpers import assert_one_line_error, run_cli

SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")


# --------------------------------------------------------------------------- pickle opcodes


def _text(value: str) -> bytes:
    """BINUNICODE: push a str."""
    data = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _bytes(value: bytes) -> bytes:
    """BINBYTES: push a bytes object (protocol 3+)."""
    return b"B" + struct.pack("<I", len(value)) + value


def _list(*items: str) -> bytes:
    """EMPTY_LIST, MARK, items, APPENDS: push a list of str."""
    return b"](" + b"".join(_text(item) for item in items) + b"e"


def _call(module: str, name: str, args: bytes, stack_global: bool) -> bytes:
    """A whole pickle that calls ``module.name(*args)`` when loaded."""
    if stack_global:
        head = b"\x80\x04" + _text(module) + _text(name) + b"\x93"
    else:
        head = b"\x80\x03" + b"c" + f"{module}\n{name}\n".encode()
    return head + b"(" + args + b"tR."


@dataclass(frozen=True)
class Payload:
    """A pickle that would create ``marker`` when unpickled, and the global it names."""

    name: str
    global_name: str
    build: Callable[[Path, bool], bytes]


def _module_importer(marker: Path, stack_global: bool) -> bytes:
    module = marker.parent / f"{marker.stem}.py"
    module.write_text(f"open({str(marker)!r}, 'w').close()\n")
    return _call("importlib", "import_module", _text(marker.stem), stack_global)


PAYLOADS = [
    Payload(
        "os-system",
        "os.system",
        lambda m, s: _call("os", "system", _text(f"touch '{m}'"), s),
    ),
    Payload(
        "builtins-exec",
        "builtins.exec",
        lambda m, s: _call("builtins", "exec", _text(f"open({str(m)!r}, 'w').close()"), s),
    ),
    Payload(
        "builtins-eval",
        "builtins.eval",
        lambda m, s: _call("builtins", "eval", _text(f"open({str(m)!r}, 'w').close()"), s),
    ),
    Payload(
        "subprocess-popen",
        "subprocess.Popen",
        lambda m, s: _call("subprocess", "Popen", _list("touch", str(m)), s),
    ),
    Payload(
        "runpy-run-code",
        "runpy._run_code",
        lambda m, s: _call("runpy", "_run_code", _text(f"open({str(m)!r}, 'w').close()") + b"}", s),
    ),
    Payload("importlib-import-module", "importlib.import_module", _module_importer),
    Payload(
        "nested-pickle-loads",
        "pickle.loads",
        lambda m, s: _call(
            "pickle", "loads", _bytes(_call("os", "system", _text(f"touch '{m}'"), s)), s
        ),
    ),
]
PAYLOAD_IDS = [p.name for p in PAYLOADS]


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where a payload would leave its mark; its folder is importable (import_module payload)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / f"pwned_{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), TINY_CLASSES, per_class=2)


def _zip_with_data_pkl(tmp_path: Path, data_pkl: bytes) -> bytes:
    """A genuine torch.save archive whose data.pkl member is replaced by ``data_pkl``."""
    genuine = tmp_path / "genuine.pt"
    torch.save({"weight": torch.zeros(2)}, genuine)
    out = io.BytesIO()
    with zipfile.ZipFile(genuine) as source, zipfile.ZipFile(out, "w") as target:
        for member in source.infolist():
            content = source.read(member)
            if member.filename.endswith("/data.pkl"):
                content = data_pkl
            target.writestr(member, content)
    return out.getvalue()


class Evil:
    """A custom class whose unpickling (``__setstate__``) creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _script_and_save(module: torch.nn.Module, path: Path) -> None:
    """torch.jit.save of a scripted module (TorchScript is deprecated: silence its notice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module).save(str(path))


def _evaluate(model: Path, data_dir: Path, *extra: str):
    return run_cli("evaluate", model, "--data", data_dir, "--quiet", *extra)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("stack_global", [False, True], ids=["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
def test_raw_pickle_payload_is_refused_naming_the_global_and_runs_nothing(
    payload: Payload, stack_global: bool, suffix: str, marker: Path, data_dir: Path
) -> None:
    model = marker.parent / f"model{suffix}"
    model.write_bytes(payload.build(marker, stack_global))
    result = _evaluate(model, data_dir)
    assert_one_line_error(result, "refused", payload.global_name)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_nested_pickle_payload_names_the_inner_global_too(
    suffix: str, marker: Path, data_dir: Path
) -> None:
    model = marker.parent / f"model{suffix}"
    model.write_bytes(PAYLOADS[-1].build(marker, False))
    assert_one_line_error(_evaluate(model, data_dir), "pickle.loads", "os.system")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("stack_global", [False, True], ids=["GLOBAL", "STACK_GLOBAL"])
def test_zip_archive_with_malicious_data_pkl_is_refused(
    suffix: str, stack_global: bool, marker: Path, data_dir: Path
) -> None:
    model = marker.parent / f"model{suffix}"
    model.write_bytes(_zip_with_data_pkl(marker.parent, PAYLOADS[1].build(marker, stack_global)))
    assert_one_line_error(_evaluate(model, data_dir), "refused", "builtins.exec")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_torch_save_of_a_custom_class_is_refused(suffix: str, marker: Path, data_dir: Path) -> None:
    model = marker.parent / f"model{suffix}"
    torch.save({"weight": torch.zeros(2), "extra": Evil(marker)}, model)
    assert_one_line_error(_evaluate(model, data_dir), "refused", f"{__name__}.Evil")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_legacy_torch_save_of_a_custom_class_is_refused(
    suffix: str, marker: Path, data_dir: Path
) -> None:
    model = marker.parent / f"model{suffix}"
    torch.save(Evil(marker), model, _use_new_zipfile_serialization=False)
    assert_one_line_error(_evaluate(model, data_dir), "refused", "Evil")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_torchscript_archive_is_refused_without_opt_in(
    suffix: str, tmp_path: Path, data_dir: Path
) -> None:
    model = tmp_path / f"scripted{suffix}"
    _script_and_save(Small(), model)
    assert_one_line_error(_evaluate(model, data_dir), "TorchScript", "--allow-torchscript")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_torchscript_without_clip_weights_is_a_clear_error_even_with_opt_in(
    suffix: str, tmp_path: Path, data_dir: Path
) -> None:
    model = tmp_path / f"scripted{suffix}"
    _script_and_save(Small(), model)
    result = _evaluate(model, data_dir, "--allow-torchscript")
    assert_one_line_error(result, "cannot infer the architecture")


def test_torchscript_clip_is_accepted_with_opt_in(tmp_path: Path, data_dir: Path) -> None:
    from clipguard.model import build_clip_from_config
    from tests.conftest import TINY_CONFIG

    torch.manual_seed(0)
    clip = build_clip_from_config({**TINY_CONFIG, "quick_gelu": True}).eval()
    model = tmp_path / "scripted-clip.pt"
    _script_and_save(clip, model)
    refused = _evaluate(model, data_dir)
    assert_one_line_error(refused, "TorchScript")
    accepted = _evaluate(model, data_dir, "--allow-torchscript", "--json")
    assert accepted.exit_code == 0, accepted.output
    bundle = load_model(model, allow_torchscript=True)
    for name, tensor in clip.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[name], tensor), name


def test_unsafe_model_error_is_raised_by_the_python_api(marker: Path) -> None:
    model = marker.parent / "model.pt"
    model.write_bytes(PAYLOADS[0].build(marker, True))
    with pytest.raises(UnsafeModelError, match=r"os\.system"):
        load_model(model)
    assert not marker.exists()


def test_corpus_holds_at_least_twelve_distinct_malicious_files() -> None:
    raw = len(PAYLOADS) * 2  # GLOBAL and STACK_GLOBAL
    zip_members, custom_class, torchscript = 2, 2, 1
    assert raw + zip_members + custom_class + torchscript >= 12


# --------------------------------------------------------------------------- controls


@pytest.mark.parametrize("stack_global", [False, True], ids=["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
def test_control_payload_really_runs_when_unpickled_unsafely(
    payload: Payload, stack_global: bool, marker: Path
) -> None:
    result = pickle.loads(payload.build(marker, stack_global))  # unsafe on purpose
    if isinstance(result, subprocess.Popen):
        result.wait(timeout=10)
    assert marker.exists()


def test_control_zip_and_custom_class_payloads_really_run_with_weights_only_false(
    marker: Path,
) -> None:
    archive = marker.parent / "archive.pt"
    archive.write_bytes(_zip_with_data_pkl(marker.parent, PAYLOADS[1].build(marker, False)))
    torch.load(archive, weights_only=False)
    assert marker.exists()
    marker.unlink()
    custom = marker.parent / "custom.pt"
    torch.save(Evil(marker), custom)
    torch.load(custom, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("stack_global", [False, True], ids=["GLOBAL", "STACK_GLOBAL"])
def test_weights_only_unpickler_still_refuses_when_the_static_scan_is_blind(
    stack_global: bool, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipguard.model

    monkeypatch.setattr(clipguard.model, "_allowed_globals", lambda: None)
    model = marker.parent / "model.pt"
    model.write_bytes(PAYLOADS[0].build(marker, stack_global))
    # torch names a GLOBAL; it refuses the STACK_GLOBAL opcode outright
    with pytest.raises(UnsafeModelError, match="STACK_GLOBAL" if stack_global else r"os\.system"):
        load_model(model)
    assert not marker.exists()


def test_global_names_with_control_characters_are_escaped(marker: Path, data_dir: Path) -> None:
    model = marker.parent / "model.pt"
    model.write_bytes(_call("os\nerror: fine", "system", _text(f"touch '{marker}'"), True))
    message = assert_one_line_error(_evaluate(model, data_dir), "refused")
    assert "os\\nerror: fine.system" in message
    assert not marker.exists()
