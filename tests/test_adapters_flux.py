"""Every adapter algorithm on a tiny FLUX.1 (1 double, 2 single blocks, width 32), through the factory.

FLUX's fused BFL layers (`img_attn.qkv`, a single block's `linear1`) are `FusedLinearView`s over diffusers'
split q/k/v (and MLP input): the view's own output is zero and its parts add the view's patched output, so an
adapter on it must return only its change of the output, and a merge must reach the parts. For each of LoRA,
DoRA, LoRA-FA, DyLoRA, `networks.oft_flux` and the `lycoris.kohya` algorithms:

* the fresh network leaves the transformer's output unchanged (an adapter that returned the full output on a
  view would double the fused layers' output);
* two training steps change the loss;
* the trained network's bypass output equals the output after merging it into the weights (fused views
  included), and its file round-trips into a fresh network.

`networks.oft_flux` also: rotations per q/k/v(/MLP) part as sd-scripts' `oft_flux` (re-stated below), its key
names (`.oft_blocks.<i>`), and the per-part block-count error.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import network_options as options, build_from_options
from lorakit.adapters.algorithms import algorithm_family_args
from lorakit.adapters.spec import TargetSpec
from lorakit.adapters.oft import OFTModule
from lorakit.errors import ConfigError
from lorakit.families.base import Components
from lorakit.families.common.layers import FusedLinearView
from lorakit.families.flux.family import FluxFamily
from lorakit.families.flux.tiny import build_tiny_flux

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def flux():
    """One tiny FLUX (with the conditioning options `load` would set), copied per test."""
    comps = build_tiny_flux(0)
    comps.extras.update(
        variant="dev", guidance_scale=1.0, t5_max_length=32, apply_t5_attn_mask=False, model_prediction_type="raw",
        cpu_offload_checkpointing=False, train_t5xxl=False,
    )
    for part in [comps.denoiser, *comps.text_encoders]:
        part.requires_grad_(False)
    return FluxFamily(), comps


def copy_model(comps: Components) -> Components:
    """The trainable parts copied (adapters attach to them); the VAE and tokenizers are only read."""
    return Components(copy.deepcopy(comps.denoiser), comps.vae, [copy.deepcopy(e) for e in comps.text_encoders],
                      comps.tokenizers, dict(comps.extras))


def fresh(flux):
    family, comps = flux
    return family, copy_model(comps)


def make_batch():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    return latents, noise, torch.tensor([300.0, 800.0])


def predict(family, comps, batch) -> torch.Tensor:
    latents, noise, t = batch
    sigma = (t / 1000).view(-1, 1, 1, 1)
    text = family.encode_text(comps, ["a red square", "a blue circle"])
    return family.predict(comps, (1 - sigma) * latents + sigma * noise, t, text, None).float()


def flow_loss(family, comps, batch) -> torch.Tensor:
    latents, noise, _ = batch
    return F.mse_loss(predict(family, comps, batch), noise - latents)


NETWORKS = {
    "lora": options("networks.lora_flux"),
    "dora": options("networks.lora_flux", "dora_wd=True"),
    "dora-output-axis": options("networks.lora_flux", "dora_wd=True", "wd_on_output=True"),
    "lora_fa": options("networks.lora_fa"),
    "dylora": options("networks.dylora", "unit=2"),
    "oft_flux": options("networks.oft_flux", dim=4, alpha=1e-2, network_train_unet_only=True),
    "oft_flux-all-linear": options("networks.oft_flux", "enable_all_linear=True", dim=4, alpha=1e-2, network_train_unet_only=True),
    **{f"lycoris-{algo}": options("lycoris.kohya", f"algo={algo}") for algo in ("locon", "loha", "lokr", "ia3", "glora", "diag-oft")},
    "lycoris-locon-dora": options("lycoris.kohya", "algo=locon", "dora_wd=True"),
    "lycoris-lokr-attn-only": options("lycoris.kohya", "algo=lokr", "preset=attn-only", "factor=4"),
    # BOFT's factor is --network_dim: the tiny linear1 (224 = 14·16 rows) needs a factor of at least 14
    "lycoris-boft": options("lycoris.kohya", "algo=boft", dim=16),
    "lycoris-full": options("lycoris.kohya", "algo=full"),
    "lycoris-dylora": options("lycoris.kohya", "algo=dylora", "block_size=2", dim=4),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_algorithm_trains_merges_and_round_trips_on_flux(flux, name):
    family, comps = fresh(flux)
    cfg = NETWORKS[name]
    batch = make_batch()
    with torch.no_grad():
        base = predict(family, comps, batch)
    network = build_from_options(cfg, family, comps, CPU).eval()
    names = list(network.lora_modules)
    fused = [n for n, m in network.lora_modules.items() if isinstance(m.org_module, FusedLinearView)]
    assert fused, f"{name}: the fused BFL layers are adapted"
    with torch.no_grad():
        assert torch.allclose(predict(family, comps, batch), base, atol=1e-5), "a fresh network changes nothing"

    groups, _ = network.prepare_optimizer_params(1e-2, 1e-2, 1e-2)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    with torch.no_grad():
        before = float(flow_loss(family, comps, batch))
    network.train()
    for _ in range(2):
        optimizer.zero_grad()
        flow_loss(family, comps, batch).backward()
        optimizer.step()
    network.eval()
    with torch.no_grad():
        bypass = predict(family, comps, batch)
        after = F.mse_loss(bypass, batch[1] - batch[0]).item()
    assert abs(after - before) > 1e-6, f"{name}: two steps must change the loss ({before} -> {after})"

    state = network.state_dict_kohya()
    again = build_from_options(cfg, family, copy_model(flux[1]), CPU)
    assert again.load_kohya_state_dict(state, source="x.safetensors") == []
    assert all(torch.equal(value, state[key]) for key, value in again.state_dict_kohya().items())

    network.merge_to_base()
    with torch.no_grad():
        merged = predict(family, comps, batch)
    assert (merged - bypass).abs().max() <= 1e-4 * bypass.abs().max(), f"{name}: merged weights = bypass"
    assert (bypass - base).abs().max() > 1e-5
    prefix = "oft_unet_" if name.startswith("oft") else "lora_unet_"
    assert f"{prefix}double_blocks_0_img_attn_qkv" in names


def test_lycoris_dylora_ranks_must_be_whole_blocks(flux):
    family, comps = fresh(flux)
    with pytest.raises(ConfigError, match="--network_dim 6 is not a multiple of block_size 4"):
        build_from_options(options("lycoris.kohya", "algo=dylora", dim=6), family, comps, CPU)


def test_algorithm_keys_stay_with_their_algorithm(flux):
    """DoRA's and DyLoRA's keys are kept from FLUX's lora_flux check only for the module that reads them."""
    family = FluxFamily()

    def family_keys(*args: str) -> dict[str, str]:
        module, *rest = args
        return algorithm_family_args(TargetSpec(module=module, args=dict(a.split("=", 1) for a in rest)), family)

    assert family_keys("networks.lora_flux", "dora_wd=True", "train_blocks=single") == {"train_blocks": "single"}
    assert family_keys("networks.dylora", "unit=2", "split_qkv=True") == {"split_qkv": "True"}
    assert family_keys("networks.lora_flux", "unit=2") == {"unit": "2"}
    assert family_keys("lycoris.kohya", "algo=loha", "preset=full") == {}
    assert family_keys("networks.oft_flux", "enable_all_linear=True") == {}
    with pytest.raises(ConfigError, match="unit: not a networks.lora_flux option"):
        build_from_options(options("networks.lora_flux", "unit=2"), *fresh(flux), CPU)
    with pytest.raises(ConfigError, match="split_qkv=True: not available with networks.dylora"):
        build_from_options(options("networks.dylora", "unit=2", "split_qkv=True"), *fresh(flux), CPU)


