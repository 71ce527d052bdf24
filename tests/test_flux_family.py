"""FLUX.1 family: loading both layouts, packing, LoRA targets and names, fused LoRA math, fp8, and diffusers'
FluxPipeline.load_lora_weights as an independent reader of our files."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from lorakit.adapters.formats import save_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.errors import CheckpointError, ConfigError
from lorakit.families.flux import bfl_keys
from lorakit.families.flux.family import (
    FluxFamily,
    image_position_ids,
    max_blocks_to_swap,
    pack_latents,
    unpack_latents,
)
from lorakit.families.flux.layers import FP8_DTYPE, to_fp8
from lorakit.families.flux.loading import load_flux_components
from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files, save_pipeline_folder


def options(**overrides):
    base = dict(
        pretrained_model_name_or_path="", clip_l=None, t5xxl=None, ae=None, model_type="flux", guidance_scale=3.5,
        t5xxl_max_token_length=None, apply_t5_attn_mask=False, model_prediction_type="raw", fp8_base=False,
        fp8_base_unet=False, blocks_to_swap=None, split_mode=False, cpu_offload_checkpointing=False,
        network_dim=4, network_alpha=2.0, network_args=None, network_train_unet_only=False,
        network_train_text_encoder_only=False, timestep_sampling="sigma", discrete_flow_shift=3.0,
        weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, sigmoid_scale=1.0,
    )
    base.update(overrides)
    args = base["network_args"] or []
    return SimpleNamespace(**base, network_kwargs=lambda: dict(a.split("=", 1) for a in args))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    comps = build_tiny_flux(0)
    files = save_bfl_files(comps, root / "bfl")
    files["folder"] = save_pipeline_folder(comps, root / "diffusers")
    return files


def test_folder_and_bfl_files_load_the_same_model(saved):
    folder = load_flux_components(str(saved["folder"]))
    single = load_flux_components(str(saved["flux1"]), clip_l=str(saved["clip_l"]), t5xxl=str(saved["t5xxl"]), ae=str(saved["ae"]))
    pairs = [(folder.denoiser, single.denoiser), (folder.vae, single.vae)] + list(zip(folder.text_encoders, single.text_encoders))
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert folder.tokenizers[1]("a cat").input_ids == single.tokenizers[1]("a cat").input_ids


def test_detection(saved):
    from lorakit.families.flux.loading import is_flux_source

    assert is_flux_source(str(saved["folder"])) and is_flux_source(str(saved["flux1"]))
    assert not is_flux_source(str(saved["ae"])) and not is_flux_source(str(saved["clip_l"]))


def test_bfl_layout_round_trip_and_fused_shapes():
    model = build_tiny_flux(1).denoiser
    state = model.state_dict()
    bfl = bfl_keys.diffusers_to_bfl(state)
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * 32, 32)
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * 32 + 4 * 32, 32)
    back = bfl_keys.bfl_to_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()})
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_missing_component_flags_and_tokenizer_are_named(saved, tmp_path):
    with pytest.raises(CheckpointError, match="--clip_l, --t5xxl, --ae"):
        load_flux_components(str(saved["flux1"]))
    lonely = tmp_path / "t5xxl.safetensors"
    lonely.write_bytes(saved["t5xxl"].read_bytes())
    with pytest.raises(CheckpointError, match="T5 tokenizer"):
        load_flux_components(str(saved["flux1"]), clip_l=str(saved["clip_l"]), t5xxl=str(lonely), ae=str(saved["ae"]))


def test_pack_unpack_and_position_ids():
    latents = torch.randn(2, 16, 4, 6)
    packed = pack_latents(latents)
    assert packed.shape == (2, 6, 64)
    assert torch.equal(packed[0, 1, :4], latents[0, 0, 0:2, 2:4].reshape(4))  # token (row 0, col 1), channel 0
    assert torch.equal(unpack_latents(packed, 4, 6), latents)
    ids = image_position_ids(4, 6, torch.device("cpu"), torch.float32)
    assert ids[4].tolist() == [0.0, 1.0, 1.0]


def test_target_names_follow_sd_scripts_lora_flux():
    comps = build_tiny_flux(0)
    names = {t.name for t in FluxFamily().adapter_targets(comps, options())}
    per_double = {"img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
                  "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"}
    assert {f"lora_unet_double_blocks_0_{n}" for n in per_double} <= names
    assert {f"lora_unet_single_blocks_{i}_{n}" for i in (0, 1) for n in ("linear1", "linear2", "modulation_lin")} <= names
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in names
    assert not any(n.startswith("lora_te3") for n in names)
    t5 = FluxFamily().adapter_targets(comps, options(network_train_text_encoder_only=True, network_args=["train_t5xxl=True"]))
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in {t.name for t in t5}
    chosen = FluxFamily().adapter_targets(
        comps, options(network_train_unet_only=True, network_args=["train_single_block_indices=1", "img_attn_dim=8",
                                                                    "txt_mod_dim=0", "in_dims=[2,0,0,0,2]"])
    )
    ranks = {t.name: t.rank for t in chosen}
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 8 and "lora_unet_double_blocks_0_txt_mod_lin" not in ranks
    assert "lora_unet_single_blocks_1_linear1" in ranks and "lora_unet_single_blocks_0_linear1" not in ranks
    assert ranks["lora_unet_img_in"] == 2 and ranks["lora_unet_txt_in"] == 2
    with pytest.raises(ConfigError, match="train_blocks"):
        FluxFamily().adapter_targets(comps, options(network_args=["train_blocks=some"]))


def _forward(transformer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden, text, pooled = torch.randn(1, 16, 64, generator=gen), torch.randn(1, 8, 32, generator=gen), torch.randn(1, 32, generator=gen)
    return transformer(
        hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([0.4]),
        img_ids=image_position_ids(8, 8, torch.device("cpu"), torch.float32), txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]), return_dict=False,
    )[0]


def _random_network(comps, cfg, seed=3):
    network = LoRANetwork(FluxFamily().adapter_targets(comps, cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.3)
    return network


def test_fused_lora_equals_merged_weights():
    """A LoRA on the fused BFL qkv / linear1 (bypass) gives what merging ΔW into the split parts gives."""
    comps = build_tiny_flux(0)
    base = _forward(comps.denoiser)
    network = _random_network(comps, options(network_train_unet_only=True))
    network.apply_to()
    adapted = _forward(comps.denoiser)
    assert (adapted - base).abs().max() > 1e-3
    merged = build_tiny_flux(0)
    targets = {t.name: t for t in FluxFamily().adapter_targets(merged, options(network_train_unet_only=True))}
    for name, module in network.lora_modules.items():
        delta = module.delta_weight()
        target = targets[name].module
        if hasattr(target, "add_to_parts"):
            target.add_to_parts(delta)
        else:
            with torch.no_grad():
                target.weight += delta
    assert torch.allclose(_forward(merged.denoiser), adapted, atol=1e-5)


def test_diffusers_reads_our_double_block_lora(tmp_path):
    """diffusers' kohya-FLUX reader splits our fused qkv itself; its output must match our own merge. Single
    blocks are left out: diffusers' reader hard-codes width 3072 for linear1 (their names are checked above)."""
    comps = build_tiny_flux(0)
    cfg = options(network_train_unet_only=True, network_args=["train_blocks=double"])
    network = _random_network(comps, cfg)
    path = tmp_path / "double.safetensors"
    save_lora_file(network.state_dict_kohya(), path, {"ss_network_module": "networks.lora_flux"}, save_dtype=torch.float32, model_format="safetensors")
    network.apply_to()
    ours = _forward(comps.denoiser)
    network.restore()
    pipe = FluxFamily().pipeline(comps)
    assert isinstance(pipe, FluxPipeline)
    base = _forward(pipe.transformer)
    pipe.load_lora_weights(str(path), adapter_name="ours")
    theirs = _forward(pipe.transformer)
    assert (theirs - base).abs().max() > 1e-3
    assert (theirs - ours).abs().max() < 1e-4


