"""`lorakit textual-inversion` on tiny SD 1.5 and SDXL models: sd-scripts' options and file, only the new vectors
change, sample prompts use the token, diffusers' `load_textual_inversion` renders what lorakit samples, exact
resume, and the option checks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from helpers import load_local_pipeline, write_dreambooth_folder, write_tiny_checkpoints
from lorakit.cli.main import main
from lorakit.families.base import ModelSource
from lorakit.families.registry import get_family
from lorakit.objectives.samplers import build_sampler
from lorakit.sampling.generate import generate_sample
from lorakit.sampling.prompts import SamplePrompt
from lorakit.training.textual_inversion import TEXTUAL_INVERSION


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ti_sd"), "sd1")["folder"]


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> Path:
    from lorakit.families.sdxl.tiny import build_tiny_sdxl, save_sdxl_diffusers_folder

    folder = tmp_path_factory.mktemp("ti_sdxl") / "sdxl"
    save_sdxl_diffusers_folder(build_tiny_sdxl(seed=0), folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dreambooth_folder(tmp_path_factory.mktemp("ti_data"))


def ti_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["textual-inversion", f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}",
            "--resolution=64", f"--output_dir={out}", "--token_string=zqx", "--init_word=toy",
            "--num_vectors_per_token=2", "--max_train_steps=3", "--learning_rate=5e-2", "--seed=1",
            "--max_data_loader_n_workers=0", "--caption_extension=.caption", *extra]


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_sd_embedding_file_and_samples_with_the_token(sd_model, data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of zqx --d 3 --w 64 --h 64 --s 2\n")
    out = tmp_path / "out"
    assert main(ti_args(sd_model, data, out, "--use_object_template", f"--sample_prompts={prompts}",
                        "--sample_every_n_steps=3")) == 0
    tensors, meta = read(out / "zqx.safetensors")  # named after the token, as sd-scripts does
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (2, 32)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert not any(key.startswith("ss_") for key in meta)  # sd-scripts writes the ModelSpec only
    assert len(list((out / "sample").glob("zqx_000003_00_*.png"))) == 1
    base = load_local_pipeline(__import__("diffusers").StableDiffusionPipeline, sd_model, safety_checker=None)
    toy = base.text_encoder.get_input_embeddings().weight[base.tokenizer.encode("toy", add_special_tokens=False)[0]]
    for vector in tensors["emb_params"]:  # both started from --init_word and moved
        assert 0 < (vector - toy).abs().max() < 1.0


def test_only_the_new_vectors_change(sd_model):
    family = get_family("sd")
    comps = family.load_model(ModelSource(str(sd_model)))
    encoder = comps.text_encoders[0]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    cfg = SimpleNamespace(token_string="zqx", num_vectors_per_token=2, init_word="toy", weights=None)
    trainable = TEXTUAL_INVERSION.build(cfg, None, family, comps, torch.device("cpu"))
    start = trainable.module.rows[0].detach().clone()
    toy = comps.tokenizers[0].encode("toy", add_special_tokens=False)[0]
    torch.testing.assert_close(start[0], encoder.get_input_embeddings().weight[toy], rtol=0, atol=0)
    optimizer = torch.optim.AdamW(trainable.trainable_parameters(), lr=0.1, weight_decay=0.5)
    ids = comps.tokenizers[0](["a zqx zqx1 toy"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    for _ in range(3):
        encoder(ids).last_hidden_state.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = encoder.state_dict()
    assert set(after) == set(before)  # the vectors are not part of the encoder
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # every row of the table bit-identical
    assert not torch.equal(trainable.module.rows[0], start)


def _lorakit_sample(model: Path, family_name: str, embedding: Path, prompt: str, control_seed: int = 5):
    """What lorakit's training samples render, continuing from the embedding file (--weights)."""
    family = get_family(family_name)
    comps = family.load_model(ModelSource(str(model)))
    cfg = SimpleNamespace(token_string="zqx", num_vectors_per_token=2, init_word=None, weights=str(embedding))
    trainable = TEXTUAL_INVERSION.build(cfg, None, family, comps, torch.device("cpu"))
    pipe = trainable.sample_pipeline(family, comps, "ddim")
    pipe.set_progress_bar_config(disable=True)
    spelled, inputs = trainable.sample_inputs(SamplePrompt(0, prompt, width=64, height=64, seed=control_seed,
                                                           sample_steps=3, scale=5.0))
    return generate_sample(pipe, spelled, inputs=inputs, output_type="np")