def test_lycoris_presets_choose_flux_layers_as_on_bfl_classes(flux):
    family, comps = fresh(flux)
    full = build_from_options(options("lycoris.kohya", "algo=locon"), family, comps, CPU)
    lora = build_from_options(options("networks.lora_flux"), *fresh(flux), CPU)
    assert set(full.lora_modules) == set(lora.lora_modules), "preset full = every block linear + CLIP, as lora_flux"
    attn = build_from_options(options("lycoris.kohya", "algo=locon", "preset=attn-only"), *fresh(flux), CPU)
    unet = [n for n in attn.lora_modules if n.startswith("lora_unet_")]
    assert sorted(unet) == sorted(f"lora_unet_double_blocks_0_{s}_attn_{p}" for s in ("img", "txt") for p in ("qkv", "proj"))
    with pytest.raises(ConfigError, match="block_dims"):
        build_from_options(options("lycoris.kohya", "block_dims=" + ",".join(["4"] * 25)), *fresh(flux), CPU)
    with pytest.raises(ConfigError, match="algo=boft .*double_blocks_0_img_attn_qkv"):
        build_from_options(options("lycoris.kohya", "algo=boft", dim=4), *fresh(flux), CPU)


# ---------------------------------------------------------------------- networks.oft_flux on fused q/k/v


