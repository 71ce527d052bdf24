"""LoRA-file tools: resize, convert, LoRA+LoRA merge and inspect, on LoRAs of a tiny real SD 1.x model."""

from __future__ import annotations

import json

import pytest

from helpers import targets_of, tool_options as _Options
import torch

from lorakit.adapters.formats import addnet_hashes, load_lora_file, save_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.cli.lora import main
from lorakit.errors import CheckpointError
from lorakit.families.sd.family import StableDiffusionFamily
from lorakit.families.sd.tiny import build_tiny_sd
from lorakit.tools.common import load_lora
from lorakit.families.registry import guess_lora_family as guess_family
from lorakit.families.sd.lora_keys import LORA_LAYOUT as SD_LAYOUT
from lorakit.tools.lora_state import LoraFactors, read_modules
from lorakit.tools.merge import merge_loras
from lorakit.tools.resize import resize_modules
from lorakit.tools.svd import choose_rank


def random_lora(components, *, rank=4, conv_rank=2, alpha=2.0, seed=0) -> dict[str, torch.Tensor]:
    """A kohya state dict for every SD target (C3Lier convs included) with non-zero up weights."""
    options = _Options({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)} if conv_rank else {}, unet_only=False, dim=rank)
    network = LoRANetwork(targets_of(StableDiffusionFamily(), components, options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.lora_up.weight.normal_(0.0, 0.1, generator=generator)
            module.alpha.fill_(alpha)
    return network.state_dict_kohya()


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd("sd1")


@pytest.fixture(scope="module")
def lora_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "a.safetensors"
    save_lora_file(random_lora(tiny), path, {"ss_base_model_version": "sd_v1", "ss_network_dim": "4", "ss_network_alpha": "2"})
    return path


def deltas(path) -> dict[str, torch.Tensor]:
    return {name: m.delta() for name, m in load_lora(path).modules.items()}


def assert_same_deltas(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name].reshape(a[name].shape), atol=tol, rtol=1e-4), name


# ---------------------------------------------------------------------------------------------- key layouts


def test_kohya_names_map_to_diffusers_paths_and_back(tiny):
    names = SD_LAYOUT.module_index(tiny)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    for name in names:
        path = SD_LAYOUT.kohya_to_path(name)
        assert path is not None, name
        assert SD_LAYOUT.path_to_kohya(path) == name
    assert SD_LAYOUT.kohya_to_path("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") == (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    assert SD_LAYOUT.kohya_to_path("lora_unet_double_blocks_0_img_attn_qkv") is None
    assert guess_family(["lora_unet_double_blocks_0_img_attn_qkv"]) == "flux"
    assert guess_family(["lora_te1_text_model_encoder_layers_0_mlp_fc1"]) == "sdxl"
    assert guess_family(["x"], {"ss_base_model_version": "sd_v2"}) == "sd"


# ---------------------------------------------------------------------------------------------- resize


def test_choose_rank_dynamic_rules():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    assert choose_rank(s, 6, "sv_ratio", 5.0) == 4  # S > 8/5: three values -> index 3 -> rank 4
    assert choose_rank(s, 2, "sv_ratio", 5.0) == 2  # capped at the maximum rank
    cumulative = torch.cumsum(s, 0) / s.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(0.9))) + 1
    assert choose_rank(s, 6, "sv_cumulative", 0.9) == index + 1
    assert choose_rank(torch.zeros(4), 4, "sv_fro", 0.9, collapse_zero=True) == 1


def test_resize_to_full_rank_is_lossless(lora_file):
    lora = load_lora(lora_file)
    resized, report = resize_modules(lora.modules, 64, new_conv_rank=64)
    for name, module in lora.modules.items():
        assert resized[name].rank == module.rank
        assert torch.allclose(resized[name].delta(), module.delta(), atol=1e-6)
        # the stored scale alpha/rank is unchanged by the new alpha rule
        assert resized[name].scale == pytest.approx(module.scale)
    assert report.mean_fro_retained() == pytest.approx(1.0)


def test_resize_to_lower_rank_keeps_largest_singular_values(lora_file):
    lora = load_lora(lora_file)
    resized, _ = resize_modules(lora.modules, 2, new_conv_rank=1)
    for name, module in lora.modules.items():
        target = 1 if module.is_spatial else 2
        assert resized[name].rank == target
        full = module.delta().reshape(module.up.shape[0], -1)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        best = (u[:, :target] * s[:target]) @ vh[:target]
        assert torch.allclose(resized[name].delta().reshape(best.shape), best, atol=1e-5), name


