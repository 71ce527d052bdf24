"""SD3 family: SAI layout against diffusers' own converter, detection, the SD3 objective, LoRA targets, the
kohya <-> diffusers converter, and diffusers' StableDiffusion3Pipeline.load_lora_weights as an independent reader."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers import family_args_of, targets_of
from lorakit.adapters.network import LoRANetwork
from lorakit.families.sd3 import sai_keys
from lorakit.families.sd3.detect import is_sd3_checkpoint
from lorakit.families.sd3.conditioning import assemble_conditioning
from lorakit.families.sd3.family import StableDiffusion3Family
from lorakit.families.sd3.targets import mmdit_targets
from lorakit.families.sd3.lora_convert import diffusers_to_kohya, kohya_to_diffusers
from lorakit.families.sd3.tiny import build_tiny_sd3, pipeline_of, save_pipeline_folder, save_sai_file
from lorakit.families.sd3.objective import SD3FlowObjective, SD3FlowOptions, sample_sd3_timesteps


def net_cfg(*args: str, dim: int = 4, alpha: float = 2.0) -> SimpleNamespace:
    kwargs = dict(a.split("=", 1) for a in args)
    return SimpleNamespace(
        network_args=list(args) or None, network_kwargs=lambda: kwargs, network_dim=dim, network_alpha=alpha,
        network_train_unet_only=False, network_train_text_encoder_only=False, text_encoder_lr=None,
    )


@pytest.fixture(scope="module")
def sd35m():
    return build_tiny_sd3(0, "sd3.5m")


def test_sai_file_matches_diffusers_converter(sd35m, tmp_path):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    file = save_sai_file(sd35m, tmp_path / "m.safetensors")
    state = {k: v for k, v in load_file(file).items() if k.startswith(sai_keys.SAI_PREFIX)}
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(state)
    ours = sd35m.denoiser.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    derived = sai_keys.transformer_config_from_sai(sai_keys.strip_transformer_prefix(load_file(file)))
    assert derived["dual_attention_layers"] == [0] and derived["qk_norm"] == "rms_norm" and derived["num_layers"] == 2
    assert is_sd3_checkpoint(file) and is_sd3_checkpoint(save_pipeline_folder(sd35m, tmp_path / "pipe"))
    assert not is_sd3_checkpoint(tmp_path)


def test_timesteps_follow_shift_and_range():
    gen = torch.Generator().manual_seed(0)
    plain = sample_sd3_timesteps(SD3FlowOptions(), 4000, generator=gen)
    shifted = sample_sd3_timesteps(SD3FlowOptions(training_shift=3.0), 4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, plain.round()) and plain.min() >= 0 and plain.max() <= 999
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0))  # the same draws: t = ⌊1000·3u/(1+2u)⌋
    assert torch.allclose(shifted, (1000 * 3 * u / (1 + 2 * u)).floor(), atol=1.0)
    ranged = sample_sd3_timesteps(SD3FlowOptions(min_timestep=100, max_timestep=200), 500, generator=gen)
    assert ranged.min() >= 100 and ranged.max() <= 199


def test_objective_targets_x0_and_sigma_sqrt_recovers_velocity_loss():
    latents = torch.randn(3, 16, 8, 8)
    objective = SD3FlowObjective(SD3FlowOptions(weighting_scheme="sigma_sqrt"))
    noised = objective.noise(latents, generator=torch.Generator().manual_seed(0))
    sigma = (noised.timesteps / 1000).view(-1, 1, 1, 1)
    noise = (noised.noisy - (1 - sigma) * latents) / sigma
    assert torch.equal(noised.target, latents)
    velocity = torch.randn_like(latents)
    x0_estimate = noised.noisy - sigma * velocity
    loss = objective.elementwise_loss(x0_estimate, noised.target, noised.timesteps).mean(dim=(1, 2, 3))
    weighted = loss * objective.loss_weights(noised.timesteps)
    direct = ((velocity - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(weighted, direct, rtol=1e-3)


def test_conditioning_layout_and_dropout():
    parts = {"l": torch.ones(2, 77, 32), "g": torch.ones(2, 77, 64), "l_pooled": torch.ones(2, 32),
             "g_pooled": torch.ones(2, 64), "t5": torch.ones(2, 32, 128)}
    out = assemble_conditioning(parts, (0.0, 0.0, 0.0), training=True)
    assert out["context"].shape == (2, 77 + 32, 128) and out["pooled"].shape == (2, 96)
    assert out["context"][:, :77, 96:].abs().sum() == 0  # CLIP padded with zeros to T5's width
    dropped = assemble_conditioning(parts, (1.0, 0.0, 1.0), training=True)
    assert dropped["context"][:, :77, :32].abs().sum() == 0 and dropped["pooled"][:, :32].abs().sum() == 0
    assert dropped["context"][:, 77:].abs().sum() == 0 and dropped["context"][:, :77, 32:96].abs().sum() > 0


def test_network_args_errors_name_the_key():
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="emb_dims"):
        family_args_of(StableDiffusion3Family(), net_cfg("emb_dims=1,2"))
    with pytest.raises(ConfigError, match="block_dims"):
        family_args_of(StableDiffusion3Family(), net_cfg("block_dims=1,2"))
    with pytest.raises(ConfigError, match="train_block_indices"):
        family_args_of(StableDiffusion3Family(), net_cfg("train_block_indices=5")).check_blocks(2)
    family = StableDiffusion3Family()
    assert family.text_encoder_lr_groups(SimpleNamespace(text_encoder_lr=[1e-5, 2e-5])) == {  # [a, b, b]
        "lora_te1": 1e-5, "lora_te2": 2e-5, "lora_te3": 2e-5}


def _trained_network(comps, *args: str) -> LoRANetwork:
    targets = mmdit_targets(comps.denoiser, family_args_of(StableDiffusion3Family(), net_cfg(*args)), 2.0)
    family = StableDiffusion3Family()
    cfg = net_cfg(*args)
    cfg.network_train_text_encoder_only, cfg.network_train_unet_only = True, False
    targets += targets_of(family, comps, cfg)
    network = LoRANetwork(targets)
    network.apply_to()
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_up" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return network


@pytest.mark.parametrize("args", [("emb_dims=[2,2,2,2,2,2]",), ("split_qkv=True", "x_mod_dim=1")])
def test_kohya_file_round_trips_and_diffusers_loads_it(tmp_path, args):
    """Diffusers' pipeline with our diffusers-layout file gives the images of our own merge (within 1e-4)."""
    comps = build_tiny_sd3(3, "sd3.5m")
    network = _trained_network(comps, *args)
    if "split_qkv=True" in args:  # training keeps the up block-diagonal; the random values above are not
        for name, module in network.lora_modules.items():
            if name.endswith("attn_qkv"):
                mask = module.lora_up.weight._lorakit_block_mask
                module.lora_up.weight.data.mul_(mask)
    kohya = {k: v.detach().clone() for k, v in network.state_dict_kohya().items()}
    diffusers_state, meta = kohya_to_diffusers(kohya, {"ss_network_dim": "4"})
    back, back_meta = diffusers_to_kohya(diffusers_state, meta)
    assert set(back) == set(kohya) and back_meta == {"ss_network_dim": "4"}
    assert all(torch.equal(back[k], kohya[k]) for k in kohya), [k for k in kohya if not torch.equal(back[k], kohya[k])]
    again, _ = kohya_to_diffusers(back, meta)
    assert all(torch.equal(again[k], diffusers_state[k]) for k in diffusers_state)

    prompt = dict(prompt="sks toy", num_inference_steps=2, height=64, width=64, max_sequence_length=32, output_type="pt")
    ours = pipeline_of(comps)(generator=torch.Generator().manual_seed(0), **prompt).images
    network.restore()
    base = pipeline_of(comps)(generator=torch.Generator().manual_seed(0), **prompt).images
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the image
    fresh = build_tiny_sd3(3, "sd3.5m")
    pipe = pipeline_of(fresh)
    from safetensors.torch import save_file

    file = tmp_path / "lora_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_state.items() if not k.startswith("text_encoder_3.")}, str(file))
    pipe.load_lora_weights(str(file))
    theirs = pipe(generator=torch.Generator().manual_seed(0), **prompt).images
    assert (theirs - ours).abs().max() < 1e-4


def test_saved_split_qkv_alpha_keeps_each_part_scale():
    comps = build_tiny_sd3(0, "sd3")
    targets = {t.name: t for t in mmdit_targets(comps.denoiser, family_args_of(StableDiffusion3Family(), net_cfg("split_qkv=True")), 2.0)}
    qkv = targets["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    assert (qkv.rank, qkv.alpha) == (12, 6.0)
    assert "lora_unet_joint_blocks_1_context_block_attn_proj" not in targets  # context_pre_only


def test_metadata_names_the_variant(tmp_path):
    family = StableDiffusion3Family()
    family.model_type = "5-large"
    cfg = SimpleNamespace(apply_lg_attn_mask=False, apply_t5_attn_mask=True, weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    assert family.metadata(cfg)["ss_base_model_version"] == "5-large"
    assert family.trained_base_model(cfg, None).architecture == "stable-diffusion-3-5-large"
    assert Path(tmp_path).exists()
