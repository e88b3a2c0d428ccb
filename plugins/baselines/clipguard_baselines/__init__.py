"""Baseline defences for clipguard's benchmark, as purifier plugins.

* ``zeroshot``: no defence, hand-crafted prompts (the reference row).
* ``finetune``: supervised fine-tuning of the image encoder on the clean shots (FT).
* ``cleanclip``: CleanCLIP-style fine-tuning of both encoders with the multimodal contrastive
  loss plus in-modal self-supervised contrastive losses on augmented views.

The fine-tuning purifiers output a model file (``model.safetensors``), not prompts.
"""

__version__ = "0.2.0"
