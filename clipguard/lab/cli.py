"""``clipguard lab``: generate the synthetic set, build clean or poisoned models, build a zoo;
and ``clipguard demo``.

The lab's plugin (:mod:`clipguard.lab.plugin`) adds :data:`app` as ``clipguard lab`` and
:func:`demo` as ``clipguard demo`` through the ``clipguard_register_commands`` hook; the core
gives every command its error handling (an :class:`~clipguard.errors.InputError` is a
one-line message and exit code 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clipguard.cli_options import QuietOpt as DemoQuietOpt
from clipguard.cli_options import SeedOpt, ThreadsOpt
from clipguard.config import parse_options
from clipguard.errors import InputError
from clipguard.outputs import check_output_dir, check_output_file
from clipguard.progress import Progress

app = typer.Typer(no_args_is_help=True, help="Build small clean and backdoored CLIP models.")
data_app = typer.Typer(no_args_is_help=True, help="Write built-in lab data sets.")
app.add_typer(data_app, name="data")

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
ProfileOpt = Annotated[
    str,
    typer.Option(
        "--profile",
        help="model and training defaults: synthetic, natural (photographs such as CIFAR-10), "
        "natural-unseen-prompt (natural, no training caption is the zero-shot prompt), "
        "or auto (synthetic for the built-in set, else natural)",
    ),
]


@data_app.command(
    "synthetic", epilog="Example:\n\n  clipguard lab data synthetic --out data/synthetic\n"
)
def data_synthetic(
    out: Annotated[Path, typer.Option("--out", help="folder to write train/ and test/ into")],
    seed: Annotated[int, typer.Option("--seed", help="seed of the images")] = 0,
    train_per_class: Annotated[int, typer.Option("--train-per-class", min=1)] = 400,
    test_per_class: Annotated[int, typer.Option("--test-per-class", min=1)] = 100,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace a non-empty --out")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the built-in synthetic image set (12 coloured-shape classes, 32 px) as ImageFolders."""
    check_output_dir(out)
    from clipguard.lab.synthetic import write_synthetic

    root = write_synthetic(
        out,
        seed,
        train_per_class,
        test_per_class,
        progress=Progress(quiet=quiet),
        overwrite=overwrite,
    )
    typer.echo(f"wrote {root}/train and {root}/test")


@app.command(
    epilog="Examples:\n\n  clipguard lab build --out clean.safetensors\n\n"
    "  clipguard lab build --attack badnets --target blue_star --out badnets.safetensors\n"
)
def build(
    out: Annotated[Path, typer.Option("--out", help="model file to write (.safetensors)")],
    dataset: Annotated[
        str, typer.Option("--dataset", help="'synthetic' or a folder with train/ and test/")
    ] = "synthetic",
    attack: Annotated[str, typer.Option("--attack", help="trigger family, or 'none'")] = "none",
    target: Annotated[
        str | None, typer.Option("--target", help="target class name (required with an attack)")
    ] = None,
    poison_rate: Annotated[float, typer.Option("--poison-rate", help="fraction of pairs")] = 0.05,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="training epochs (default: the profile's)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="training seed")] = 0,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            help="scratch, or finetune a cached clean base model (default: the profile's)",
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="peak learning rate")] = None,
    attack_option: Annotated[
        list[str] | None, typer.Option("--attack-option", help="trigger option key=value")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="print the model card as JSON")
    ] = False,
    profile: ProfileOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Train a clean or poisoned small CLIP and write it with its model card (NAME.card.json)."""
    check_output_file(out)
    from clipguard.lab.train import build_model, card_path

    card = build_model(
        dataset,
        out,
        attack=attack,
        target=target,
        poison_rate=poison_rate,
        epochs=epochs,
        seed=seed,
        recipe=recipe,  # type: ignore[arg-type]
        attack_options=parse_options(attack_option or []),
        lr=lr,
        progress=Progress(quiet=quiet or json_output),
        profile=profile,
    )
    if json_output:
        typer.echo(json.dumps(card, indent=2))
        return
    asr = card["attack_success_rate"]
    typer.echo(
        f"wrote {out} and {card_path(out).name}: CA {100 * card['clean_accuracy']:.1f} %"
        + (f", ASR {100 * asr:.1f} %" if asr is not None else "")
        + f", {card['training_seconds']:.0f} s of training"
    )


@app.command(
    epilog="Example:\n\n  clipguard lab zoo --dataset synthetic --out zoo/ --attack seven\n"
)
def zoo(
    out: Annotated[Path, typer.Option("--out", help="zoo folder (resumable)")],
    dataset: Annotated[
        str, typer.Option("--dataset", help="'synthetic' or a folder with train/ and test/")
    ] = "synthetic",
    clean_seeds: Annotated[int, typer.Option("--clean-seeds", min=1)] = 3,
    attack_seeds: Annotated[int, typer.Option("--attack-seeds", min=1)] = 1,
    recipe: Annotated[
        str | None, typer.Option("--recipe", help="scratch or finetune (default: the profile's)")
    ] = None,
    poison_rate: Annotated[
        float | None,
        typer.Option("--poison-rate", help="base rate (default: the profile's; see docs/lab.md)"),
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="default: the profile's")] = None,
    profile: ProfileOpt = "auto",
    shard: Annotated[
        str,
        typer.Option(
            "--shard",
            help="i/n: build every n-th model from the i-th, so n processes share the work",
        ),
    ] = "0/1",
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="build only the planned models whose name matches this pattern "
            "(repeatable; e.g. '*-s1' for a further seed)",
        ),
    ] = None,
    attack: Annotated[
        list[str] | None,
        typer.Option(
            "--attack",
            help="trigger families to plan (repeatable): a family's name, or seven (the "
            "default), extended (the seven further families) or all",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Build clean models on several seeds and every attack (varied targets); manifest.json."""
    check_output_dir(out)
    from clipguard.lab.zoo import build_zoo, resolve_attacks

    manifest = build_zoo(
        dataset,
        out,
        clean_seeds=clean_seeds,
        attack_seeds=attack_seeds,
        recipe=recipe,  # type: ignore[arg-type]
        poison_rate=poison_rate,
        epochs=epochs,
        progress=Progress(quiet=quiet),
        profile=profile,
        shard=_parse_shard(shard),
        only=only or (),
        attacks=resolve_attacks(attack or ()),
    )
    typer.echo(f"zoo {out}: {len(manifest['models'])} models (manifest.json)")


