"""LoRA tool recipes: block weights in merges (`--lbws`), DyLoRA splits and the base-relative resize recipe
(`fro_ckpt=1,thr=-3.55`), on LoRAs of a tiny real SD 1.x model."""

from __future__ import annotations

import json
import math

import pytest

from helpers import targets_of, tool_options as _Options
import torch

from lorakit.adapters.formats import save_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.errors import ConfigError
from lorakit.families.registry import get_family
from lorakit.families.sd.family import StableDiffusionFamily
from lorakit.families.sd.tiny import build_tiny_sd
from lorakit.tools.common import LoadedLora, load_lora
from lorakit.families.sd.lora_keys import LORA_LAYOUT as SD_LAYOUT
from lorakit.tools.lbw import LBW_SLOTS, apply_block_weights, lbw_slot, parse_lbws
from lorakit.tools.lora_state import LoraFactors
from lorakit.tools.merge import merge_loras


def random_network(components, *, rank=4, conv_rank=2, alpha=2.0, seed=0, make=None) -> LoRANetwork:
    """A LoRA network on every SD target (3x3 convs included) with non-zero up weights."""
    options = _Options({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)} if conv_rank else {}, unet_only=False, dim=rank)
    targets = targets_of(StableDiffusionFamily(), components, options)
    network = LoRANetwork(targets) if make is None else LoRANetwork(targets, module_factory=make)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.lora_up.weight.normal_(0.0, 0.1, generator=generator)
            module.alpha.fill_(alpha)
            module.refresh_scale()  # the forward uses the cached alpha / rank, as after loading a file
    return network


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd("sd1")


@pytest.fixture(scope="module")
def lora_files(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    paths = []
    for seed, rank in ((0, 4), (1, 4)):
        path = folder / f"lora{seed}.safetensors"
        state = random_network(tiny, rank=rank, seed=seed).state_dict_kohya()
        save_lora_file(state, path, {"ss_base_model_version": "sd_v1", "ss_network_dim": str(rank)})
        paths.append(path)
    return paths


def deltas(modules) -> dict[str, torch.Tensor]:
    return {name: m.delta() for name, m in modules.items()}


# ---------------------------------------------------------------------------------------------- block weights


def test_lbw_slots_follow_the_lora_block_weight_numbering():
    sd = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1": "BASE",
        "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01",
        "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
        "lora_unet_down_blocks_1_attentions_1_proj_out": "IN05",
        "lora_unet_mid_block_attentions_0_proj_in": "MID",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
        "lora_unet_up_blocks_1_attentions_0_proj_in": "OUT03",
        "lora_unet_up_blocks_3_resnets_2_conv1": "OUT11",
    }
    sdxl = {
        "lora_te2_text_model_encoder_layers_3_self_attn_q_proj": "BASE",
        "lora_unet_time_embed_0": "IN00",
        "lora_unet_input_blocks_4_1_proj_in": "IN04",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2": "IN08",
        "lora_unet_middle_block_1_proj_out": "MID",
        "lora_unet_middle_block_2_in_layers_2": "MID",
        "lora_unet_output_blocks_0_1_proj_in": "OUT00",
        "lora_unet_output_blocks_5_1_proj_out": "OUT05",
        "lora_unet_out_2": "OUT09",
    }
    for family, table in (("sd", sd), ("sdxl", sdxl)):
        for name, slot in table.items():
            assert LBW_SLOTS[lbw_slot(name, get_family(family))] == slot, name
    assert lbw_slot("lora_unet_conv_in", get_family("sd")) is None


def test_lbws_of_the_wrong_length_or_family_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"--lbws \(for a.safetensors\): 12 entries; a SD 1.x/2.x LoRA takes 17 or 26"):
        parse_lbws(["[" + ",".join(["1"] * 12) + "]"], ["a.safetensors"], get_family("sd"))
    with pytest.raises(ConfigError, match="SDXL LoRA takes 12 or 20 entries"):
        parse_lbws(["[" + ",".join(["1"] * 17) + "]"], ["a.safetensors"], get_family("sdxl"))
    with pytest.raises(ConfigError, match="FLUX.1 LoRAs; block weights exist for"):
        parse_lbws(["[1]"], ["a.safetensors"], get_family("flux"))
    with pytest.raises(ConfigError, match="one list per file"):
        parse_lbws(["[1]"], ["a.safetensors", "b.safetensors"], get_family("sd"))
    with pytest.raises(ConfigError, match="JSON list of numbers"):
        parse_lbws(["[1, 'x']"], ["a.safetensors"], get_family("sd"))
    assert parse_lbws(["[" + ",".join(["0.5"] * 26) + "]"], ["a"], get_family("sd")) == [[0.5] * 26]


