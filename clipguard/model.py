"""Loading CLIP checkpoints safely, and the model bundle the rest of clipguard works with.

A checkpoint is untrusted input. :func:`load_model` accepts

* ``.safetensors`` files (no code can run while reading them);
* ``torch.save`` files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) holding a state dict, read with
  ``weights_only=True`` only, never with a fallback; ``{"state_dict": ...}`` layouts and a
  ``module.`` prefix are unwrapped;
* TorchScript archives only when the caller opts in with ``allow_torchscript=True``.

The architecture comes, in this order, from an open_clip config stored in the file's metadata,
from ``arch`` (any open_clip model name), or is inferred from an OpenAI-style state dict (ViT
and ModifiedResNet image towers). Missing, unexpected or mis-shaped weights, and non-finite
values, are refused with a one-line :class:`~clipguard.errors.ModelLoadError`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
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

from clipguard.errors import InputError, ModelLoadError, UnsafeModelError
from clipguard.io import atomic_write_bytes, read_safetensors_file, safetensors_bytes, sha256_file

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
        """Wrap an in-memory open_clip model; ``sha256`` defaults to a hash of its weights."""
        _check_text_tower(model, arch)
        device = torch.device(device)
        model = model.to(device).eval()
        model.requires_grad_(False)
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
            tokenizer=SimpleTokenizer(context_length=model.context_length),
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

        Gradients flow to ``pixels`` when they require grad (trigger inversion needs that).
        """
        self.image_encoder_calls += 1
        self.image_encoder_images += int(pixels.shape[0])
        features = self.model.encode_image(self.normalize(pixels.to(self.device)))
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``len(texts) x context_length`` from the model's own tokenizer."""
        return self.tokenizer(texts).to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Text features of ``texts`` (no gradients; prompt tuning uses clipguard.prompts)."""
        self.text_encoder_prompts += len(texts)
        return self.model.encode_text(self.tokenize(texts), normalize=normalize)

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
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as error:
        raise ModelLoadError(f"invalid open_clip model config: {error}") from None


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
    except (KeyError, IndexError) as error:
        raise ModelLoadError(
            f"cannot infer the architecture: not an OpenAI-style CLIP state dict (no {error}); "
            "pass --arch NAME"
        ) from None


# --------------------------------------------------------------------------- saving


def save_model(
    path: Path,
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    metadata: dict[str, str] | None = None,
) -> str:
    """Write ``model``'s weights as safetensors with its open_clip config; return the file sha256.

    The write is atomic. ``metadata`` adds string entries (a model card summary, say).
    """
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": MODEL_FILE_FORMAT,
        OPEN_CLIP_CONFIG_KEY: json.dumps({"model_cfg": model_cfg}, sort_keys=True),
        **(metadata or {}),
    }
    atomic_write_bytes(Path(path), safetensors_bytes(state, meta))
    return sha256_file(Path(path))


# --------------------------------------------------------------------------- loading


def load_model(
    path: Path | str,
    arch: str | None = None,
    allow_torchscript: bool = False,
    device: str | torch.device = "cpu",
) -> ModelBundle:
    """Load a CLIP checkpoint safely and return a frozen :class:`ModelBundle` in eval mode.

    Raises :class:`InputError` (missing path, directory, empty file),
    :class:`UnsafeModelError` (pickle globals outside torch's weights-only allow-list,
    TorchScript without opt-in) or :class:`ModelLoadError` (corrupt or truncated file, weights
    that do not fit the architecture, non-finite values). Nothing in the file is executed.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: model file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: model file is empty")
    state_dict, file_cfg = read_checkpoint(path, allow_torchscript=allow_torchscript)
    state_dict = _unwrap_state_dict(state_dict, path)
    if file_cfg is not None and arch is None:
        model_cfg, arch_name = file_cfg, "custom"
        model = build_clip_from_config(model_cfg)
    elif arch is not None:
        model, model_cfg = build_clip_from_name(arch)
        arch_name = arch
    else:
        model_cfg = infer_openai_config(state_dict)
        model, arch_name = build_clip_from_config(model_cfg), "inferred-openai"
    _load_weights_strict(model, state_dict, path, arch_name)
    return ModelBundle.from_model(
        model, model_cfg, arch=arch_name, sha256=sha256_file(path), path=path, device=device
    )


