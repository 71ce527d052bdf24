"""`lorakit generate`: sd-scripts' `gen_img.py` (and its minimal inference scripts') command lines, every family.

Options keep gen_img.py's names (`--ckpt`, `--outdir`, `--W`/`--H`, `--from_file`, `--network_weights`, ...) and
the minimal inference scripts' (`--ckpt_path`, `--output_dir`/`--out`, `--lora path;multiplier`, `--guidance`,
`--flux_dtype`, `--offload`), so their command lines work with the script replaced by `lorakit generate`. Options
of theirs that are not implemented are refused with a message, never ignored. The work is done in
`lorakit.sampling.gen_run`.
"""

from __future__ import annotations

import argparse
import logging

from lorakit.cli.option_types import OneLineErrorParser, finite_float, non_negative_float, positive_int, seed
from lorakit.families.registry import family_names

log = logging.getLogger("lorakit")

PART_FILES = ("vae", "clip_l", "clip_g", "t5xxl", "ae")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="lorakit generate", description="Generate images (sd-scripts gen_img.py options), any family.")
    model = p.add_argument_group("model")
    model.add_argument("--ckpt", "--ckpt_path", "--pretrained_model_name_or_path", dest="model", required=True,
                       help="the model: a single file or a diffusers folder (family detected)")
    model.add_argument("--family", choices=("auto", *family_names()), default="auto")
    for flag in ("--v1", "--sdxl"):
        model.add_argument(flag, action="store_true", help="accepted: the family is detected from the model")
    model.add_argument("--v2", action="store_true", help="an SD 2.x model")
    model.add_argument("--v_parameterization", action="store_true", help="a v-prediction model")
    for name in PART_FILES:
        model.add_argument(f"--{name}", default=None, help=f"the {name} part from a file of its own")

    prompts = p.add_argument_group("prompts and images")
    prompts.add_argument("--prompt", default=None, help="one prompt line (with --n --w --h --s --d --l --t --am ... options)")
    prompts.add_argument("--from_file", "--prompt_file", dest="from_file", default=None, help="a text file, one prompt line each")
    prompts.add_argument("--negative_prompt", default="", help="default negative prompt (a line's --n wins)")
    prompts.add_argument("--images_per_prompt", type=positive_int, default=1)
    prompts.add_argument("--n_iter", type=positive_int, default=1, help="passes over the prompts")
    prompts.add_argument("--batch_size", type=positive_int, default=1)
    prompts.add_argument("--seed", type=seed, default=None, help="see docs/generate.md for how seeds are drawn")
    prompts.add_argument("--iter_same_seed", action="store_true", help="one seed for every image of a pass")
    prompts.add_argument("--W", "--width", dest="width", type=positive_int, default=None)
    prompts.add_argument("--H", "--height", dest="height", type=positive_int, default=None)
    prompts.add_argument("--steps", type=positive_int, default=None, help="default 30")
    prompts.add_argument("--scale", "--cfg_scale", "--guidance_scale", dest="scale", type=non_negative_float, default=None,
                         help="CFG scale (default 7.5, SD3 5; FLUX: true CFG, default 1)")
    prompts.add_argument("--guidance", type=non_negative_float, default=None, help="FLUX's embedded guidance (default 3.5)")
    prompts.add_argument("--negative_scale", type=finite_float, default=None, help=argparse.SUPPRESS)
    prompts.add_argument("--sampler", "--sample_sampler", dest="sampler", default=None, help="ddim (default), euler_a, dpmsolver++, ...")
    prompts.add_argument("--clip_skip", type=positive_int, default=None)
    prompts.add_argument("--max_embeddings_multiples", type=positive_int, default=None, help="prompts up to 75 x this tokens")
    prompts.add_argument("--outdir", "--output_dir", "--out", dest="outdir", default="outputs")
    prompts.add_argument("--sequential_file_name", action="store_true", help="im_000001.png, ... instead of im_<time>_<n>_<seed>.png")

    nets = p.add_argument_group("networks")
    nets.add_argument("--network_module", nargs="*", default=None, help="accepted: the module is read from each file")
    nets.add_argument("--network_weights", nargs="*", default=None, help="LoRA (or any adapter lorakit trains) files")
    nets.add_argument("--network_mul", nargs="*", type=finite_float, default=None, help="one multiplier per file (default 1)")
    nets.add_argument("--network_dim", default=None, help="accepted: the rank is read from each file")
    nets.add_argument("--lora", "--lora_weights", dest="loras", action="extend", nargs="+", default=[], metavar="PATH[;MULTIPLIER]")
    nets.add_argument("--network_merge", "--merge_lora_weights", dest="network_merge", action="store_true",
                      help="merge the networks into the weights (faster; --am then cannot change them)")
    nets.add_argument("--textual_inversion_embeddings", nargs="*", default=[],
                      help="embedding files (sd-scripts', A1111's or diffusers' layout); write the file name in the prompt")
    nets.add_argument("--network_show_meta", action="store_true", help="log each network file's metadata")

    image = p.add_argument_group("img2img, inpainting, highres fix")
    image.add_argument("--image_path", default=None, help="init image (or a folder of them): img2img")
    image.add_argument("--mask_path", default=None, help="mask image (or folder): inpainting, white is repainted")
    image.add_argument("--strength", type=non_negative_float, default=None, help="img2img strength (default 0.8)")
    image.add_argument("--highres_fix_scale", type=non_negative_float, default=None, help="first pass at this fraction of the size")
    image.add_argument("--highres_fix_steps", type=positive_int, default=28)
    image.add_argument("--highres_fix_strength", type=non_negative_float, default=None)
    image.add_argument("--highres_fix_save_1st", action="store_true")
    image.add_argument("--highres_fix_latents_upscaling", action="store_true")
    image.add_argument("--highres_fix_disable_control_net", action="store_true", help="the second pass without ControlNet")

    control = p.add_argument_group("ControlNet")
    control.add_argument("--control_net_models", nargs="*", default=None,
                         help="ControlNet files (original layout) or diffusers folders: SD 1.x/2.x, FLUX.1")
    control.add_argument("--control_net_lllite_models", nargs="*", default=None, help="ControlNet-LLLite files: SDXL")
    control.add_argument("--control_net_multipliers", "--control_net_weights", dest="control_net_multipliers", nargs="*",
                         type=finite_float, default=None, help="one weight per ControlNet (default 1.0)")
    control.add_argument("--control_net_ratios", nargs="*", type=finite_float, default=None,
                         help="the fraction of the steps each ControlNet guides (default 1.0)")
    control.add_argument("--control_net_preps", nargs="*", default=None, help="canny_LOW_HIGH or none, one per ControlNet")
    control.add_argument("--guide_image_path", nargs="*", default=None,
                         help="control images (files or folders), used in turn; a prompt line's --cn wins")

    run = p.add_argument_group("precision, device, memory")
    run.add_argument("--dtype", "--precision", dest="dtype", default=None, help="fp32, fp16 or bf16")
    run.add_argument("--fp16", action="store_const", const="fp16", dest="dtype")
    run.add_argument("--bf16", action="store_const", const="bf16", dest="dtype")
    run.add_argument("--flux_dtype", "--denoiser_dtype", dest="denoiser_dtype", default=None, help="fp8 stores the denoiser's linears in float8")
    run.add_argument("--device", default=None)
    run.add_argument("--offload", action="store_true", help="CUDA: each model on the GPU only while it runs")
    run.add_argument("--apply_t5_attn_mask", action="store_true", help="SD3, FLUX.1: hide T5's padding (as lorakit sample)")
    run.add_argument("--apply_lg_attn_mask", action="store_true", help="SD3: hide CLIP-L/G's padding (as lorakit sample)")
    for flag in ("--xformers", "--sdpa", "--diffusers_xformers", "--opt_channels_last", "--no_half_vae", "--no_preview"):
        run.add_argument(flag, action="store_true", help="accepted: PyTorch's attention is used, in the model's precision")

    refused = p.add_argument_group("not available (refused with a message)")
    for name in NOT_AVAILABLE:
        refused.add_argument(f"--{name}", nargs="*", default=None, help=argparse.SUPPRESS)
    return p


