"""Scanner options shared by tests."""

from __future__ import annotations

#: a cbpt scan of the tiny model that takes a second or two when uncut
CHEAP_CBPT = {
    "class_steps": 3,
    "class_batch_size": 2,
    "refine_steps": 2,
    "refine_batch_size": 4,
    "prompt_steps": 5,
    "additive_steps": 2,
    "additive_refits": 0,
    "warp_steps": 2,
    "probe_held_out": 2,
}