def test_resize_cli_writes_metadata_and_hashes_of_saved_precision(lora_file, tmp_path):
    out = tmp_path / "small.safetensors"
    assert main(["resize", "--model", str(lora_file), "--save_to", str(out), "--new_rank", "2", "--save_precision", "fp16"]) == 0
    tensors, metadata = load_lora_file(out)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert metadata["ss_network_dim"] == "2"
    assert metadata["ss_training_comment"].startswith("dimension is resized from 4 to 2")
    assert addnet_hashes(tensors, metadata)["sshs_model_hash"] == metadata["sshs_model_hash"]
    dyn = tmp_path / "dyn.safetensors"
    args = ["resize", "--model", str(lora_file), "--save_to", str(dyn), "--new_rank", "4", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9"]
    assert main(args) == 0
    assert load_lora_file(dyn)[1]["ss_network_dim"] == "Dynamic"


# ---------------------------------------------------------------------------------------------- convert


def test_convert_kohya_diffusers_kohya_round_trip(lora_file, tmp_path):
    original, _ = load_lora_file(lora_file)
    peft, back = tmp_path / "peft.safetensors", tmp_path / "back.safetensors"
    assert main(["convert", "--model", str(lora_file), "--save_to", str(peft), "--to", "diffusers", "--keep_alpha"]) == 0
    converted, _ = load_lora_file(peft)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in converted
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in converted
    assert main(["convert", "--model", str(peft), "--save_to", str(back), "--to", "kohya"]) == 0
    restored, _ = load_lora_file(back)
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_convert_folds_alpha_into_lora_b(lora_file, tmp_path):
    peft, back = tmp_path / "peft.safetensors", tmp_path / "back.safetensors"
    assert main(["convert", "--src_path", str(lora_file), "--dst_path", str(peft), "--dst", "peft"]) == 0
    converted, _ = load_lora_file(peft)
    assert not any(k.endswith(".alpha") for k in converted)
    assert main(["convert", "--model", str(peft), "--save_to", str(back), "--to", "sd-scripts"]) == 0
    assert_same_deltas(deltas(lora_file), deltas(back), tol=1e-7)
    # a loader that assumes alpha = rank (PEFT's rule) sees the original ΔW
    modules, style = read_modules(converted, SD_LAYOUT, source="peft")
    assert style == "peft"
    assert all(m.alpha is None for m in modules.values())


# ---------------------------------------------------------------------------------------------- LoRA + LoRA


def test_merge_ratio_is_applied_once_in_every_mode(lora_file, tmp_path):
    lora = load_lora(lora_file)
    expected = {n: 0.5 * m.delta() for n, m in lora.modules.items()}
    for mode in ("same", "concat", "svd"):
        merged = merge_loras([lora], [0.5], mode=mode, new_rank=4, new_conv_rank=2)
        assert_same_deltas(expected, {n: m.delta() for n, m in merged.items()})


def test_concat_merge_is_exact_sum_and_negative_ratios_survive(tiny, lora_file, tmp_path):
    other = tmp_path / "b.safetensors"
    save_lora_file(random_lora(tiny, rank=8, conv_rank=3, alpha=8.0, seed=1), other)
    out = tmp_path / "cat.safetensors"
    args = ["merge", "--save_to", str(out), "--models", str(lora_file), str(other), "--ratios", "0.7", "-0.4", "--concat", "--shuffle"]
    assert main(args) == 0
    a, b = deltas(lora_file), deltas(other)
    assert_same_deltas({n: 0.7 * a[n] - 0.4 * b[n] for n in a}, deltas(out))
    merged = load_lora(out)
    assert next(iter(merged.modules.values())).rank in (12, 5)
    assert json.loads(merged.metadata["ss_network_args"])["conv_dim"] == "5"
    # different ranks without --concat or --new_rank: refused, nothing written
    same = tmp_path / "same.safetensors"
    assert main(["merge", "--save_to", str(same), "--models", str(lora_file), str(other)]) == 2
    assert not same.exists()


def test_same_rank_merge_is_best_rank_r_fit_of_the_exact_sum():
    generator = torch.Generator().manual_seed(3)
    make = lambda: LoraFactors("lora_unet_conv_in", torch.randn(4, 16, generator=generator), torch.randn(8, 4, generator=generator), 2.0)  # noqa: E731

    class Source:
        def __init__(self, module):
            self.path, self.modules = "x", {module.name: module}

    first, second = make(), make()
    merged = merge_loras([Source(first), Source(second)], [1.0, 0.5])["lora_unet_conv_in"]
    exact = first.delta() + 0.5 * second.delta()
    u, s, vh = torch.linalg.svd(exact)
    assert merged.rank == 4 and merged.alpha == 2.0
    assert torch.allclose(merged.delta(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)


# ---------------------------------------------------------------------------------------------- inspect and errors


def test_inspect_reports_structure_and_loaders(lora_file, capsys):
    assert main(["inspect", str(lora_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["algorithm"].startswith("locon")
    assert report["family"] == "sd" and report["layout"] == "kohya"
    assert report["modules_per_component"] == {"unet": 117, "text_encoder": 12}
    assert report["ranks"] == {"2": 26, "4": 103} and report["alphas"] == {"2": 129}
    assert report["loaders"]["diffusers"].startswith("yes")
    assert report["metadata"]["ss_network_dim"] == "4"


def test_bad_lora_files_name_the_file_and_key(lora_file, tmp_path, capsys):
    tensors, _ = load_lora_file(lora_file)
    tensors["lora_unet_nonexistent_block_proj.lora_down.weight"] = torch.zeros(4, 8)
    bad = tmp_path / "bad.safetensors"
    save_lora_file(tensors, bad)
    with pytest.raises(CheckpointError, match="lora_unet_nonexistent_block_proj"):
        load_lora(bad)
    out = tmp_path / "out.safetensors"
    assert main(["resize", "--model", str(bad), "--save_to", str(out)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err and not out.exists()
    assert main(["resize", "--model", str(tmp_path / "missing.safetensors"), "--save_to", str(out)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["merge", "--save_to", str(out), "--models", str(lora_file), str(lora_file), "--ratios", "1"]) == 2
    assert "--ratios" in capsys.readouterr().err and not out.exists()
    assert main(["resize", "--model", str(lora_file), "--save_to", str(tmp_path / "x.txt")]) == 2
    assert main(["resize", "--model", str(lora_file), "--save_to", str(out), "--dynamic_method", "sv_ratio"]) == 2
    assert not list(tmp_path.glob(".*.tmp"))
