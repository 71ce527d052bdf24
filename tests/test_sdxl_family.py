"""SDXL family: offline loading (diffusers folder, SGM .safetensors/.ckpt), conditioning, LoRA names as
sd-scripts writes them, metadata, errors for non-SDXL files, and two training steps through `lorakit train`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import init_empty_weights
from safetensors import safe_open

from helpers import write_dreambooth_folder, write_tiny_checkpoints, targets_of
from lorakit.cli.main import main
from lorakit.errors import CheckpointError
from lorakit.families import registry
from lorakit.families.sdxl import loading, sgm_keys
from lorakit.families.sdxl.family import StableDiffusionXLFamily, size_time_ids, unet_targets
from lorakit.families.sdxl.detect import is_sdxl_checkpoint
from lorakit.families.sdxl.loading import load_sdxl_components
from lorakit.families.sdxl.tiny import build_tiny_sdxl, save_sdxl_diffusers_folder
from lorakit.adapters.targets import RankChoice
from lorakit.checkpoint_io import write_safetensors_atomic


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl")
    paths = {"folder": root / "sdxl_diffusers", "safetensors": root / "sdxl.safetensors", "ckpt": root / "sdxl.ckpt"}
    save_sdxl_diffusers_folder(tiny, paths["folder"])
    sgm_keys.save_sdxl_single_file(tiny, paths["safetensors"])
    sgm_keys.save_sdxl_single_file(tiny, paths["ckpt"], fmt="ckpt")
    return paths


def options(**overrides) -> SimpleNamespace:
    base = dict(
        pretrained_model_name_or_path=None, v2=False, v_parameterization=False, vae=None, clip_skip=None,
        no_half_vae=False, mixed_precision="no", cache_text_encoder_outputs=False,
        cache_text_encoder_outputs_to_disk=False, network_dim=4, network_alpha=2.0, network_args=None,
        network_train_unet_only=False, network_train_text_encoder_only=False,
    )
    base.update(overrides)
    args = base["network_args"] or []
    return SimpleNamespace(**base, network_kwargs=lambda: dict(a.split("=", 1) for a in args))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- loading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["folder", "safetensors", "ckpt"])
def test_loads_equal_to_the_original(tiny, files, source):
    assert is_sdxl_checkpoint(files[source])
    loaded = load_sdxl_components(str(files[source]))
    for ours, theirs in zip([tiny.denoiser, tiny.vae, *tiny.text_encoders], [loaded.denoiser, loaded.vae, *loaded.text_encoders]):
        assert_same_weights(ours, theirs)
    assert loaded.tokenizers[1].pad_token_id == 0 and loaded.tokenizers[0].pad_token == "<|endoftext|>"
    assert loaded.vae.config.scaling_factor == pytest.approx(0.13025)


def test_diffusers_reads_our_sgm_file(tiny, files):
    """diffusers' own SDXL single-file reader (an independent consumer) gets the same four networks."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(files["safetensors"]), config=str(files["folder"]), local_files_only=True)
    for ours, theirs in zip([tiny.denoiser, tiny.vae, *tiny.text_encoders], [pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]):
        assert_same_weights(ours, theirs)