@app.command(
    "badclip-patch",
    epilog="Example:\n\n  clipguard lab badclip-patch clean.safetensors --target blue_star "
    "--out patch.safetensors\n",
)
def badclip_patch(
    model: Annotated[Path, typer.Argument(help="clean model to optimise the patch on")],
    target: Annotated[str, typer.Option("--target", help="target class name")],
    out: Annotated[Path, typer.Option("--out", help="trigger file to write (.safetensors)")],
    dataset: Annotated[
        str, typer.Option("--dataset", help="'synthetic' or a folder with train/ and test/")
    ] = "synthetic",
    size: Annotated[int, typer.Option("--size", min=1, help="patch side in pixels")] = 4,
    steps: Annotated[int, typer.Option("--steps", min=1, help="optimisation steps")] = 200,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Optimise a BadCLIP-like patch on a clean model towards the target's captions."""
    check_output_file(out)
    from clipguard.data import load_pixels, open_image_folder, resolve_class
    from clipguard.lab.train import make_badclip_patch, open_lab_dataset
    from clipguard.model import load_model

    progress = Progress(quiet=quiet)
    bundle = load_model(model)
    folder = open_image_folder(open_lab_dataset(dataset, progress=progress) / "train")
    index = resolve_class(target, folder.classnames, folder.folders)
    target = folder.classnames[index]
    samples = [sample for sample in folder.samples if sample[1] != index]
    pixels, _ = load_pixels(samples, bundle.pixel_transform, progress)
    make_badclip_patch(
        bundle,
        folder.classnames,
        index,
        pixels,
        out,
        size=size,
        steps=steps,
        seed=seed,
        progress=progress,
    )
    typer.echo(f"wrote {out} (use --attack badclip-like --attack-option patch_file={out})")


def _parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` as ``(i, n)``; :class:`InputError` otherwise."""
    parts = text.split("/")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise InputError(f"--shard {text!r}: expected i/n, e.g. 0/2")
    return int(parts[0]), int(parts[1])


def demo(
    out: Annotated[Path, typer.Option("--out", help="folder for the demo's outputs")] = Path(
        "demo-output"
    ),
    seed: SeedOpt = 0,
    quiet: DemoQuietOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Build a backdoored model on the built-in synthetic set, scan it, purify it.

    Example: clipguard demo --out demo-output
    """
    check_output_dir(out)
    from rich.console import Console

    from clipguard.lab.demo import print_demo, run_demo
    from clipguard.runtime import cli_threads

    print_demo(run_demo(out, seed=seed, quiet=quiet, threads=cli_threads(threads)), Console())
