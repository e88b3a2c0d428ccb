"""The lab as a clipguard plugin (entry point ``lab`` of the ``clipguard`` package).

It registers the lab's trigger families (:data:`clipguard.lab.attacks.LAB_FAMILIES` and
:data:`clipguard.lab.attacks_extended.EXTENDED_FAMILIES`) and adds
the ``clipguard lab ...`` command group and ``clipguard demo`` to the command line, through
the same hooks as any installed plugin: the core never imports the lab. The families are
registered as :class:`~clipguard.hookspecs.Deferred`, so their modules (and torch) are imported
only when one is used.
"""

from __future__ import annotations

import typer

from clipguard.hookspecs import Deferred, RegisterTriggerFamily, hookimpl

_ATTACKS, _EXTENDED = "clipguard.lab.attacks", "clipguard.lab.attacks_extended"
#: the lab's trigger families (:data:`clipguard.lab.attacks.LAB_FAMILIES`, then
#: :data:`clipguard.lab.attacks_extended.EXTENDED_FAMILIES`), imported on first use
FAMILIES = tuple(
    Deferred(f"{module}:{cls}", name, "1", description)
    for module, cls, name, description in (
        (_ATTACKS, "Blended", "blended",
         "full-image uniform-noise pattern blended into the image (alpha)"),
        (_ATTACKS, "Sig", "sig", "additive horizontal sinusoid (amplitude delta, frequency f)"),
        (_ATTACKS, "WaNet", "wanet", "smooth fixed warping field from a random k x k control grid"),
        (_ATTACKS, "BadNetsLC", "badnets-lc",
         "BadNets patch stamped only on target-class images (clean-label)"),
        (_ATTACKS, "IssbaLike", "issba-like",
         "sample-specific invisible residual from a fixed random generator net"),
        (_ATTACKS, "BadClipLike", "badclip-like",
         "patch optimised on a clean model towards the target text (patch_file=...)"),
        (_EXTENDED, "BadNetsRandom", "badnets-random",
         "square patch stamped at a random position on every image"),
        (_EXTENDED, "MultiPatch", "multi-patch",
         "several small patches scattered over the image, stamped together"),
        (_EXTENDED, "GridOverlay", "grid-overlay",
         "thin coloured grid lines over the whole image (opacity alpha)"),
        (_EXTENDED, "RefoolLike", "refool-like",
         "blurred random scene and its shifted ghost blended in (weight alpha)"),
        (_EXTENDED, "ColourFilter", "color-filter",
         "fixed colour filter (sepia, warm, cool or channel swap) on the whole image"),
        (_EXTENDED, "Bpp", "bpp",
         "colour depth reduced to 2**bits levels per channel (optionally dithered)"),
        (_EXTENDED, "FTrojan", "ftrojan",
         "mid/high DCT frequencies raised in every block of the U and V channels"),
    )
)  # fmt: skip


@hookimpl
def clipguard_register_triggers(register: RegisterTriggerFamily) -> None:
    """Register the lab's trigger families (badnets is registered by the core)."""
    for family in FAMILIES:
        register(family)


@hookimpl
def clipguard_register_commands(app: typer.Typer) -> None:
    """Add ``clipguard lab`` (data, build, zoo, badclip-patch) and ``clipguard demo``."""
    from clipguard.lab.cli import app as lab_app
    from clipguard.lab.cli import demo

    app.command("demo")(demo)
    app.add_typer(lab_app, name="lab", help="Build small clean and backdoored CLIP models.")