def _lbw17(**slots: float) -> list[float]:
    """A 17-entry SD list, 1 everywhere except the named slots."""
    filled = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12)))
    return [slots.get(name, 1.0) for name in filled]


def test_lbw_zero_removes_exactly_that_block_and_ones_change_nothing(lora_files):
    first, second = (load_lora(p) for p in lora_files)
    plain = merge_loras([first, second], [1.0, 0.5], mode="svd", new_rank=8, new_conv_rank=4)
    ones = [apply_block_weights(lora, _lbw17()) for lora in (first, second)]
    same = merge_loras(ones, [1.0, 0.5], mode="svd", new_rank=8, new_conv_rank=4)
    assert same.keys() == plain.keys()
    assert all(torch.equal(same[n].down, plain[n].down) and torch.equal(same[n].up, plain[n].up) for n in plain)

    # IN01 off in both files: its modules are gone, nothing else changes
    off = [apply_block_weights(lora, _lbw17(IN01=0.0)) for lora in (first, second)]
    merged = merge_loras(off, [1.0, 0.5], mode="svd", new_rank=8, new_conv_rank=4)
    in01 = {n for n in plain if lbw_slot(n, get_family("sd")) == LBW_SLOTS.index("IN01")}
    assert in01 and merged.keys() == plain.keys() - in01
    assert all(torch.equal(merged[n].up, plain[n].up) for n in merged)

    # IN01 off in the first file only: those modules are the second file's alone (rank 8 ≥ 4 keeps it exact)
    mixed = merge_loras([off[0], second], [1.0, 0.5], mode="svd", new_rank=8, new_conv_rank=4)
    for name in in01:
        assert torch.allclose(mixed[name].delta(), 0.5 * second.modules[name].delta(), atol=1e-6), name


def test_lbw_scales_block_deltas_exactly_in_sdxl_names():
    generator = torch.Generator().manual_seed(5)

    def module(name: str) -> LoraFactors:
        return LoraFactors(name, torch.randn(2, 6, generator=generator), torch.randn(5, 2, generator=generator), 1.0)

    names = ["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_input_blocks_4_1_proj_in",
             "lora_unet_middle_block_1_proj_out", "lora_unet_output_blocks_2_1_proj_in", "lora_unet_out_2"]
    lora = LoadedLora("x.safetensors", {n: module(n) for n in names}, {}, "kohya", StableDiffusionFamily())
    # 12 entries: BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05
    weighted = apply_block_weights(lora, [0.5, 2.0, 1, 1, 1, 0.0, 1, 1, -1.0, 1, 1, 1], family=get_family("sdxl"))
    merged = merge_loras([weighted], [1.0], mode="concat")
    factor = {names[0]: 0.5, names[1]: 2.0, names[3]: -1.0, names[4]: 1.0}
    assert merged.keys() == factor.keys()  # the middle block (weight 0) is left out
    for name, w in factor.items():
        assert torch.allclose(merged[name].delta(), w * lora.modules[name].delta(), atol=1e-6), name


# ---------------------------------------------------------------------------------------------- DyLoRA split


@pytest.fixture(scope="module")
def dylora(tiny, tmp_path_factory):
    """A DyLoRA network (rank 4, unit 2, 3x3 convs at the same rank) saved as networks.dylora saves it."""
    from lorakit.adapters.dylora import DyLoRAModule

    make = lambda t: DyLoRAModule(t.name, t.module, t.rank, t.alpha, unit=2)  # noqa: E731
    network = random_network(tiny, rank=4, conv_rank=4, alpha=3.0, seed=2, make=make)
    with torch.no_grad():  # DyLoRA starts with random down factors too; make them distinct per component
        for module in network.lora_modules.values():
            module.lora_down.weight.mul_(1.0 + torch.arange(4.0).reshape(-1, *[1] * (module.lora_down.weight.dim() - 1)))
    path = tmp_path_factory.mktemp("dylora") / "dy.safetensors"
    metadata = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.dylora", "ss_network_dim": "4",
                "ss_network_alpha": "3.0", "ss_network_args": json.dumps({"unit": "2", "conv_dim": "4"})}
    save_lora_file(network.state_dict_kohya(), path, metadata)
    return network, path


