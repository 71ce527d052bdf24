"""diffusers, an independent reader of kohya files, loads our SDXL LoRA files (SGM U-Net names, lora_te1_,
lora_te2_) and renders the images our own merge renders."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from lorakit.adapters.formats import save_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.families.sdxl.family import StableDiffusionXLFamily
from lorakit.families.sdxl.tiny import build_tiny_sdxl, save_sdxl_diffusers_folder

PROMPT = "a red square on a blue background"


def lora_options(conv: bool, unet_only: bool = False, te_only: bool = False) -> SimpleNamespace:
    args = ["conv_dim=4", "conv_alpha=2"] if conv else None
    return SimpleNamespace(
        network_dim=4, network_alpha=2.0, network_args=args,
        network_kwargs=lambda: dict(a.split("=", 1) for a in (args or [])),
        network_train_unet_only=unet_only, network_train_text_encoder_only=te_only,
    )


def random_network(comps, cfg, seed: int) -> LoRANetwork:
    network = LoRANetwork(StableDiffusionXLFamily().adapter_targets(comps, cfg))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in network.named_parameters():
            # large enough that a dropped or mis-mapped module changes the image visibly
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return network


def render(pipe) -> torch.Tensor:
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "sdxl"
    save_sdxl_diffusers_folder(build_tiny_sdxl(seed=0), path)
    return path


def load_pipeline(path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "conv,unet_only,te_only",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
    ids=["lierla-unet-te1-te2", "c3lier-unet-te1-te2", "unet-only", "te-only"],
)
def test_diffusers_load_lora_weights_matches_our_merge(pipeline_dir, tmp_path, conv, unet_only, te_only):
    cfg = lora_options(conv, unet_only, te_only)
    ours = load_pipeline(pipeline_dir)
    comps = SimpleNamespace(denoiser=ours.unet, text_encoders=[ours.text_encoder, ours.text_encoder_2])
    network = random_network(comps, cfg, seed=3)
    state = network.state_dict_kohya()
    prefixes = {key.split("_")[1] for key in state}
    assert prefixes == ({"unet"} if unet_only else {"te1", "te2"} if te_only else {"unet", "te1", "te2"})
    lora_file = tmp_path / "lora.safetensors"
    save_lora_file(state, lora_file, {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    base = render(ours)
    network.merge_to_base()
    merged = render(ours)

    theirs = load_pipeline(pipeline_dir)
    theirs.load_lora_weights(str(lora_file), adapter_name="ours")
    loaded = render(theirs)
    # every kind of layer was really adapted (a silently dropped module would fail the comparison too, but
    # these say which)
    if not te_only:
        assert hasattr(theirs.unet.down_blocks[1].attentions[0].transformer_blocks[1].attn2.to_k, "lora_A")
        assert hasattr(theirs.unet.down_blocks[0].resnets[0].conv1, "lora_A") == conv
        assert hasattr(theirs.unet.up_blocks[0].upsamplers[0].conv, "lora_A") == conv
    if not unet_only:
        assert hasattr(theirs.text_encoder_2.text_model.encoder.layers[2].mlp.fc2, "lora_A")

    assert (merged - base).abs().max() > 1e-2, "the LoRA must change the image for the comparison to mean anything"
    assert (loaded - merged).abs().max() < 1e-4
