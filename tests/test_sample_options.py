"""`lorakit sample`'s options from other sd-scripts scripts, each by its effect: gen_img_diffusers.py's
--network_module/--network_weights/--network_mul, the prompt line's --f (file name), sd3/flux_minimal_inference.py's
--apply_t5_attn_mask / --apply_lg_attn_mask (against diffusers' pipelines given the masked encodings, or for FLUX.1
the prompt without padding), and --offload (diffusers' model offload: each model moved in only while it runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.cli.main import main

from test_sample_command import PROMPT, loras, models, sample  # noqa: F401  (module fixtures)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_within_2(a: np.ndarray, b: np.ndarray) -> None:
    assert np.abs(a - b).max() <= 2, (np.abs(a - b).max(), np.abs(a - b).mean())


def test_gen_img_network_options_are_the_lora_option(models, loras, tmp_path):
    spelled = sample(models["sd"], tmp_path / "a.png", "--network_module", "networks.lora", "--network_weights",
                     str(loras["sd"]), str(loras["sd_rank8"]), "--network_mul", "0.6")
    ours = sample(models["sd"], tmp_path / "b.png", "--lora", f"{loras['sd']};0.6", "--lora", f"{loras['sd_rank8']};1")
    base = sample(models["sd"], tmp_path / "c.png")
    assert np.array_equal(spelled, ours) and np.abs(spelled - base).mean() > 1.0
    code = main(["sample", "--ckpt_path", str(models["sd"]), "--prompt", "x", "--network_weights", str(loras["sd"]),
                 "--network_mul", "0.5", "0.7", "--output", str(tmp_path / "d.png")])
    assert code == 2 and not (tmp_path / "d.png").exists()


def test_prompt_line_f_names_the_image(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --f first --d 3 --s 1\na blue circle --d 4 --s 1\nagain --f first --d 5 --s 1\n",
                       encoding="utf-8")
    out = tmp_path / "images"
    assert main(["sample", "--ckpt_path", str(models["sd"]), "--prompt_file", str(prompts), "--output", str(out),
                 "--width", "64", "--height", "64"]) == 0
    names = sorted(f.name for f in out.glob("*.png"))
    assert "first.png" in names and "first_02.png" in names and len(names) == 3
    assert any(name.endswith("_01_4.png") for name in names)  # no --f: training's naming


def test_flux_t5_mask_is_the_prompt_without_padding(models, tmp_path):
    """T5 padding hidden from T5 and from every attention = no padding at all (the text positions are all zero):
    diffusers' FluxPipeline with max_sequence_length = the prompt's token count."""
    from diffusers import FluxPipeline

    masked = sample(models["flux"], tmp_path / "masked.png", "--apply_t5_attn_mask")
    base = sample(models["flux"], tmp_path / "base.png")
    assert np.abs(masked - base).mean() > 1.0
    pipe = FluxPipeline.from_pretrained(str(models["flux"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    tokens = len(pipe.tokenizer_2(PROMPT).input_ids)
    theirs = pipe(prompt=PROMPT, guidance_scale=5.0, num_inference_steps=2, width=64, height=64,
                  max_sequence_length=tokens, generator=torch.Generator().manual_seed(1)).images[0]
    assert_within_2(masked, pixels(theirs))


def _sd3_masked_embeds(pipe, text: str, lg: bool, t5: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's conditioning with the masked encoders not attending to padding and their padded outputs zeroed."""
    def run(encoder, tokenizer, length, masked, clip):
        tokens = tokenizer([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask if masked else None
        out = encoder(tokens.input_ids, attention_mask=mask, output_hidden_states=clip)
        hidden = out.hidden_states[-2] if clip else out.last_hidden_state
        hidden = hidden * tokens.attention_mask[..., None] if masked else hidden
        return hidden, (out[0] if clip else None)

    with torch.no_grad():
        l, l_pooled = run(pipe.text_encoder, pipe.tokenizer, 77, lg, True)
        g, g_pooled = run(pipe.text_encoder_2, pipe.tokenizer_2, 77, lg, True)
        t5_hidden, _ = run(pipe.text_encoder_3, pipe.tokenizer_3, 256, t5, False)
    clip = torch.nn.functional.pad(torch.cat([l, g], dim=-1), (0, t5_hidden.shape[-1] - l.shape[-1] - g.shape[-1]))
    return torch.cat([clip, t5_hidden], dim=-2), torch.cat([l_pooled, g_pooled], dim=-1)


@pytest.mark.parametrize("masks", [("--apply_t5_attn_mask",), ("--apply_lg_attn_mask", "--apply_t5_attn_mask")])
def test_sd3_masks_equal_diffusers_given_the_masked_encodings(models, tmp_path, masks):
    from diffusers import StableDiffusion3Pipeline

    masked = sample(models["sd3"], tmp_path / "masked.png", *masks)
    base = sample(models["sd3"], tmp_path / "base.png")
    assert np.abs(masked - base).mean() > 1.0
    pipe = StableDiffusion3Pipeline.from_pretrained(str(models["sd3"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    lg, t5 = "--apply_lg_attn_mask" in masks, "--apply_t5_attn_mask" in masks
    embeds, pooled = _sd3_masked_embeds(pipe, PROMPT, lg, t5)
    negative, negative_pooled = _sd3_masked_embeds(pipe, "", lg, t5)
    theirs = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                  negative_pooled_prompt_embeds=negative_pooled, guidance_scale=5.0, num_inference_steps=2, width=64,
                  height=64, generator=torch.Generator().manual_seed(1)).images[0]
    assert_within_2(masked, pixels(theirs))


def test_masks_are_refused_where_the_family_has_none(models, tmp_path, capsys):
    code = main(["sample", "--ckpt_path", str(models["sd"]), "--prompt", "x", "--apply_t5_attn_mask",
                 "--output", str(tmp_path / "x.png")])
    assert code == 2 and "--apply_t5_attn_mask: SD 1.x/2.x models have no such text attention mask" in capsys.readouterr().err


def test_offload_moves_each_model_in_only_while_it_runs(models):
    """diffusers' model offload as --offload installs it on a CUDA device, here onto the CPU (the one device a CPU
    machine has): each model is moved in when it runs and out when the next one runs; the image is unchanged."""
    from lorakit.families.base import ModelSource
    from lorakit.families.registry import get_family
    from lorakit.sampling.generate import generate_sample
    from lorakit.sampling.minimal import install_offload
    from lorakit.sampling.prompts import SamplePrompt

    family = get_family("sd")
    pipe = family.pipeline(family.load_model(ModelSource(str(models["sd"]))))
    pipe.set_progress_bar_config(disable=True)
    prompt = SamplePrompt(0, PROMPT, "", 64, 64, 1, 2, 5.0)
    before = pixels(generate_sample(pipe, prompt))
    moves: list[str] = []
    for name in ("text_encoder", "unet", "vae"):
        module = getattr(pipe, name)
        real = module.to
        module.to = lambda *a, _real=real, _name=name, **k: (moves.append(_name), _real(*a, **k))[1]
    install_offload(pipe, torch.device("cpu"))
    moves.clear()
    after = pixels(generate_sample(pipe, prompt))
    assert np.array_equal(before, after)
    assert all(getattr(pipe, n)._hf_hook.execution_device is not None for n in ("text_encoder", "unet", "vae"))
    last_text_encoder_move = len(moves) - 1 - moves[::-1].index("text_encoder")
    assert moves.count("text_encoder") >= 2 and last_text_encoder_move < moves.index("unet") < moves.index("vae")


def test_chroma_takes_the_t5_mask_it_always_has(tmp_path):
    """sd-scripts requires --apply_t5_attn_mask for Chroma; diffusers' ChromaPipeline always masks T5's padding, so
    the option is taken and the image is the pipeline's masked one."""
    from lorakit.families.chroma.tiny import build_tiny_chroma, save_pipeline_folder

    model = save_pipeline_folder(build_tiny_chroma(0), tmp_path / "chroma")
    masked = sample(model, tmp_path / "masked.png", "--apply_t5_attn_mask")
    assert np.array_equal(masked, sample(model, tmp_path / "plain.png"))


def test_generate_takes_the_masks_too(models, tmp_path):
    """`lorakit generate --apply_t5_attn_mask` on FLUX.1: the prompt without padding, as diffusers encodes it with
    max_sequence_length = its token count (two images with their own seeds, made one at a time)."""
    from diffusers import FluxPipeline

    out = tmp_path / "gen"
    assert main(["generate", "--ckpt", str(models["flux"]), "--prompt", PROMPT, "--W", "64", "--H", "64", "--steps", "2",
                 "--scale", "1", "--seed", "3", "--images_per_prompt", "2", "--batch_size", "2", "--outdir", str(out),
                 "--sequential_file_name", "--apply_t5_attn_mask"]) == 0
    images = sorted(out.glob("*.png"))
    assert len(images) == 2
    pipe = FluxPipeline.from_pretrained(str(models["flux"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seed = int(Image.open(images[1]).text["seed"])
    theirs = pipe(prompt=PROMPT, guidance_scale=3.5, num_inference_steps=2, width=64, height=64,
                  max_sequence_length=len(pipe.tokenizer_2(PROMPT).input_ids),
                  generator=torch.Generator().manual_seed(seed)).images[0]
    assert_within_2(pixels(Image.open(images[1])), pixels(theirs))
