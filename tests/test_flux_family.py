"""FLUX.1 family: loading both layouts, packing, LoRA targets and names, fused LoRA math, fp8, and diffusers'
FluxPipeline.load_lora_weights as an independent reader of our files."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers import spec_of, targets_of
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
        fp8_base_unet=False, blocks_to_swap=None, split_mode=False, cpu_offload_checkpointing=False, tokenizer_cache_dir=None,
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
    names = {t.name for t in targets_of(FluxFamily(), comps, options())}
    per_double = {"img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
                  "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"}
    assert {f"lora_unet_double_blocks_0_{n}" for n in per_double} <= names
    assert {f"lora_unet_single_blocks_{i}_{n}" for i in (0, 1) for n in ("linear1", "linear2", "modulation_lin")} <= names
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in names
    assert not any(n.startswith("lora_te3") for n in names)
    t5 = targets_of(FluxFamily(), comps, options(network_train_text_encoder_only=True, network_args=["train_t5xxl=True"]))
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in {t.name for t in t5}
    chosen = targets_of(FluxFamily(), 
        comps, options(network_train_unet_only=True, network_args=["train_single_block_indices=1", "img_attn_dim=8",
                                                                    "txt_mod_dim=0", "in_dims=[2,0,0,0,2]"])
    )
    ranks = {t.name: t.rank for t in chosen}
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 8 and "lora_unet_double_blocks_0_txt_mod_lin" not in ranks
    assert "lora_unet_single_blocks_1_linear1" in ranks and "lora_unet_single_blocks_0_linear1" not in ranks
    assert ranks["lora_unet_img_in"] == 2 and ranks["lora_unet_txt_in"] == 2
    with pytest.raises(ConfigError, match="train_blocks"):
        targets_of(FluxFamily(), comps, options(network_args=["train_blocks=some"]))


def _forward(transformer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden, text, pooled = torch.randn(1, 16, 64, generator=gen), torch.randn(1, 8, 32, generator=gen), torch.randn(1, 32, generator=gen)
    return transformer(
        hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([0.4]),
        img_ids=image_position_ids(8, 8, torch.device("cpu"), torch.float32), txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]), return_dict=False,
    )[0]


def _random_network(comps, cfg, seed=3):
    network = LoRANetwork(targets_of(FluxFamily(), comps, cfg))
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
    targets = {t.name: t for t in targets_of(FluxFamily(), merged, options(network_train_unet_only=True))}
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
    facts = family.trained_base_model(options(), None)
    assert (facts.architecture, facts.implementation, facts.resolution) == ("flux-1-dev", "https://github.com/black-forest-labs/flux", 1024)
    assert facts.prediction_type is None  # sd-scripts writes no prediction type for FLUX


# ---------------------------------------------------------------------------------------------------------
# split_qkv=True: one LoRA per part of the fused qkv / linear1 layers
# ---------------------------------------------------------------------------------------------------------

SPLIT = options(network_train_unet_only=True, network_args=["split_qkv=True"])  # network_dim 4, alpha 2
FUSED_PARTS = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}


def test_split_qkv_targets_rank_and_alpha():
    comps = build_tiny_flux(0)
    targets = {t.name: t for t in targets_of(FluxFamily(), comps, SPLIT)}
    assert (targets["lora_unet_double_blocks_0_img_attn_qkv"].rank, targets["lora_unet_double_blocks_0_img_attn_qkv"].alpha) == (12, 6.0)
    assert (targets["lora_unet_single_blocks_1_linear1"].rank, targets["lora_unet_single_blocks_1_linear1"].alpha) == (16, 8.0)
    assert (targets["lora_unet_single_blocks_1_linear2"].rank, targets["lora_unet_single_blocks_1_linear2"].alpha) == (4, 2.0)


def test_split_qkv_starts_as_the_base_model_and_trains():
    comps = build_tiny_flux(0)
    base = _forward(comps.denoiser)
    network = LoRANetwork(targets_of(FluxFamily(), comps, SPLIT))
    network.apply_to()
    assert torch.equal(_forward(comps.denoiser), base)  # zero-initialised up: the output is unchanged
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2, weight_decay=0.1)
    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(3):
        loss = (_forward(comps.denoiser) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[0]
    for name, module in network.lora_modules.items():
        parts = FUSED_PARTS.get(name.split("blocks_")[1].split("_", 1)[1])
        if parts:
            up = module.lora_up.weight
            mask = up._lorakit_block_mask
            assert up.abs().sum() > 0 and torch.equal(up * (1 - mask), torch.zeros_like(up)), name


def _split_network(comps, cfg=SPLIT, seed=3):
    network = _random_network(comps, cfg, seed)
    network.apply_to()  # masks the random up matrices to their block-diagonal form
    return network


def test_split_qkv_file_holds_each_part_as_its_own_lora(tmp_path):
    """In the saved file, ΔW = up·down·alpha/rank of each fused layer, read row-block by row-block, is the
    part's own rank-4 LoRA at scale α/r = 2/4; and the live forward adds exactly that to each part."""
    comps = build_tiny_flux(0)
    network = _split_network(comps)
    path = tmp_path / "split.safetensors"
    save_lora_file(network.state_dict_kohya(), path, {}, save_dtype=torch.float32, model_format="safetensors")
    from lorakit.adapters.formats import load_lora_file

    state, _ = load_lora_file(path)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    for name, module in network.lora_modules.items():
        parts = FUSED_PARTS.get(name.split("blocks_")[1].split("_", 1)[1])
        if not parts:
            continue
        up, down, alpha = (state[f"{name}.{k}"] for k in ("lora_up.weight", "lora_down.weight", "alpha"))
        assert down.shape[0] == up.shape[1] == 4 * parts and float(alpha) == 2.0 * parts
        delta = up @ down * (float(alpha) / down.shape[0])  # what any kohya reader computes
        view = module.org_module
        live = view(x)
        for j, rows in enumerate(view.slices):
            own_up, own_down = module.lora_up.weight[rows, 4 * j:4 * (j + 1)], module.lora_down.weight[4 * j:4 * (j + 1)]
            own = own_up @ own_down * (2.0 / 4)
            assert own.abs().max() > 0
            torch.testing.assert_close(delta[rows], own, rtol=0, atol=1e-6)
            torch.testing.assert_close(live[:, rows], x @ own.T, rtol=0, atol=1e-5)
            others = [c for c in range(up.shape[1]) if not 4 * j <= c < 4 * (j + 1)]
            assert up[rows][:, others].abs().sum() == 0  # block-diagonal, as sd-scripts writes it


