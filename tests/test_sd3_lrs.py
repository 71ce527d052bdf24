"""Per-encoder --text_encoder_lr groups (SD3: CLIP-L, CLIP-G, T5; FLUX: CLIP-L, T5) and SD3.5 Medium's
--enable_scaled_pos_embed, against sd-scripts' rules and the scaled sin-cos formula, on tiny real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import optimizer_groups, targets_of, write_dreambooth_folder
from lorakit.adapters.network import LoRANetwork
from lorakit.cli.main import main
from lorakit.config import parse_train_args
from lorakit.errors import ConfigError
from lorakit.families.flux.family import FluxFamily
from lorakit.families.flux.tiny import build_tiny_flux
from lorakit.families.sd3 import pos_embed
from lorakit.families.sd3.family import StableDiffusion3Family, random_position_crop
from lorakit.families.sd3.tiny import build_tiny_sd3, save_sai_file
from lorakit.training import loop as trainer_module


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def config(*extra: str, module: str = "networks.lora_sd3"):
    argv = ["--pretrained_model_name_or_path=x", "--train_data_dir=x", "--output_dir=x", "--resolution=64",
            "--network_dim=4", "--learning_rate=1.0", f"--network_module={module}", *extra]
    cfg, _ = parse_train_args(argv)
    return cfg


@pytest.fixture(scope="module")
def sd35m():
    return build_tiny_sd3(0, "sd3.5m")


@pytest.fixture(scope="module")
def flux():
    return build_tiny_flux(0)


def lrs_by_name(family, comps, cfg) -> tuple[dict[str, float], dict[str, set[str]], LoRANetwork]:
    """{description: lr} and {description: the kohya prefixes of its modules} of the optimizer groups."""
    network = LoRANetwork(targets_of(family, comps, cfg))
    groups, names = optimizer_groups(cfg, network, family)
    owner = {id(p): name for name, module in network.lora_modules.items() for p in module.parameters()}
    prefixes = {desc: {owner[id(p)].split("_")[1] for p in g["params"]} for desc, g in zip(names, groups)}
    assert len(names) == len(set(names))
    return dict(zip(names, (g["lr"] for g in groups))), prefixes, network


T5 = ("--network_args", "train_t5xxl=True")


@pytest.mark.parametrize("values,expected", [
    (["0.1"], (0.1, 0.1, 0.1)),  # one value: all three encoders
    (["0.1", "0.2"], (0.1, 0.2, 0.2)),  # two: [CLIP-L, CLIP-G], T5 at CLIP-G's
    (["0.1", "0.2", "0.3"], (0.1, 0.2, 0.3)),  # three: one each
])
def test_sd3_groups_per_encoder(sd35m, values, expected):
    lrs, prefixes, _ = lrs_by_name(StableDiffusion3Family(), sd35m, config("--text_encoder_lr", *values, *T5))
    assert lrs == {"textencoder1": expected[0], "textencoder2": expected[1], "textencoder3": expected[2], "unet": 1.0}
    assert prefixes == {"textencoder1": {"te1"}, "textencoder2": {"te2"}, "textencoder3": {"te3"}, "unet": {"unet"}}


def test_sd3_groups_defaults_zero_and_loraplus(sd35m):
    family = StableDiffusion3Family()
    # no value: every encoder at --learning_rate; without train_t5xxl there is no T5 group
    lrs, _, _ = lrs_by_name(family, sd35m, config())
    assert lrs == {"textencoder1": 1.0, "textencoder2": 1.0, "unet": 1.0}
    # 0 leaves that encoder untrained (its group is dropped), as the single-LR rule
    lrs, _, _ = lrs_by_name(family, sd35m, config("--text_encoder_lr", "0.1", "0", "0.3", "--unet_lr=0.5", *T5))
    assert lrs == {"textencoder1": 0.1, "textencoder3": 0.3, "unet": 0.5}
    # LoRA+ splits every encoder's group with the text-encoder ratio
    lrs, _, network = lrs_by_name(family, sd35m, config("--text_encoder_lr", "0.1", "0.2", "--network_args",
                                                        "loraplus_lr_ratio=8", "loraplus_text_encoder_lr_ratio=4"))
    assert lrs == pytest.approx({"textencoder1": 0.1, "textencoder1 plus": 0.4, "textencoder2": 0.2,
                                 "textencoder2 plus": 0.8, "unet": 1.0, "unet plus": 8.0})
    groups, names = optimizer_groups(config("--text_encoder_lr", "0.1", "0.2", "--network_args", "loraplus_lr_ratio=8",
                                            "loraplus_text_encoder_lr_ratio=4"), network, family)
    ups = {id(m.lora_up.weight) for m in network.lora_modules.values()}
    for name, group in zip(names, groups):
        assert all((id(p) in ups) == name.endswith("plus") for p in group["params"])
    with pytest.raises(ConfigError, match="at most 3"):
        family.text_encoder_lr_groups(config("--text_encoder_lr", "1", "2", "3", "4"))


@pytest.mark.parametrize("values,expected", [
    (["0.1"], (0.1, 0.1)),  # one value: CLIP-L and T5
    (["0.1", "0.3"], (0.1, 0.3)),  # [CLIP-L, T5]
])
def test_flux_groups_per_encoder(flux, values, expected):
    cfg = config("--text_encoder_lr", *values, *T5, module="networks.lora_flux")
    lrs, prefixes, _ = lrs_by_name(FluxFamily(), flux, cfg)
    assert lrs == {"textencoder1": expected[0], "textencoder3": expected[1], "unet": 1.0}
    assert prefixes == {"textencoder1": {"te1"}, "textencoder3": {"te3"}, "unet": {"unet"}}
    with pytest.raises(ConfigError, match="at most 2"):
        FluxFamily().text_encoder_lr_groups(config("--text_encoder_lr", "1", "2", "3"))


def test_flux_loraplus(flux):
    cfg = config("--text_encoder_lr", "0.1", "0.2", "--network_args", "train_t5xxl=True", "loraplus_lr_ratio=8",
                 "loraplus_text_encoder_lr_ratio=4", "split_qkv=True", module="networks.lora_flux")
    lrs, _, network = lrs_by_name(FluxFamily(), flux, cfg)
    assert lrs == pytest.approx({"textencoder1": 0.1, "textencoder1 plus": 0.4, "textencoder3": 0.2,
                                 "textencoder3 plus": 0.8, "unet": 1.0, "unet plus": 8.0})
    groups, names = optimizer_groups(cfg, network, FluxFamily())
    ups = {id(p) for m in network.lora_modules.values() for p in m.lora_up.parameters()}
    for name, group in zip(names, groups):  # split qkv modules too: every up factor, and only those, train faster
        assert all((id(p) in ups) == name.endswith("plus") for p in group["params"])


def test_network_without_prefix_map_keeps_one_group(sd35m):
    cfg = config("--text_encoder_lr", "0.1", "0.2", "0.3", *T5)
    network = LoRANetwork(targets_of(StableDiffusion3Family(), sd35m, cfg))
    groups, names = optimizer_groups(cfg, network, spec_family=StableDiffusion3Family())  # no LR map: one LR, the first value
    assert names == ["textencoder", "unet"] and [g["lr"] for g in groups] == [0.1, 1.0]
    # modules under no listed prefix stay in the plain group
    groups, names = network.prepare_optimizer_params(0.5, None, 1.0, text_encoder_lrs={"lora_te2": 0.2})
    assert dict(zip(names, (g["lr"] for g in groups))) == {"textencoder2": 0.2, "textencoder": 0.5, "unet": 1.0}


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sd35m_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd35m")
    return save_sai_file(build_tiny_sd3(1, "sd3.5m"), root / "sd3.5_medium.safetensors")


def test_three_lrs_train_through_the_cli(sd35m_file, tmp_path, monkeypatch):
    data = write_dreambooth_folder(tmp_path / "data", count=2, repeats=1)
    seen: dict[str, object] = {}
    real_build = trainer_module.build_optimizer

    def spy_build(cfg, groups):
        seen["groups"] = [(g["lr"], len(g["params"])) for g in groups]
        handle = real_build(cfg, groups)
        seen["optimizer"] = handle.optimizer
        return handle

    from lorakit.training.network_trainable import NetworkTrainable

    real_groups = NetworkTrainable.parameter_groups

    def spy_groups(*args):
        groups, names = real_groups(*args)
        seen["names"] = names
        return groups, names

    monkeypatch.setattr(trainer_module, "build_optimizer", spy_build)
    monkeypatch.setattr(NetworkTrainable, "parameter_groups", spy_groups)
    out = tmp_path / "out"
    args = [
        "train", f"--pretrained_model_name_or_path={sd35m_file}", f"--train_data_dir={data}", "--resolution=64",
        f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora_sd3", "--network_dim=4",
        "--network_alpha=2", "--max_train_steps=2", "--learning_rate=1e-2", "--unet_lr=5e-3", "--seed=1",
        "--max_data_loader_n_workers=0", "--text_encoder_lr", "1e-3", "2e-3", "3e-3", "--network_args",
        "train_t5xxl=True",
    ]
    assert main(args) == 0
    assert seen["names"] == ["textencoder1", "textencoder2", "textencoder3", "unet"]
    assert [lr for lr, _ in seen["groups"]] == [1e-3, 2e-3, 3e-3, 5e-3]
    assert all(count > 0 for _, count in seen["groups"])
    # the constant schedule leaves each group at its own LR through the run
    assert [g["lr"] for g in seen["optimizer"].param_groups] == pytest.approx([1e-3, 2e-3, 3e-3, 5e-3])
    with safe_open(str(out / "tiny.safetensors"), framework="pt") as f:
        ups = {k.split("_")[1]: f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")}
    assert all(ups[p].abs().sum() > 0 for p in ("te1", "te2", "te3", "unet"))  # every group trained


# --------------------------------------------------------------------------------------------- scaled pos embed


def formula_window(dim: int, patched: int, h: int, w: int) -> torch.Tensor:
    """The scaled table's centre h×w window, written out: pos(i) = (i − (G − P)/2)·16/P with G = ⌊1.5P⌋;
    entry (r, c) = [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)], x = pos(left + c), y = pos(top + r)."""
    grid = int(1.5 * patched)
    top, left = (grid - h) // 2, (grid - w) // 2
    omega = torch.tensor([10000 ** (-k / (dim / 4)) for k in range(dim // 4)], dtype=torch.float64)

    def pos(i: int) -> float:
        return (i - (grid - patched) / 2) * 16 / patched

    rows = []
    for r in range(h):
        for c in range(w):
            x, y = pos(left + c) * omega, pos(top + r) * omega
            rows.append(torch.cat([x.sin(), x.cos(), y.sin(), y.cos()]))
    return torch.stack(rows).float().unsqueeze(0)


def test_scaled_embedding_at_two_resolutions_matches_the_formula():
    comps = build_tiny_sd3(2, "sd3.5m")
    transformer, dim = comps.denoiser, 32
    scaled = pos_embed.enable_scaled_pos_embed(transformer, comps.vae, [(64, 64), (128, 128), (128, 128)], "5-medium")
    # 64 px -> 8 latent -> 4 patches (6x6 table); 128 px -> 16 -> 8 patches (12x12 table)
    assert scaled.patched_sizes == [4, 8] and scaled.area_limits == [(40, 4), (144, 8)]
    embed = transformer.pos_embed
    for latent_size, patched in ((8, 4), (16, 8)):
        latent = torch.randn(1, 16, latent_size, latent_size)
        with torch.no_grad():
            tokens = embed(latent)
            patches = embed.proj(latent).flatten(2).transpose(1, 2)
        expected = formula_window(dim, patched, patched, patched)
        assert torch.allclose(tokens - patches, expected, atol=1e-5)
        # the centre window spans the positions 0 … 16 − 16/P at every resolution: its first row starts at 0
        assert torch.allclose(expected[0, 0, : dim // 4], torch.zeros(dim // 4), atol=1e-6)
    # an in-between size uses the table whose area range holds it: 6x6 patches (area 36 <= 40) -> the P=4 table
    assert torch.allclose(scaled.window(12, 12), formula_window(dim, 4, 6, 6), atol=1e-5)
    # 7x7 (area 49 > 40) -> the P=8 table; a 4x12 latent (2x6 patches) keeps the small table
    assert torch.allclose(scaled.window(14, 14), formula_window(dim, 8, 7, 7), atol=1e-5)
    assert torch.allclose(scaled.window(4, 12), formula_window(dim, 4, 2, 6), atol=1e-5)
    # a side beyond the table adds one for P = that side (sd-scripts does the same)
    assert torch.allclose(scaled.window(4, 16), formula_window(dim, 8, 2, 8), atol=1e-5)
    # they differ from the model's fixed table (which the plain path would crop)
    assert not torch.allclose(embed.cropped_pos_embed(8, 8), _fixed_crop(embed, 8, 8), atol=1e-3)


def _fixed_crop(embed, height: int, width: int) -> torch.Tensor:
    return type(embed).cropped_pos_embed(embed, height, width)


def test_random_crop_of_the_scaled_table_and_restore():
    comps = build_tiny_sd3(3, "sd3.5m")
    transformer = comps.denoiser
    pos_embed.enable_scaled_pos_embed(transformer, comps.vae, [(64, 64)], "5-medium")
    installed = transformer.pos_embed.cropped_pos_embed
    table = pos_embed.scaled_sincos_table(32, 6, 4).reshape(6, 6, 32)
    windows = {tuple(table[t:t + 4, l:l + 4].reshape(-1, 32)[0].tolist()): (t, l) for t in range(3) for l in range(3)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        with random_position_crop(transformer, 1.0):
            window = transformer.pos_embed.cropped_pos_embed(8, 8)
        seen.add(windows[tuple(window[0, 0].tolist())])
        assert transformer.pos_embed.cropped_pos_embed is installed  # the centre window is back afterwards
    assert len(seen) > 1


def test_scaled_pos_embed_training_with_two_resolutions(sd35m_file, tmp_path, monkeypatch):
    small = write_dreambooth_folder(tmp_path / "small", count=1, size=64, repeats=1, name="sks small")
    large = write_dreambooth_folder(tmp_path / "large", count=1, size=128, repeats=1, name="sks large")
    toml = tmp_path / "datasets.toml"
    toml.write_text(
        "[general]\ncaption_extension = \".caption\"\n"
        f"[[datasets]]\nresolution = 64\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = '{small / '1_sks small'}'\n"
        f"[[datasets]]\nresolution = 128\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = '{large / '1_sks large'}'\n",
        encoding="utf-8",
    )
    calls: list[tuple[int, int, tuple[int, ...]]] = []
    real_window = pos_embed.ScaledPositionEmbeddings.window

    def spy(self, height, width, **kwargs):
        result = real_window(self, height, width, **kwargs)
        calls.append((height, width, tuple(self.patched_sizes)))
        return result

    monkeypatch.setattr(pos_embed.ScaledPositionEmbeddings, "window", spy)
    out = tmp_path / "out"
    args = [
        "train", f"--pretrained_model_name_or_path={sd35m_file}", f"--dataset_config={toml}", f"--output_dir={out}",
        "--output_name=tiny", "--network_module=networks.lora_sd3", "--network_dim=4", "--network_train_unet_only",
        "--max_train_steps=2", "--learning_rate=1e-2", "--seed=1", "--max_data_loader_n_workers=0",
        "--enable_scaled_pos_embed",
    ]
    assert main(args) == 0
    assert {(h, w) for h, w, _ in calls} == {(8, 8), (16, 16)}  # both resolutions went through the scaled tables
    assert all(sizes == (4, 8) for _, _, sizes in calls)
    with safe_open(str(out / "tiny.safetensors"), framework="pt") as f:
        assert any(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if k.endswith("lora_up.weight"))


def test_latent_sizes_follow_sd_scripts():
    # round(√(w·h)) // 8, distinct, ascending: √(768·1344) = 1015.97 -> 1016 // 8 = 127
    assert pos_embed.latent_sizes([(1024, 1024), (768, 1344), (512, 512), (512, 512)], 8) == [64, 127, 128]
