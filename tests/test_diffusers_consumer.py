"""diffusers, an independent reader of kohya files, loads our LoRA files and gives the images our merge gives."""

from __future__ import annotations

import pytest
from diffusers import StableDiffusionPipeline

from helpers import diffusers_round_trip, load_local_pipeline, lora_options
from lorakit.families.sd.family import StableDiffusionFamily
from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "sd1"
    save_sd_diffusers_folder(build_tiny_sd("sd1", seed=0), path)
    return path


def load_pipeline(path) -> StableDiffusionPipeline:
    return load_local_pipeline(StableDiffusionPipeline, path, safety_checker=None)


@pytest.mark.parametrize(
    "conv,unet_only,te_only",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
    ids=["lierla-unet-te", "c3lier-unet-te", "unet-only", "te-only"],
)
def test_diffusers_load_lora_weights_matches_our_merge(pipeline_dir, tmp_path, conv, unet_only, te_only):
    result = diffusers_round_trip(
        load_pipeline, pipeline_dir, StableDiffusionFamily(), ("text_encoder",), lora_options(conv, unet_only, te_only),
        tmp_path / "lora.safetensors", {"ss_network_module": "networks.lora"},
    )
    merged, base, loaded = result.merged, result.base, result.loaded

    assert (merged - base).abs().max() > 1e-2, "the LoRA must change the image for the comparison to mean anything"
    assert (loaded - merged).abs().max() < 1e-4