def _rank_r_output_change(module, x: torch.Tensor, rank: int) -> torch.Tensor:
    """What the trained DyLoRA module adds to its layer's output when it runs at sub-rank `rank`."""
    module.train()
    module.sample_rank = lambda: rank  # the rank DyLoRA would otherwise draw at random for this step
    with torch.no_grad():
        return module(x) - module.original_forward(x)


def test_dylora_split_equals_the_module_evaluated_at_that_rank(dylora):
    from lorakit.tools.dylora_split import dylora_unit, truncate_modules

    network, path = dylora
    lora = load_lora(path)
    assert dylora_unit(lora.metadata, str(path)) == 2
    split = truncate_modules(lora.modules, 2)
    linear = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = next(n for n, m in split.items() if m.is_spatial)
    generator = torch.Generator().manual_seed(0)
    for name in (linear, conv, "lora_te_text_model_encoder_layers_0_mlp_fc1"):
        module, factors = network.lora_modules[name], split[name]
        assert factors.rank == 2 and factors.alpha == 3.0  # alpha unchanged: the scale becomes alpha / 2
        delta = factors.delta()
        if delta.dim() == 4:
            x = torch.randn(1, delta.shape[1], 8, 8, generator=generator)
            layer = module.org_module
            expected = torch.nn.functional.conv2d(x, delta, None, layer.stride, layer.padding, layer.dilation)
        else:
            x = torch.randn(3, delta.shape[1], generator=generator)
            expected = x @ delta.T
        assert torch.allclose(_rank_r_output_change(module, x, 2), expected, atol=1e-5), name
        # and at the full rank the file is the ordinary LoRA
        assert torch.allclose(truncate_modules(lora.modules, 4)[name].delta(), lora.modules[name].delta())


def test_dylora_split_refuses_plain_loras_and_untrained_ranks(lora_files, dylora):
    from lorakit.errors import CheckpointError
    from lorakit.tools.dylora_split import check_rank, split_ranks

    with pytest.raises(CheckpointError, match="ss_network_module is networks.lora, not networks.dylora"):
        from lorakit.tools.dylora_split import dylora_unit

        dylora_unit({"ss_network_module": "networks.lora"}, "plain.safetensors")
    with pytest.raises(ConfigError, match="unit=2, so only multiples of 2"):
        check_rank(3, 4, 2, "dy.safetensors")
    with pytest.raises(ConfigError, match="has rank 4; a split can only lower"):
        check_rank(8, 4, 2, "dy.safetensors")
    assert split_ranks(8, 2) == [2, 4, 6] and split_ranks(4, 4) == []


# ---------------------------------------------------------------------------------------------- score recipes


def test_score_recipe_parsing_normalises_weights_and_names_mistakes():
    from lorakit.tools.resize_recipe import parse_recipe

    recipe = parse_recipe("fro_ckpt=1,thr=-3.55")
    assert recipe.weights["fro_ckpt"] == 1.0 and recipe.threshold == -3.55 and recipe.size_mib is None
    assert parse_recipe("fro_ckpt=2,spn_lora,size=3").weights == pytest.approx(
        {"fro_ckpt": 2 / 3, "spn_lora": 1 / 3, "spn_ckpt": 0, "subspace": 0, "fro_lora": 0, "params": 0}
    )
    for text, message in (("fro_ckpt=1", "exactly one of thr"), ("thr=-1", "at least one score key"),
                          ("fro_ckpt=1,thr=x", "thr=x is not a number"), ("frob=1,thr=-1", "unknown or valueless key 'frob=1'"),
                          ("fro_ckpt=1,thr=-1:spn_lora=1,thr=-1", "one recipe per run")):
        with pytest.raises(ConfigError, match=message):
            parse_recipe(text)


def _base_weight(components, name: str) -> torch.Tensor:
    """The base layer of a kohya module name, found through its diffusers path (not through the tools' index)."""
    component, _, path = SD_LAYOUT.kohya_to_path(name).partition(".")
    root = components.denoiser if component == "unet" else components.text_encoders[0]
    path = path if component == "unet" or hasattr(root, "text_model") else path.removeprefix("text_model.")
    return root.get_submodule(path).weight


@pytest.fixture(scope="module")
def spread_lora(tiny, tmp_path_factory):
    """A LoRA whose modules' ΔW sit from far below to far above 10^-3.55 of their base layers' norms."""
    network = random_network(tiny, rank=4, conv_rank=2, seed=3)
    with torch.no_grad():
        for index, module in enumerate(network.lora_modules.values()):
            module.lora_up.weight.mul_(10.0 ** (-2.5 - (index % 7) * 0.35))  # the spread: 2.4 decades
    path = tmp_path_factory.mktemp("spread") / "spread.safetensors"
    save_lora_file(network.state_dict_kohya(), path, {"ss_base_model_version": "sd_v1", "ss_network_dim": "4"})
    return path


