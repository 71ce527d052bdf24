"""Loading SD 1.x/2.x base models offline: diffusers folders, original single files, --vae, and bad inputs."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from lorakit.errors import CheckpointError
from lorakit.checkpoint_io import read_checkpoint
from lorakit.families.common.tokenizers import CLIP_PAD_OPENCLIP, bundled_clip_tokenizer
from lorakit.families.common.ldm_keys import components_to_ldm, save_sd_single_file, vae_to_ldm
from lorakit.families.sd.loading import bundled_config, load_sd_components
from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder

FLAGS = {"sd1": dict(v2=False, v_parameterization=False), "sd2v": dict(v2=True, v_parameterization=True)}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: loading must work with no network at all."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """Builds each tiny model, its diffusers folder and its single files once for the whole module."""
    cache: dict[str, tuple] = {}

    def get(version: str):
        if version not in cache:
            components = build_tiny_sd(version, seed=0)
            root = tmp_path_factory.mktemp(f"tiny_{version}")
            save_sd_diffusers_folder(components, root / "folder")
            save_sd_single_file(components, root / "model.safetensors", fmt="safetensors")
            save_sd_single_file(components, root / "model.ckpt", fmt="ckpt")
            cache[version] = (version, components, root)
        return cache[version]

    return get


@pytest.fixture(params=["sd1", "sd2v"])
def tiny(request, tiny_store):
    """(version, components, folder with `folder/`, `model.safetensors`, `model.ckpt`) for SD 1.x and SD 2.x-v."""
    return tiny_store(request.param)


@pytest.fixture
def tiny_sd1(tiny_store):
    return tiny_store("sd1")


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def assert_same_components(expected, actual) -> None:
    assert_same_weights(expected.denoiser, actual.denoiser)
    assert_same_weights(expected.vae, actual.vae)
    assert_same_weights(expected.text_encoders[0], actual.text_encoders[0])


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["folder", "model.safetensors", "model.ckpt"])
def test_round_trip_is_exact(tiny, source):
    version, components, root = tiny
    loaded = load_sd_components(str(root / source), **FLAGS[version])
    assert_same_components(components, loaded)
    assert torch.equal(unet_output(components.denoiser), unet_output(loaded.denoiser))
    assert not loaded.denoiser.training and not loaded.vae.training and not loaded.text_encoders[0].training
    expected_prediction = "v_prediction" if version == "sd2v" else "epsilon"
    assert loaded.extras["prediction_type"] == expected_prediction
    assert loaded.extras["noise_scheduler_config"]["prediction_type"] == expected_prediction
    assert loaded.extras["version"] == ("sd2" if version == "sd2v" else "sd1")
    assert loaded.extras["source"] == str(root / source)


def test_load_in_half_precision(tiny_sd1):
    version, components, root = tiny_sd1
    loaded = load_sd_components(str(root / "model.safetensors"), dtype=torch.float16, **FLAGS[version])
    assert {p.dtype for p in loaded.denoiser.parameters()} == {torch.float16}
    want = components.vae.state_dict()["decoder.conv_out.weight"].half()
    assert torch.equal(loaded.vae.state_dict()["decoder.conv_out.weight"], want)


def test_single_file_uses_original_key_names(tiny):
    version, _, root = tiny
    keys = set(read_checkpoint(root / "model.safetensors").state_dict)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.input_blocks.1.0.in_layers.2.weight" in keys
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # UpBlock2D: upsampler after the resnet
    assert "model.diffusion_model.out.2.weight" in keys
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in keys
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    if version == "sd1":
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
        assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in keys
    else:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert "cond_stage_model.model.positional_embedding" in keys
        assert "cond_stage_model.model.ln_final.weight" in keys
        assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    assert all(k.split(".")[0] in {"model", "first_stage_model", "cond_stage_model"} for k in keys)


def test_single_file_metadata_and_ckpt_wrapper(tiny):
    version, components, root = tiny
    metadata = read_checkpoint(root / "model.safetensors").metadata
    configs = json.loads(metadata["lorakit.configs"])
    assert configs["unet"]["block_out_channels"] == [32, 64]
    assert configs["text_encoder"]["hidden_act"] == ("quick_gelu" if version == "sd1" else "gelu")
    raw = torch.load(root / "model.ckpt", weights_only=True)
    assert set(raw) == {"state_dict", "lorakit_configs"}
    assert json.loads(raw["lorakit_configs"]) == configs
    assert not [p for p in os.listdir(root) if p.endswith(".tmp")]  # atomic writes leave no temporaries


def test_diffusers_pipeline_loads_our_folder(tiny):
    _, components, root = tiny
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "folder"), local_files_only=True, safety_checker=None)
    assert_same_weights(components.denoiser, pipe.unet)
    assert_same_weights(components.text_encoders[0], pipe.text_encoder)
    assert pipe.scheduler.config.prediction_type == components.extras["prediction_type"]
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_diffusers_single_file_reader_loads_our_file(tiny):
    """diffusers' own LDM reader (an independent consumer) accepts the file we wrote."""
    _, components, root = tiny
    pipe = StableDiffusionPipeline.from_single_file(
        str(root / "model.safetensors"), config=str(root / "folder"), local_files_only=True, safety_checker=None
    )
    assert_same_weights(components.denoiser, pipe.unet)
    assert_same_weights(components.vae, pipe.vae)
    assert_same_weights(components.text_encoders[0], pipe.text_encoder)


