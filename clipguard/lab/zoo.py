"""A model zoo: clean models on several seeds and every attack, resumable, with a manifest.

The zoo is what the scanner is calibrated on and the benchmark runs over. Each model is
``ZOO/NAME.safetensors`` with its card ``ZOO/NAME.card.json``; a model whose card exists is
finished and kept when the zoo is built again (the card is written after the model, both
atomically). ``ZOO/manifest.json`` lists every finished model with its card's key figures.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipguard.data import open_image_folder
from clipguard.errors import InputError
from clipguard.io import atomic_write_json
from clipguard.lab.train import (
    LabProfile,
    Recipe,
    build_model,
    card_path,
    get_profile,
    open_lab_dataset,
)
from clipguard.plugins import get_registry
from clipguard.progress import Progress

#: the lab's first seven attacks, in zoo order: a zoo's default
ATTACKS: tuple[str, ...] = (
    "badnets",
    "blended",
    "sig",
    "wanet",
    "badnets-lc",
    "issba-like",
    "badclip-like",
)
#: the seven further families (:mod:`clipguard.lab.attacks_extended`), in zoo order
EXTENDED_ATTACKS: tuple[str, ...] = (
    "badnets-random",
    "multi-patch",
    "grid-overlay",
    "refool-like",
    "color-filter",
    "bpp",
    "ftrojan",
)
#: names that stand for a group of attacks in :func:`resolve_attacks`
ATTACK_GROUPS: dict[str, tuple[str, ...]] = {
    "seven": ATTACKS,
    "extended": EXTENDED_ATTACKS,
    "all": ATTACKS + EXTENDED_ATTACKS,
}


def resolve_attacks(names: Sequence[str]) -> tuple[str, ...]:
    """The attacks a zoo plans: each name is a registered trigger family or a group of
    :data:`ATTACK_GROUPS`, in the order given, without repeats; none given: :data:`ATTACKS`.

    Raises :class:`InputError` for a name that is neither."""
    if not names:
        return ATTACKS
    known = get_registry().triggers
    planned: list[str] = []
    for name in names:
        group = ATTACK_GROUPS.get(name)
        if group is None and name not in known:
            choices = ", ".join([*ATTACK_GROUPS, *sorted(known)])
            raise InputError(f"--attack {name!r} is no trigger family or group ({choices})")
        planned += [attack for attack in group or (name,) if attack not in planned]
    return tuple(planned)


MANIFEST = "manifest.json"


@dataclass
class ZooEntry:
    """One model of the zoo."""

    name: str
    attack: str
    target: str | None
    seed: int
    poison_rate: float
    options: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None


def plan_zoo(
    classnames: list[str],
    profile: LabProfile,
    recipe: Recipe | None = None,
    clean_seeds: int = 3,
    attack_seeds: int = 1,
    poison_rate: float | None = None,
    attacks: tuple[str, ...] = ATTACKS,
) -> list[ZooEntry]:
    """The models of a zoo: clean seeds first, then each attack per seed, targets varied.

    Poison rates and epochs per attack come from ``profile`` (for ``recipe``, default the
    profile's); ``poison_rate`` replaces the profile's base rate (attacks with their own rate
    in the profile keep it).
    """
    recipe = recipe or profile.recipe
    entries = [
        ZooEntry(name=f"clean-s{seed}", attack="none", target=None, seed=seed, poison_rate=0.0)
        for seed in range(clean_seeds)
    ]
    n = len(classnames)
    for seed in range(attack_seeds):
        for index, attack in enumerate(attacks):
            target = classnames[(3 * index + 5 * seed + 1) % n]
            entries.append(
                ZooEntry(
                    name=f"{attack}-s{seed}",
                    attack=attack,
                    target=target,
                    seed=seed,
                    poison_rate=profile.zoo_poison_rate(attack, poison_rate),
                    epochs=profile.zoo_epochs(attack, recipe),
                )
            )
    return entries


def _summary(entry: ZooEntry, card: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "clean_accuracy",
        "attack_success_rate",
        "oracle_clean_accuracy",
        "oracle_attack_success_rate",
        "triggered_feature_cosine",
        "training_seconds",
        "model_sha256",
        "trigger_options",
        "recipe",
        "epochs",
    )
    return {
        "name": entry.name,
        "file": f"{entry.name}.safetensors",
        "card": card_path(Path(f"{entry.name}.safetensors")).name,
        "attack": entry.attack,
        "target": entry.target,
        "seed": entry.seed,
        "poison_rate": entry.poison_rate,
        "backdoored": entry.attack != "none",
        **{key: card.get(key) for key in keys},
    }


def build_zoo(
    dataset: str | Path,
    out: Path | str,
    clean_seeds: int = 3,
    attack_seeds: int = 1,
    recipe: Recipe | None = None,
    poison_rate: float | None = None,
    epochs: int | None = None,
    attacks: tuple[str, ...] = ATTACKS,
    progress: Progress | None = None,
    profile: str = "auto",
    shard: tuple[int, int] = (0, 1),
    only: Sequence[str] = (),
) -> dict[str, Any]:
    """Build (or complete) a zoo in ``out``; returns the manifest (also ``out/manifest.json``).

    ``profile`` (``auto``: detected from the data set) sets the architecture, the recipe,
    and the poison rate and epochs of each attack; ``recipe``, ``poison_rate`` and ``epochs``
    replace the defaults. ``shard=(i, n)`` builds only the models at plan positions ``i``,
    ``i + n``, ...: ``n`` processes with the same other arguments build a zoo in parallel.
    ``only`` (shell patterns such as ``*-s1``) builds just the planned models whose name
    matches one of them, e.g. a further seed of a zoo built before; a pattern that matches
    no planned model is an error. The manifest lists every finished model of the plan,
    whoever built it and whatever ``only`` was, in plan order.
    """
    index, count = shard
    if not 0 <= index < count:
        raise InputError(f"--shard {index}/{count}: need 0 <= i < n")
    progress = progress or Progress(quiet=True)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: zoo path exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    root = open_lab_dataset(dataset, progress=progress)
    classnames = open_image_folder(root / "train").classnames
    lab_profile = get_profile(profile, root)
    recipe = recipe or lab_profile.recipe
    plan = plan_zoo(
        classnames, lab_profile, recipe, clean_seeds, attack_seeds, poison_rate, attacks
    )

    def named(entry: ZooEntry, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns)

    unmatched = [pattern for pattern in only if not any(named(e, [pattern]) for e in plan)]
    if unmatched:
        raise InputError(
            f"--only {', '.join(unmatched)}: no planned model matches "
            f"(planned: {', '.join(e.name for e in plan)})"
        )
    wanted = [entry for entry in plan if not only or named(entry, only)]

    def finished(entry: ZooEntry) -> bool:
        model_path = out / f"{entry.name}.safetensors"
        return model_path.is_file() and card_path(model_path).is_file()

    def write_manifest() -> dict[str, Any]:
        models = [
            _summary(entry, json.loads(card_path(out / f"{entry.name}.safetensors").read_text()))
            for entry in plan
            if finished(entry)
        ]
        manifest = {
            "format": "clipguard.lab.zoo/1",
            "dataset": str(dataset),
            "recipe": recipe,
            "profile": lab_profile.name,
            "classnames": classnames,
            "models": models,
        }
        atomic_write_json(out / MANIFEST, manifest)
        return manifest

    mine = wanted[index::count]
    for entry in progress.track(mine, description="building zoo"):
        if not finished(entry):
            build_model(
                dataset,
                out / f"{entry.name}.safetensors",
                attack=entry.attack,
                target=entry.target,
                poison_rate=entry.poison_rate,
                epochs=epochs if epochs is not None else entry.epochs,
                seed=entry.seed,
                recipe=recipe,
                attack_options=entry.options,
                progress=progress,
                profile=lab_profile.name,
            )
            write_manifest()
    return write_manifest()