def read_checkpoint(
    path: Path, allow_torchscript: bool = False
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read a checkpoint's raw state dict and its embedded open_clip model config, if any."""
    with open(path, "rb") as stream:
        head = stream.read(8)
    if zipfile.is_zipfile(path):
        return _read_torch_zip(path, allow_torchscript), None
    if _looks_like_safetensors(path, head):
        return _read_safetensors_model(path)
    if head[:1] == b"\x80" or path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _torch_load_weights_only(path), None
    raise ModelLoadError(
        f"{path}: unrecognised model file format (expected safetensors or torch.save)"
    )


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if path.suffix == ".safetensors":
        return True
    if len(head) < 8:
        return False
    with open(path, "rb") as stream:
        stream.seek(8)
        return stream.read(1) == b"{"


def _read_safetensors_model(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    try:
        tensors, metadata = read_safetensors_file(path, what="model file")
    except InputError as error:
        raise ModelLoadError(str(error)) from None
    config = None
    if OPEN_CLIP_CONFIG_KEY in metadata:
        try:
            parsed = json.loads(metadata[OPEN_CLIP_CONFIG_KEY])
            config = parsed.get("model_cfg", parsed) if isinstance(parsed, dict) else None
        except json.JSONDecodeError:
            raise ModelLoadError(f"{path}: embedded open_clip config is not valid JSON") from None
        if not isinstance(config, dict) or "vision_cfg" not in config or "text_cfg" not in config:
            raise ModelLoadError(f"{path}: embedded open_clip config lacks vision_cfg/text_cfg")
    return tensors, config


def _is_torchscript_zip(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _read_torch_zip(path: Path, allow_torchscript: bool) -> dict[str, Any]:
    try:
        torchscript = _is_torchscript_zip(path)
    except zipfile.BadZipFile:
        raise ModelLoadError(f"{path}: corrupt zip archive") from None
    if torchscript:
        if not allow_torchscript:
            raise UnsafeModelError(
                f"{path}: TorchScript archive refused (it can carry code); pass --allow-torchscript "
                "to load it anyway"
            )
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as error:
            raise ModelLoadError(
                f"{path}: cannot read TorchScript archive ({_first_line(error)})"
            ) from None
        return dict(scripted.state_dict())
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as error:
        raise ModelLoadError(f"{path}: corrupt torch.save archive ({_first_line(error)})") from None
    if unsafe:
        raise UnsafeModelError(
            f"{path}: refused: the pickle references non-allow-listed globals: {', '.join(sorted(unsafe))}"
        )
    return _torch_load_weights_only(path)


def _torch_load_weights_only(path: Path) -> dict[str, Any]:
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as error:
        message = _first_line(error)
        for line in str(error).splitlines():
            if "Unsupported global" in line or "GLOBAL" in line:
                message = line.strip()
                break
        raise UnsafeModelError(
            f"{path}: refused by the weights-only unpickler: {message}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError) as error:
        raise ModelLoadError(
            f"{path}: corrupt or truncated checkpoint ({_first_line(error)})"
        ) from None
    if not isinstance(loaded, dict):
        raise ModelLoadError(
            f"{path}: checkpoint holds a {type(loaded).__name__}, not a state dict"
        )
    return loaded


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _unwrap_state_dict(raw: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    state: Any = raw
    for key in _STATE_DICT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name in _OPENAI_SCALAR_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        tensors[name.removeprefix("module.")] = value
    if not tensors:
        raise ModelLoadError(f"{path}: checkpoint holds no tensors")
    return tensors


def _load_weights_strict(
    model: CLIP, state_dict: dict[str, torch.Tensor], path: Path, arch: str
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ModelLoadError(f"{path}: weights do not fit architecture {arch}: {'; '.join(parts)}")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelLoadError(
                f"{path}: weights do not fit architecture {arch}: {name} has shape "
                f"{tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelLoadError(f"{path}: weight {name} holds NaN or Inf values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True)
