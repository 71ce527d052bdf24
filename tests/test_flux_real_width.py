"""FLUX LoRA files at FLUX.1's real width (3072 = 24 heads of 128) read by diffusers' kohya-FLUX converter, which
hard-codes that width for single blocks' linear1 (q, k, v of 3072 rows each, then the 12288-row MLP input) and
so cannot be checked on the narrow test models. One double and one single block; the text widths stay tiny
(the converter does not look at them). Our bypass forward and diffusers' PEFT forward must agree."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from lorakit.adapters.formats import save_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.families.flux.targets import transformer_targets
from lorakit.families.flux.family import FluxFamily, image_position_ids
from lorakit.families.flux.tiny import build_tiny_flux
from test_flux_family import options

LAYERS = {"img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin", "txt_attn_qkv", "txt_attn_proj",
          "txt_mlp_0", "txt_mlp_2", "txt_mod_lin", "linear1", "linear2", "modulation_lin"}


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline()


def build_pipeline():
    """A FluxPipeline over a width-3072 transformer (1 double + 1 single block) and the tiny text encoders."""
    comps = build_tiny_flux(0)
    torch.manual_seed(0)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    transformer.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # variance 1/fan_in: activations of order 1 at every layer (uniform: faster than normal)
        for name, param in transformer.named_parameters():
            if param.ndim > 1:
                bound = (3.0 / param.shape[-1]) ** 0.5
                param.uniform_(-bound, bound, generator=generator)
            else:
                param.fill_(1.0 if "norm" in name else 0.0)
    comps.denoiser = transformer.eval().requires_grad_(False)
    return FluxFamily().pipeline(comps)


@torch.no_grad()
def forward(transformer):
    gen = torch.Generator().manual_seed(1)
    return transformer(
        hidden_states=torch.randn(1, 16, 64, generator=gen), encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
        pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.4]), guidance=torch.tensor([3.5]),
        img_ids=image_position_ids(8, 8, torch.device("cpu"), torch.float32), txt_ids=torch.zeros(8, 3), return_dict=False,
    )[0]


@pytest.mark.parametrize("network_args", [[], ["split_qkv=True"]], ids=["fused", "split_qkv"])
def test_diffusers_reads_double_and_single_blocks_at_width_3072(pipe, tmp_path, network_args):
    transformer = pipe.transformer
    network = LoRANetwork(transformer_targets(transformer, flux_args(network_args), 2.0))
    assert {n.split("blocks_0_", 1)[1] for n in network.lora_modules} == LAYERS
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in network.lora_modules.values():
            up = module.lora_up.weight
            up.copy_(torch.randn(up.shape, generator=generator) * 0.5)
    network.apply_to()  # split views mask their up matrices to block-diagonal here
    path = tmp_path / "lora.safetensors"
    save_lora_file(network.state_dict_kohya(), path, {"ss_network_module": "networks.lora_flux"}, save_dtype=torch.float32, model_format="safetensors")
    ours = forward(transformer)
    network.restore()
    base = forward(transformer)
    pipe.load_lora_weights(str(path), adapter_name="ours")
    try:
        theirs = forward(transformer)
    finally:
        pipe.unload_lora_weights()
    scale = ours.abs().max()
    assert (ours - base).abs().max() > 0.05 * scale  # the LoRA matters
    assert (theirs - ours).abs().max() < 1e-4 * max(1.0, float(scale)), ((theirs - ours).abs().max(), scale)


def flux_args(network_args):
    from helpers import family_args_of

    return family_args_of(FluxFamily(), options(network_train_unet_only=True, network_args=network_args))