def test_folder_without_tokenizer_uses_bundled_one(tiny, tmp_path):
    version, _, root = tiny
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for sub in ("unet", "vae", "text_encoder"):
        os.symlink(root / "folder" / sub, folder / sub)
    loaded = load_sd_components(str(folder), **FLAGS[version])
    expected_pad = "<|endoftext|>" if version == "sd1" else "!"
    assert loaded.tokenizers[0].pad_token == expected_pad


# ---------------------------------------------------------------------------------------------------------
# --vae
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ldm_prefixed", "ldm_bare", "diffusers_file", "diffusers_folder"])
def test_separate_vae_replaces_the_vae(tiny_sd1, tmp_path, layout):
    version, components, root = tiny_sd1
    other = build_tiny_sd("sd1", seed=7).vae
    config = dict(other.config)
    if layout == "ldm_prefixed":
        vae_path = tmp_path / "vae.safetensors"
        save_file({k: v.contiguous() for k, v in vae_to_ldm(other.state_dict(), config).items()}, str(vae_path))
    elif layout == "ldm_bare":
        vae_path = tmp_path / "vae.ckpt"
        torch.save({"state_dict": vae_to_ldm(other.state_dict(), config, prefix="")}, vae_path)
    elif layout == "diffusers_file":
        vae_path = tmp_path / "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(vae_path))
    else:
        vae_path = tmp_path / "vae_folder"
        other.save_pretrained(str(vae_path))
    loaded = load_sd_components(str(root / "model.safetensors"), vae_path=str(vae_path), **FLAGS[version])
    assert_same_weights(other, loaded.vae)
    assert_same_weights(components.denoiser, loaded.denoiser)


# ---------------------------------------------------------------------------------------------------------
# Errors a user can make
# ---------------------------------------------------------------------------------------------------------


class NotATensor:
    """Stands in for the arbitrary Python objects some old .ckpt files pickle."""

    def __init__(self):
        self.payload = "anything"


def expect_error(path, match: str, **flags) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as info:
        load_sd_components(str(path), **(flags or FLAGS["sd1"]))
    assert str(path) in str(info.value)
    return info.value


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "not found")


def test_missing_vae_path(tiny_sd1, tmp_path):
    version, _, root = tiny_sd1
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_sd_components(str(root / "model.safetensors"), vae_path=str(tmp_path / "nope.safetensors"), **FLAGS[version])


