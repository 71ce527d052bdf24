"""`lorakit demo`: a LoRA learns a colour the base model has never seen, in a few minutes on a CPU
(`lorakit demo --finetune`: the model's own weights learn it, with `lorakit finetune`).

Steps: write ~20 captioned images of the held-out concept (magenta shapes, `toy.world`) as an sd-scripts
DreamBooth folder; take the built-in toy base model (trained on the base world only; see `toy/pretrain.py`) or,
when its weights are not installed, the same architecture untrained; sample the concept prompts; train a LoRA with
`lorakit train` and exactly the options a user would type; sample the same prompts and seeds with the LoRA; write a
before/after grid and print the concept score of both rows.
"""

from __future__ import annotations

import argparse
import logging
import time
from importlib import resources
from pathlib import Path

from PIL import Image


BASE_WEIGHTS = "weights/toy_base"
SAMPLE_SEED = 1234


def base_model_dir() -> Path | None:
    """The installed toy base model (a diffusers folder inside the package), if present."""
    folder = Path(str(resources.files("lorakit.toy") / BASE_WEIGHTS))
    return folder if (folder / "model_index.json").is_file() else None


def prepare_base_model(output_dir: Path) -> tuple[Path, bool]:
    """(model folder, pretrained?) — the shipped toy model, or a freshly built random one as a fallback."""
    shipped = base_model_dir()
    if shipped is not None:
        return shipped, True
    from lorakit.toy.pretrain import untrained_pipeline

    folder = output_dir / "random_base_model"
    if not (folder / "model_index.json").is_file():
        untrained_pipeline().save_pretrained(str(folder))
    return folder, False


def train_arguments(model: Path, data: Path, output_dir: Path, steps: int) -> list[str]:
    """The `lorakit train` command line of the demo (also printed, so a user can rerun and vary it)."""
    return [
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--caption_extension=.caption",
        "--resolution=64", "--train_batch_size=4", f"--output_dir={output_dir}", "--output_name=demo_lora",
        "--network_module=networks.lora", "--network_dim=16", "--network_alpha=16", "--network_train_unet_only",
        "--learning_rate=2e-3", "--optimizer_type=AdamW", "--lr_scheduler=constant_with_warmup", "--lr_warmup_steps=20",
        f"--max_train_steps={steps}", "--cache_latents", "--seed=42", "--max_data_loader_n_workers=0",
        "--save_model_as=safetensors",
    ]


def finetune_arguments(model: Path, data: Path, output_dir: Path, steps: int) -> list[str]:
    """The `lorakit finetune` command line of `lorakit demo --finetune`: the whole U-Net trains (the output is
    a diffusers folder, as the toy model is one)."""
    return [
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--caption_extension=.caption",
        "--resolution=64", "--train_batch_size=4", f"--output_dir={output_dir}", "--output_name=demo_finetune",
        "--learning_rate=2e-4", "--optimizer_type=AdamW", "--lr_scheduler=constant_with_warmup", "--lr_warmup_steps=20",
        f"--max_train_steps={steps}", "--cache_latents", "--seed=42", "--max_data_loader_n_workers=0",
    ]


def sample_rows(model: Path, lora_file: Path | None, prompts: list[str], steps: int) -> list:
    """Images for `prompts` from the base model, with the LoRA merged when `lora_file` is given."""
    from lorakit.sampling.generate import generate
    from lorakit.toy.evaluate import load_with_lora

    family, comps = load_with_lora(model, lora_file)
    return generate(family, comps, prompts, seed=SAMPLE_SEED, steps=steps, guidance_scale=4.0, width=64, height=64)


def run_demo(output_dir: Path, *, images: int = 20, steps: int = 300, sample_steps: int = 25, finetune: bool = False) -> dict[str, float]:
    from lorakit.config import parse_train_args
    from lorakit.sampling.generate import image_grid
    from lorakit.training.finetune_setup import FINETUNE
    from lorakit.training.network_trainable import NETWORK
    from lorakit.training.run import train
    from lorakit.toy.score import concept_score
    from lorakit.toy.world import concept_prompts, make_dataset

    output_dir.mkdir(parents=True, exist_ok=True)
    data = output_dir / "dataset"
    if not data.exists():
        make_dataset(data, images, concept=True, seed=7, size=64, repeats=1)
    model, pretrained = prepare_base_model(output_dir)
    if not pretrained:
        print("note: the pretrained toy base model is not installed; using a random tiny model (its samples are noise)")
    prompts = concept_prompts()
    before = sample_rows(model, None, prompts, sample_steps)

    command = "finetune" if finetune else "train"
    args = (finetune_arguments if finetune else train_arguments)(model, data, output_dir, steps)
    print(f"lorakit {command} \\\n  " + " \\\n  ".join(args), flush=True)
    started = time.perf_counter()
    cfg, warnings = parse_train_args(args, command=command)  # a mistake raises ConfigError, which `lorakit` prints
    for warning in warnings:
        logging.getLogger("lorakit").warning(warning)
    train(cfg, FINETUNE if finetune else NETWORK)
    train_seconds = time.perf_counter() - started

    lora_file = None if finetune else output_dir / "demo_lora.safetensors"
    trained_model = output_dir / "demo_finetune" if finetune else model
    after = sample_rows(trained_model, lora_file, prompts, sample_steps)
    grid = image_grid([before, after])
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(output_dir / "samples_before_after.png")
    scores = {"before": concept_score(before), "after": concept_score(after), "train_seconds": train_seconds}
    print(f"\nconcept score ('{prompts[0]}' and 7 more prompts): before {scores['before']:.2f}  after {scores['after']:.2f}")
    print(f"training took {train_seconds:.0f} s; grid: {output_dir / 'samples_before_after.png'}; "
          f"{'model' if finetune else 'LoRA'}: {trained_model if finetune else lora_file}")
    return scores


def run_demo_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorakit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_output", type=Path)
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--images", type=int, default=20, help="training images of the held-out concept")
    parser.add_argument("--finetune", action="store_true", help="fine-tune the model's own weights (lorakit finetune) instead of a LoRA")
    args = parser.parse_args(argv)
    run_demo(args.output_dir, images=args.images, steps=args.steps, finetune=args.finetune)
    return 0
