"""Class-wise prompts: the learnable text encoder path, prompt files, and the classifier.

A class-wise prompt for class ``k`` is ``[v_k1 .. v_kM, <tokens of the class name>, "."]``
with ``M`` learnable context vectors per class (CoOp's class-specific context). The text
encoder runs on embeddings rather than token ids (:class:`PromptEncoder`), so gradients reach
the context vectors while the encoder stays frozen.

A *prompt file* (safetensors) holds the ``C x M x D`` context tensor with metadata: class
names, model sha256, architecture, the plugin that made it and its settings. Loading one
against a model or class list it does not fit is an :class:`~clipguard.errors.InputError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from open_clip.transformer import text_global_pool
from torch import nn

from clipguard.errors import InputError
from clipguard.io import atomic_write_bytes, read_safetensors_file, safetensors_bytes
from clipguard.model import ModelBundle

PROMPT_FILE_FORMAT = "clipguard.prompts/1"
HANDCRAFTED_TEMPLATE = "a photo of a {}."
DEFAULT_CONTEXT_INIT = "a photo of a"
_PLACEHOLDER = "X"


def pooled_prefix_length(model: nn.Module, token_ids: torch.Tensor) -> int:
    """How many leading token positions determine the pooled text feature of ``token_ids``.

    With a causal attention mask and end-of-text pooling (``argmax`` or ``eos``), the feature
    at the end-of-text token depends only on the positions up to it, so the padding after the
    longest prompt's end-of-text token can be dropped: the same features, for a fraction of
    the transformer's work (a class-wise prompt has about 10 tokens, CLIP's context 77).
    Any other model keeps its whole context.
    """
    full = int(token_ids.shape[1])
    if getattr(model, "attn_mask", None) is None:
        return full
    pool_type = getattr(model, "text_pool_type", "argmax")
    if pool_type == "argmax":
        ends = token_ids.argmax(dim=1)
    elif pool_type == "eos" and getattr(model, "text_eos_id", None) is not None:
        ends = (token_ids == model.text_eos_id).int().argmax(dim=1)
    else:
        return full
    return min(full, int(ends.max()) + 1)


class PromptEncoder(nn.Module):
    """Text features of class-wise prompts from context vectors, through a frozen text tower.

    ``forward(context)`` takes ``C x M x D`` context vectors and returns ``C x E`` L2-normalised
    text features, on the device of ``context`` (the text tower runs on the bundle's). Token
    embedding, positional embedding, the causal transformer (batch first, mask outside it, as
    in open_clip 3.x), ``ln_final``, end-of-text pooling and the text projection are the
    model's own. Positions after the last end-of-text token are
    dropped where that cannot change the result (:func:`pooled_prefix_length`).
    """

    def __init__(self, bundle: ModelBundle, classnames: Sequence[str], n_context: int) -> None:
        super().__init__()
        if n_context < 1:
            raise InputError(f"context length must be at least 1, got {n_context}")
        self.bundle = bundle
        self.n_context = n_context
        self.classnames = list(classnames)
        placeholder = " ".join([_PLACEHOLDER] * n_context)
        texts = [f"{placeholder} {name}." for name in classnames]
        context_length = bundle.model.context_length
        for name, text in zip(classnames, texts, strict=True):
            if len(bundle.tokenizer.encode(text)) + 2 > context_length:
                raise InputError(
                    f"class name {name!r} is too long for the model's context of {context_length} "
                    f"tokens with {n_context} context vectors"
                )
        token_ids = bundle.tokenize(texts)
        model = bundle.model
        self.length = pooled_prefix_length(model, token_ids)
        token_ids = token_ids[:, : self.length]
        with torch.no_grad():
            embeddings = model.token_embedding(token_ids).float()
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("prefix", embeddings[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, 1 + n_context :].clone(), persistent=False)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        model = self.bundle.model
        if context.shape[:2] != (len(self.classnames), self.n_context):
            raise InputError(
                f"context tensor is {tuple(context.shape)}, expected "
                f"({len(self.classnames)}, {self.n_context}, D)"
            )
        self.bundle.text_encoder_prompts += len(self.classnames)
        x = torch.cat([self.prefix, context.to(self.prefix), self.suffix], dim=1)
        x = x + model.positional_embedding[: self.length].to(x)
        mask = model.attn_mask
        x = model.transformer(
            x, attn_mask=None if mask is None else mask[: self.length, : self.length]
        )
        x = model.ln_final(x)
        x = text_global_pool(
            x,
            self.token_ids,
            model.text_pool_type,
            eos_token_id=getattr(model, "text_eos_id", None),
        )
        if isinstance(model.text_projection, nn.Linear):
            x = model.text_projection(x)
        elif model.text_projection is not None:
            x = x @ model.text_projection
        return nn.functional.normalize(x, dim=-1).to(context.device)


def initial_context(
    bundle: ModelBundle, n_classes: int, n_context: int, init_text: str = DEFAULT_CONTEXT_INIT
) -> torch.Tensor:
    """``C x M x D`` context vectors initialised from the token embeddings of ``init_text``.

    When ``init_text`` has fewer tokens than ``n_context`` the remaining vectors start from a
    small random normal (std 0.02, fixed seed); extra tokens are dropped.
    """
    ids = bundle.tokenize([init_text])[0]
    n_tokens = int((ids > 0).sum()) - 2  # without start- and end-of-text
    with torch.no_grad():
        embeddings = bundle.model.token_embedding(ids[1 : 1 + n_tokens]).float()
    width = embeddings.shape[1]
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(n_context, width, generator=generator) * 0.02
    take = min(n_context, n_tokens)
    context[:take] = embeddings[:take].cpu()
    return context.unsqueeze(0).repeat(n_classes, 1, 1)


@dataclass
class PromptSet:
    """Learned class-wise context vectors and what ties them to a model and class list."""

    context: torch.Tensor
    classnames: list[str]
    model_sha256: str
    architecture: str = ""
    plugin: str = ""
    plugin_version: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def check_fits(self, bundle: ModelBundle, classnames: Sequence[str] | None = None) -> None:
        """Raise :class:`InputError` unless the prompts fit ``bundle`` and ``classnames``."""
        if self.model_sha256 != bundle.sha256:
            raise InputError(
                f"prompt file was made for model sha256 {self.model_sha256[:12]}…, not for "
                f"this model ({bundle.sha256[:12]}…)"
            )
        width = int(bundle.model.token_embedding.weight.shape[1])
        if self.context.shape[-1] != width:
            raise InputError(
                f"prompt file has context width {self.context.shape[-1]}, the model's text tower "
                f"has {width}"
            )
        if classnames is not None and list(classnames) != self.classnames:
            raise InputError(
                "prompt file was made for another class list: "
                f"{', '.join(self.classnames[:4])}… vs {', '.join(list(classnames)[:4])}…"
            )


def save_prompt_file(path: Path, prompts: PromptSet) -> None:
    """Write ``prompts`` as a safetensors prompt file, atomically."""
    metadata = {
        "format": PROMPT_FILE_FORMAT,
        "classnames": json.dumps(prompts.classnames),
        "model_sha256": prompts.model_sha256,
        "architecture": prompts.architecture,
        "plugin": prompts.plugin,
        "plugin_version": prompts.plugin_version,
        "settings": json.dumps(prompts.settings, sort_keys=True, default=str),
    }
    tensors = {"context": prompts.context.detach().float().cpu().contiguous()}
    atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata))


def load_prompt_file(path: Path) -> PromptSet:
    """Read a prompt file; :class:`InputError` if it is not a valid clipguard prompt file."""
    tensors, metadata = read_safetensors_file(Path(path), what="prompt file")
    if metadata.get("format") != PROMPT_FILE_FORMAT:
        raise InputError(f"{path}: not a clipguard prompt file (format {metadata.get('format')!r})")
    context = tensors.get("context")
    if context is None or context.dim() != 3:
        raise InputError(f"{path}: prompt file must hold a 3-d 'context' tensor")
    context = context.float()
    if not torch.isfinite(context).all():
        raise InputError(f"{path}: prompt context holds NaN or Inf values")
    try:
        classnames = json.loads(metadata.get("classnames", ""))
        settings = json.loads(metadata.get("settings", "{}"))
    except (json.JSONDecodeError, RecursionError):
        raise InputError(f"{path}: prompt file metadata is not valid JSON") from None
    if (
        not isinstance(classnames, list)
        or not all(isinstance(c, str) for c in classnames)
        or len(classnames) != context.shape[0]
    ):
        raise InputError(f"{path}: prompt file class names do not match its context tensor")
    return PromptSet(
        context=context.float(),
        classnames=classnames,
        model_sha256=metadata.get("model_sha256", ""),
        architecture=metadata.get("architecture", ""),
        plugin=metadata.get("plugin", ""),
        plugin_version=metadata.get("plugin_version", ""),
        settings=settings if isinstance(settings, dict) else {},
    )


def handcrafted_text_features(
    bundle: ModelBundle, classnames: Sequence[str], template: str = HANDCRAFTED_TEMPLATE
) -> torch.Tensor:
    """``C x E`` normalised text features of the hand-crafted prompt for each class."""
    return bundle.encode_text([template.format(name) for name in classnames])


class PromptClassifier:
    """Zero-shot classifier over ``classnames``: hand-crafted prompts, or a learned prompt set.

    ``logits(x) = s * f(x) . t_k`` with ``s`` the model's logit scale. This is what an
    organisation deploys: the model plus a prompt file.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        classnames: Sequence[str],
        prompts: PromptSet | None = None,
    ) -> None:
        self.bundle = bundle
        self.classnames = list(classnames)
        self.prompts = prompts
        if prompts is None:
            self.class_features = handcrafted_text_features(bundle, self.classnames)
        else:
            prompts.check_fits(bundle, self.classnames)
            encoder = PromptEncoder(bundle, self.classnames, int(prompts.context.shape[1]))
            with torch.no_grad():
                self.class_features = encoder(prompts.context)

    @classmethod
    def from_files(
        cls,
        model_path: Path,
        prompt_path: Path | None = None,
        classnames: Sequence[str] | None = None,
    ) -> PromptClassifier:
        """Load a model (safely) and optionally a prompt file; class names default to the file's."""
        from clipguard.model import load_model

        bundle = load_model(model_path)
        prompts = load_prompt_file(prompt_path) if prompt_path else None
        if classnames is None:
            if prompts is None:
                raise InputError("class names are needed when no prompt file is given")
            classnames = prompts.classnames
        return cls(bundle, classnames, prompts)

    def logits_from_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits from normalised image features."""
        return self.bundle.logit_scale * image_features @ self.class_features.T

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits for pixel images in ``[0, 1]``."""
        return self.logits_from_features(self.bundle.encode_image(pixels))

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class indices for pixel images, computed in batches."""
        return torch.cat([self.logits(batch).argmax(dim=-1) for batch in pixels.split(batch_size)])