def test_real_sdxl_architecture_names():
    """The bundled SDXL base configs give the real SGM key set and sd-scripts' module counts (built on meta)."""
    from diffusers import UNet2DConditionModel

    config = loading.bundled_config("unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
        te1, te2 = loading._empty_modules({n: loading.bundled_config(n) for n in sgm_keys.CONFIG_NAMES})[2:]
    sgm = sgm_keys.unet_to_sgm(unet.state_dict(), config)
    assert len(sgm) == 1680
    for key in ("label_emb.0.0.weight", "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
                "middle_block.1.transformer_blocks.9.ff.net.2.weight", "output_blocks.2.2.conv.weight",
                "input_blocks.6.0.op.weight", "output_blocks.0.0.skip_connection.weight"):
        assert "model.diffusion_model." + key in sgm
    family = StableDiffusionXLFamily()
    comps = SimpleNamespace(denoiser=unet, text_encoders=[te1, te2])
    targets = targets_of(family, comps, options())
    counts = {p: sum(t.name.startswith(p + "_") for t in targets) for p in ("lora_unet", "lora_te1", "lora_te2")}
    assert counts == {"lora_unet": 722, "lora_te1": 72, "lora_te2": 192}
    names = {t.name for t in targets}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_middle_block_1_proj_in" in names
    assert "lora_te2_text_model_encoder_layers_31_self_attn_q_proj" in names
    conv = {t.name for t in unet_targets(unet, RankChoice(4, 4.0, 4, 1.0))}
    assert {"lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_4_0_emb_layers_1"} <= conv


def test_vae_replacement(tiny, files, tmp_path):
    other = build_tiny_sdxl(seed=5).vae
    vae_file = tmp_path / "vae.safetensors"
    write_safetensors_atomic(other.state_dict(), vae_file)
    loaded = load_sdxl_components(str(files["folder"]), vae_path=str(vae_file))
    assert_same_weights(loaded.vae, other)


def test_non_sdxl_checkpoints_are_refused(tmp_path):
    sd = write_tiny_checkpoints(tmp_path, "sd1")
    assert not is_sdxl_checkpoint(sd["safetensors"]) and not is_sdxl_checkpoint(sd["folder"])
    with pytest.raises(CheckpointError, match=r"sd1\.safetensors: this is an SD 1.x/2.x checkpoint \(use --family sd\)"):
        load_sdxl_components(str(sd["safetensors"]))
    with pytest.raises(CheckpointError, match="StableDiffusionPipeline model, not SDXL; use --family sd"):
        load_sdxl_components(str(sd["folder"]))
    lora = tmp_path / "lora.safetensors"
    write_safetensors_atomic({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, lora)
    with pytest.raises(CheckpointError, match="LoRA/adapter file"):
        load_sdxl_components(str(lora))
    unet_only = tmp_path / "unet_only.safetensors"
    write_safetensors_atomic({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, unet_only)
    assert is_sdxl_checkpoint(unet_only)
    with pytest.raises(CheckpointError, match=r"an SDXL UNet without conditioner\.embedders\.0\.transformer\.\*"):
        load_sdxl_components(str(unet_only))
    with pytest.raises(CheckpointError, match="not found"):
        load_sdxl_components(str(tmp_path / "missing.safetensors"))


# -- conditioning ----------------------------------------------------------------------------------------------


def test_text_conditioning_matches_diffusers(tiny):
    """Penultimate layers of both encoders, concatenated, and bigG's projected pooled output: what the
    diffusers SDXL pipeline computes for the same prompt."""
    from diffusers import StableDiffusionXLPipeline

    family = StableDiffusionXLFamily()
    te1, te2 = tiny.text_encoders
    pipe = StableDiffusionXLPipeline(vae=tiny.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tiny.tokenizers[0],
                                     tokenizer_2=tiny.tokenizers[1], unet=tiny.denoiser, scheduler=None)
    with torch.no_grad():
        ours = family.encode_text(tiny, ["a red square", "sks toy"])
        embeds, _, pooled, _ = pipe.encode_prompt(["a red square", "sks toy"], do_classifier_free_guidance=False)
    assert ours.tensors["encoder_hidden_states"].shape == (2, 77, 96)
    torch.testing.assert_close(ours.tensors["encoder_hidden_states"], embeds)
    torch.testing.assert_close(ours.tensors["text_embeds"], pooled)


def test_time_ids_in_height_width_order():
    batch = SimpleNamespace(original_sizes=[(600, 800)], crop_top_lefts=[(10, 20)], target_sizes=[(512, 768)])
    assert size_time_ids(batch, torch.zeros(1, 4, 64, 96), 8).tolist() == [[600, 800, 10, 20, 512, 768]]
    assert size_time_ids(SimpleNamespace(), torch.zeros(2, 4, 8, 16), 8).tolist() == [[64, 128, 0, 0, 64, 128]] * 2


def test_text_encoder_output_cache(tiny):
    family = StableDiffusionXLFamily()
    problems = family.option_problems(options(cache_text_encoder_outputs=True, bucket_reso_steps=64, v2=False,
                                              save_format="kohya"))
    assert any("--cache_text_encoder_outputs needs --network_train_unet_only" in p for p in problems)
    family._read_options(options(cache_text_encoder_outputs=True, network_train_unet_only=True))
    first = family.encode_text(tiny, ["a", "b"])
    again = family.encode_text(tiny, ["b", "a", "b"])
    assert len(family.text_cache) == 2
    torch.testing.assert_close(again.tensors["encoder_hidden_states"][1], first.tensors["encoder_hidden_states"][0])
    torch.testing.assert_close(again.tensors["text_embeds"][0], first.tensors["text_embeds"][1])


def test_predict_uses_size_conditioning(tiny):
    family = StableDiffusionXLFamily()
    text = family.encode_text(tiny, ["x"])
    noisy, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        a = family.predict(tiny, noisy, t, text, SimpleNamespace(original_sizes=[(64, 64)], crop_top_lefts=[(0, 0)], target_sizes=[(64, 64)]))
        b = family.predict(tiny, noisy, t, text, SimpleNamespace(original_sizes=[(1024, 64)], crop_top_lefts=[(0, 0)], target_sizes=[(64, 64)]))
    assert a.shape == noisy.shape and (a - b).abs().max() > 0


def test_no_half_vae_keeps_the_vae_in_float32(tiny):
    family = StableDiffusionXLFamily()
    family._read_options(options(no_half_vae=True, mixed_precision="bf16"))
    comps = build_tiny_sdxl(seed=0)
    comps.vae.to(torch.bfloat16)  # what the loop does to every frozen module under mixed precision
    latents = family.encode_images(comps, torch.zeros(1, 3, 64, 64))
    assert comps.vae.dtype == torch.float32 and latents.dtype == torch.float32


def test_metadata_and_modelspec():
    family = StableDiffusionXLFamily()
    assert family.metadata(options()) == {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    facts = family.trained_base_model(options(), None)
    assert (facts.architecture, facts.implementation, facts.resolution) == (
        "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models", 1024
    )


# -- training end to end -----------------------------------------------------------------------------------------


@pytest.fixture
def sdxl_registered(monkeypatch):
    """`--family sdxl` through the registry, whether or not the registry lists SDXL yet."""
    if "sdxl" not in registry.FAMILIES:
        monkeypatch.setitem(registry.FAMILIES, "sdxl", StableDiffusionXLFamily)


@pytest.mark.parametrize("source,extra", [("folder", []), ("safetensors", ["--network_args", "conv_dim=4", "conv_alpha=1", "--cache_latents"])])
def test_two_steps_through_lorakit_train(files, tmp_path, sdxl_registered, source, extra):
    data = write_dreambooth_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = [
        "train", "--family=sdxl", f"--pretrained_model_name_or_path={files[source]}", f"--train_data_dir={data}",
        "--resolution=64", f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora",
        "--network_dim=4", "--network_alpha=2", "--max_train_steps=2", "--learning_rate=1e-3", "--seed=1",
        "--max_data_loader_n_workers=0", *extra,
    ]
    assert main(args) == 0
    with safe_open(str(out / "tiny.safetensors"), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        ups = [f.get_tensor(k) for k in keys if k.endswith(".lora_up.weight")]
    for prefix in ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te1_text_model_", "lora_te2_text_model_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_te_")) for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_1_0_in_layers_2.") for k in keys) == bool(extra)
    assert any(v.abs().sum() > 0 for v in ups), "two optimizer steps must move the zero-initialised up weights"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "64x64"


@pytest.mark.skipif("sdxl" not in registry.FAMILIES, reason="runs once families/registry.py lists sdxl")
def test_family_auto_detects_sdxl(files):
    cfg = SimpleNamespace(family="auto", pretrained_model_name_or_path=str(files["safetensors"]))
    assert registry.resolve_family(cfg).name == "sdxl"