def sd_scripts_oft_flux_weight(weight: torch.Tensor, blocks: list[torch.Tensor], parts: list[int], alpha: float) -> torch.Tensor:
    """sd-scripts `oft_flux` re-stated: per part, Q = B − Bᵀ clamped to ‖Q‖ ≤ alpha·part, R = (I + Q)(I − Q)⁻¹,
    rows (k n) m rotated as einsum("k n m, k n p -> k m p", R, W)."""
    out, start = [], 0
    for b, size in zip(blocks, parts):
        q = b - b.transpose(1, 2)
        norm = q.flatten().norm()
        q = q * ((norm.clamp(max=alpha * size) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(b.shape[-1]).expand_as(q)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        rows = weight[start:start + size].reshape(b.shape[0], b.shape[1], -1)
        out.append(torch.einsum("knm,knp->kmp", r, rows).reshape(size, -1))
        start += size
    return torch.cat(out)


def test_oft_flux_on_a_fused_view_rotates_each_part_as_sd_scripts(flux):
    _, comps = fresh(flux)
    block = comps.denoiser.single_transformer_blocks[0]
    layers = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    view = FusedLinearView(layers)
    parts = [32, 32, 32, 128]
    x = torch.randn(2, 5, 32)
    base = torch.cat([layer(x) for layer in layers], dim=-1)
    oft = OFTModule("oft_unet_single_blocks_0_linear1", view, 4, 1e-1, parts=parts)
    oft.apply_to()
    assert torch.equal(torch.cat([layer(x) for layer in layers], dim=-1), base), "zero blocks: unchanged output"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blocks in oft.oft_blocks:
            blocks.copy_(0.05 * torch.randn(blocks.shape, generator=g))
    assert [tuple(b.shape) for b in oft.oft_blocks] == [(4, 8, 8)] * 3 + [(4, 32, 32)]
    bypass = torch.cat([layer(x) for layer in layers], dim=-1)
    weight, bias = view.weight, torch.cat([layer.bias for layer in layers])
    reference = sd_scripts_oft_flux_weight(weight, [b.detach() for b in oft.oft_blocks], parts, 1e-1)
    assert torch.allclose(oft.merged_weight(), reference, atol=1e-5)
    assert torch.allclose(bypass, F.linear(x, reference, bias), atol=1e-5), "bypass = merged, bias not rotated"
    assert (bypass - base).abs().max() > 1e-3
    oft.merge_to_base()
    assert torch.allclose(torch.cat([layer(x) for layer in layers], dim=-1), bypass, atol=1e-5), "merge reaches the parts"
    assert set(oft.adapter_state_dict()) == {"oft_blocks.0", "oft_blocks.1", "oft_blocks.2", "oft_blocks.3", "alpha"}


def test_oft_flux_keys_and_block_count_error(flux):
    network = build_from_options(options("networks.oft_flux", "enable_all_linear=True", dim=4, alpha=1e-3), *fresh(flux), CPU)
    state = network.state_dict_kohya()
    assert state["oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.2"].shape == (4, 8, 8)
    assert "oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.3" not in state
    assert state["oft_unet_single_blocks_1_linear1.oft_blocks.3"].shape == (4, 32, 32), "the MLP part of linear1"
    assert state["oft_unet_double_blocks_0_img_attn_proj.oft_blocks.0"].shape == (4, 8, 8), "unfused: one part"
    assert all(k.rsplit(".", 1)[-1] == "alpha" or ".oft_blocks." in k for k in state)
    # 96 fused rows divide by 3, the 32-row parts do not: the parts decide, as in sd-scripts
    with pytest.raises(ConfigError, match=r"--network_dim 3: .*sizes 32, 32, 32"):
        build_from_options(options("networks.oft_flux", dim=3, alpha=1e-3), *fresh(flux), CPU)
