"""`lorakit sample` (also `lorakit lora sample`): images from a base model with LoRAs, for every family.

The options keep the names of sd-scripts' minimal inference scripts (`sdxl_minimal_inference.py`,
`sd3_minimal_inference.py`, `flux_minimal_inference.py`) and of `gen_img.py` where they differ, so their command
lines work with the script replaced by `lorakit sample`. The work is done by `lorakit.sampling.minimal`.
"""

from __future__ import annotations

import argparse
import logging

from lorakit.cli.option_types import OneLineErrorParser, finite_float, non_negative_float, positive_int, seed
from lorakit.families.registry import family_names

log = logging.getLogger("lorakit")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="lorakit sample",
        description="Generate images with LoRAs merged into a base model (SD 1.x/2.x, SDXL, SD3, FLUX.1).",
    )
    model = p.add_argument_group("model")
    model.add_argument("--ckpt_path", "--ckpt", "--pretrained_model_name_or_path", dest="model", required=True,
                       help="base model: a single file or a diffusers folder (family detected as in training)")
    model.add_argument("--family", choices=("auto", *family_names()), default="auto", help="default: detected")
    model.add_argument("--v2", action="store_true", help="SD 2.x model")
    model.add_argument("--v_parameterization", action="store_true", help="v-prediction model (SD 2.x 768-v)")
    for name, what in (("vae", "VAE"), ("clip_l", "CLIP-L text encoder (SD3, FLUX)"), ("clip_g", "CLIP-G text encoder (SD3)"),
                       ("t5xxl", "T5-XXL text encoder (SD3, FLUX)"), ("ae", "FLUX autoencoder")):
        model.add_argument(f"--{name}", default=None, help=f"{what} from its own file")

    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora", "--lora_weights", dest="loras", action="extend", nargs="+", default=[],
                      metavar="PATH[;MULTIPLIER]",
                      help="a LoRA file and its multiplier (default 1.0); repeat the option or give several. "
                           "Quote the value in a shell: ';' ends a command")
    lora.add_argument("--merge_lora_weights", "--network_merge", dest="merge_lora_weights", action="store_true",
                      help="accepted: LoRAs are always merged")
    # gen_img_diffusers.py's spelling: files and multipliers in two lists
    lora.add_argument("--network_module", nargs="*", default=None, help="accepted: the module is read from each file")
    lora.add_argument("--network_weights", nargs="*", default=None, help="LoRA files (with --network_mul)")
    lora.add_argument("--network_mul", nargs="*", type=finite_float, default=None,
                      help="one multiplier per --network_weights file (default 1.0)")

    image = p.add_argument_group("image")
    image.add_argument("--prompt", default=None, help="the prompt")
    image.add_argument("--negative_prompt", default="", help="the negative prompt")
    image.add_argument("--prompt_file", "--from_file", dest="prompt_file", default=None,
                       help=".txt/.toml/.json prompts with --n --w --h --s --d --l --ss --f line options, as training's "
                            "--sample_prompts (--f: the image's file name, as in gen_img.py)")
    image.add_argument("--width", type=positive_int, default=None, help="default: the model's resolution (512, 768 with v-param, 1024)")
    image.add_argument("--height", type=positive_int, default=None, help="default: the model's resolution")
    image.add_argument("--steps", "--sample_steps", dest="steps", type=positive_int, default=None, help="default 30")
    image.add_argument("--guidance_scale", "--cfg_scale", "--scale", "--guidance", dest="guidance_scale", type=non_negative_float,
                       default=None, help="CFG scale (FLUX: embedded guidance); default 7.5, SD3 5.0, FLUX 3.5")
    image.add_argument("--seed", type=seed, default=None, help="default: random (printed)")
    image.add_argument("--sampler", "--sample_sampler", dest="sampler", default=None,
                       help="a --sample_sampler name (ddim, euler_a, dpmsolver++, ...); SD3/FLUX use their flow sampler")
    image.add_argument("--clip_skip", type=positive_int, default=None, help="SD: use the n-th text-encoder layer from the end")
    image.add_argument("--output", "--output_dir", "--out", "--outdir", "-o", dest="output", default=".",
                       help="a .png file, or a folder for <time>_<prompt#>_<seed>.png files (default: .)")

    run = p.add_argument_group("precision and device")
    run.add_argument("--dtype", "--precision", dest="dtype", default=None,
                     help="fp32, fp16 or bf16 (default fp32 on the CPU, bf16 on CUDA where supported, else fp16)")
    run.add_argument("--flux_dtype", "--denoiser_dtype", dest="denoiser_dtype", default=None,
                     help="the denoiser's precision if it differs from --dtype; fp8 stores its linear weights in float8")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cuda if available, else cpu)")
    run.add_argument("--fp16", action="store_const", const="fp16", dest="dtype", help="same as --dtype fp16")
    run.add_argument("--bf16", action="store_const", const="bf16", dest="dtype", help="same as --dtype bf16")
    run.add_argument("--offload", action="store_true",
                     help="keep the models on the CPU, each moved to --device only while it runs (CUDA)")
    masks = p.add_argument_group("attention masks (sd3_minimal_inference.py, flux_minimal_inference.py)")
    masks.add_argument("--apply_t5_attn_mask", action="store_true",
                       help="SD3, FLUX.1: hide T5's padding in the encoder (FLUX.1: and from the transformer's attention)")
    masks.add_argument("--apply_lg_attn_mask", action="store_true", help="SD3: hide CLIP-L/G's padding in the encoders")

    later = p.add_argument_group("sd-scripts options not available here yet (refused with a message)")
    for name in NOT_YET:
        later.add_argument(f"--{name}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    return p


#: options of sd-scripts' minimal inference scripts that this command does not implement: refused, never ignored
NOT_YET = {
    "interactive": "prompts are read from --prompt or --prompt_file",
    "t5xxl_token_length": "the pipeline's T5 sequence length is used",
    "do_not_use_t5xxl": "the model's T5 is always used",
    "clip_l_dtype": "one --dtype covers the text encoders and the VAE",
    "t5xxl_dtype": "one --dtype covers the text encoders and the VAE",
    "ae_dtype": "one --dtype covers the text encoders and the VAE",
    "target_height": "SDXL size conditioning uses the image size",
    "target_width": "SDXL size conditioning uses the image size",
    "original_height": "SDXL size conditioning uses the image size",
    "original_width": "SDXL size conditioning uses the image size",
    "crop_top": "SDXL size conditioning uses no crop",
    "crop_left": "SDXL size conditioning uses no crop",
}


def main(argv: list[str]) -> int:
    """Parse, run, print where each image went. A LorakitError reaches the caller, which prints it (exit 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's own errors (status 2) and --help (0)
        return int(exc.code or 0)
    from lorakit.errors import ConfigError
    from lorakit.sampling.minimal import MODEL_FILE_OPTIONS, SampleOptions, run_sample

    refused = [f"--{name}: not available in lorakit sample yet; {why}" for name, why in NOT_YET.items() if getattr(args, name) is not None]
    if refused:
        raise ConfigError(refused)
    weights, muls = args.network_weights or [], args.network_mul or []
    if len(muls) > len(weights):
        raise ConfigError([f"--network_mul: {len(muls)} values for {len(weights)} --network_weights files"])
    loras = list(args.loras) + [f"{path};{muls[i] if i < len(muls) else 1.0}" for i, path in enumerate(weights)]
    model_files = {name: getattr(args, name) for name in MODEL_FILE_OPTIONS if getattr(args, name)}
    options = SampleOptions(
        model=args.model, loras=loras, prompt=args.prompt, negative_prompt=args.negative_prompt,
        prompt_file=args.prompt_file, width=args.width, height=args.height, steps=args.steps,
        guidance_scale=args.guidance_scale, seed=args.seed, sampler=args.sampler, clip_skip=args.clip_skip,
        output=args.output, dtype=args.dtype, denoiser_dtype=args.denoiser_dtype, device=args.device,
        family=args.family, v2=args.v2, v_parameterization=args.v_parameterization, model_files=model_files,
        offload=args.offload, apply_t5_attn_mask=args.apply_t5_attn_mask, apply_lg_attn_mask=args.apply_lg_attn_mask,
    )
    for path in run_sample(options):
        print(f"wrote {path}")
    return 0
