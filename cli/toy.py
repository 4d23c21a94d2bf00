"""``python runall.py toy scenes|train``: the synthetic scenes and training the shipped toy CLIP."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import DeviceOpt, console, fail, interrupted, out, value

toy_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="The toy world: synthetic scenes and the shipped toy CLIP.")


class SceneStyle(str, enum.Enum):  # pipeline.toy.world.Style
    train = "train"
    alt = "alt"
    varied = "varied"
    mixed = "mixed"
    blend = "blend"


class Recipe(str, enum.Enum):  # "auto" and pipeline.toy.train.RECIPES
    auto = "auto"
    fine_gpu = "fine-gpu"
    fine_cpu = "fine-cpu"
    distill_cpu = "distill-cpu"
    distill_init_cpu = "distill-init-cpu"
    surgery_cpu = "surgery-cpu"
    varied_cpu = "varied-cpu"
    mixed_cpu = "mixed-cpu"
    scratch_gpu = "scratch-gpu"
    scratch_surgery_gpu = "scratch-surgery-gpu"
    gpu = "gpu"
    cpu = "cpu"


@toy_app.command("scenes")
def toy_scenes(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the PNGs, truth.json and its COCO form truth_coco.json.")],
    count: Annotated[int, typer.Option(help="How many scenes.")] = 12,
    seed: Annotated[int, typer.Option(help="Scene stream seed.")] = 7,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    min_objects: Annotated[int, typer.Option(help="Fewest objects per scene.")] = 1,
    max_objects: Annotated[int, typer.Option(help="Most objects per scene (up to 3).")] = 3,
    style: Annotated[SceneStyle, typer.Option(help="train (hard-edged), alt (anti-aliased, other backgrounds), varied (the training augmentation: new choices per scene), mixed (train or varied, half each) or blend (train, varied or alt, a third each).")] = SceneStyle.train,
) -> None:
    """Write toy scenes (coloured shapes with known truth), truth.json and truth_coco.json (for eval)."""
    from pipeline.toy.world import SceneSpec, write_scenes

    try:
        spec = SceneSpec(size=size, min_objects=min_objects, max_objects=max_objects, style=style.value)  # type: ignore[arg-type]
    except ValueError as err:
        fail(str(err))
    truth = write_scenes(out_dir, seed, count, spec)
    out.print(f"wrote {count} scenes and {truth}", highlight=False)


@toy_app.command("train")
def toy_train(
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the fp16 state dict; a .json card goes beside it.")],
    recipe: Annotated[Recipe, typer.Option(help="'fine-gpu' (16x16-grid model), 'fine-cpu' (the same, sized for a 2-core CPU), 'distill-cpu' (the 16x16-grid vision tower taught by --teacher), 'distill-init-cpu' (the same, started from the teacher's vision tower), 'surgery-cpu' (continues --start-from with the patch term on the surgery path too), 'varied-cpu' (continues --start-from on scenes drawn a new way each time, text tower frozen), 'mixed-cpu' (the same on training-style and varied scenes, with a 36-way class term on the image embedding), 'scratch-gpu' (a vision tower from scratch against --start-from's frozen text tower, on training-style, varied and alt scenes), 'scratch-surgery-gpu' (continues a scratch-gpu model with the surgery term), 'gpu' and 'cpu' (the 8x8-grid model), or 'auto': fine-gpu on CUDA, else fine-cpu.")] = Recipe.auto,
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: the recipe's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Scenes per step (default: the recipe's).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: the recipe's).")] = None,
    class_weight: Annotated[Optional[float], typer.Option(help="Weight of the 36-way colour+shape term on the image embedding (default: the recipe's).")] = None,
    freeze_text: Annotated[Optional[bool], typer.Option("--freeze-text/--train-text", help="Keep the text tower as loaded from --start-from, or train it (default: the recipe's).", show_default=False)] = None,
    workers: Annotated[int, typer.Option(help="Scene-drawing worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    teacher: Annotated[Optional[Path], typer.Option(help="A toy checkpoint for the distill- recipes: its text tower is copied and frozen, its image embedding distilled.")] = None,
    start_from: Annotated[Optional[Path], typer.Option(help="A toy checkpoint of the recipe's architecture to start from (surgery-cpu continues a distill-init-cpu model).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint beside --out (OUT.ckpt), written every few steps.")] = False,
    device: DeviceOpt = None,
) -> None:
    """Train the toy CLIP on toy scenes (GPU when present), writing a checkpoint stock openai-clip loads."""
    from pipeline.model.load import resolve_device
    from pipeline.toy.train import resolve_recipe, save_toy_checkpoint, train_toy_clip
    from pipeline.views import training_progress

    dev = resolve_device(value(device) or "auto")
    try:
        name, cfg = resolve_recipe(recipe.value, dev, steps=steps, batch_size=batch_size, lr=lr, class_weight=class_weight,
                                   freeze_text=freeze_text, workers=workers, seed=seed,
                                   teacher=str(teacher.resolve()) if teacher else None,
                                   start_from=str(start_from.resolve()) if start_from else None)
    except ValueError as err:
        fail(str(err))
    ckpt = out_file.with_suffix(".ckpt")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"recipe {name}: {cfg.steps} steps of {cfg.batch_size} scenes, lr {cfg.lr}, on {dev}; "
                  f"checkpoint {ckpt}" + (" (resuming)" if resume and ckpt.is_file() else ""), highlight=False)
    with training_progress(console, cfg.steps) as on_step:
        try:
            state, card = train_toy_clip(cfg, dev, on_step, checkpoint=ckpt, resume=resume)
        except ValueError as err:
            fail(f"{err}; drop --resume to start over")
        except KeyboardInterrupt:  # the checkpoint holds the last finished hundred steps
            interrupted()
    card_path = save_toy_checkpoint(out_file, state, {**card, "recipe": {**card["recipe"], "name": name}})
    out.print(f"wrote {out_file} and {card_path}", highlight=False)