def test_diffusers_load_textual_inversion_renders_what_lorakit_samples_sd(sd_model, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert main(ti_args(sd_model, data, tmp_path)) == 0
    ours = _lorakit_sample(sd_model, "sd", tmp_path / "zqx.safetensors", "a photo of zqx")
    pipe = load_local_pipeline(StableDiffusionPipeline, sd_model, safety_checker=None)
    pipe.scheduler = build_sampler("ddim", "epsilon")  # the sampler lorakit's samples use
    pipe.load_textual_inversion(str(tmp_path / "zqx.safetensors"), token="zqx")
    theirs = pipe("a photo of zqx", num_inference_steps=3, guidance_scale=5.0, width=64, height=64,
                  generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    base = pipe("a photo of", num_inference_steps=3, guidance_scale=5.0, width=64, height=64,
                generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    assert abs(ours - theirs).max() < 1e-4
    assert abs(ours - base).max() > 1e-3  # the token does something


def test_sdxl_clip_l_and_clip_g_and_diffusers(sdxl_model, data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    assert main(ti_args(sdxl_model, data, tmp_path, "--output_name=emb")) == 0
    tensors, meta = read(tmp_path / "emb.safetensors")
    assert sorted(tensors) == ["clip_g", "clip_l"] and tensors["clip_l"].shape[0] == 2
    assert meta["modelspec.architecture"].endswith("/textual-inversion")
    ours = _lorakit_sample(sdxl_model, "sdxl", tmp_path / "emb.safetensors", "a photo of zqx")
    pipe = load_local_pipeline(StableDiffusionXLPipeline, sdxl_model)
    pipe.scheduler = build_sampler("ddim", "epsilon")
    pipe.load_textual_inversion(tensors["clip_l"], token="zqx", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token="zqx", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    theirs = pipe("a photo of zqx", num_inference_steps=3, guidance_scale=5.0, width=64, height=64,
                  generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    assert abs(ours - theirs).max() < 1e-4


def test_exact_resume(sd_model, data, tmp_path):
    full, first, resumed = tmp_path / "full", tmp_path / "first", tmp_path / "resumed"
    extra = ("--save_every_n_steps=2", "--save_state", "--max_train_steps=4")
    assert main(ti_args(sd_model, data, full, *extra)) == 0
    assert main(ti_args(sd_model, data, first, *extra)) == 0
    assert main(ti_args(sd_model, data, resumed, *extra, f"--resume={first / 'zqx-step00000002-state'}")) == 0
    assert torch.equal(read(full / "zqx.safetensors")[0]["emb_params"], read(resumed / "zqx.safetensors")[0]["emb_params"])


def test_option_checks_together(sd_model, data, tmp_path, capsys):
    args = ti_args(sd_model, data, tmp_path, "--cache_text_encoder_outputs", "--lllite", "--weights=missing.pt")
    args.remove("--token_string=zqx")
    assert main(args) == 2
    err = capsys.readouterr().err
    for part in ("--token_string is required", "--cache_text_encoder_outputs cannot", "--lllite belongs to",
                 "--weights missing.pt does not exist"):
        assert part in err
    assert main(ti_args(sd_model, data, tmp_path, "--token_string=toy")) == 2
    assert "already has this word" in capsys.readouterr().err
