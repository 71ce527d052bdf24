"""--dim_from_weights (ranks and alphas read from --network_weights) and --base_weights (LoRAs merged into the
base model before training), on a tiny SD 1.x model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import lora_options, targets_of, write_dreambooth_folder
from lorakit.adapters.factory import build_network
from lorakit.cli.main import main
from lorakit.config import parse_train_args
from lorakit.families.registry import get_family
from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder
from lorakit.training.network_files import merge_base_weights, sized_spec
from lorakit.training.preflight import check_run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    comps = build_tiny_sd("sd1", seed=0)
    save_sd_diffusers_folder(comps, root / "model")
    family = get_family("sd")
    targets = targets_of(family, comps, lora_options(conv=True))
    linear = next(t for t in targets if t.component == "unet" and isinstance(t.module, torch.nn.Linear))
    conv = next(t for t in targets if isinstance(t.module, torch.nn.Conv2d) and t.module.kernel_size == (3, 3))
    text = next(t for t in targets if t.component == "text_encoder")
    sizes = {linear.name: (2, 1.0), conv.name: (3, 3.0), text.name: (5, 2.5)}
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for target in (linear, conv, text):
        rank, alpha = sizes[target.name]
        weight = target.module.weight
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank, *([1, 1] if weight.dim() == 4 else []))
        tensors[f"{target.name}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * 0.1
        tensors[f"{target.name}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * 0.1
        tensors[f"{target.name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(root / "lora.safetensors"))
    return {"root": root, "model": root / "model", "lora": root / "lora.safetensors", "sizes": sizes,
            "tensors": tensors, "data": write_dreambooth_folder(root / "data")}


def args(world, out: Path, *extra: str) -> list[str]:
    return [f"--pretrained_model_name_or_path={world['model']}", f"--train_data_dir={world['data']}",
            "--resolution=64", f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora",
            "--max_train_steps=1", "--learning_rate=1e-3", "--seed=1", "--max_data_loader_n_workers=0", *extra]


def test_dim_from_weights_builds_the_files_modules_at_their_sizes(world, tmp_path):
    cfg, _ = parse_train_args(args(world, tmp_path, f"--network_weights={world['lora']}", "--dim_from_weights",
                                   "--network_dim=8", "--network_alpha=8"))
    family = get_family("sd")
    problems: list[str] = []
    spec = sized_spec(cfg, family, check_run(cfg).spec, problems)
    assert problems == [] and dict(spec.module_sizes) == world["sizes"]
    network = build_network(spec, family, build_tiny_sd("sd1", seed=0), "cpu")
    built = {name: (module.rank, float(module.alpha)) for name, module in network.lora_modules.items()}
    assert built == world["sizes"]
    # through the command: the saved file has the same modules, ranks and alphas
    assert main(["train", *args(world, tmp_path / "out", f"--network_weights={world['lora']}", "--dim_from_weights",
                                "--network_dim=8")]) == 0
    saved = load_file(tmp_path / "out" / "tiny.safetensors")
    assert {k for k in saved if k.endswith(".alpha")} == {f"{name}.alpha" for name in world["sizes"]}
    for name, (rank, alpha) in world["sizes"].items():
        assert saved[f"{name}.lora_down.weight"].shape[0] == rank and float(saved[f"{name}.alpha"]) == alpha


def test_dim_from_weights_problems(world, tmp_path):
    for extra, message in [([], "--dim_from_weights reads the ranks from --network_weights"),
                           ([f"--network_weights={tmp_path / 'none.safetensors'}"], "no such file"),
                           ([f"--network_weights={world['lora']}", "--network_module=networks.oft"],
                            "--network_module networks.oft builds other adapters")]:
        cfg, _ = parse_train_args(args(world, tmp_path, "--dim_from_weights", *extra))
        with pytest.raises(Exception, match=message):
            check_run(cfg)


def test_base_weights_are_merged_into_the_model(world, tmp_path):
    cfg, _ = parse_train_args(args(world, tmp_path, f"--base_weights={world['lora']}", "--base_weights_multiplier=0.5"))
    family = get_family("sd")
    comps = build_tiny_sd("sd1", seed=0)
    before = {t.name: t.module.weight.detach().clone() for t in targets_of(family, comps, lora_options(conv=True))}
    merge_base_weights(cfg, family, comps)
    tensors = world["tensors"]
    for target in targets_of(family, comps, lora_options(conv=True)):
        change = target.module.weight.detach() - before[target.name]
        if target.name not in world["sizes"]:
            assert not change.any(), target.name
            continue
        rank, alpha = world["sizes"][target.name]
        up = tensors[f"{target.name}.lora_up.weight"].flatten(1)
        down = tensors[f"{target.name}.lora_down.weight"]
        expected = (0.5 * alpha / rank * up @ down.flatten(1)).reshape(change.shape)
        torch.testing.assert_close(change, expected, rtol=1e-5, atol=1e-6)


def test_base_weights_problems(world, tmp_path):
    cfg, _ = parse_train_args(args(world, tmp_path, f"--base_weights={tmp_path / 'x.safetensors'}"))
    with pytest.raises(Exception, match="--base_weights .*x.safetensors: no such file"):
        check_run(cfg)
    with pytest.raises(Exception, match="needs one value per --base_weights file"):
        parse_train_args(args(world, tmp_path, f"--base_weights={world['lora']}", "--base_weights_multiplier", "1", "2"))
