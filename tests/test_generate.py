"""`lorakit generate` against diffusers' own pipelines (an independent path): every family, with and without a
LoRA; img2img, inpainting and highres fix for SD 1.x and SDXL; batches, seeds, prompt options, PNG text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.cli.main import main
from lorakit.objectives.samplers import build_sampler

from test_sample_command import models, loras, write_random_lora  # noqa: F401  (module fixtures: tiny models, LoRAs)

PROMPT = "a red square on a blue background"
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}
TASKS = {("sd", "img2img"): "StableDiffusionImg2ImgPipeline", ("sd", "inpaint"): "StableDiffusionInpaintPipeline",
         ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline", ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline"}


def generate(model: Path, out: Path, *extra: str, prompt: str = PROMPT, seed: int = 7) -> list[Path]:
    argv = ["generate", "--ckpt", str(model), "--prompt", prompt, "--W", "64", "--H", "64", "--steps", "3",
            "--seed", str(seed), "--scale", "5", "--outdir", str(out), "--sequential_file_name", *extra]
    assert main(argv) == 0
    return sorted(out.glob("*.png"))


def pixels(path_or_image) -> np.ndarray:
    image = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_within_2(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a - b)
    assert diff.max() <= 2, (diff.max(), diff.mean())


def diffusers_pipe(family: str, model: Path, class_name: str | None = None):
    import diffusers

    pipe = getattr(diffusers, class_name or PIPELINES[family]).from_pretrained(str(model), local_files_only=True)
    if family in ("sd", "sdxl"):
        pipe.scheduler = build_sampler("ddim", "epsilon")  # generate's default sampler (gen_img.py's)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def theirs(family: str, pipe, seed: int = 7, **kwargs) -> np.ndarray:
    call = dict(prompt=PROMPT, negative_prompt="", num_inference_steps=3, width=64, height=64,
                generator=[torch.Generator().manual_seed(seed)])
    call.update({"guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 5.0})
    call.update(kwargs)
    return pixels(pipe(**call).images[0])


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_text_to_image_equals_diffusers(models, tmp_path, family):
    extra = ("--scale", "1") if family == "flux" else ()  # FLUX: --guidance 3.5 embedded, no true CFG
    ours = generate(models[family], tmp_path, *extra)
    assert len(ours) == 1
    assert_within_2(pixels(ours[0]), theirs(family, diffusers_pipe(family, models[family])))


def peft_file(kohya: Path, tmp_path: Path) -> Path:
    """The LoRA in the diffusers/PEFT layout (what diffusers reads for every family)."""
    out = tmp_path / f"{kohya.stem}_peft.safetensors"
    assert main(["lora", "convert", "--model", str(kohya), "--save_to", str(out), "--to", "diffusers"]) == 0
    return out


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_lora_unmerged_and_merged_equal_diffusers(models, loras, tmp_path, family):
    extra = ("--scale", "1") if family == "flux" else ()
    attached = pixels(generate(models[family], tmp_path / "attached", "--network_module", "networks.lora",
                               "--network_weights", str(loras[family]), "--network_mul", "0.8", *extra)[0])
    pipe = diffusers_pipe(family, models[family])
    base = theirs(family, pipe)
    lora_file = loras[family] if family in ("sd", "sdxl") else peft_file(loras[family], tmp_path)
    pipe.load_lora_weights(str(lora_file), adapter_name="file")
    pipe.set_adapters(["file"], [0.8])
    expected = theirs(family, pipe)
    assert np.abs(expected - base).mean() > 1.0  # the LoRA shows
    assert_within_2(attached, expected)
    if family in ("sd", "flux"):  # merged into the weights (lorakit sample's tests cover every family's merge)
        merged = pixels(generate(models[family], tmp_path / "merged", "--lora", f"{loras[family]};0.8", "--network_merge", *extra)[0])
        assert_within_2(merged, expected)


@pytest.fixture(scope="module")
def init_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    gradient = np.linspace(0, 255, 64, dtype=np.uint8)
    image = np.stack([np.tile(gradient, (64, 1)), np.tile(gradient[:, None], (1, 64)), np.full((64, 64), 90, np.uint8)], -1)
    Image.fromarray(image).save(root / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root / "init.png", root / "mask.png"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpainting_equal_diffusers(models, init_files, tmp_path, family, task):
    init, mask = init_files
    extra = ["--image_path", str(init), "--strength", "0.7"] + (["--mask_path", str(mask)] if task == "inpaint" else [])
    ours = pixels(generate(models[family], tmp_path, *extra)[0])
    kwargs = {"image": [Image.open(init).convert("RGB")], "strength": 0.7}
    if task == "inpaint":
        kwargs["mask_image"] = [Image.open(mask).convert("L")]
    assert_within_2(ours, theirs(family, diffusers_pipe(family, models[family], TASKS[(family, task)]), **kwargs))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_highres_fix_equals_diffusers_two_passes(models, tmp_path, family):
    ours = generate(models[family], tmp_path, "--W", "128", "--H", "128", "--highres_fix_scale", "0.5",
                    "--highres_fix_steps", "2", "--strength", "0.6", "--highres_fix_save_1st")
    assert [p.name for p in ours] == ["im_0000001.png", "im_1000001.png"]
    first = diffusers_pipe(family, models[family])(prompt=PROMPT, negative_prompt="", num_inference_steps=2, width=64, height=64,
                                                    guidance_scale=5.0, generator=[torch.Generator().manual_seed(7)]).images[0]
    assert_within_2(pixels(ours[0]), pixels(first))
    second = theirs(family, diffusers_pipe(family, models[family], TASKS[(family, "img2img")]), seed=8, width=128, height=128,
                    image=[first.resize((128, 128), resample=Image.LANCZOS)], strength=0.6)
    assert_within_2(pixels(ours[1]), second)


def test_batches_seeds_prompt_file_and_png_text(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# a comment\n{PROMPT} --n ugly --d 11,12 --s 2\n\n(blue:1.3) circle, {'word ' * 90}--l 4 --f named\n",
                       encoding="utf-8")
    out = tmp_path / "batched"
    assert main(["generate", "--ckpt", str(models["sd"]), "--from_file", str(prompts), "--images_per_prompt", "2",
                 "--batch_size", "2", "--W", "64", "--H", "64", "--seed", "3", "--max_embeddings_multiples", "3",
                 "--outdir", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 4 and (out / "named.png").exists() and (out / "named_004.png").exists()
    texts = [Image.open(f).text for f in files if not f.name.startswith("named")]
    seeds = sorted(int(t["seed"]) for t in texts if t["prompt"] == PROMPT)
    assert seeds == [11, 12]
    first = next(t for t in texts if t["seed"] == "11")
    assert first["negative-prompt"] == "ugly" and first["steps"] == "2" and first["sampler"] == "ddim" and first["scale"] == "7.5"
    # the same seed alone (batch 1) gives the same image as inside the batch
    single = generate(models["sd"], tmp_path / "single", prompt=f"{PROMPT} --n ugly --s 2", seed=11, *("--scale", "7.5"))
    batched = next(f for f in files if Image.open(f).text.get("seed") == "11")
    assert_within_2(pixels(single[0]), pixels(batched))


def test_seed_rules(models, tmp_path):
    from lorakit.sampling.gen_jobs import PromptSettings, image_jobs

    fixed = generate(models["sd"], tmp_path / "a", seed=42)
    assert Image.open(fixed[0]).text["seed"] == "42"
    same = generate(models["sd"], tmp_path / "b", "--images_per_prompt", "2", "--iter_same_seed", seed=42)
    assert len({Image.open(f).text["seed"] for f in same}) == 1
    prompt = PromptSettings("p", "", 64, 64, 2, 5.0)

    def drawn(seed):
        return [j.seed for j in image_jobs([prompt, prompt], images_per_prompt=2, n_iter=1, seed=seed, iter_same_seed=False,
                                           init_images=[], mask_images=[])]

    assert drawn(42) == drawn(42) and len(set(drawn(42))) == 4 and drawn(None) != drawn(None)


def test_per_prompt_network_multipliers(models, loras, tmp_path):
    zero = generate(models["sd"], tmp_path / "zero", "--network_weights", str(loras["sd"]), prompt=f"{PROMPT} --am 0")
    base = generate(models["sd"], tmp_path / "base")
    assert np.array_equal(pixels(zero[0]), pixels(base[0]))


SEED_001_FLUX = ('--ckpt {model} --clip_l {clip_l} --t5xxl {t5xxl} --ae {ae} --dtype bf16 --prompt "a cat holding a sign '
                 'that says hello world" --out {out} --seed 1 --flux_dtype fp8 --offload --lora {lora};1.0')


def test_seed_001_flux_minimal_inference_command(tmp_path):
    """Seed 001's flux_minimal_inference.py command, with only the paths changed (64 px, 2 steps added to keep it fast)."""
    import shlex

    from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files

    files = save_bfl_files(build_tiny_flux(0), tmp_path / "bfl")
    command = SEED_001_FLUX.format(model=files["flux1"], clip_l=files["clip_l"], t5xxl=files["t5xxl"], ae=files["ae"],
                                   out=tmp_path / "out", lora=_flux_lora(tmp_path))
    assert main(["generate", *shlex.split(command), "--width", "64", "--height", "64", "--steps", "2"]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def _flux_lora(tmp_path: Path) -> Path:
    from lorakit.families.flux.tiny import build_tiny_flux, save_pipeline_folder

    folder = save_pipeline_folder(build_tiny_flux(0), tmp_path / "flux_folder")
    return write_random_lora(folder, tmp_path / "flux_lora.safetensors", seed=2, scale=0.5)


SEED_003_GEN_IMG = ("--ckpt {model} --outdir {out} --xformers --fp16 --W 64 --H 64 --scale 7 --sampler k_euler_a --steps 2 "
                    "--network_module networks.lora --network_weights {lora} --network_dim 4 --network_mul 0.7 "
                    '--prompt "a photo of sks toy --n lowres" --seed 5 --batch_size 1 --images_per_prompt 2')


def test_seed_003_gen_img_network_command(models, loras, tmp_path):
    import shlex

    command = SEED_003_GEN_IMG.format(model=models["sd"], out=tmp_path / "out", lora=loras["sd"])
    assert main(["generate", *shlex.split(command)]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_refusals_are_listed_together(models, tmp_path, capsys):
    code = main(["generate", "--ckpt", str(models["sd3"]), "--prompt", "x", "--image_path", "nowhere.png",
                 "--textual_inversion_embeddings", "a.pt", "--sampler", "nonsense", "--outdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    for fragment in ("img2img is not available", "nowhere.png: file or folder not found", "--textual_inversion_embeddings",
                     "unknown sampler"):
        assert fragment in err


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_textual_inversion_embedding_equals_diffusers(models, tmp_path, family):
    """An sd-scripts-layout embedding (SD: `emb_params`; SDXL: `clip_l`, `clip_g`), two vectors, used by its file name."""
    from safetensors.torch import save_file

    pipe = diffusers_pipe(family, models[family])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    generator = torch.Generator().manual_seed(4)
    vectors = [torch.randn(2, e.get_input_embeddings().weight.shape[1], generator=generator) for e in encoders]
    file = tmp_path / "sksemb.safetensors"
    save_file({"emb_params": vectors[0]} if family == "sd" else {"clip_l": vectors[0], "clip_g": vectors[1]}, file)
    prompt = "a photo of sksemb on a table"
    ours = pixels(generate(models[family], tmp_path / "ti", "--textual_inversion_embeddings", str(file), prompt=prompt)[0])
    base = pixels(generate(models[family], tmp_path / "base", prompt="a photo of on a table")[0])
    assert np.abs(ours - base).mean() > 1.0
    if family == "sd":
        pipe.load_textual_inversion(vectors[0], token="sksemb")
    else:
        pipe.load_textual_inversion(vectors[0], token="sksemb", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(vectors[1], token="sksemb", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    assert_within_2(ours, theirs(family, pipe, prompt=prompt))
