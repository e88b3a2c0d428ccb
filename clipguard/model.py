"""Loading CLIP checkpoints safely, and the model bundle the rest of clipguard works with.

A checkpoint is untrusted input. :func:`load_model` accepts

* ``.safetensors`` files (no code can run while reading them);
* ``torch.save`` files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) holding a state dict, read with
  ``weights_only=True`` only, never with a fallback; ``{"state_dict": ...}`` layouts and a
  ``module.`` prefix are unwrapped;
* TorchScript archives only when the caller opts in with ``allow_torchscript=True``.

The architecture comes from ``arch`` (any open_clip model name) when given, else from an
open_clip config stored in the file's metadata, else it is inferred from an OpenAI-style state
dict (ViT and ModifiedResNet image towers; QuickGELU assumed, as open_clip does). Missing,
unexpected or mis-shaped weights, and non-finite values, are refused with a one-line
:class:`~clipguard.errors.ModelLoadError`.

Memory is checked before it is spent: the file's size before it is read, and the float32
model (counted on the ``meta`` device) before it is built (:func:`check_memory`).

Defences, in order: the file is read once (its sha256 is that of the bytes parsed); every
pickle in it is disassembled (never run) and refused if it names a global outside torch's
weights-only allow-list, so the error can name it, GLOBAL and STACK_GLOBAL alike; only then
does ``torch.load(weights_only=True)`` run, as the final gate. An untrusted architecture config
is bounded (layers, sizes) and the model is first built on the ``meta`` device to check names
and shapes before any memory is spent; a model with more weights than the file has bytes is
refused (zero-stride views cannot inflate a small file).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torchvision import transforms as tv_transforms

from clipguard.attention import pack_self_attention
from clipguard.errors import InputError, ModelLoadError, UnsafeModelError
from clipguard.io import (
    atomic_write_bytes,
    read_safetensors_bytes,
    safetensors_bytes,
    sha256_file,
)

MODEL_FILE_FORMAT = "clipguard.model/1"
#: metadata key holding ``{"model_cfg": ..., "preprocess_cfg": ...}`` as JSON
OPEN_CLIP_CONFIG_KEY = "open_clip_config"
#: state-dict wrappers that checkpoints from training scripts use
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model")
#: non-tensor entries of OpenAI state dicts, dropped before loading
_OPENAI_SCALAR_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class ModelBundle:
    """A loaded, frozen CLIP model with its tokenizer, preprocessing and provenance.

    Images are handled in *pixel space*: :attr:`pixel_transform` turns a PIL image into a
    ``3 x H x W`` tensor in ``[0, 1]`` (resized and cropped, not normalised), triggers are
    applied to such tensors, and :meth:`encode_image` normalises internally.
    """

    model: CLIP
    model_cfg: dict[str, Any]
    arch: str
    sha256: str
    path: Path | None
    tokenizer: SimpleTokenizer
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_transform: Callable[[Image.Image], torch.Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: number of images passed through the image encoder so far
    image_encoder_images: int = 0
    #: number of calls of :meth:`encode_image`
    image_encoder_calls: int = 0
    #: number of prompts passed through the text encoder so far (both text paths)
    text_encoder_prompts: int = 0

    @classmethod
    def from_model(
        cls,
        model: CLIP,
        model_cfg: dict[str, Any],
        arch: str = "custom",
        sha256: str | None = None,
        path: Path | None = None,
        device: str | torch.device = "cpu",
    ) -> ModelBundle:
        """Wrap an in-memory open_clip model; ``sha256`` defaults to a hash of its weights.

        The model is moved to ``device``, put in eval mode and frozen in place, and the
        self-attention of its image tower made :class:`~clipguard.attention.PackedSelfAttention`
        (same weights and results, a cheaper backward pass)."""
        _check_text_tower(model, arch)
        device = torch.device(device)
        model = model.to(device).eval()
        model.requires_grad_(False)
        pack_self_attention(model.visual)
        image_size = _square_size(model.visual.image_size)
        preprocess_cfg = model_cfg.get("preprocess_cfg", {}) or {}
        mean = tuple(preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD))
        pixel_transform = make_pixel_transform(
            image_size,
            interpolation=preprocess_cfg.get("interpolation", "bicubic"),
            resize_mode=preprocess_cfg.get("resize_mode", "shortest"),
        )
        return cls(
            model=model,
            model_cfg=model_cfg,
            arch=arch,
            sha256=sha256 or state_dict_sha256(model.state_dict()),
            path=path,
            tokenizer=_tokenizer(int(model.context_length)),
            image_size=image_size,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            pixel_transform=pixel_transform,
            device=device,
        )

    @property
    def n_parameters(self) -> int:
        """Number of parameters of the whole model."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def logit_scale(self) -> float:
        """The model's learned logit scale ``s`` (already exponentiated)."""
        return float(self.model.logit_scale.exp().clamp(max=100).item())

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Apply the model's mean/std normalisation to pixel images in ``[0, 1]``."""
        mean = torch.tensor(self.mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features of pixel images ``B x 3 x H x W`` in ``[0, 1]`` (normalised inside).

        The encoder runs on the bundle's ``device``; the features come back on the device of
        ``pixels`` (the host, for callers that keep their tensors there), so the code around
        the encoders is the same on every device. Gradients flow to ``pixels`` when they
        require grad (trigger inversion needs that).
        """
        self.image_encoder_calls += 1
        self.image_encoder_images += int(pixels.shape[0])
        features = self.model.encode_image(self.normalize(pixels.to(self.device)))
        features = torch.nn.functional.normalize(features, dim=-1) if normalize else features
        return features.to(pixels.device)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``len(texts) x context_length`` from the model's own tokenizer."""
        return self.tokenizer(texts).to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Text features of ``texts`` on the host (CPU), computed on the bundle's ``device``
        (no gradients; prompt tuning uses clipguard.prompts)."""
        self.text_encoder_prompts += len(texts)
        return self.model.encode_text(self.tokenize(texts), normalize=normalize).cpu()

    def describe(self) -> dict[str, Any]:
        """Provenance for reports: path, sha256, architecture, parameters, image size."""
        return {
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "architecture": self.arch,
            "parameters": self.n_parameters,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@functools.lru_cache(maxsize=8)
def _tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's BPE tokenizer; building it reads the vocabulary, so bundles share one."""
    return SimpleTokenizer(context_length=context_length)


def make_pixel_transform(
    image_size: int, interpolation: str = "bicubic", resize_mode: str = "shortest"
) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's evaluation transform without its final normalisation: PIL -> ``[0, 1]``."""
    full = open_clip.image_transform(
        image_size, is_train=False, interpolation=interpolation, resize_mode=resize_mode
    )
    steps = [t for t in full.transforms if not isinstance(t, tv_transforms.Normalize)]
    return tv_transforms.Compose(steps)


def _square_size(size: int | tuple[int, int] | list[int]) -> int:
    if isinstance(size, int):
        return size
    if len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise ModelLoadError(f"non-square image size {tuple(size)} is not supported")


def _check_text_tower(model: torch.nn.Module, arch: str) -> None:
    if not isinstance(model, CLIP):
        raise ModelLoadError(
            f"architecture {arch!r} has a custom text tower ({type(model).__name__}); clipguard "
            "supports CLIP models with open_clip's built-in text transformer"
        )


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A hex sha256 over a state dict's names, shapes and float32 values (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- building


def build_clip_from_config(model_cfg: dict[str, Any]) -> CLIP:
    """A randomly initialised float32 open_clip ``CLIP`` from an open_clip model config dict."""
    cfg = {k: v for k, v in model_cfg.items() if k not in ("preprocess_cfg", "custom_text")}
    text_cfg = cfg.get("text_cfg", {})
    if (
        model_cfg.get("custom_text")
        or "hf_model_name" in text_cfg
        or "hf_tokenizer_name" in text_cfg
    ):
        raise ModelLoadError("models with a Hugging Face or custom text tower are not supported")
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"] = {**cfg["vision_cfg"], "timm_model_pretrained": False}
    try:
        return CLIP(**cfg).float()
    except Exception as error:  # an untrusted config can break open_clip in many ways
        raise ModelLoadError(f"invalid open_clip model config: {_first_line(error)}") from None


def build_clip_from_name(arch: str) -> tuple[CLIP, dict[str, Any]]:
    """A randomly initialised model of the open_clip architecture ``arch``, and its config.

    Never downloads anything: ``pretrained=None`` and base-tower weights disabled.
    """
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise InputError(f"unknown architecture {arch!r} (see open_clip.list_models())")
    return build_clip_from_config(model_cfg), model_cfg


def infer_openai_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer an open_clip model config from an OpenAI-style CLIP state dict (ViT or ResNet).

    Follows open_clip's ``build_model_from_openai_state_dict``: head width 64, QuickGELU.
    """
    try:
        if "visual.proj" in state_dict:
            vision_width = state_dict["visual.conv1.weight"].shape[0]
            vision_layers: int | tuple[int, ...] = len(
                [
                    k
                    for k in state_dict
                    if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")
                ]
            )
            patch_size = state_dict["visual.conv1.weight"].shape[-1]
            grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision_cfg: dict[str, Any] = {
                "layers": vision_layers,
                "width": vision_width,
                "patch_size": patch_size,
                "image_size": patch_size * grid,
            }
        elif "visual.layer1.0.conv1.weight" in state_dict:
            counts = tuple(
                len({k.split(".")[2] for k in state_dict if k.startswith(f"visual.layer{b}.")})
                for b in (1, 2, 3, 4)
            )
            out_width = round(
                (state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5
            )
            vision_cfg = {
                "layers": counts,
                "width": state_dict["visual.layer1.0.conv1.weight"].shape[0],
                "image_size": out_width * 32,
            }
        else:
            raise KeyError("visual.proj or visual.layer1")
        text_width = state_dict["ln_final.weight"].shape[0]
        text_cfg = {
            "context_length": state_dict["positional_embedding"].shape[0],
            "vocab_size": state_dict["token_embedding.weight"].shape[0],
            "width": text_width,
            "heads": max(1, text_width // 64),
            "layers": len(
                {k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}
            ),
        }
        return {
            "embed_dim": state_dict["text_projection"].shape[1],
            "quick_gelu": True,
            "vision_cfg": vision_cfg,
            "text_cfg": text_cfg,
        }
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise ModelLoadError(
            f"cannot infer the architecture: not an OpenAI-style CLIP state dict (no {error}); "
            "pass --arch NAME"
        ) from None


# --------------------------------------------------------------------------- saving


def model_file_bytes(
    model: torch.nn.Module, model_cfg: dict[str, Any], metadata: dict[str, str] | None = None
) -> bytes:
    """The safetensors bytes of ``model``'s float32 weights with its open_clip config.

    ``metadata`` adds string entries (a model card summary, the purifier that made it, ...).
    """
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": MODEL_FILE_FORMAT,
        OPEN_CLIP_CONFIG_KEY: json.dumps({"model_cfg": model_cfg}, sort_keys=True),
        **(metadata or {}),
    }
    return safetensors_bytes(state, meta)


def save_model(
    path: Path,
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    metadata: dict[str, str] | None = None,
) -> str:
    """Write :func:`model_file_bytes` to ``path`` atomically; return the file's sha256."""
    atomic_write_bytes(Path(path), model_file_bytes(model, model_cfg, metadata))
    return sha256_file(Path(path))


# --------------------------------------------------------------------------- loading

#: torch.save suffixes; any of them may hold a pickle, a torch zip archive or TorchScript
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: a pickle member of a torch zip archive larger than this is refused before it is scanned
_MAX_PICKLE_MEMBER = 64 * 1024 * 1024
#: sanity bounds on an architecture config read from (or inferred from) an untrusted file
_MAX_TOTAL_LAYERS = 256
_MAX_CONFIG_INT = 1_000_000
_STRING_OPCODES = frozenset(
    {
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
    }
)
_BYTES_OPCODES = frozenset({"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"})
_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def load_model(
    path: Path | str,
    arch: str | None = None,
    allow_torchscript: bool = False,
    device: str | torch.device = "cpu",
) -> ModelBundle:
    """Load a CLIP checkpoint safely and return a frozen :class:`ModelBundle` in eval mode,
    on ``device`` (``"auto"``: CUDA where present, else the CPU; :func:`resolve_device`).

    Raises :class:`InputError` (missing path, directory, unknown ``arch`` or ``device``),
    :class:`UnsafeModelError` (pickle globals outside torch's weights-only allow-list,
    TorchScript without opt-in) or :class:`ModelLoadError` (empty, corrupt or truncated file,
    weights that do not fit the architecture, non-finite values). Nothing in the file is
    executed. The file is read once: the recorded sha256 is that of the bytes that were parsed.
    """
    path = Path(path)
    torch_device = _check_device(device)
    if path.is_file():
        check_memory(2 * path.stat().st_size, path, "to read and parse the file")
    data = _read_model_bytes(path)
    state_dict, file_cfg = _read_checkpoint_bytes(data, path, allow_torchscript)
    state_dict = _unwrap_state_dict(state_dict, path)
    if file_cfg is not None and arch is None:
        model_cfg, arch_name = file_cfg, "custom"
    elif arch is not None:
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise InputError(f"unknown architecture {arch!r} (see open_clip.list_models())")
        arch_name = arch
    else:
        try:
            model_cfg = infer_openai_config(state_dict)
        except ModelLoadError as error:
            raise ModelLoadError(f"{path}: {error}") from None
        arch_name = "inferred-openai"
    _check_config_bounds(model_cfg, path)
    _check_preprocess_cfg(model_cfg, path)
    with torch.device("meta"):
        skeleton = build_clip_from_config(model_cfg)
    state_dict = _check_weights_fit(skeleton, state_dict, path, arch_name, len(data))
    model_bytes = 4 * sum(t.numel() for t in skeleton.state_dict().values())
    # the float32 model, and the float32 copies of the file's weights it is loaded from
    check_memory(2 * model_bytes, path, "for the float32 model and its weights")
    if torch_device.type == "cuda":
        check_device_memory(model_bytes, torch_device, path)
    model = _materialise(skeleton, model_cfg)
    del skeleton
    _load_weights_strict(model, state_dict, path, arch_name)
    return ModelBundle.from_model(
        model,
        model_cfg,
        arch=arch_name,
        sha256=hashlib.sha256(data).hexdigest(),
        path=path,
        device=torch_device,
    )


def available_memory() -> int | None:
    """Bytes of memory this process can still take: the kernel's ``MemAvailable``, lowered
    by the control group's limit where one is set (Linux); None where neither is known."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def check_memory(needed: int, path: Path, what: str) -> None:
    """Refuse, with a one-line :class:`ModelLoadError`, a load that needs ``needed`` more
    bytes of memory (``what`` for) than :func:`available_memory` says are left; nothing is
    refused where the available memory is unknown."""
    available = available_memory()
    if available is not None and needed > available:
        raise ModelLoadError(
            f"{path}: not enough memory: loading needs about {_gib(needed)} {what}, "
            f"{_gib(available)} available"
        )


def check_device_memory(needed: int, device: torch.device, path: Path) -> None:
    """Refuse a model of ``needed`` bytes that the CUDA ``device``'s free memory cannot
    hold (activations need more again)."""
    free, _ = torch.cuda.mem_get_info(device)
    if needed > free:
        raise ModelLoadError(
            f"{path}: not enough memory on {device}: the model needs {_gib(needed)}, "
            f"{_gib(free)} free"
        )


def read_checkpoint(
    path: Path, allow_torchscript: bool = False
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read a checkpoint's raw state dict and its embedded open_clip model config, if any."""
    path = Path(path)
    return _read_checkpoint_bytes(_read_model_bytes(path), path, allow_torchscript)


def resolve_device(device: str | torch.device) -> str:
    """``device`` as torch names it, ``"auto"`` resolved: ``"cuda"`` where CUDA is
    available, else ``"cpu"``."""
    if str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _check_device(device: str | torch.device) -> torch.device:
    device = resolve_device(device)
    try:
        torch_device = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"invalid --device {device!r}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if torch_device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise InputError(f"--device {device}: unsupported device type")
    return torch_device


def _read_model_bytes(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"{path}: model file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a model file")
    if not path.is_file():
        raise InputError(f"{path}: is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read model file ({error.strerror or error})") from None
    if not data:
        raise ModelLoadError(f"{path}: model file is empty")
    return data


def _read_checkpoint_bytes(
    data: bytes, path: Path, allow_torchscript: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if data[:4] == b"PK\x03\x04":  # torch.save archives and TorchScript, as torch detects them
        return _read_torch_zip(data, path, allow_torchscript), None
    if _looks_like_safetensors(path, data[:9]):
        return _read_safetensors_model(data, path)
    if data[:1] == b"\x80" or path.suffix.lower() in TORCH_SUFFIXES:
        _refuse_unsafe_globals(_globals_in_pickle_stream(data), path)
        return _torch_load_weights_only(data, path), None
    raise ModelLoadError(
        f"{path}: unrecognised model file format (expected safetensors or torch.save)"
    )


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    return len(head) >= 9 and head[8:9] == b"{"


def _read_safetensors_model(
    data: bytes, path: Path
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    try:
        tensors, metadata = read_safetensors_bytes(data, what="model file", path=path)
    except InputError as error:
        raise ModelLoadError(str(error)) from None
    config = None
    if OPEN_CLIP_CONFIG_KEY in metadata:
        try:
            parsed = json.loads(metadata[OPEN_CLIP_CONFIG_KEY])
        except (json.JSONDecodeError, RecursionError):
            raise ModelLoadError(f"{path}: embedded open_clip config is not valid JSON") from None
        config = parsed.get("model_cfg", parsed) if isinstance(parsed, dict) else None
        if (
            not isinstance(config, dict)
            or not isinstance(config.get("vision_cfg"), dict)
            or not isinstance(config.get("text_cfg"), dict)
        ):
            raise ModelLoadError(f"{path}: embedded open_clip config lacks vision_cfg/text_cfg")
    return tensors, config


# ---- pickles: name the globals without running anything


def _globals_in_pickle(stream: io.BytesIO, depth: int = 0) -> list[str]:
    """The globals one pickle in ``stream`` imports, found by disassembly (nothing runs).

    GLOBAL/INST name theirs inline; STACK_GLOBAL takes module and name from the stack, which
    is simulated from the opcodes' stack effects (memo included). A name that is computed
    rather than pushed as a constant is reported as ``<computed>``. Byte strings that are
    pickles themselves (``pickle.loads`` payloads) are scanned too. Stops quietly at the first
    malformed opcode: the weights-only unpickler has the final word.
    """
    found: list[str] = []
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[Any, Any] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append(f"{module}.{attr}")
            elif name == "STACK_GLOBAL":
                module = stack[-2] if len(stack) >= 2 else None
                attr = stack[-1] if stack else None
                if isinstance(module, str) and isinstance(attr, str):
                    found.append(f"{module}.{attr}")
                else:
                    found.append("<computed>.<computed>")
            elif name in _BYTES_OPCODES and depth < 2 and bytes(arg)[:1] == b"\x80":
                found.extend(_globals_in_pickle(io.BytesIO(bytes(arg)), depth + 1))
            if name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
                continue
            if name in _PUT_OPCODES:
                memo[arg] = stack[-1] if stack else None
                continue
            if name == "MARK":
                marks.append(len(stack))
                continue
            before = opcode.stack_before
            if pickletools.markobject in before:
                start = marks.pop() if marks else 0
                del stack[start:]
                n_pop = before.index(pickletools.markobject)
            else:
                n_pop = len(before)
            if n_pop:
                del stack[max(0, len(stack) - n_pop) :]
            if name in _STRING_OPCODES:
                stack.append(arg)
            elif name in _GET_OPCODES:
                stack.append(memo.get(arg))
            else:
                stack.extend([None] * len(opcode.stack_after))
    except Exception:  # malformed or truncated pickle: stop scanning here
        pass
    return found


def _globals_in_pickle_stream(data: bytes, max_pickles: int = 6) -> list[str]:
    """Globals of the consecutive pickles at the start of ``data`` (a legacy torch.save file)."""
    stream = io.BytesIO(data)
    found: list[str] = []
    for _ in range(max_pickles):
        position = stream.tell()
        if position >= len(data) or data[position : position + 1] not in (b"\x80", b"c", b"("):
            break
        found.extend(_globals_in_pickle(stream))
        if stream.tell() == position:
            break
    return found


def _allowed_globals() -> set[str] | None:
    """Names torch's weights-only unpickler accepts, or None if torch does not expose them."""
    try:
        from torch import _weights_only_unpickler as unpickler

        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except (ImportError, AttributeError):
        return None


def _refuse_unsafe_globals(names: list[str], path: Path) -> None:
    allowed = _allowed_globals()
    if allowed is None:
        return
    unsafe = sorted({name for name in names if name not in allowed})
    if unsafe:
        shown = ", ".join(_printable(name) for name in unsafe[:6]) + (
            f" and {len(unsafe) - 6} more" if len(unsafe) > 6 else ""
        )
        raise UnsafeModelError(
            f"{path}: refused: the pickle references globals outside torch's weights-only "
            f"allow-list: {shown}"
        )


def _read_torch_zip(data: bytes, path: Path, allow_torchscript: bool) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            names = [member.filename for member in members]
            torchscript = any(n.endswith("/constants.pkl") or "/code/" in n for n in names)
            pickle_globals: list[str] = []
            if not torchscript:
                for member in members:
                    if not member.filename.endswith(".pkl"):
                        continue
                    if member.file_size > _MAX_PICKLE_MEMBER:
                        raise ModelLoadError(
                            f"{path}: archive member {_printable(member.filename)} is too large"
                        )
                    pickle_globals.extend(_globals_in_pickle(io.BytesIO(archive.read(member))))
    except ModelLoadError:
        raise
    except Exception as error:  # BadZipFile, zlib errors, CRC mismatches, truncation
        raise ModelLoadError(f"{path}: corrupt zip archive ({_first_line(error)})") from None
    if torchscript:
        if not allow_torchscript:
            raise UnsafeModelError(
                f"{path}: TorchScript archive refused (it can carry code); pass "
                "--allow-torchscript to load it anyway"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.load(io.BytesIO(data), map_location="cpu")
            return dict(scripted.state_dict())
        except Exception as error:
            raise ModelLoadError(
                f"{path}: cannot read TorchScript archive ({_first_line(error)})"
            ) from None
    _refuse_unsafe_globals(pickle_globals, path)
    return _torch_load_weights_only(data, path)


def _torch_load_weights_only(data: bytes, path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes would break the one-line error
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        if "global" in reason.lower() or "operand" in reason.lower():
            raise UnsafeModelError(
                f"{path}: refused by the weights-only unpickler: {reason}"
            ) from None
        raise ModelLoadError(
            f"{path}: corrupt or unsupported checkpoint (weights-only unpickler: {reason})"
        ) from None
    except Exception as error:  # truncated archives, bad records, storage size mismatches
        raise ModelLoadError(
            f"{path}: corrupt or truncated checkpoint ({_first_line(error)})"
        ) from None
    if not isinstance(loaded, dict):
        raise ModelLoadError(
            f"{path}: checkpoint holds a {type(loaded).__name__}, not a state dict"
        )
    return loaded


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The informative line of torch's long weights-only error, e.g. the refused GLOBAL."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(error).splitlines()]
    reasons = [line for line in lines if line and not line.startswith(boilerplate)]
    reason = reasons[0] if reasons else _first_line(error)
    match = re.search(r"Unsupported operand (\d+)", reason)
    if match:
        code = int(match.group(1))
        names = [op.name for op in pickletools.opcodes if op.code == chr(code)]
        if names:
            reason = f"{reason} ({names[0]})"
    return reason[:300]


def _printable(text: str, limit: int = 120) -> str:
    """``text`` from an untrusted file, safe for a one-line message (controls escaped)."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return shown + ("…" if len(text) > limit else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


# ---- state dicts and configs


def _unwrap_state_dict(raw: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    state: Any = raw
    for key in _STATE_DICT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise ModelLoadError(f"{path}: state dict key {name!r} is not a string")
        if name in _OPENAI_SCALAR_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        if value.is_complex() or value.dtype == torch.bool or value.is_quantized:
            raise ModelLoadError(f"{path}: entry {name!r} has unsupported dtype {value.dtype}")
        key = name.removeprefix("module.")
        if key in tensors:
            raise ModelLoadError(f"{path}: state dict holds {key!r} twice (with module. prefix)")
        tensors[key] = value
    if not tensors:
        raise ModelLoadError(f"{path}: checkpoint holds no tensors")
    return tensors


def _check_config_bounds(model_cfg: dict[str, Any], path: Path) -> None:
    """Refuse absurd sizes in an untrusted config before any model is built from it."""
    for tower in ("vision_cfg", "text_cfg"):
        if not isinstance(model_cfg.get(tower), dict):
            raise ModelLoadError(f"{path}: open_clip config lacks {tower}")
    layers = 0
    for tower in ("vision_cfg", "text_cfg"):
        value = model_cfg[tower].get("layers", 0)
        counts = value if isinstance(value, list | tuple) else [value]
        for count in counts:
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ModelLoadError(f"{path}: open_clip config has invalid {tower}.layers")
            layers += count
    if layers > _MAX_TOTAL_LAYERS:
        raise ModelLoadError(f"{path}: open_clip config asks for {layers} layers, too many")

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}" if where else str(key))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, where)
        elif (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (not math.isfinite(value) or abs(value) > _MAX_CONFIG_INT)
        ):
            raise ModelLoadError(
                f"{path}: open_clip config value {_printable(where)}={value} is absurd"
            )

    walk(model_cfg, "")


def _check_preprocess_cfg(model_cfg: dict[str, Any], path: Path) -> None:
    cfg = model_cfg.get("preprocess_cfg") or {}
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: preprocess_cfg must be an object")
    for key in ("mean", "std"):
        if key not in cfg:
            continue
        value = cfg[key]
        if (
            not isinstance(value, list | tuple)
            or len(value) != 3
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)
            or (key == "std" and not all(v > 0 for v in value))
        ):
            raise ModelLoadError(f"{path}: preprocess_cfg.{key} must be 3 finite numbers")
    if cfg.get("interpolation", "bicubic") not in ("bicubic", "bilinear", "nearest"):
        raise ModelLoadError(f"{path}: preprocess_cfg.interpolation is not supported")
    if cfg.get("resize_mode", "shortest") not in ("shortest", "longest", "squash"):
        raise ModelLoadError(f"{path}: preprocess_cfg.resize_mode is not supported")


def _check_weights_fit(
    skeleton: CLIP,
    state_dict: dict[str, torch.Tensor],
    path: Path,
    arch: str,
    file_size: int,
) -> dict[str, torch.Tensor]:
    """Check names and shapes against a ``meta``-device model, before any memory is spent.

    Non-persistent buffers (TorchScript archives carry ``attn_mask``) are dropped. The model
    may not have more parameters than the file has bytes: stride tricks in a pickle could
    otherwise make a small file demand a huge model.
    """
    expected = skeleton.state_dict()
    transient = {name for name, _ in skeleton.named_buffers()} - set(expected)
    state_dict = {k: v for k, v in state_dict.items() if k not in transient}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {_printable(missing[0])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {_printable(unexpected[0])})")
        raise ModelLoadError(f"{path}: weights do not fit architecture {arch}: {'; '.join(parts)}")
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelLoadError(
                f"{path}: weights do not fit architecture {arch}: {_printable(name)} has shape "
                f"{tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    n_elements = sum(t.numel() for t in expected.values())
    if n_elements > file_size:
        raise ModelLoadError(
            f"{path}: {n_elements} weights cannot come from a file of {file_size} bytes"
        )
    return state_dict


def _materialise(skeleton: CLIP, model_cfg: dict[str, Any]) -> CLIP:
    """A CPU model for ``skeleton`` whose weights are about to be overwritten by the file's.

    Random initialisation is skipped when the only buffer the state dict does not restore is
    CLIP's causal text mask, which is rebuilt here; otherwise the model is built normally.
    """
    transient = {name for name, _ in skeleton.named_buffers()} - set(skeleton.state_dict())
    if transient - {"attn_mask"}:
        return build_clip_from_config(model_cfg)
    model = skeleton.to_empty(device="cpu")
    if "attn_mask" in transient:
        size = model.context_length
        model.attn_mask = torch.full((size, size), float("-inf")).triu_(1)
    return model


def _all_finite(tensor: torch.Tensor) -> bool:
    """True unless ``tensor`` holds NaN or Inf (``x * 0`` is NaN exactly for those; fast)."""
    return bool(torch.isfinite((tensor * 0).sum()))


def _load_weights_strict(
    model: CLIP, state_dict: dict[str, torch.Tensor], path: Path, arch: str
) -> None:
    expected = model.state_dict()
    state_dict = _check_weights_fit(model, state_dict, path, arch, file_size=sys.maxsize)
    converted: dict[str, torch.Tensor] = {}
    for name in sorted(state_dict):
        try:
            tensor = state_dict[name].to(expected[name].dtype)
        except Exception as error:
            raise ModelLoadError(
                f"{path}: weight {_printable(name)} cannot be converted ({_first_line(error)})"
            ) from None
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise ModelLoadError(f"{path}: weight {_printable(name)} holds NaN or Inf values")
        converted[name] = tensor
    model.load_state_dict(converted, strict=True)