CONTROL_OPTIONS = ("control_net_models", "control_net_lllite_models", "control_net_multipliers", "control_net_ratios",
                   "control_net_preps", "guide_image_path")

NOT_AVAILABLE = {
    "interactive": "prompts come from --prompt or --from_file",
    "from_module": "prompts come from --prompt or --from_file",
    "network_args": "each network is rebuilt from its file",
    "network_pre_calc": "use --network_merge",
    "network_merge_n_models": "use --network_merge (every network) or none",
    "network_regional_mask_max_color_codes": "regional prompts are not implemented",
    "highres_fix_upscaler": "the first pass is upscaled with LANCZOS (or --highres_fix_latents_upscaling)",
    "ds_depth_1": "Deep Shrink is not implemented",
    "gradual_latent_timesteps": "gradual latent is not implemented",
    "vae_batch_size": "the VAE decodes each batch at once",
}


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    from lorakit.sampling.gen_run import GenerateOptions, run_generate

    problems = [f"--{name}: not available in lorakit generate; {why}" for name, why in NOT_AVAILABLE.items() if getattr(args, name) is not None]
    networks = list(args.loras)
    weights, muls = args.network_weights or [], args.network_mul or []
    if len(muls) > len(weights):
        problems.append(f"--network_mul: {len(muls)} values for {len(weights)} --network_weights files")
    networks += [f"{path};{muls[i] if i < len(muls) else 1.0}" for i, path in enumerate(weights)]
    if args.network_show_meta:
        _show_meta(networks)
    options = GenerateOptions(
        model=args.model, outdir=args.outdir, family=args.family, v2=args.v2, v_parameterization=args.v_parameterization,
        model_files={n: getattr(args, n) for n in PART_FILES if getattr(args, n)}, prompt=args.prompt, from_file=args.from_file,
        negative_prompt=args.negative_prompt, images_per_prompt=args.images_per_prompt, n_iter=args.n_iter,
        batch_size=args.batch_size, seed=args.seed, iter_same_seed=args.iter_same_seed, width=args.width, height=args.height,
        steps=args.steps, scale=args.scale, guidance=args.guidance, negative_scale=args.negative_scale, sampler=args.sampler,
        clip_skip=args.clip_skip, max_embeddings_multiples=args.max_embeddings_multiples, networks=networks,
        network_merge=args.network_merge, embeddings=list(args.textual_inversion_embeddings or []),
        image_path=args.image_path, mask_path=args.mask_path, strength=args.strength,
        highres_fix_scale=args.highres_fix_scale, highres_fix_steps=args.highres_fix_steps,
        highres_fix_strength=args.highres_fix_strength, highres_fix_save_1st=args.highres_fix_save_1st,
        highres_fix_latents_upscaling=args.highres_fix_latents_upscaling, sequential_file_name=args.sequential_file_name,
        highres_fix_disable_control_net=args.highres_fix_disable_control_net,
        **{name: list(getattr(args, name) or []) for name in CONTROL_OPTIONS},
        dtype=args.dtype, denoiser_dtype=args.denoiser_dtype, device=args.device, offload=args.offload, problems=problems,
        text_masks=frozenset(n for n in ("apply_t5_attn_mask", "apply_lg_attn_mask") if getattr(args, n)),
    )
    for path in run_generate(options):
        print(f"wrote {path}")
    return 0


def _show_meta(networks: list[str]) -> None:
    from pathlib import Path

    from safetensors import safe_open

    for text in networks:
        path = text.rpartition(";")[0] or text
        if Path(path).suffix == ".safetensors" and Path(path).is_file():
            with safe_open(path, framework="pt") as handle:
                log.info("%s metadata: %s", path, handle.metadata())