def test_split_qkv_file_reloads_to_the_same_delta(tmp_path):
    """--network_weights and resume read the file into a split network: the same ΔW and the same output."""
    comps = build_tiny_flux(0)
    network = _split_network(comps)
    ours = _forward(comps.denoiser)
    path = tmp_path / "split.safetensors"
    save_lora_file(network.state_dict_kohya(), path, {}, save_dtype=torch.float32, model_format="safetensors")
    from lorakit.adapters.formats import load_lora_file

    fresh = build_tiny_flux(0)
    reloaded = LoRANetwork(targets_of(FluxFamily(), fresh, SPLIT))
    reloaded.apply_to()
    state, _ = load_lora_file(path)
    assert reloaded.load_kohya_state_dict(state, source=str(path)) == []
    for name, module in network.lora_modules.items():
        torch.testing.assert_close(reloaded.lora_modules[name].delta_weight(), module.delta_weight(), rtol=0, atol=0)
    torch.testing.assert_close(_forward(fresh.denoiser), ours, rtol=0, atol=1e-6)


def test_diffusers_reads_our_split_qkv_double_blocks(tmp_path):
    """diffusers recognises the block-diagonal up of a split qkv and gives each of q, k, v its own LoRA; its
    output matches ours. (linear1 at width 3072: tests/test_flux_real_width.py.)"""
    comps = build_tiny_flux(0)
    network = _split_network(comps, options(network_train_unet_only=True, network_args=["split_qkv=True", "train_blocks=double"]))
    path = tmp_path / "split_double.safetensors"
    save_lora_file(network.state_dict_kohya(), path, {"ss_network_module": "networks.lora_flux"}, save_dtype=torch.float32, model_format="safetensors")
    ours = _forward(comps.denoiser)
    network.restore()
    pipe = FluxFamily().pipeline(comps)
    base = _forward(pipe.transformer)
    pipe.load_lora_weights(str(path), adapter_name="ours")
    theirs = _forward(pipe.transformer)
    assert (theirs - base).abs().max() > 1e-3
    assert (theirs - ours).abs().max() < 1e-4
    assert pipe.transformer.transformer_blocks[0].attn.to_q.lora_A["ours"].weight.shape == (4, 32)  # its own rank-4 part


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("unet_only", [True, False])
def test_cached_text_outputs_equal_fresh_ones_and_t5_runs_once_per_caption(saved, unet_only):
    """--cache_text_encoder_outputs: T5 encodes each caption once; CLIP-L too unless its LoRA trains (then it
    runs every step, sd-scripts' partial caching); the outputs are those of the uncached encoders."""
    fresh_family, cached_family = FluxFamily(), FluxFamily()
    fresh = fresh_family.load(options(pretrained_model_name_or_path=str(saved["folder"])))
    cached_options = options(pretrained_model_name_or_path=str(saved["folder"]), cache_text_encoder_outputs=True,
                             network_train_unet_only=unet_only)
    comps = cached_family.load(cached_options, spec_of(cached_family, cached_options))
    clip_calls, t5_calls = _count_calls(comps.text_encoders[0]), _count_calls(comps.text_encoders[1])
    captions = ["a red square", "a blue circle"]
    with torch.no_grad():
        first = cached_family.encode_text(comps, captions)
        again = cached_family.encode_text(comps, captions[::-1])
        reference = fresh_family.encode_text(fresh, captions)
    assert t5_calls[0] == 1 and clip_calls[0] == (1 if unet_only else 2)
    for name in ("pooled", "t5", "t5_mask"):
        torch.testing.assert_close(first.tensors[name], reference.tensors[name])
        torch.testing.assert_close(again.tensors[name], reference.tensors[name].flip(0))


def test_training_t5_with_cached_outputs_is_refused(saved):
    """Refused with the other option checks, before anything loads."""
    family = FluxFamily()
    cfg = options(pretrained_model_name_or_path=str(saved["folder"]), cache_text_encoder_outputs=True,
                  network_args=["train_t5xxl=True"], bucket_reso_steps=64, v2=False, save_format="kohya",
                  loss_type="l2", huber_schedule="snr")
    problems = family.option_problems(cfg, spec_of(family, cfg))
    assert any("train_t5xxl=True cannot be used with --cache_text_encoder_outputs" in p for p in problems)
