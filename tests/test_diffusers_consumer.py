"""diffusers, an independent reader of kohya files, loads our LoRA files and gives the images our merge gives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline

from lorakit.adapters.formats import save_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.families.sd.family import StableDiffusionFamily
from lorakit.toy.tiny_models import build_tiny_sd, save_sd_diffusers_folder

PROMPT = "a red square on a blue background"


def lora_options(conv: bool, unet_only: bool = False, te_only: bool = False) -> SimpleNamespace:
    args = ["conv_dim=4", "conv_alpha=2"] if conv else None
    return SimpleNamespace(
        network_dim=4, network_alpha=2.0, network_args=args,
        network_kwargs=lambda: dict(a.split("=", 1) for a in (args or [])),
        network_train_unet_only=unet_only, network_train_text_encoder_only=te_only,
    )


def random_network(comps, cfg, seed: int) -> LoRANetwork:
    network = LoRANetwork(StableDiffusionFamily().adapter_targets(comps, cfg))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            # large enough that a dropped or mis-mapped module changes the image visibly
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return network


def render(pipe) -> torch.Tensor:
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "sd1"
    save_sd_diffusers_folder(build_tiny_sd("sd1", seed=0), path)
    return path


def load_pipeline(path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "conv,unet_only,te_only",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
    ids=["lierla-unet-te", "c3lier-unet-te", "unet-only", "te-only"],
)
def test_diffusers_load_lora_weights_matches_our_merge(pipeline_dir, tmp_path, conv, unet_only, te_only):
    cfg = lora_options(conv, unet_only, te_only)
    ours = load_pipeline(pipeline_dir)
    comps = SimpleNamespace(denoiser=ours.unet, text_encoders=[ours.text_encoder])
    network = random_network(comps, cfg, seed=3)
    lora_file = tmp_path / "lora.safetensors"
    save_lora_file(network.state_dict_kohya(), lora_file, {"ss_network_module": "networks.lora"})
    base = render(ours)
    network.merge_to_base()
    merged = render(ours)

    theirs = load_pipeline(pipeline_dir)
    theirs.load_lora_weights(str(lora_file), adapter_name="ours")
    loaded = render(theirs)

    assert (merged - base).abs().max() > 1e-2, "the LoRA must change the image for the comparison to mean anything"
    assert (loaded - merged).abs().max() < 1e-4
