"""Model-level LoRA tools on a tiny real SD 1.x model: merge into a checkpoint, extract, bad inputs."""

from __future__ import annotations

import pytest

from helpers import targets_of, tool_options as _Options
import torch

from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.cli.lora import main
from lorakit.families.sd.family import StableDiffusionFamily
from lorakit.families.common.ldm_keys import save_sd_single_file
from lorakit.families.sd.loading import load_sd_components
from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder
from lorakit.tools.common import load_lora

RATIO = 0.7


def lora_network(components, *, seed=0) -> LoRANetwork:
    """LoRA on every SD target (rank 4, 3x3 convs rank 2, alpha 2) with non-zero up weights."""
    options = _Options({"conv_dim": "2", "conv_alpha": "2"}, unet_only=False, dim=4)
    network = LoRANetwork(targets_of(StableDiffusionFamily(), components, options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.lora_up.weight.normal_(0.0, 0.1, generator=generator)
            module.alpha.fill_(2.0)
            module.refresh_scale()
    return network


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base model as a single file and as a diffusers folder, a LoRA file, and the merged single file."""
    root = tmp_path_factory.mktemp("models")
    components = build_tiny_sd("sd1")
    base_file, base_folder = root / "base.safetensors", root / "base_diffusers"
    save_sd_single_file(components, base_file)
    save_sd_diffusers_folder(components, base_folder)
    lora = root / "lora.safetensors"
    save_lora_file(lora_network(components).state_dict_kohya(), lora, {"ss_base_model_version": "sd_v1"})
    merged = root / "merged.safetensors"
    assert main(["merge", "--sd_model", str(base_file), "--save_to", str(merged), "--models", str(lora), "--ratios", str(RATIO)]) == 0
    return {"root": root, "base_file": base_file, "base_folder": base_folder, "lora": lora, "merged": merged}


def unet_output(components, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return components.denoiser(latents, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def text_output(components):
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    with torch.no_grad():
        return components.text_encoders[0](ids).last_hidden_state


def test_merged_checkpoint_equals_bypass_forward(files):
    """merge(base, LoRA, r) run as a plain model == base with the LoRA attached beside it at multiplier r."""
    merged = load_sd_components(str(files["merged"]), v2=False, v_parameterization=False)
    base = load_sd_components(str(files["base_file"]), v2=False, v_parameterization=False)
    network = lora_network(base)
    network.load_kohya_state_dict(load_lora_file(files["lora"])[0], source="lora")
    network.set_multiplier(RATIO)
    network.apply_to()
    assert torch.allclose(unet_output(merged), unet_output(base), atol=1e-5)
    assert torch.allclose(text_output(merged), text_output(base), atol=1e-5)
    network.restore()
    assert not torch.allclose(unet_output(merged), unet_output(base), atol=1e-3)  # the LoRA did change something


def test_diffusers_folder_is_merged_into_a_folder(files):
    out = files["root"] / "merged_diffusers"
    args = ["merge", "--sd_model", str(files["base_folder"]), "--save_to", str(out), "--models", str(files["lora"]), "--ratios", str(RATIO)]
    assert main(args) == 0
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()
    from_folder = load_sd_components(str(out), v2=False, v_parameterization=False)
    from_file = load_sd_components(str(files["merged"]), v2=False, v_parameterization=False)
    assert torch.allclose(unet_output(from_folder), unet_output(from_file), atol=1e-6)


def test_extract_recovers_the_merged_lora(files):
    out = files["root"] / "extracted.safetensors"
    args = ["extract", "--model_org", str(files["base_file"]), "--model_tuned", str(files["merged"]), "--save_to", str(out),
            "--dim", "4", "--conv_dim", "2", "--clamp_quantile", "1"]
    assert main(args) == 0
    original, extracted = load_lora(files["lora"]), load_lora(out)
    assert extracted.modules.keys() == original.modules.keys()
    for name, module in original.modules.items():
        recovered = extracted.modules[name]
        assert recovered.rank == module.rank and recovered.alpha == recovered.rank
        expected = RATIO * module.delta()
        # rank >= the LoRA's rank: only float rounding of the two checkpoints separates them
        assert torch.allclose(recovered.delta().reshape(expected.shape), expected, atol=2e-6), name
    metadata = extracted.metadata
    assert metadata["ss_network_dim"] == "4" and metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_extract_at_lower_rank_is_the_best_approximation(files):
    out = files["root"] / "rank2.safetensors"
    args = ["extract", "--model_org", str(files["base_file"]), "--model_tuned", str(files["merged"]), "--save_to", str(out),
            "--dim", "2", "--clamp_quantile", "1"]
    assert main(args) == 0
    original, extracted = load_lora(files["lora"]), load_lora(out)
    assert not any(m.is_spatial for m in extracted.modules.values())  # no --conv_dim: 3x3 convs skipped
    for name, module in extracted.modules.items():
        assert module.rank == 2
        full = RATIO * original.modules[name].delta().reshape(module.up.shape[0], -1)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young: the truncated SVD is the best rank-2 fit
        assert torch.allclose(module.delta().reshape(best.shape), best, atol=1e-5), name


def test_bad_merges_stop_before_writing(files, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    base = ["merge", "--sd_model", str(files["base_file"]), "--save_to", str(out)]
    # shape mismatch: a LoRA made for a wider model
    tensors, _ = load_lora_file(files["lora"])
    key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    tensors[key] = torch.zeros(4, 64, 1, 1)
    wrong = tmp_path / "wrong.safetensors"
    save_lora_file(tensors, wrong)
    assert main([*base, "--models", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "wrong.safetensors" in err and "lora_unet_down_blocks_0_attentions_0_proj_in" in err
    # a module the model does not have (a valid SD name, but the tiny model has no down_blocks.3)
    tensors, _ = load_lora_file(files["lora"])
    name = "lora_unet_down_blocks_3_resnets_0_conv1"
    tensors |= {f"{name}.lora_down.weight": torch.zeros(2, 32, 3, 3), f"{name}.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    unknown = tmp_path / "unknown.safetensors"
    save_lora_file(tensors, unknown)
    assert main([*base, "--models", str(unknown)]) == 2
    assert name in capsys.readouterr().err
    # ratios that do not match the models, a missing file, an SD 2.x flag on an SD 1.x model
    assert main([*base, "--models", str(files["lora"]), "--ratios", "0.5", "0.5"]) == 2
    assert main([*base, "--models", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert main(["merge", "--sd_model", str(tmp_path / "nobase.safetensors"), "--save_to", str(out), "--models", str(files["lora"])]) == 2
    assert "nobase.safetensors" in capsys.readouterr().err
    assert main([*base, "--models", str(files["lora"]), "--v2"]) == 2
    assert main([*base, "--models", str(files["lora"]), "--concat"]) == 2
    assert not out.exists() and not list(tmp_path.glob(".*"))
