"""Files that load everywhere, and a loader table that says so truthfully.

The ComfyUI key facts below are those of `comfy/lora.py` (`model_lora_keys_clip`: every text-encoder weight as
`text_encoders.<name>.transformer.<module path>`, CLIP layers also as `text_encoder[_2].text_model.…`) and of
its diffusers-name maps for the SD3/FLUX transformers; they are written down here, not imported.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from helpers import build_from_options, network_options, random_network
from lorakit.families.registry import fixtures, get_family
from lorakit.tools.convert import convert_to_diffusers
from lorakit.tools.inspect_lora import describe
from lorakit.tools.lora_state import read_modules

CLIP_LAYERS = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


def linear_paths(root: nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}{path}" for path, module in root.named_modules() if isinstance(module, nn.Linear)}


def comfy_text_encoder_modules(comps, clip_components: tuple[str, ...]) -> set[str]:
    """The diffusers-layout text-encoder module names ComfyUI maps: CLIP by diffusers' component names, T5 only
    under ComfyUI's generic `text_encoders.t5xxl.transformer.` name."""
    names: set[str] = set()
    for component, encoder in zip(clip_components, comps.text_encoders):
        # ComfyUI's CLIP paths are transformers' `text_model.…` (newer CLIPTextModels hold the layers directly)
        paths = {p if p.startswith("text_model.") else f"text_model.{p}" for p in linear_paths(encoder, "")}
        names |= {f"{component}.{p}" for p in paths if CLIP_LAYERS.fullmatch(p)}
    names |= linear_paths(comps.text_encoders[-1], "text_encoders.t5xxl.transformer.")
    return names


def delta(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
    return up @ down * (float(state[f"{name}.alpha"]) / down.shape[0])


def t5_lora(family_name: str, seed: int = 1):
    """A tiny model of the family and a random LoRA on every layer of its denoiser, CLIP and T5, converted to the
    diffusers layout."""
    family = get_family(family_name)
    build = fixtures(family_name)
    comps = build.build_tiny_sd3(0, "sd3.5m") if family_name == "sd3" else build.build_tiny_flux(0)
    module = family.lora_network_modules[0]
    network = random_network(family, comps, network_options(module, "train_t5xxl=True"), seed)
    kohya = {k: v.detach().clone() for k, v in network.state_dict_kohya().items()}
    assert any(k.startswith("lora_te3_encoder_block_") for k in kohya), "the LoRA trains T5"
    converted, metadata = family.lora_to_diffusers(kohya, {})
    return family, comps, kohya, converted, metadata


@pytest.mark.parametrize("family_name, clips", [("sd3", ("text_encoder", "text_encoder_2")), ("flux", ("text_encoder",))])
def test_diffusers_layout_t5_modules_are_named_as_comfyui_maps_them(family_name, clips):
    family, comps, kohya, converted, metadata = t5_lora(family_name)
    modules = {k.rsplit(".lora_", 1)[0] for k in converted}
    text = {m for m in modules if not m.startswith("transformer.")}
    t5 = {m for m in text if m.startswith("text_encoders.t5xxl.transformer.")}
    assert t5 and text <= comfy_text_encoder_modules(comps, clips), sorted(text - comfy_text_encoder_modules(comps, clips))[:5]
    assert {m for m in modules if m.startswith("transformer.")} <= linear_paths(comps.denoiser, "transformer.")

    back, _ = family.lora_from_diffusers(converted, metadata)
    assert back.keys() == kohya.keys()
    for name in {k.partition(".")[0] for k in kohya}:  # the same ΔW (FLUX's converter folds alpha into up)
        assert torch.allclose(delta(back, name), delta(kohya, name), rtol=1e-5, atol=1e-6), name

    report = describe(converted, {"ss_base_model_version": family.version_prefixes[0] if family.version_prefixes else ""})
    assert report["loaders"]["ComfyUI"] == "yes", report["loaders"]
    assert report["loaders"]["diffusers"].startswith("partly: its T5 modules ("), report["loaders"]
    assert report["modules_per_component"]["t5xxl"] == len(t5)


@pytest.mark.parametrize("family_name", ["sd3", "flux"])
def test_files_with_diffusers_style_t5_names_still_read_and_are_reported_as_partial(family_name):
    family, _, kohya, converted, metadata = t5_lora(family_name)
    component = "text_encoder_3" if family_name == "sd3" else "text_encoder_2"
    old = {k.replace("text_encoders.t5xxl.transformer.", f"{component}."): v for k, v in converted.items()}
    back, _ = family.lora_from_diffusers(old, metadata)
    assert back.keys() == kohya.keys(), "files of earlier versions read back whole"
    report = describe(old, {})
    assert report["family"] == family_name
    assert report["loaders"]["ComfyUI"].startswith("partly: its T5 modules under diffusers-style names ("), report["loaders"]


@pytest.mark.parametrize("family_name", ["sd3", "flux"])
def test_diffusers_loads_a_file_with_t5_modules(family_name, tmp_path):
    """diffusers ignores T5 LoRA modules; a file holding them under ComfyUI's name must still load."""
    family, comps, _, converted, _ = t5_lora(family_name)
    file = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in converted.items()}, str(file))
    pipe = family.pipeline(comps)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("sks toy", num_inference_steps=2, height=64, width=64, max_sequence_length=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    base = render()
    pipe.load_lora_weights(str(file))
    assert (render() - base).abs().max() > 1e-3, "the transformer's LoRA applies"


@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
def test_diffusers_layout_unet_files_are_partial_in_comfyui(family_name):
    """ComfyUI loads the text encoders and the U-Net's other modules of such a file, not its attention projections."""
    family = get_family(family_name)
    build = fixtures(family_name)
    comps = build.build_tiny_sd("sd1", seed=0) if family_name == "sd" else build.build_tiny_sdxl(seed=0)
    network = random_network(family, comps, network_options("networks.lora"), 2)
    kohya = {k: v.detach() for k, v in network.state_dict_kohya().items()}
    converted, _ = convert_to_diffusers(read_modules(kohya, family.lora_layout, source="test")[0], family, {})
    verdict = describe(converted, {})["loaders"]["ComfyUI"]
    match = re.fullmatch(r"partly: its U-Net attention projections \((\d+) of (\d+) modules\) are dropped \('lora key not loaded'\)", verdict)
    assert match and 0 < int(match[1]) < int(match[2]), verdict


def test_output_axis_dora_is_reported_as_applied_differently():
    family = get_family("sd")
    comps = fixtures("sd").build_tiny_sd("sd1", seed=0)
    for wd_on_output, expected in ((False, "yes"), (True, "loads, but applies the output-axis DoRA magnitude")):
        options = network_options("networks.lora", "dora_wd=True", f"wd_on_output={wd_on_output}")
        network = build_from_options(options, family, comps, torch.device("cpu"))
        loaders = describe({k: v.detach() for k, v in network.state_dict_kohya().items()}, {})["loaders"]
        assert loaders["ComfyUI"].startswith(expected), loaders
