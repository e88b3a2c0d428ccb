"""The fidelity of an inverted trigger to the real one.

Not available to a defender: it uses the *real* trigger. Benchmarks report it beside CBPT's
figures and the oracle ceiling (:func:`clipguard.oracle.oracle_ceiling`) to separate "the
method missed" from "no prompt set could do better".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipguard.features import encode_images
from clipguard.model import ModelBundle
from clipguard.triggers import Trigger


@torch.no_grad()
def trigger_fidelity(
    bundle: ModelBundle, pixels: torch.Tensor, real: Trigger, inverted: Trigger
) -> dict[str, float]:
    """How well ``inverted`` reproduces ``real`` in feature space, on clean ``pixels``.

    Returns ``mean_shift_cosine`` (cosine between the mean shifts ``f(T(x)) - f(x)`` of the
    two triggers) and ``per_image_cosine`` (the mean over images of the cosine of the two
    shifts of that image).
    """
    clean = encode_images(bundle, pixels)
    shift_real = encode_images(bundle, real.apply(pixels)) - clean
    shift_inv = encode_images(bundle, inverted.apply(pixels)) - clean
    mean_cos = F.cosine_similarity(shift_real.mean(0), shift_inv.mean(0), dim=0)
    per_image = F.cosine_similarity(shift_real, shift_inv, dim=1).mean()
    return {"mean_shift_cosine": float(mean_cos), "per_image_cosine": float(per_image)}
