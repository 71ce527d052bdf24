"""Quality of a LoRA trained with given options on the toy world's held-out concept.

    python benchmarks/quality.py --steps 150 -- --network_dim=4 --network_alpha=4
    python benchmarks/quality.py --steps 150 -- --network_args conv_dim=8 conv_alpha=8
    python benchmarks/quality.py --finetune --steps 300            # lorakit finetune: the whole U-Net trains

Trains on the demo's concept dataset (extra `lorakit train` options after `--` override the demo's), then reports
the concept score of samples (fraction of images showing the concept, 0..1) and the held-out denoising loss
with and without the LoRA, as one JSON line, so options can be compared on the same task.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from lorakit.cli.main import main as lorakit_main
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
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--sample_steps", type=int, default=20)
    parser.add_argument("--finetune", action="store_true", help="fine-tune the model's own weights instead of a LoRA")
    args = parser.parse_args(own)
    model = base_model_dir()
    if model is None:
        raise SystemExit("the pretrained toy base model is not installed")
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


if __name__ == "__main__":
    main()