def test_fp8_base_stores_float8_and_stays_close():
    comps = build_tiny_flux(0)
    reference = _forward(comps.denoiser)
    changed = to_fp8(comps.denoiser)
    assert changed > 0 and comps.denoiser.transformer_blocks[0].attn.to_q.weight.dtype == FP8_DTYPE
    comps.denoiser.to(dtype=torch.bfloat16)  # what the trainer does for --mixed_precision bf16
    assert comps.denoiser.transformer_blocks[0].attn.to_q.weight.dtype == FP8_DTYPE
    comps.denoiser.float()
    out = _forward(comps.denoiser)
    assert (out - reference).abs().max() < 0.15 * reference.abs().max()


def test_block_swap_limits_match_sd_scripts():
    assert max_blocks_to_swap(19, 38) == 35
    model = FluxTransformer2DModel(num_layers=4, num_single_layers=6, attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    comps = SimpleNamespace(denoiser=model)
    FluxFamily._check_block_swap(options(blocks_to_swap=max_blocks_to_swap(4, 6)), comps)
    with pytest.raises(ConfigError, match="at most"):
        FluxFamily._check_block_swap(options(blocks_to_swap=max_blocks_to_swap(4, 6) + 1), comps)


def test_metadata_and_modelspec():
    family = FluxFamily()
    meta = family.metadata(options(timestep_sampling="shift", guidance_scale=1.0))
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_guidance_scale"] == "1.0"
    assert family.modelspec_architecture(options()) == ("flux-1-dev", "https://github.com/black-forest-labs/flux", (1024, 1024))