def test_lora_file_is_rejected(tmp_path):
    lora = tmp_path / "my_lora.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(lora),
    )
    expect_error(lora, "LoRA")


def test_random_tensors_are_rejected(tmp_path):
    path = tmp_path / "random.safetensors"
    save_file({"weight": torch.randn(3, 3)}, str(path))
    expect_error(path, "expected a Stable Diffusion")


def test_truncated_file(tiny_sd1, tmp_path):
    _, _, root = tiny_sd1
    for name in ("truncated.safetensors", "truncated.ckpt"):
        source = root / ("model.safetensors" if name.endswith("safetensors") else "model.ckpt")
        data = source.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        expect_error(tmp_path / name, "truncated or corrupt")


@pytest.mark.parametrize("name", ["noise.safetensors", "noise.ckpt", "noise.bin"])
def test_random_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 64)
    expect_error(path, "corrupt")


def test_ckpt_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "extra": NotATensor()}, path)
    error = expect_error(path, "safetensors")
    assert "unpickle" in str(error)


def test_folder_that_is_not_a_model(tmp_path):
    expect_error(tmp_path, "not a diffusers model folder")


def test_version_flag_mismatch(tiny):
    version, _, root = tiny
    wrong = FLAGS["sd1"] if version == "sd2v" else FLAGS["sd2v"]
    hint = "remove --v2" if version == "sd1" else "add --v2"
    expect_error(root / "model.safetensors", hint, **wrong)


def test_file_without_configs_is_checked_against_the_real_architecture(tiny, tmp_path):
    """With no lorakit metadata the bundled real config is used, and the tiny shapes cannot fit it."""
    version, components, _ = tiny
    path = tmp_path / "no_metadata.safetensors"
    save_file({k: v.contiguous() for k, v in components_to_ldm(components).items()}, str(path))
    error = expect_error(path, "architecture", **FLAGS[version])
    assert "v2" in str(error)


# ---------------------------------------------------------------------------------------------------------
# Bundled assets
# ---------------------------------------------------------------------------------------------------------


def test_tokenizer_gives_the_real_clip_ids():
    sd1 = bundled_clip_tokenizer()
    assert sd1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(sd1) == 49408
    padded = sd1("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    sd2 = bundled_clip_tokenizer(CLIP_PAD_OPENCLIP)
    assert sd2("a cat", padding="max_length", max_length=77).input_ids[-1] == 0


def test_bundled_real_configs_have_the_real_sizes():
    with init_empty_weights():
        sd15 = UNet2DConditionModel.from_config(bundled_config("sd15", "unet"))
        sd2 = UNet2DConditionModel.from_config(bundled_config("sd2_v", "unet"))
    sd15_params = sum(p.numel() for p in sd15.parameters())
    sd2_params = sum(p.numel() for p in sd2.parameters())
    assert abs(sd15_params - 859.52e6) < 0.1e6, sd15_params
    assert abs(sd2_params - 865.91e6) < 0.1e6, sd2_params
    assert bundled_config("sd2_base", "text_encoder")["num_hidden_layers"] == 23
    assert bundled_config("sd2_v", "scheduler")["prediction_type"] == "v_prediction"


def test_tiny_models_match_the_requested_architecture():
    sd1, sd2 = build_tiny_sd("sd1"), build_tiny_sd("sd2")
    assert not sd1.denoiser.config.use_linear_projection and sd2.denoiser.config.use_linear_projection
    assert sd1.text_encoders[0].config.hidden_act == "quick_gelu"
    assert sd2.text_encoders[0].config.hidden_act == "gelu"
    assert sd2.extras["prediction_type"] == "epsilon" and sd2.extras["version"] == "sd2"
    latents = sd1.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    assert_same_weights(sd1.denoiser, build_tiny_sd("sd1").denoiser)  # same seed, same weights