def test_fro_ckpt_recipe_keeps_components_above_the_threshold_times_the_base_norm(tiny, spread_lora):
    from lorakit.tools.resize_recipe import parse_recipe, resize_by_recipe

    lora = load_lora(spread_lora)
    index = SD_LAYOUT.module_index(tiny)
    base = {name: index[name].weight for name in lora.modules}
    resized, report, threshold = resize_by_recipe(lora.modules, parse_recipe("fro_ckpt=1,thr=-3.55"), base)
    assert threshold == -3.55
    outcomes = set()
    for name, module in lora.modules.items():
        # independent: the full SVD of ΔW against 10^-3.55 · ‖W_base‖_F
        delta = module.delta().reshape(module.up.shape[0], -1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        limit = 10.0 ** -3.55 * float(_base_weight(tiny, name).detach().float().norm())
        keep = int((s > limit).sum())
        assert report.ranks[name] == (module.rank, keep), name
        outcomes.add("removed" if keep == 0 else "full" if keep == module.rank else "cut")
        if keep == 0:
            assert name not in resized
            continue
        expected = (u[:, :keep] * s[:keep]) @ vh[:keep]
        assert torch.allclose(resized[name].delta().reshape(expected.shape), expected, atol=1e-9, rtol=1e-4), name
        assert resized[name].scale == pytest.approx(module.scale)  # alpha' = scale · r'
    assert outcomes == {"removed", "full", "cut"}  # the file exercises every case


def test_size_recipe_fits_the_budget_and_spn_lora_is_relative_to_the_largest_value(spread_lora):
    from lorakit.tools.resize_recipe import parse_recipe, resize_by_recipe

    lora = load_lora(spread_lora)
    budget_mib = 0.05
    resized, report, threshold = resize_by_recipe(lora.modules, parse_recipe("fro_lora=1,size=0.05"), None, element_size=2)
    used = sum(m.rank * (m.up.shape[0] + m.down[0].numel()) * 2 for m in resized.values())
    assert 0 < used <= budget_mib * 2**20 and math.isfinite(threshold)
    relative, _, _ = resize_by_recipe(lora.modules, parse_recipe("spn_lora=1,thr=-0.5"), None, max_rank=2)
    for name, module in lora.modules.items():
        s = torch.linalg.svdvals(module.delta().reshape(module.up.shape[0], -1))
        assert relative[name].rank == min(2, int((s > s[0] * 10**-0.5).sum())), name


# ---------------------------------------------------------------------------------------------- command line


def test_cli_merge_with_lbws(lora_files, tmp_path, capsys):
    from lorakit.cli.lora import main

    out = tmp_path / "lbw.safetensors"
    weights = "[" + ",".join(map(str, _lbw17(IN01=0))) + "]"
    args = ["merge", "--save_to", str(out), "--models", *map(str, lora_files), "--new_rank", "8", "--lbws", weights, weights]
    assert main(args) == 0
    names = load_lora(out).modules.keys()
    assert names and not any(lbw_slot(n, get_family("sd")) == LBW_SLOTS.index("IN01") for n in names)
    bad = tmp_path / "bad.safetensors"
    assert main(["merge", "--save_to", str(bad), "--models", str(lora_files[0]), "--new_rank", "4", "--lbws", "[1,1,1]"]) == 2
    assert "--lbws" in capsys.readouterr().err and not bad.exists()


def test_cli_dylora_writes_one_rank_or_every_unit(dylora, tmp_path, capsys):
    from lorakit.cli.lora import main
    from lorakit.tools.dylora_split import truncate_modules

    _, path = dylora
    one = tmp_path / "r2.safetensors"
    assert main(["dylora", "--model", str(path), "--save_to", str(one), "--new_rank", "2"]) == 0
    expected = deltas(truncate_modules(load_lora(path).modules, 2))
    written = load_lora(one)
    assert written.metadata["ss_network_dim"] == "2" and written.metadata["ss_training_comment"].startswith("split from DyLoRA")
    assert all(torch.allclose(written.modules[n].delta(), d) for n, d in expected.items())
    assert main(["dylora", "--model", str(path), "--save_to", str(tmp_path / "all.safetensors"), "--unit", "2"]) == 0
    assert sorted(p.name for p in tmp_path.glob("all-*")) == ["all-0002.safetensors"]
    assert main(["dylora", "--model", str(path), "--save_to", str(tmp_path / "x.safetensors"), "--new_rank", "3"]) == 2
    assert "multiples of 2" in capsys.readouterr().err


def test_cli_resize_by_recipe_against_a_base_model_folder(tiny, spread_lora, tmp_path, capsys):
    from lorakit.cli.lora import main
    from lorakit.families.sd.tiny import save_sd_diffusers_folder
    from lorakit.tools.resize_recipe import parse_recipe, resize_by_recipe

    base = tmp_path / "base"
    save_sd_diffusers_folder(tiny, base)
    out = tmp_path / "small.safetensors"
    recipe = "fro_ckpt=1,thr=-3.55"
    assert main(["resize", "--model", str(spread_lora), "--save_to", str(out), "--score_recipes", recipe, "--base_model", str(base)]) == 0
    lora = load_lora(spread_lora)
    index = SD_LAYOUT.module_index(tiny)
    expected, _, _ = resize_by_recipe(lora.modules, parse_recipe(recipe), {n: index[n].weight for n in lora.modules})
    written = load_lora(out)
    assert {n: m.rank for n, m in written.modules.items()} == {n: m.rank for n, m in expected.items()}
    assert written.metadata["ss_network_dim"] == "Dynamic" and recipe in written.metadata["ss_training_comment"]
    missing = tmp_path / "none.safetensors"
    assert main(["resize", "--model", str(spread_lora), "--save_to", str(missing), "--score_recipes", recipe]) == 2
    assert "need --base_model" in capsys.readouterr().err and not missing.exists()


def test_factorise_of_a_wide_matrix_goes_through_its_transpose_exactly():
    from lorakit.tools.svd import factorise

    generator = torch.Generator().manual_seed(7)
    for shape in ((6, 20), (20, 6), (4, 3, 3, 3)):
        delta = torch.randn(*shape, generator=generator)
        matrix = delta.reshape(shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        result = factorise(delta, 3)
        product = result.up.reshape(shape[0], 3) @ result.down.reshape(3, -1)
        assert torch.allclose(product, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5), shape
        assert torch.allclose(result.singular_values, s)
        assert result.down.shape == (3, *shape[1:])


def _real_unet_target_names(family: str) -> list[str]:
    """The kohya names a default (attention-only) LoRA has on the real SD 1.5 / SDXL U-Net (built on meta)."""
    import json as _json
    from importlib import resources

    from diffusers import UNet2DConditionModel

    from lorakit.families.base import Components
    from lorakit.families.registry import get_family

    folder = "sd/configs/sd15" if family == "sd" else "sdxl/configs/sdxl_base"
    config = _json.loads((resources.files("lorakit") / "families" / folder / "unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    options = _Options({}, unet_only=False, dim=4)
    options.network_train_unet_only = True
    comps = Components(denoiser=unet, vae=None, text_encoders=[], tokenizers=[])
    return [t.name for t in targets_of(get_family(family), comps, options)]


@pytest.mark.parametrize("family, length", [("sd", 17), ("sdxl", 12)])
def test_short_lbw_lists_cover_exactly_the_blocks_of_real_attention_loras(family, length):
    slots = {lbw_slot(name, get_family(family)) for name in _real_unet_target_names(family)}
    assert None not in slots
    # the short list is made for default LoRAs: its U-Net entries are exactly the blocks such a LoRA has
    assert slots == set(get_family(family).block_layout.lbw_lengths[length]) - {0}


def _family_lora(family_name: str, root, *, unet_only: bool):
    """A tiny SDXL (SGM file) or FLUX (BFL file) base model and a LoRA on its trainer targets, with ΔW spread
    over two decades. Returns the targets, the base file and the LoRA file."""
    from types import SimpleNamespace

    from lorakit.families.registry import get_family

    if family_name == "sdxl":
        from lorakit.families.sdxl.sgm_keys import save_sdxl_single_file
        from lorakit.families.sdxl.tiny import build_tiny_sdxl

        comps = build_tiny_sdxl(0)
        base = root / "sdxl.safetensors"
        save_sdxl_single_file(comps, base)
    else:
        from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files

        comps = build_tiny_flux(0)
        base = save_bfl_files(comps, root / "flux")["flux1"]
    cfg = SimpleNamespace(network_dim=4, network_alpha=2.0, network_args=None, network_kwargs=dict,
                          network_train_unet_only=unet_only, network_train_text_encoder_only=False)
    targets = targets_of(get_family(family_name), comps, cfg)
    network = LoRANetwork(targets)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for index, module in enumerate(network.lora_modules.values()):
            module.lora_up.weight.normal_(0.0, 10.0 ** (-1.5 - (index % 5) * 0.4), generator=generator)
    lora_path = root / "lora.safetensors"
    save_lora_file(network.state_dict_kohya(), lora_path, {"ss_network_module": "networks.lora"})
    return targets, base, lora_path


@pytest.mark.parametrize("family_name", ["sdxl", "flux"])
def test_cli_recipe_reads_sdxl_and_flux_base_files(family_name, tmp_path):
    """The recipe against an SGM / BFL single file: each module's rank is the count of σ_i(ΔW) above
    10^thr · ‖W‖_F, with W the trainer's own target layer (fused q/k/v rows for FLUX) of the model in memory."""
    from lorakit.cli.lora import main

    targets, base, lora_path = _family_lora(family_name, tmp_path, unet_only=family_name == "flux")
    lora = load_lora(lora_path)
    weights = {t.name: t.module.weight.detach().float() for t in targets}
    ratios = {}
    for name, module in lora.modules.items():
        s = torch.linalg.svdvals(module.delta().reshape(module.up.shape[0], -1))
        ratios[name] = torch.log10(s[: module.rank] / weights[name].norm())
    threshold = float(torch.cat(list(ratios.values())).median()) + 1e-3
    out = tmp_path / "small.safetensors"
    args = ["resize", "--model", str(lora_path), "--save_to", str(out), "--base_model", str(base),
            "--score_recipes", f"fro_ckpt=1,thr={threshold}"]
    assert main(args) == 0
    written = load_lora(out).modules
    expected = {name: int((r > threshold).sum()) for name, r in ratios.items()}
    assert {n: m.rank for n, m in written.items()} == {n: k for n, k in expected.items() if k}
    assert 0 in expected.values() and max(expected.values()) == 4  # some modules dropped, some kept whole


def test_cli_merge_with_sdxl_lbws(tmp_path, capsys):
    from lorakit.cli.lora import main

    _, _, lora_path = _family_lora("sdxl", tmp_path, unet_only=False)
    lora = load_lora(lora_path)
    out = tmp_path / "lbw.safetensors"
    # 12 entries: BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05 — text encoders at 0.5, the middle block off
    weights = "[0.5,1,1,1,1,0,1,1,1,1,1,1]"
    assert main(["merge", "--save_to", str(out), "--models", str(lora_path), "--concat", "--lbws", weights]) == 0
    merged = load_lora(out).modules
    middle = {n for n in lora.modules if n.startswith("lora_unet_middle_block_")}
    assert middle and merged.keys() == lora.modules.keys() - middle
    for name, module in merged.items():
        factor = 0.5 if name.startswith("lora_te") else 1.0
        assert torch.allclose(module.delta(), factor * lora.modules[name].delta(), atol=1e-6), name
    assert main(["merge", "--save_to", str(tmp_path / "x.safetensors"), "--models", str(lora_path), "--concat",
                 "--lbws", "[" + ",".join(["1"] * 17) + "]"]) == 2
    assert "SDXL LoRA takes 12 or 20 entries" in capsys.readouterr().err


def test_cli_merge_into_a_model_with_lbws(tiny, lora_files, tmp_path):
    """Into a base model, BASE at 0 leaves the text encoder untouched while the U-Net blocks get ratio · ΔW."""
    from lorakit.cli.lora import main
    from lorakit.families.sd.tiny import save_sd_diffusers_folder
    from lorakit.tools.models import load_base_model

    base = tmp_path / "base"
    save_sd_diffusers_folder(tiny, base)
    out = tmp_path / "merged"
    weights = "[" + ",".join(map(str, _lbw17(BASE=0))) + "]"
    assert main(["merge", "--sd_model", str(base), "--save_to", str(out), "--models", str(lora_files[0]), "--lbws", weights]) == 0
    before, after = (SD_LAYOUT.module_index(load_base_model(str(p), family="sd")) for p in (base, out))
    lora = load_lora(lora_files[0])
    for name, module in lora.modules.items():
        change = after[name].weight - before[name].weight
        expected = torch.zeros_like(change) if name.startswith("lora_te") else module.delta().reshape(change.shape)
        assert torch.allclose(change, expected, atol=1e-5), name
