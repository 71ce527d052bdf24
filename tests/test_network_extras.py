"""Network extras: max-norm, LoRA+ groups, block indices, block-wise LR presets and block-wise ranks."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import optimizer_groups, spec_of
from lorakit.adapters.blocks import block_lr_weights, preset_weights
from lorakit.adapters.lora import lora_delta_weight
from lorakit.adapters.network import LoRANetwork
from lorakit.config import parse_train_args
from lorakit.errors import ConfigError
from lorakit.families.sd.family import StableDiffusionFamily
from lorakit.families.sd.tiny import build_tiny_sd
from lorakit.families.common.unet_blocks import BLOCK_LAYOUT as SD_LAYOUT
from lorakit.families.common.unet_blocks import block_of as sd_block_index
from lorakit.families.sdxl.blocks import BLOCK_LAYOUT as SDXL_LAYOUT
from lorakit.families.sdxl.blocks import block_of as sdxl_block_index


@pytest.fixture(scope="module")
def comps():
    return build_tiny_sd("sd1", seed=0)


def config(*network_args: str, extra: tuple[str, ...] = ()):
    argv = ["--pretrained_model_name_or_path=x", "--train_data_dir=x", "--output_dir=x", "--network_dim=4",
            "--learning_rate=1.0", "--resolution=64", *extra]
    if network_args:
        argv += ["--network_args", *network_args]
    cfg, _ = parse_train_args(argv)
    return cfg


def network_for(comps, cfg) -> LoRANetwork:
    from lorakit.adapters.factory import lora_targets

    family = StableDiffusionFamily()
    return LoRANetwork(lora_targets(spec_of(family, cfg), family, comps))


# --------------------------------------------------------------------------------------------- max-norm


def test_max_norm_follows_its_formula(comps):
    network = network_for(comps, config())
    torch.manual_seed(0)
    for module in network.lora_modules.values():
        module.lora_up.weight.data.normal_(std=0.5)
    before = {n: lora_delta_weight(m.lora_down.weight, m.lora_up.weight, m.alpha).norm().item()
              for n, m in network.lora_modules.items()}
    limit = sorted(before.values())[len(before) // 2]  # about half the modules are above it
    scaled, mean, largest = network.apply_max_norm(limit)
    after = {n: lora_delta_weight(m.lora_down.weight, m.lora_up.weight, m.alpha).norm().item()
             for n, m in network.lora_modules.items()}
    for name, norm in before.items():
        # n = max(‖ΔW‖, v/2); ratio = min(n, v)/n; both factors × √ratio, so ‖ΔW‖ × ratio
        n = max(norm, limit / 2)
        assert after[name] == pytest.approx(norm * min(n, limit) / n, rel=1e-5)
    assert scaled == sum(1 for v in before.values() if v > limit)
    assert largest == pytest.approx(max(before.values()), rel=1e-6)
    assert mean == pytest.approx(sum(after.values()) / len(after), rel=1e-5)


# --------------------------------------------------------------------------------------------- LoRA+


def test_loraplus_groups(comps):
    cfg = config("loraplus_lr_ratio=16", "loraplus_text_encoder_lr_ratio=4", extra=("--unet_lr=0.5",))
    network = network_for(comps, cfg)
    groups, names = optimizer_groups(cfg, network, StableDiffusionFamily())
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1.0, 4.0, 0.5, 8.0]
    ups = {id(m.lora_up.weight) for m in network.lora_modules.values()}
    assert all(id(p) in ups for g in (groups[1], groups[3]) for p in g["params"])
    assert not any(id(p) in ups for g in (groups[0], groups[2]) for p in g["params"])


# --------------------------------------------------------------------------------------------- block indices


@pytest.mark.parametrize("name,index", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 1),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", 2),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", 3),
    ("lora_unet_down_blocks_3_resnets_1_conv2", 11),
    ("lora_unet_mid_block_attentions_0_proj_out", 12),
    ("lora_unet_up_blocks_0_resnets_0_conv1", 13),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", 18),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", 24),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", None),
])
def test_sd_block_index(name, index):
    assert sd_block_index(name) == index


@pytest.mark.parametrize("name,index", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 5),
    ("lora_unet_input_blocks_8_0_in_layers_2", 9),
    ("lora_unet_middle_block_1_proj_in", 11),
    ("lora_unet_output_blocks_2_2_conv", 15),
    ("lora_unet_output_blocks_8_1_proj_out", 21),
    ("lora_unet_out_2", 22),
    ("lora_unet_time_embed_0", 0),
])
def test_sdxl_block_index(name, index):
    assert sdxl_block_index(name) == index
    assert SDXL_LAYOUT.block_index(name) == index


# --------------------------------------------------------------------------------------------- LR presets


def test_presets_against_hand_values():
    s = math.sin
    assert preset_weights("sine", 4, "x") == pytest.approx([0.0, s(math.pi / 6), s(math.pi / 3), 1.0])
    assert preset_weights("cosine", 4, "x") == pytest.approx([1.0, s(math.pi / 3), s(math.pi / 6), 0.0])
    assert preset_weights("linear", 5, "x") == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert preset_weights("reverse_linear+0.5", 3, "x") == pytest.approx([1.5, 1.0, 0.5])
    assert preset_weights("zeros+.25", 3, "x") == [0.25] * 3
    assert preset_weights("1,2", 3, "x") is None


def test_block_lr_weights_flatten_sd_and_sdxl():
    sd = block_lr_weights({"down_lr_weight": "linear", "mid_lr_weight": "2", "up_lr_weight": "0.5,,0.1"}, SD_LAYOUT)
    assert len(sd) == 25
    assert sd[:12] == pytest.approx([i / 11 for i in range(12)])
    assert sd[12] == 2.0
    # empty entries are 0, short lists padded with 1.0, weights <= threshold (0) become 0
    assert sd[13:17] == [0.5, 0.0, 0.1, 1.0]
    xl = block_lr_weights({"mid_lr_weight": "0,1,0.5", "block_lr_zero_threshold": "0.2", "up_lr_weight": "zeros+0.1"},
                          SDXL_LAYOUT)
    assert len(xl) == 23 and xl[0] == 1.0 and xl[22] == 1.0
    assert xl[10:13] == [0.0, 1.0, 0.5] and xl[13:22] == [0.0] * 9


def test_block_lr_groups(comps):
    cfg = config("down_lr_weight=zeros+0.5", "up_lr_weight=sine")
    network = network_for(comps, cfg)
    groups, names = optimizer_groups(cfg, network, StableDiffusionFamily())
    lrs = dict(zip(names, (g["lr"] for g in groups)))
    assert lrs["textencoder"] == 1.0 and lrs["unet_block1"] == 0.5 and lrs["unet_block12"] == 1.0
    # up weight sine[0] = 0: block 13 has no modules at all, so no group either
    assert "unet_block13" not in lrs and not any(sd_block_index(n) == 13 for n in network.lora_modules)
    # the tiny U-Net has two up blocks: OUT00-OUT05 = blocks 13-18
    assert lrs["unet_block18"] == pytest.approx(math.sin(math.pi / 2 * 5 / 11))


# --------------------------------------------------------------------------------------------- block dims


def test_block_dims_create_and_skip_modules(comps):
    dims = ["2"] * 25
    dims[1] = "0"  # IN01: no modules
    dims[18] = "8"
    alphas = ["1"] * 25
    cfg = config("block_dims=" + ",".join(dims), "block_alphas=" + ",".join(alphas))
    network = network_for(comps, cfg)
    modules = network.lora_modules
    assert not any(sd_block_index(n) == 1 for n in modules)
    assert any(sd_block_index(n) == 2 for n in modules)
    for name, module in modules.items():
        index = sd_block_index(name)
        if name.startswith("lora_te"):
            assert module.rank == 4  # text encoder keeps --network_dim
        elif index is not None:
            assert module.rank == int(dims[index]) and float(module.alpha) == 1.0


def test_block_dims_need_25_values(comps):
    cfg = config("block_dims=1,2,3")
    with pytest.raises(ConfigError, match="exactly 25"):
        network_for(comps, cfg)


def test_conv_block_dims(comps):
    cfg = config("block_dims=" + ",".join(["4"] * 25), "conv_dim=2", "conv_block_dims=" + ",".join(["3"] * 12 + ["0"] * 13))
    network = network_for(comps, cfg)
    convs = {n: m for n, m in network.lora_modules.items() if m.is_conv and m.lora_down.weight.shape[-1] == 3}
    assert convs and all(m.rank == 3 and sd_block_index(n) < 12 for n, m in convs.items())
