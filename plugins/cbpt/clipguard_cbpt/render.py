"""The trigger picture of a scan (``trigger.png``) and the trigger file bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from clipguard.components import ShotSet
from clipguard.prompts import PromptClassifier
from clipguard.triggers import MaskPatternTrigger

#: tiles are upscaled (nearest neighbour) to at least this many pixels per side
MIN_TILE = 128
_LABEL_HEIGHT = 14
_PAD = 4


def _to_image(tensor: torch.Tensor, tile: int) -> Image.Image:
    """A ``C x H x W`` tensor in ``[0, 1]`` (C = 1 or 3) as an RGB image of side ``tile``."""
    tensor = tensor.detach().float().cpu().clamp(0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    array = (tensor.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, mode="RGB").resize((tile, tile), Image.Resampling.NEAREST)


def render_trigger_png(
    trigger: MaskPatternTrigger,
    clean: torch.Tensor,
    clean_names: Sequence[str],
    triggered_names: Sequence[str],
    title: str = "",
) -> bytes:
    """PNG bytes: mask, pattern and mask*pattern on the first row (the mask rescaled to its
    maximum so a faint mask stays visible), then clean/triggered pairs with predicted class
    names (``clean`` is ``K x 3 x H x W``, names are the predictions, one per image)."""
    size = int(trigger.mask.shape[-1])
    tile = max(MIN_TILE, size)
    mask = trigger.mask.detach().float()
    peak = float(mask.max().item())
    first_row = [
        (mask / max(peak, 1e-6), f"mask (max {peak:.2f})"),
        (trigger.pattern, "pattern"),
        (mask * trigger.pattern, "mask * pattern"),
    ]
    pairs = list(zip(clean, clean_names, triggered_names, strict=True))
    columns = max(3, min(len(pairs), 4) * 2)
    rows = 1 + (len(pairs) + 3) // 4
    cell_h = tile + _LABEL_HEIGHT + _PAD
    top = _LABEL_HEIGHT + _PAD if title else 0
    canvas = Image.new("RGB", (columns * (tile + _PAD) + _PAD, top + rows * cell_h + _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD // 2), title, fill="black")

    def put(column: int, row: int, tensor: torch.Tensor, label: str) -> None:
        x = _PAD + column * (tile + _PAD)
        y = top + _PAD + row * cell_h
        canvas.paste(_to_image(tensor, tile), (x, y))
        draw.text((x, y + tile + 1), label[: max(tile // 6, 8)], fill="black")

    for column, (tensor, label) in enumerate(first_row):
        put(column, 0, tensor, label)
    triggered = trigger.apply(clean) if len(pairs) else clean
    for k, (image, clean_name, triggered_name) in enumerate(pairs):
        row, column = 1 + k // 4, (k % 4) * 2
        put(column, row, image, f"clean: {clean_name}")
        put(column + 1, row, triggered[k], f"trig: {triggered_name}")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


#: clean/triggered pairs shown in trigger.png
N_PICTURE_PAIRS = 8


def picture_bytes(
    classifier: PromptClassifier,
    shots: ShotSet,
    trigger: MaskPatternTrigger,
    verdict: str,
    dominant: str,
    scanner: str = "cbpt",
) -> bytes:
    """``trigger.png`` with up to :data:`N_PICTURE_PAIRS` shots of different classes, labelled
    with ``classifier``'s predictions."""
    chosen: list[int] = []
    seen: set[int] = set()
    for index, label in enumerate(shots.labels.tolist()):
        if label not in seen:
            seen.add(label)
            chosen.append(index)
        if len(chosen) == N_PICTURE_PAIRS:
            break
    clean = shots.pixels[chosen]
    clean_pred = classifier.predict(clean).tolist()
    trig_pred = classifier.predict(trigger.apply(clean)).tolist()
    names = shots.classnames
    return render_trigger_png(
        trigger,
        clean,
        [names[k] for k in clean_pred],
        [names[k] for k in trig_pred],
        title=f"{scanner} scan: {verdict}; triggered shots go to '{dominant}'",
    )
