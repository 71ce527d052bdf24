"""Quality of what lorakit trains with given options, on the toy world's tasks.

    python benchmarks/quality.py --steps 150 -- --network_dim=4 --network_alpha=4
    python benchmarks/quality.py --steps 150 -- --network_args conv_dim=8 conv_alpha=8
    python benchmarks/quality.py --task textual-inversion --steps 200
    python benchmarks/quality.py --task controlnet --steps 600 --images 100
    python benchmarks/quality.py --finetune --steps 300            # lorakit finetune: the whole U-Net trains

`--task lora` (the default) trains on the demo's concept dataset (extra `lorakit train` options after `--` override
the demo's), then reports the concept score of samples (fraction of images showing the concept, 0..1) and the
held-out denoising loss with and without the LoRA. `--task textual-inversion` trains a token for the held-out
colour (`lorakit textual-inversion`) and reports the concept score of prompts naming the token, before and after.
`--task controlnet` trains a ControlNet on shape masks (`lorakit controlnet`) and reports the mean IoU between
held-out masks and the generated shapes, for the base model and with the ControlNet. One JSON line each, so options
can be compared on the same task; `--picture FILE` also writes the samples as a grid.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from lorakit.cli.main import main as lorakit_main
from lorakit.sampling.generate import image_grid
from lorakit.toy import tasks
from lorakit.toy.demo import base_model_dir, finetune_arguments, sample_rows, train_arguments
from lorakit.toy.evaluate import denoising_loss, held_out_concept_set, load_with_lora
from lorakit.toy.score import concept_score
from lorakit.toy.world import concept_prompts, make_dataset


def merge_options(defaults: list[str], overrides: list[str]) -> list[str]:
    """The demo's options with any option named in `overrides` replaced."""
    names = {o.split("=", 1)[0] for o in overrides if o.startswith("--")}
    kept = [o for o in defaults if o.split("=", 1)[0] not in names]
    return kept + overrides


def main() -> None:
    if "--" in sys.argv:
        cut = sys.argv.index("--")
        own, extra = sys.argv[1:cut], sys.argv[cut + 1:]
    else:
        own, extra = sys.argv[1:], []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("lora", "textual-inversion", "controlnet"), default="lora")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--sample_steps", type=int, default=20)
    parser.add_argument("--picture", type=Path, default=None, help="write the samples (before / after) here")
    parser.add_argument("--finetune", action="store_true", help="fine-tune the model's own weights instead of a LoRA")
    args = parser.parse_args(own)
    model = base_model_dir()
    if model is None:
        raise SystemExit("the pretrained toy base model is not installed")
    if args.task != "lora":
        run = textual_inversion_task if args.task == "textual-inversion" else controlnet_task
        print(json.dumps(run(model, args, extra)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_dataset(work / "data", args.images, concept=True, seed=7, size=64, repeats=1)
        arguments = finetune_arguments if args.finetune else train_arguments
        options = merge_options(arguments(model, data, work / "out", args.steps), extra)
        started = time.perf_counter()
        if lorakit_main(["finetune" if args.finetune else "train", *options]) != 0:
            raise SystemExit(2)
        seconds = time.perf_counter() - started
        # a fine-tune is a new model (a diffusers folder); a LoRA is applied to the base model
        trained, lora = (work / "out" / "demo_finetune", None) if args.finetune else (model, work / "out" / "demo_lora.safetensors")
        suffix = "finetune" if args.finetune else "lora"
        held_out = held_out_concept_set()
        result = {
            "command": "finetune" if args.finetune else "train",
            "options": extra,
            "steps": args.steps,
            "train_seconds": round(seconds, 1),
            "heldout_loss_base": round(denoising_loss(*load_with_lora(model, None), held_out), 5),
            f"heldout_loss_{suffix}": round(denoising_loss(*load_with_lora(trained, lora), held_out), 5),
            "concept_score_base": concept_score(sample_rows(model, None, concept_prompts(), args.sample_steps)),
            f"concept_score_{suffix}": concept_score(sample_rows(trained, lora, concept_prompts(), args.sample_steps)),
        }
    print(json.dumps(result))


def _train(command: str, options: list[str]) -> float:
    started = time.perf_counter()
    if lorakit_main([command, *options]) != 0:
        raise SystemExit(2)
    return round(time.perf_counter() - started, 1)


def textual_inversion_task(model: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """A token for the held-out colour: concept score of the token prompts before and after."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = tasks.ti_dataset(work / "data", args.images)
        seconds = _train("textual-inversion", merge_options(tasks.ti_arguments(model, data, work / "out", args.steps), extra))
        before = tasks.ti_samples(model, None, args.sample_steps)
        after = tasks.ti_samples(model, work / "out" / "toy_embedding.safetensors", args.sample_steps)
    if args.picture:
        image_grid([before, after]).save(args.picture)
    return {"task": "textual-inversion", "options": extra, "steps": args.steps, "train_seconds": seconds,
            "concept_score_base": concept_score(before), "concept_score_token": concept_score(after)}


def controlnet_task(model: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """Shapes where a mask says: mean IoU on held-out masks, base model alone and with the ControlNet."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pictures, masks = tasks.control_dataset(work / "data", args.images)
        options = merge_options(tasks.control_arguments(model, pictures, masks, work / "out", args.steps), extra)
        seconds = _train("controlnet", options)
        base, base_images = tasks.control_score(model, None, args.sample_steps)
        trained, images = tasks.control_score(model, work / "out" / "toy_controlnet.safetensors", args.sample_steps)
    if args.picture:
        image_grid([[tasks.mask_of(s) for s in tasks.held_out_scenes()][:8], base_images[:8], images[:8]]).save(args.picture)
    return {"task": "controlnet", "options": extra, "steps": args.steps, "images": args.images,
            "train_seconds": seconds, "mean_iou_base": round(base, 3), "mean_iou_controlnet": round(trained, 3)}


if __name__ == "__main__":
    main()
