"""diffusers, an independent reader of kohya files, loads our SDXL LoRA files (SGM U-Net names, lora_te1_,
lora_te2_) and renders the images our own merge renders."""

from __future__ import annotations

import pytest
from diffusers import StableDiffusionXLPipeline

from helpers import diffusers_round_trip, load_local_pipeline, lora_options
from lorakit.families.sdxl.family import StableDiffusionXLFamily
from lorakit.families.sdxl.tiny import build_tiny_sdxl, save_sdxl_diffusers_folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "sdxl"
    save_sdxl_diffusers_folder(build_tiny_sdxl(seed=0), path)
    return path


def load_pipeline(path) -> StableDiffusionXLPipeline:
    return load_local_pipeline(StableDiffusionXLPipeline, path)


@pytest.mark.parametrize(
    "conv,unet_only,te_only",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
    ids=["lierla-unet-te1-te2", "c3lier-unet-te1-te2", "unet-only", "te-only"],
)
def test_diffusers_load_lora_weights_matches_our_merge(pipeline_dir, tmp_path, conv, unet_only, te_only):
    result = diffusers_round_trip(
        load_pipeline, pipeline_dir, StableDiffusionXLFamily(), ("text_encoder", "text_encoder_2"),
        lora_options(conv, unet_only, te_only), tmp_path / "lora.safetensors",
        {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"},
    )
    theirs, merged, base, loaded = result.theirs, result.merged, result.base, result.loaded
    prefixes = {key.split("_")[1] for key in result.state}
    assert prefixes == ({"unet"} if unet_only else {"te1", "te2"} if te_only else {"unet", "te1", "te2"})
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
